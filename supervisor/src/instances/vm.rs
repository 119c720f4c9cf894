//! Virtual machines under `cove-vmm`: one VMM process per VM, started detached in a session of
//! its own so it outlives coved, and driven through the guest's cove-agent over vsock.
//!
//! A VM's files: its disk in `<pool>/virtual-machines/<name>/root.img` (`vm_disk`), and while
//! it runs its run directory `$COVE_DIR/run/<name>/`: `vmm.json` (cove-vmm's pid and start time,
//! which is how a restarted coved finds it again), `vsock.sock` (the host side of the guest's
//! vsock, where the agent is reached), `control.sock` (cove-vmm's API), `console.log` (the
//! serial console, kept after the VM stops) and `vmm.log` (cove-vmm's own messages). coved
//! holds nothing about a running VM in memory.

use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cove_agent::client::{self, Client, Endpoint};
use cove_agent::protocol::{PowerAction, DEFAULT_ANNOUNCE_PORT, DEFAULT_PORT};
use cove_shim::monitor::run_directory::{is_same_process, process_start_time};
use serde::{Deserialize, Serialize};

use super::runtime::{ExecSpec, LaunchSpec, Runtime, RuntimeError, RuntimeState, RuntimeStatus};
use super::vm_disk;
use super::vm_launch;
use super::vm_network;

/// The guest's vsock CID: each VM has a vsock device of its own, so every one can be 3.
const GUEST_CID: u32 = 3;
/// How long a query of the guest's state may wait for the agent (lists ask for it).
const STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a start checks that cove-vmm still runs while it waits for the agent.
const READY_POLL: Duration = Duration::from_secs(2);

/// Where coved finds what it needs to start VMs.
#[derive(Debug, Clone)]
pub struct VmSettings {
    /// `$COVE_DIR`.
    pub cove_directory: PathBuf,
    /// The `cove-vmm` binary (none found: VMs are refused).
    pub vmm: Option<PathBuf>,
    /// The static cove-agent placed in every VM's disk (none found: VMs are refused).
    pub agent: Option<PathBuf>,
    /// The guest kernel; the newest cached build of the host's flavour when `None`.
    pub kernel: Option<PathBuf>,
    /// How long a start waits for the agent to announce itself.
    pub ready_timeout: Duration,
}

/// What identifies a running cove-vmm.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct VmmRecord {
    pid: u32,
    start_time: u64,
}

#[derive(Debug)]
pub struct VmRuntime {
    settings: VmSettings,
    machines: PathBuf,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

fn failed(error: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Failed(error.to_string())
}

/// The last `lines` lines of a file, for an error message.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Finds a binary beside coved, else on PATH.
pub fn find_beside_or_on_path(name: &str) -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()?
        .parent()
        .map(|directory| directory.join(name));
    if let Some(path) = beside.filter(|path| path.is_file()) {
        return Some(path);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|directory| directory.join(name))
            .find(|path| path.is_file())
    })
}

/// The static agent that `guest-agent/build` makes (`<target>/agent/<triple>/release`), seen
/// from coved's own target directory.
pub fn find_static_agent() -> Option<PathBuf> {
    let executable = std::env::current_exe().ok()?;
    let target = executable.parent()?.parent()?;
    let built = target
        .join("agent")
        .join("x86_64-unknown-linux-gnu")
        .join("release")
        .join("cove-agent");
    built.is_file().then_some(built)
}

impl VmRuntime {
    pub fn new(settings: VmSettings) -> Self {
        let machines = vm_disk::machines_directory(&settings.cove_directory);
        Self { settings, machines }
    }

    /// Refuses VMs when cove-vmm or the static agent is missing.
    pub fn check_tools(&self) -> Result<(&Path, &Path), RuntimeError> {
        let vmm = self.settings.vmm.as_deref().filter(|path| path.is_file());
        let vmm = vmm.ok_or_else(|| {
            RuntimeError::Failed(
                "cove-vmm was found neither beside coved nor on PATH: build it (cargo build -p \
                 cove-vmm) or give coved --vmm PATH"
                    .into(),
            )
        })?;
        let agent = self.settings.agent.as_deref().filter(|path| path.is_file());
        let agent = agent.ok_or_else(|| {
            RuntimeError::Failed(
                "no static cove-agent for the VMs' disks: build it with guest-agent/build and \
                 give coved --vm-agent PATH"
                    .into(),
            )
        })?;
        Ok((vmm, agent))
    }

