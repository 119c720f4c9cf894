//! Support for the tests that drive containers through the `cove-shim` binary: the binary
//! itself (built on first use, so a test never runs a stale one), a scratch host (run
//! directory, containers directory, cgroup parent) that removes everything when dropped, and
//! the checks for leftovers: mounts, cgroups, run-directory entries and processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cove_shim::cgroup::CgroupLayout;
use cove_shim::control::StateRecord;

use crate::container::{mounted_under, require_root};

/// The `cove-shim` binary of this build profile, built once per test process (a no-op when
/// it is up to date).
pub fn cove_shim() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let test_binary = std::env::current_exe().expect("the test binary knows its path");
        let profile_dir = test_binary
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut build = Command::new(cargo);
        build.current_dir(crate::repository()).args([
            "build",
            "-p",
            "cove-shim",
            "--bin",
            "cove-shim",
        ]);
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build -p cove-shim failed: {status}"
        );
        let binary = profile_dir.join("cove-shim");
        assert!(
            binary.exists(),
            "{} is missing after the build",
            binary.display()
        );
        binary
    })
}

/// A scratch place for monitors: `<scratch>/run` (run directory), `<scratch>/containers`, and
/// the cgroup parent `cove-test-<pid>-<test>`. Dropping it deletes every container in it
/// (killing what a test left running) and removes the cgroup parent and the scratch directory.
pub struct MonitorHost {
    pub scratch: PathBuf,
    pub run_directory: PathBuf,
    pub containers_directory: PathBuf,
    pub cgroup_parent: String,
}

impl MonitorHost {
    pub fn new(test: &str) -> Self {
        require_root();
        let scratch = crate::scratch_dir(test);
        Self {
            run_directory: scratch.join("run"),
            containers_directory: scratch.join("containers"),
            cgroup_parent: format!("cove-test-{}-{test}", std::process::id()),
            scratch,
        }
    }

    /// `cove-shim COMMAND ARGUMENTS... --run-dir <run dir>` (start also gets the containers
    /// directory and cgroup parent), with stdin from /dev/null.
    pub fn command(&self, command: &str, arguments: &[&str]) -> Command {
        let mut process = Command::new(cove_shim());
        process.arg(command);
        let (before, after) = match arguments.iter().position(|argument| *argument == "--") {
            Some(split) => arguments.split_at(split),
            None => (arguments, &[][..]),
        };
        process.args(before);
        process.arg("--run-dir").arg(&self.run_directory);
        if command == "start" {
            process
                .arg("--containers-dir")
                .arg(&self.containers_directory)
                .args(["--cgroup-parent", &self.cgroup_parent]);
        }
        process.args(after).stdin(Stdio::null());
        process
    }

    /// Runs `cove-shim COMMAND ...` to completion (killed after a minute, which fails the
    /// test).
    pub fn run(&self, command: &str, arguments: &[&str]) -> Output {
        run_with_timeout(self.command(command, arguments), Duration::from_secs(60))
    }

