//! Containers under `cove-shim` monitors: one monitor process per container, started by the
//! `cove-shim start` binary (the monitor forks, so it cannot be started from coved's
//! threaded process), then driven over its control socket through the cove-shim library's
//! client. The monitor publishes itself in the run directory (`<run dir>/<name>/state.json`,
//! `control.sock`), which is all coved needs to find its containers again after a restart:
//! coved holds nothing about a running container in memory.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cove_shim::control::{ExecCommand, RecordedStatus};
use cove_shim::monitor::run_directory::is_same_process;
use cove_shim::monitor::{client, MonitorError, RunDirectory};
use cove_shim::Host;

use super::runtime::{
    move_container_directory, ExecSpec, LaunchSpec, Runtime, RuntimeError, RuntimeState,
    RuntimeStatus,
};

/// How often a running exec looks for signals to pass on.
const SIGNAL_POLL_MILLISECONDS: i32 = 50;

#[derive(Debug)]
pub struct ShimRuntime {
    host: Host,
    runs: RunDirectory,
    binary: PathBuf,
}

fn failed(error: MonitorError) -> RuntimeError {
    RuntimeError::Failed(error.to_string())
}

/// The `cove-shim` binary: beside this executable, else on PATH.
fn find_binary() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()?
        .parent()
        .map(|directory| directory.join("cove-shim"));
    if let Some(path) = beside.filter(|path| path.is_file()) {
        return Some(path);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|directory| directory.join("cove-shim"))
            .find(|path| path.is_file())
    })
}

impl ShimRuntime {
    pub fn new(
        host: Host,
        run_directory: PathBuf,
        binary: Option<PathBuf>,
    ) -> Result<Self, RuntimeError> {
        let binary = binary.or_else(find_binary).ok_or_else(|| {
            RuntimeError::Failed(
                "the cove-shim binary was found neither beside coved nor on PATH: build it \
                 (cargo build -p cove-shim) or give --shim PATH"
                    .into(),
            )
        })?;
        if !binary.is_file() {
            return Err(RuntimeError::Failed(format!(
                "the cove-shim binary {} does not exist",
                binary.display()
            )));
        }
        Ok(Self {
            host,
            runs: RunDirectory::new(run_directory),
            binary,
        })
    }

    /// Removes what a stopped container left: its run-directory entry and directory (with
    /// its files).
    fn clear(&self, name: &str, directory: &Path) -> Result<(), RuntimeError> {
        self.forget_run(name)?;
        if directory.exists() {
            let _ = cove_shim::rootfs::unmount_if_mounted(&directory.join(cove_shim::rootfs::ROOT));
            let _ = cove_shim::rootfs::remove_snapshot(directory);
            std::fs::remove_dir_all(directory).map_err(|source| RuntimeError::Io {
                what: format!("cannot remove {}", directory.display()),
                source,
            })?;
        }
        Ok(())
    }

    /// Removes a stopped container's run-directory entry only (an entry without a record, a
    /// killed starter's, included); its directory stays for the next start.
    fn forget_run(&self, name: &str) -> Result<(), RuntimeError> {
        let entry = self.runs.entry(name);
        if entry.exists() && !self.runs.state_file(name).exists() {
            let _ = std::fs::remove_dir_all(&entry);
        }
        Ok(())
    }
}