    /// A VM's directory (its disk) on the pool.
    pub fn machine_directory(&self, name: &str) -> PathBuf {
        self.machines.join(name)
    }

    fn run_entry(&self, name: &str) -> PathBuf {
        self.settings.cove_directory.join("run").join(name)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.run_entry(name).join("vmm.json")
    }

    fn vsock_socket(&self, name: &str) -> PathBuf {
        self.run_entry(name).join("vsock.sock")
    }

    fn control_socket(&self, name: &str) -> PathBuf {
        self.run_entry(name).join("control.sock")
    }

    /// Present while coved has the VM paused (freeze).
    fn paused_marker(&self, name: &str) -> PathBuf {
        self.run_entry(name).join("paused")
    }

    /// `PUT /api/v1/<action>` on cove-vmm's API socket (`vm.pause`, `vm.resume`).
    fn control(&self, name: &str, action: &str) -> Result<(), RuntimeError> {
        use std::io::{Read, Write};
        let socket = self.control_socket(name);
        let mut stream = std::os::unix::net::UnixStream::connect(&socket)
            .map_err(io(format!("reach cove-vmm at {}", socket.display())))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io("set a timeout on cove-vmm's socket"))?;
        let request = format!(
            "PUT /api/v1/{action} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .map_err(io(format!("send {action} to cove-vmm")))?;
        let mut answer = Vec::new();
        let _ = stream.take(64 << 10).read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        let status = answer.split_whitespace().nth(1).unwrap_or_default();
        match status {
            "204" | "200" => Ok(()),
            _ => Err(RuntimeError::Failed(format!(
                "cove-vmm refused {action} for \"{name}\": {}",
                answer.lines().last().unwrap_or_default()
            ))),
        }
    }

    /// cove-vmm's serial input socket: what a client writes there is typed into the console.
    pub fn console_input(&self, name: &str) -> PathBuf {
        self.run_entry(name).join("console.sock")
    }

    /// The serial console's log; it stays after the VM stopped, until the next start.
    pub fn console_path(&self, name: &str) -> PathBuf {
        self.run_entry(name).join("console.log")
    }

    /// True when `name` is a VM: its directory exists (made before its row is committed).
    pub fn owns(&self, name: &str) -> bool {
        self.machine_directory(name).is_dir() || self.record_path(name).is_file()
    }

    /// Makes the VM's directory, the mark that `name` is a VM, before its row is committed.
    pub fn reserve(&self, name: &str) -> Result<(), RuntimeError> {
        let directory = self.machine_directory(name);
        std::fs::create_dir_all(&directory).map_err(io(format!("create {}", directory.display())))
    }

    /// Gives the VM its disk (building the image's VM disk first if it is not cached).
    pub fn prepare_disk(&self, name: &str, rootfs: &Path) -> Result<(), RuntimeError> {
        let directory = self.machine_directory(name);
        if vm_disk::root_disk(&directory).is_file() {
            return Ok(());
        }
        let (_, agent) = self.check_tools()?;
        self.reserve(name)?;
        let image = vm_disk::ensure_image_disk(rootfs, agent).map_err(failed)?;
        vm_disk::clone_disk(&image, &directory).map_err(failed)?;
        Ok(())
    }

