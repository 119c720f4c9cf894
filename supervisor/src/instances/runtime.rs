//! The instance layer's interface to whatever runs containers: start, state, stop, freeze,
//! exec with the caller's file descriptors, delete. coved's routes only see this trait.
//!
//! Two implementations: `ShimRuntime` (`shim.rs`) starts one `cove-shim`
//! monitor process per container and talks to it over its control socket, so containers
//! outlive coved and are found again from the run directory; and
//! [`crate::instances::library::LibraryRuntime`], which runs containers inside coved's own
//! process through the cove-shim library (for development and tests where the monitor binary
//! is missing: its containers do not survive a restart of coved).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// What a container is doing, as its monitor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeStatus {
    /// No monitor, or the monitor says init has exited.
    Stopped,
    Starting,
    Running,
    Frozen,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeState {
    pub status: RuntimeStatus,
    pub init_pid: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub processes: Option<u64>,
    pub cpu_time_ns: Option<u64>,
    /// The addresses inside the container's network namespace while it runs.
    pub addresses: Vec<cove_shim::InterfaceAddress>,
}

impl RuntimeState {
    pub fn stopped() -> Self {
        Self {
            status: RuntimeStatus::Stopped,
            init_pid: None,
            memory_bytes: None,
            processes: None,
            cpu_time_ns: None,
            addresses: Vec::new(),
        }
    }
}

/// Everything a runtime needs to start a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    pub name: String,
    /// The instance's directory on its storage pool (`<pool>/containers/<name>`): its
    /// snapshot and console log live there.
    pub directory: PathBuf,
    /// The unpacked image the container runs a snapshot of.
    pub rootfs: PathBuf,
    /// The keys the container core understands (`limits.*`, `security.privileged`,
    /// `security.nesting`, `security.idmap.*`, `security.syscalls.*`, `user.hostname`),
    /// already validated.
    pub keys: BTreeMap<String, String>,
    /// The bridged nic, as an LXD nic device's keys (`nictype`, `parent`, `name`, `hwaddr`,
    /// ...), already validated.
    pub nic: Option<BTreeMap<String, String>>,
    /// Disk devices as the container core takes them (`type=disk`, `source` a host path,
    /// `path`, `readonly`), storage volumes already resolved to their directories.
    pub disks: Vec<BTreeMap<String, String>>,
}

impl LaunchSpec {
    /// The directory holding the instance's directory (the container core's containers
    /// directory); refuses a directory not named after the instance.
    pub fn containers_directory(&self) -> Result<&Path, RuntimeError> {
        match (self.directory.parent(), self.directory.file_name()) {
            (Some(parent), Some(last)) if last == self.name.as_str() => Ok(parent),
            _ => Err(RuntimeError::Failed(format!(
                "the directory {} of instance \"{}\" is not named after it",
                self.directory.display(),
                self.name
            ))),
        }
    }
}

/// A command to run in a running container, with the three file descriptors it gets as its
/// stdin, stdout and stderr (pipes, or one terminal three times).
#[derive(Debug)]
pub struct ExecSpec {
    pub command: Vec<String>,
    pub environment: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The three fds are one terminal, which the command takes as its controlling terminal in
    /// a session of its own (so that the terminal's hangup and signals reach it).
    pub terminal: bool,
    /// Signals for the command while it runs (LXD's exec control `signal` messages); `None`
    /// when nobody can send any.
    pub signals: Option<Receiver<i32>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("instance \"{0}\" is not running: start it first")]
    NotRunning(String),
    #[error("instance \"{0}\" is already running")]
    AlreadyRunning(String),
    #[error("{0}")]
    Failed(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs containers. Every method blocks (call it from `spawn_blocking`).
pub trait Runtime: Send + Sync + 'static {
    /// Starts the container; returns once its init runs.
    fn start(&self, spec: &LaunchSpec) -> Result<(), RuntimeError>;

    /// The container's state now, with its usage; `Stopped` for a container the runtime does
    /// not know.
    fn state(&self, name: &str) -> RuntimeState;

    /// Only the status, which may be cheaper than the whole state (lists ask for it).
    fn status(&self, name: &str) -> RuntimeStatus {
        self.state(name).status
    }

    /// Halts init (killing it after `timeout`) and releases the container's mount and cgroup.
    fn stop(&self, name: &str, timeout: Duration) -> Result<(), RuntimeError>;

    fn freeze(&self, name: &str) -> Result<(), RuntimeError>;

    fn unfreeze(&self, name: &str) -> Result<(), RuntimeError>;

    /// Runs a command to its end with `spec`'s fds; returns its exit code (128 + signal).
    fn exec(&self, name: &str, spec: ExecSpec) -> Result<i32, RuntimeError>;

    /// Removes everything the runtime keeps for a stopped container, its directory
    /// (`Daemon::instance_directory`) included.
    fn delete(&self, name: &str, directory: &Path) -> Result<(), RuntimeError>;

    /// Moves what the runtime keeps for a stopped container to a new name, its directory
    /// from `directory` to `new_directory` (on the same pool).
    fn rename(
        &self,
        name: &str,
        new_name: &str,
        directory: &Path,
        new_directory: &Path,
    ) -> Result<(), RuntimeError>;

    /// The container's root as mounted on the host, while it runs, given its directory.
    fn root(&self, directory: &Path) -> PathBuf {
        directory.join(cove_shim::rootfs::ROOT)
    }

    /// The console log, which stays after the container stopped, given its directory.
    fn console_log(&self, directory: &Path) -> PathBuf {
        directory.join(cove_shim::container::CONSOLE_LOG)
    }

    /// The containers this runtime finds running (from its run directory), at coved's start.
    fn running(&self) -> Vec<String>;

    /// The guest agent of a running VM (files go through it); `None` for a container.
    fn guest_agent(&self, _name: &str) -> Option<cove_agent::client::Client> {
        None
    }

    /// True when `name` is a virtual machine.
    fn is_virtual_machine(&self, _name: &str) -> bool {
        false
    }

    /// The VM runtime, where this runtime runs VMs.
    fn virtual_machines(&self) -> Option<&crate::instances::vm::VmRuntime> {
        None
    }
}

/// Moves a stopped container's directory, with its files, to its new name's (the caller has
/// removed whatever held the new name).
pub fn move_container_directory(from: &Path, to: &Path) -> Result<(), RuntimeError> {
    if from.exists() {
        std::fs::rename(from, to).map_err(|source| RuntimeError::Io {
            what: format!("cannot move {} to {}", from.display(), to.display()),
            source,
        })?;
    }
    Ok(())
}