impl ShimRuntime {
    /// Waits (up to a minute) for `cove-shim start` processes on this run directory that a
    /// killed coved left behind: their containers are not yet recorded, and starting them
    /// again meanwhile would race them.
    fn wait_for_starters(&self) {
        let run = self.runs.root().as_os_str().as_encoded_bytes().to_vec();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let pending = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
                .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
                .any(|line| {
                    let mut arguments = line.split(|byte| *byte == 0);
                    let program = arguments.next().unwrap_or_default();
                    program.ends_with(b"cove-shim")
                        && arguments.next() == Some(b"start".as_slice())
                        && line
                            .split(|byte| *byte == 0)
                            .any(|argument| argument == run.as_slice())
                        // A monitor keeps its starter's command line: only count processes
                        // whose container has no state yet.
                        && !starter_is_monitor(&line, &self.runs)
                });
            if !pending {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// True when the `cove-shim start --name NAME` command line is a running monitor's (its
/// container is recorded), not a starter's.
fn starter_is_monitor(line: &[u8], runs: &RunDirectory) -> bool {
    let arguments: Vec<&[u8]> = line.split(|byte| *byte == 0).collect();
    let name = arguments
        .windows(2)
        .find(|pair| pair[0] == b"--name")
        .map(|pair| String::from_utf8_lossy(pair[1]).into_owned());
    name.is_some_and(|name| runs.read_state(&name).is_ok())
}

/// The cheap answer to "does it run": the record, and whether its monitor or init lives.
fn recorded_status(runs: &RunDirectory, name: &str) -> RuntimeStatus {
    let Ok(record) = runs.read_state(name) else {
        return RuntimeStatus::Stopped;
    };
    if record.status == RecordedStatus::Stopped {
        return RuntimeStatus::Stopped;
    }
    let monitor_alive = is_same_process(record.monitor_pid, record.monitor_start_time);
    let init_alive = match (record.init_pid, record.init_start_time) {
        (Some(pid), Some(start)) => is_same_process(pid, start),
        _ => false,
    };
    match (monitor_alive, init_alive, record.status) {
        (true, _, RecordedStatus::Starting) => RuntimeStatus::Starting,
        (true, _, RecordedStatus::Frozen) => RuntimeStatus::Frozen,
        (true, _, _) | (false, true, _) => RuntimeStatus::Running,
        (false, false, _) => RuntimeStatus::Stopped,
    }
}

fn clean_message(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    text.strip_prefix("cove-shim: error: ")
        .unwrap_or(text)
        .to_string()
}

impl Runtime for ShimRuntime {
    fn start(&self, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        match recorded_status(&self.runs, &spec.name) {
            // The monitor starts a stopped container again on its own files.
            RuntimeStatus::Stopped => self.forget_run(&spec.name)?,
            _ => return Err(RuntimeError::AlreadyRunning(spec.name.clone())),
        }
        let mut command = Command::new(&self.binary);
        command
            .arg("start")
            .arg("--name")
            .arg(&spec.name)
            .arg("--rootfs")
            .arg(&spec.rootfs)
            .arg("--run-dir")
            .arg(self.runs.root())
            .arg("--containers-dir")
            .arg(spec.containers_directory()?)
            .arg("--cgroup-parent")
            .arg(&self.host.cgroup_parent);
        for (key, value) in &spec.keys {
            command.arg("--config").arg(format!("{key}={value}"));
        }
        if let Some(nic) = &spec.nic {
            let name = nic.get("name").map_or("eth0", String::as_str);
            let mut device = name.to_string();
            for (key, value) in nic {
                device.push_str(&format!(",{key}={value}"));
            }
            command.arg("--device").arg(device);
        }
        for (index, disk) in spec.disks.iter().enumerate() {
            let mut device = format!("disk{index}");
            for (key, value) in disk {
                if value.contains(',') {
                    return Err(RuntimeError::Failed(format!(
                        "disk device {key} \"{value}\" holds a comma, which cove-shim's \
                         --device cannot carry: use a path without one"
                    )));
                }
                device.push_str(&format!(",{key}={value}"));
            }
            command.arg("--device").arg(device);
        }
        let output = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| RuntimeError::Io {
                what: format!("cannot run {}", self.binary.display()),
                source,
            })?;
        if !output.status.success() {
            return Err(RuntimeError::Failed(clean_message(&output.stderr)));
        }
        Ok(())
    }

    fn state(&self, name: &str) -> RuntimeState {
        let Ok(record) = client::state(&self.runs, name) else {
            return RuntimeState::stopped();
        };
        let usage = record.usage.unwrap_or_default();
        let status = match record.status {
            RecordedStatus::Stopped => RuntimeStatus::Stopped,
            RecordedStatus::Starting => RuntimeStatus::Starting,
            RecordedStatus::Frozen => RuntimeStatus::Frozen,
            RecordedStatus::Running => RuntimeStatus::Running,
        };
        RuntimeState {
            status,
            init_pid: record.init_pid.filter(|_| status != RuntimeStatus::Stopped),
            memory_bytes: usage.memory_bytes,
            processes: usage.processes,
            cpu_time_ns: usage.cpu_time_ns,
            addresses: record.addresses.unwrap_or_default(),
        }
    }

    fn status(&self, name: &str) -> RuntimeStatus {
        recorded_status(&self.runs, name)
    }

    fn stop(&self, name: &str, timeout: Duration) -> Result<(), RuntimeError> {
        match client::stop(&self.runs, name, timeout) {
            Ok(_) | Err(MonitorError::NotRunning(_)) | Err(MonitorError::NotFound { .. }) => Ok(()),
            Err(error) => Err(failed(error)),
        }
    }

    fn freeze(&self, name: &str) -> Result<(), RuntimeError> {
        client::freeze(&self.runs, name).map_err(failed)
    }

    fn unfreeze(&self, name: &str) -> Result<(), RuntimeError> {
        client::unfreeze(&self.runs, name).map_err(failed)
    }

    fn exec(&self, name: &str, spec: ExecSpec) -> Result<i32, RuntimeError> {
        let command = ExecCommand {
            command: spec.command,
            environment: spec.environment,
            cwd: spec.cwd,
            uid: spec.uid,
            gid: spec.gid,
            // The size is the caller's to set on its terminal; this only asks for the
            // controlling terminal.
            terminal: spec
                .terminal
                .then(|| cove_shim::terminal::size_of(spec.stdin.as_fd()).unwrap_or_default()),
        };
        let stdio = [spec.stdin.as_fd(), spec.stdout.as_fd(), spec.stderr.as_fd()];
        let refused = |error| match error {
            MonitorError::NotFound { .. } | MonitorError::NotRunning(_) => {
                RuntimeError::NotRunning(name.to_string())
            }
            other => failed(other),
        };
        let Some(signals) = spec.signals else {
            return client::exec(&self.runs, name, &command, stdio).map_err(refused);
        };
        let connection = client::start_exec(&self.runs, name, &command, &stdio).map_err(refused)?;
        // Until the monitor answers (the command ended), pass on the signals that come.
        loop {
            let mut poll = libc::pollfd {
                fd: connection.socket().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `poll` is one valid pollfd whose fd the connection keeps open.
            if unsafe { libc::poll(&mut poll, 1, SIGNAL_POLL_MILLISECONDS) } > 0 {
                break;
            }
            while let Ok(signal) = signals.try_recv() {
                // A refused signal (SIGSTOP, say) changes nothing; the command runs on.
                let _ = connection.signal(signal);
            }
        }
        client::finish_exec(connection).map_err(refused)
    }

    fn delete(&self, name: &str, directory: &Path) -> Result<(), RuntimeError> {
        match client::delete(&self.runs, name, false) {
            Ok(()) | Err(MonitorError::NotFound { .. }) => {}
            Err(error) => return Err(failed(error)),
        }
        self.clear(name, directory)
    }

    fn rename(
        &self,
        name: &str,
        new_name: &str,
        directory: &Path,
        new_directory: &Path,
    ) -> Result<(), RuntimeError> {
        if recorded_status(&self.runs, name) != RuntimeStatus::Stopped {
            return Err(RuntimeError::AlreadyRunning(name.to_string()));
        }
        // The old name's run entry goes (its cgroup and mount are released); the directory,
        // with the container's files, moves to the new name.
        match client::delete_record(&self.runs, name) {
            Ok(()) | Err(MonitorError::NotFound { .. }) => {}
            Err(error) => return Err(failed(error)),
        }
        self.forget_run(name)?;
        self.delete(new_name, new_directory)?;
        move_container_directory(directory, new_directory)
    }

    fn running(&self) -> Vec<String> {
        self.wait_for_starters();
        let Ok(entries) = std::fs::read_dir(self.runs.root()) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|entry| entry.path().is_dir())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| recorded_status(&self.runs, name) != RuntimeStatus::Stopped)
            .collect();
        names.sort();
        names
    }
}