    fn read_record(&self, name: &str) -> Option<VmmRecord> {
        let text = std::fs::read_to_string(self.record_path(name)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// cove-vmm's pid while it runs.
    fn live_vmm(&self, name: &str) -> Option<u32> {
        self.read_record(name)
            .filter(|record| is_same_process(record.pid, record.start_time))
            .map(|record| record.pid)
    }

    /// The agent of a running VM.
    pub fn agent(&self, name: &str) -> Option<Client> {
        self.live_vmm(name)?;
        Some(Client::new(Endpoint::Vsock {
            socket: self.vsock_socket(name),
            port: DEFAULT_PORT,
        }))
    }

    /// Removes what a VM's run leaves (its record, sockets and tap), keeping the console log.
    fn clear_run(&self, name: &str) {
        let entry = self.run_entry(name);
        for file in [
            "vmm.json",
            "vsock.sock",
            "control.sock",
            "console.sock",
            "paused",
        ] {
            let _ = std::fs::remove_file(entry.join(file));
        }
        let _ = std::fs::remove_file(client::announce_path(
            &self.vsock_socket(name),
            DEFAULT_ANNOUNCE_PORT,
        ));
        vm_network::remove_tap(name);
    }

    /// Kills cove-vmm and waits for it to go.
    fn kill(&self, name: &str) {
        if let Some(pid) = self.live_vmm(name) {
            // SAFETY: kill(2) takes no pointers; the pid was checked to be this VM's cove-vmm
            // (same start time) just now.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.live_vmm(name).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn vmm_command(
        &self,
        vmm: &Path,
        name: &str,
        shape: &vm_launch::MachineShape,
        kernel: &Path,
        tap: Option<(String, String)>,
    ) -> Command {
        let mut command = Command::new(vmm);
        let disk = vm_disk::root_disk(&self.machine_directory(name));
        command
            .arg("--kernel")
            .arg(kernel)
            .arg("--cpus")
            .arg(format!("boot={}", shape.cpus))
            .arg("--memory")
            .arg(format!("size={}", shape.memory_bytes))
            .arg("--disk")
            .arg(format!("path={},id=root", disk.display()))
            .arg("--vsock")
            .arg(format!(
                "cid={GUEST_CID},socket={}",
                self.vsock_socket(name).display()
            ))
            .arg("--serial")
            .arg(format!("file={}", self.console_path(name).display()))
            .arg("--serial-input")
            .arg(self.console_input(name))
            .arg("--api-socket")
            .arg(self.control_socket(name))
            .arg("--cmdline")
            .arg(format!(
                "console=ttyS0 reboot=k panic=-1 rodata=off root=/dev/vda rw init={}",
                vm_disk::GUEST_INIT
            ));
        if let Some((tap, mac)) = tap {
            command.arg("--net").arg(format!("tap={tap},mac={mac}"));
        }
        command
    }

    /// Starts the VM; a failure leaves no process, tap or socket behind (the console log
    /// stays, to say what happened).
    fn boot(&self, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        self.try_boot(spec).inspect_err(|_| {
            self.kill(&spec.name);
            self.clear_run(&spec.name);
        })
    }

    /// Starts cove-vmm (making the VM's disk first if needed), and waits for its agent.
    fn try_boot(&self, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        let name = &spec.name;
        let (vmm, _) = self.check_tools()?;
        let shape = vm_launch::admit(&spec.keys).map_err(failed)?;
        let kernel =
            vm_launch::find_kernel(self.settings.kernel.as_deref(), shape.host).map_err(failed)?;
        self.prepare_disk(name, &spec.rootfs)?;
        let entry = self.run_entry(name);
        std::fs::create_dir_all(&entry).map_err(io(format!("create {}", entry.display())))?;
        self.clear_run(name);
        let announce = client::announce_path(&self.vsock_socket(name), DEFAULT_ANNOUNCE_PORT);
        let listener = UnixListener::bind(&announce)
            .map_err(io(format!("listen on {}", announce.display())))?;
        let tap = match &spec.nic {
            Some(nic) => Some(vm_network::create_tap(name, nic).map_err(failed)?),
            None => None,
        };
        let log_path = entry.join("vmm.log");
        let log = std::fs::File::create(&log_path)
            .map_err(io(format!("create {}", log_path.display())))?;
        let log_copy = log.try_clone().map_err(io("duplicate the log"))?;
        let mut command = self.vmm_command(vmm, name, &shape, &kernel, tap);
        command.stdin(Stdio::null()).stdout(log_copy).stderr(log);
        // SAFETY: setsid() is async-signal-safe and touches no memory of the parent; it puts
        // cove-vmm in a session of its own, so no signal meant for coved's group reaches it.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(io(format!("start {}", vmm.display())))?;
        let pid = child.id();
        let record = VmmRecord {
            pid,
            start_time: process_start_time(pid).unwrap_or_default(),
        };
        let written = serde_json::to_vec(&record)
            .map_err(failed)
            .and_then(|bytes| {
                std::fs::write(self.record_path(name), bytes).map_err(io("record cove-vmm's pid"))
            });
        let ready = written.and_then(|()| {
            self.wait_for_agent(name, &listener).map_err(|reason| {
                RuntimeError::Failed(format!(
                    "the VM \"{name}\" did not start: {reason}\ncove-vmm: {}\nconsole: {}",
                    tail(&log_path, 5),
                    tail(&self.console_path(name), 10)
                ))
            })
        });
        if ready.is_err() {
            // Not reaped yet, so the pid is still this child's, record or not.
            let _ = child.kill();
            let _ = child.wait();
            return ready;
        }
        // coved reaps its own child; after a restart of coved, init does.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
    }

    fn wait_for_agent(&self, name: &str, listener: &UnixListener) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + self.settings.ready_timeout;
        loop {
            let mut poll = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd that outlives the call.
            let ready = unsafe { libc::poll(&mut poll, 1, READY_POLL.as_millis() as i32) } > 0;
            if ready {
                // The announcement is on its way: read it with all the time that is left (a
                // guest under emulation writes it slowly).
                let left = deadline.saturating_duration_since(Instant::now());
                return client::wait_ready(listener, left.max(READY_POLL))
                    .map(drop)
                    .map_err(|error| format!("the agent's announcement failed: {error}"));
            }
            if self.live_vmm(name).is_none() {
                return Err("cove-vmm exited before the agent was ready".into());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the agent did not announce itself within {:?}",
                    self.settings.ready_timeout
                ));
            }
        }
    }