    /// Starts `name` on `image` with `--config` pairs; panics with the error if it fails.
    pub fn start(&self, name: &str, image: &Path, config: &[&str]) -> StateRecord {
        let rootfs = image.to_string_lossy().into_owned();
        let mut arguments = vec!["--name", name, "--rootfs", &rootfs];
        for pair in config {
            arguments.extend(["--config", pair]);
        }
        let output = self.run("start", &arguments);
        assert!(
            output.status.success(),
            "cove-shim start {name} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "start printed no state ({error}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// `cove-shim state NAME`, parsed.
    pub fn state(&self, name: &str) -> StateRecord {
        let output = self.run("state", &[name]);
        assert!(
            output.status.success(),
            "cove-shim state {name} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("state prints a StateRecord")
    }

    /// `state.json` as the monitor wrote it.
    pub fn recorded_state(&self, name: &str) -> StateRecord {
        let path = self.run_directory.join(name).join("state.json");
        let text = std::fs::read(&path)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
        serde_json::from_slice(&text).expect("state.json holds a StateRecord")
    }

    pub fn container_directory(&self, name: &str) -> PathBuf {
        self.containers_directory.join(name)
    }

    /// The container's cgroup directory in every hierarchy.
    pub fn cgroup_directories(&self, name: &str) -> Vec<PathBuf> {
        let layout = CgroupLayout::detect().expect("cgroups");
        layout
            .mounts()
            .map(|mount| mount.join(&self.cgroup_parent).join(name))
            .collect()
    }

    /// Panics naming whatever `name` left behind: a run-directory entry, a container
    /// directory, a cgroup, a mount, or a live monitor or init (by pid and start time from
    /// `record`, if given).
    pub fn assert_nothing_left(&self, name: &str, record: Option<&StateRecord>) {
        let entry = self.run_directory.join(name);
        assert!(!entry.exists(), "{} was left behind", entry.display());
        let directory = self.container_directory(name);
        assert!(
            !directory.exists(),
            "{} was left behind",
            directory.display()
        );
        self.assert_released(name, record);
    }

    /// Like `assert_nothing_left`, for a stopped container whose directory and run-directory
    /// entry rightly stay until `delete`.
    pub fn assert_released(&self, name: &str, record: Option<&StateRecord>) {
        for cgroup in self.cgroup_directories(name) {
            assert!(!cgroup.exists(), "{} was left behind", cgroup.display());
        }
        let directory = self.container_directory(name);
        assert!(
            !mounted_under(&directory),
            "something is still mounted under {}",
            directory.display()
        );
        if let Some(record) = record {
            assert!(
                !process_exists(record.monitor_pid, record.monitor_start_time),
                "the monitor {} still runs",
                record.monitor_pid
            );
            if let (Some(pid), Some(start)) = (record.init_pid, record.init_start_time) {
                assert!(
                    !process_exists(pid, start),
                    "the container's init {pid} still runs"
                );
            }
        }
        let needle = format!("--name\0{name}\0");
        let run_directory = self.run_directory.to_string_lossy().into_owned();
        for process in monitor_command_lines() {
            assert!(
                !(process.contains(&needle) && process.contains(&run_directory)),
                "a cove-shim process for {name} still runs: {}",
                process.replace('\0', " ")
            );
        }
    }
}

impl Drop for MonitorHost {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.run_directory) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let _ = run_with_timeout(
                    self.command("delete", &[&name, "--force"]),
                    Duration::from_secs(30),
                );
            }
        }
        if let Ok(layout) = CgroupLayout::detect() {
            for mount in layout.mounts() {
                let _ = std::fs::remove_dir(mount.join(&self.cgroup_parent));
            }
        }
        if !mounted_under(&self.scratch) {
            let _ = std::fs::remove_dir_all(&self.scratch);
        }
    }
}

/// Runs a command to completion, capturing its output; kills it and panics after `timeout`.
pub fn run_with_timeout(mut command: Command, timeout: Duration) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cove-shim");
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(timeout) {
        Ok(output) => output.expect("wait for cove-shim"),
        Err(_) => {
            // SAFETY: kill(2) on our own child, which has not been reaped (it is still
            // running).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{command:?} did not finish within {timeout:?}");
        }
    }
}

/// True while the process `pid` that started at `start_time` exists and is not a zombie.
pub fn process_exists(pid: u32, start_time: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, fields)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = fields.split_whitespace().collect();
    fields
        .first()
        .is_some_and(|state| *state != "Z" && *state != "X")
        && fields.get(19).and_then(|field| field.parse().ok()) == Some(start_time)
}

/// The command lines (NUL-separated arguments) of every running cove-shim process.
fn monitor_command_lines() -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        if std::fs::read_to_string(path.join("comm")).is_ok_and(|comm| comm.trim() == "cove-shim") {
            if let Ok(line) = std::fs::read(path.join("cmdline")) {
                lines.push(String::from_utf8_lossy(&line).into_owned());
            }
        }
    }
    lines
}

/// Waits until `check` holds, polling; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