    fn guest_state(&self, name: &str) -> Option<cove_agent::protocol::GuestState> {
        self.agent(name)?
            .with_connect_timeout(STATE_TIMEOUT)
            .state()
            .ok()
    }
}

fn addresses(state: &cove_agent::protocol::GuestState) -> Vec<cove_shim::InterfaceAddress> {
    let mut found = Vec::new();
    for interface in &state.interfaces {
        for address in &interface.addresses {
            let family = match address.family.as_str() {
                "inet" => cove_shim::AddressFamily::Inet,
                "inet6" => cove_shim::AddressFamily::Inet6,
                _ => continue,
            };
            let Ok(parsed) = address.address.parse() else {
                continue;
            };
            found.push(cove_shim::InterfaceAddress {
                interface: interface.name.clone(),
                family,
                address: parsed,
                prefix: address.prefix_length,
            });
        }
    }
    found
}

impl Runtime for VmRuntime {
    fn start(&self, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        if self.live_vmm(&spec.name).is_some() {
            return Err(RuntimeError::AlreadyRunning(spec.name.clone()));
        }
        if let Some(disk) = spec.disks.first() {
            return Err(RuntimeError::Failed(format!(
                "virtual machine \"{}\" has a disk device at {}: disks other than the root are \
                 not supported on virtual machines yet; remove the device",
                spec.name,
                disk.get("path").map(String::as_str).unwrap_or("?")
            )));
        }
        self.boot(spec)
    }

    fn state(&self, name: &str) -> RuntimeState {
        let Some(pid) = self.live_vmm(name) else {
            return RuntimeState::stopped();
        };
        let status = self.status(name);
        // A paused guest's agent cannot answer.
        let guest = match status {
            RuntimeStatus::Running => self.guest_state(name),
            _ => None,
        };
        RuntimeState {
            status,
            init_pid: Some(pid),
            memory_bytes: guest.as_ref().map(|state| state.memory.used_bytes),
            processes: guest.as_ref().map(|state| u64::from(state.processes)),
            cpu_time_ns: None,
            addresses: guest.as_ref().map(addresses).unwrap_or_default(),
        }
    }

    fn status(&self, name: &str) -> RuntimeStatus {
        match self.live_vmm(name) {
            Some(_) if self.paused_marker(name).exists() => RuntimeStatus::Frozen,
            Some(_) => RuntimeStatus::Running,
            None => RuntimeStatus::Stopped,
        }
    }

    fn stop(&self, name: &str, timeout: Duration) -> Result<(), RuntimeError> {
        if self.live_vmm(name).is_none() {
            self.clear_run(name);
            return Ok(());
        }
        if self.paused_marker(name).exists() {
            // A paused guest can neither shut down nor be asked to.
            let _ = self.control(name, "vm.resume");
            let _ = std::fs::remove_file(self.paused_marker(name));
        }
        if !timeout.is_zero() {
            // A reboot, not a power-off: the project kernel has no ACPI, so a power-off would
            // only halt the vCPUs, while cove-vmm ends the VM when the guest resets.
            let grace = timeout.as_secs().clamp(1, 60) as u32;
            let asked = self
                .agent(name)
                .map(|agent| agent.with_connect_timeout(timeout.min(Duration::from_secs(30))))
                .map(|agent| agent.shutdown(PowerAction::Reboot, Some(grace)));
            if let Some(Ok(())) = asked {
                let deadline = Instant::now() + timeout;
                while self.live_vmm(name).is_some() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        self.kill(name);
        self.clear_run(name);
        Ok(())
    }

    fn freeze(&self, name: &str) -> Result<(), RuntimeError> {
        if self.live_vmm(name).is_none() {
            return Err(RuntimeError::NotRunning(name.to_string()));
        }
        self.control(name, "vm.pause")?;
        std::fs::write(self.paused_marker(name), b"")
            .map_err(io(format!("record that \"{name}\" is paused")))
    }

    fn unfreeze(&self, name: &str) -> Result<(), RuntimeError> {
        if self.live_vmm(name).is_none() {
            return Err(RuntimeError::NotRunning(name.to_string()));
        }
        self.control(name, "vm.resume")?;
        let _ = std::fs::remove_file(self.paused_marker(name));
        Ok(())
    }

    fn exec(&self, name: &str, spec: ExecSpec) -> Result<i32, RuntimeError> {
        let agent = self
            .agent(name)
            .ok_or_else(|| RuntimeError::NotRunning(name.to_string()))?;
        super::vm_exec::run(&agent, spec)
    }

    fn delete(&self, name: &str, directory: &Path) -> Result<(), RuntimeError> {
        if self.live_vmm(name).is_some() {
            return Err(RuntimeError::AlreadyRunning(name.to_string()));
        }
        self.clear_run(name);
        for directory in [self.run_entry(name), directory.to_path_buf()] {
            if directory.exists() {
                std::fs::remove_dir_all(&directory)
                    .map_err(io(format!("remove {}", directory.display())))?;
            }
        }
        Ok(())
    }

    fn rename(
        &self,
        name: &str,
        new_name: &str,
        directory: &Path,
        new_directory: &Path,
    ) -> Result<(), RuntimeError> {
        if self.live_vmm(name).is_some() {
            return Err(RuntimeError::AlreadyRunning(name.to_string()));
        }
        self.delete(new_name, new_directory)?;
        for (from, to) in [
            (directory.to_path_buf(), new_directory.to_path_buf()),
            (self.run_entry(name), self.run_entry(new_name)),
        ] {
            if from.exists() {
                std::fs::rename(&from, &to).map_err(io(format!(
                    "move {} to {}",
                    from.display(),
                    to.display()
                )))?;
            }
        }
        Ok(())
    }

    /// A VM's console log is in its run directory (cove-vmm writes it there); `directory`
    /// is the VM's directory on its pool, named after it.
    fn console_log(&self, directory: &Path) -> PathBuf {
        let name = directory
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.console_path(&name)
    }

    fn running(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.settings.cove_directory.join("run")) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| self.live_vmm(name).is_some())
            .collect();
        names.sort();
        names
    }
}
