//! One system container's life: start (snapshot, cgroup, console, namespaces, init as PID 1),
//! state, stop and delete. The order of setup is visible in [`Container::start`].
//!
//! The process that starts a container is its init's parent and must reap it; that is the job
//! of the per-container monitor (a later `cove-shim` binary). A failed start undoes everything
//! it did: no mount, cgroup, directory or process is left behind.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cgroup::{Cgroup, CgroupError, CgroupLayout};
use crate::config::{ConfigError, ContainerConfig, InitSystem, Network};
use crate::confinement::Confinement;
use crate::console::{Console, ConsoleError, ConsoleLogger};
use crate::filesystem::FilesystemPlan;
use crate::idmap::{IdMap, IdMapError};
use crate::init::InitProgram;
use crate::kernel;
use crate::network::{self, HostInterface, InterfaceAddress, NetworkError, NicPlan};
use crate::rootfs::{self, RootfsError, Snapshot};
use crate::seccomp::SeccompError;

/// The tty group inside the container (Debian's and busybox's `tty` is gid 5).
pub(crate) const TTY_GROUP: u32 = 5;
/// The console's log of the current boot, in the container's directory.
pub const CONSOLE_LOG: &str = "console.log";
/// The previous boot's console log.
pub const PREVIOUS_CONSOLE_LOG: &str = "console.log.1";
/// How long removing a cgroup waits for the processes of a stopped container to be gone.
const CGROUP_PATIENCE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("containers need root: run as root (uid 0)")]
    NotRoot,
    #[error("container \"{0}\" already exists: choose another name or delete it first")]
    NameTaken(String),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("cannot create the container directory {path}: {source}")]
    Directory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    IdMap(#[from] IdMapError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error("cannot start the container's init process ({step}): {source}")]
    Spawn {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("container \"{name}\" failed to start: cannot {step}: {source}")]
    Setup {
        name: String,
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot signal the init of container \"{name}\": {source}")]
    Signal {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the container directory {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where containers live on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Each container gets `<containers_directory>/<name>/`.
    pub containers_directory: PathBuf,
    /// Each container's cgroup is `<cgroup_parent>/<name>` in every hierarchy.
    pub cgroup_parent: String,
}

impl Default for Host {
    fn default() -> Self {
        Self {
            containers_directory: PathBuf::from("/var/lib/cove/containers"),
            cgroup_parent: "cove".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    /// Running, but every process is frozen by the cgroup freezer (`Container::freeze`).
    Frozen,
    Stopped,
}

/// What `state()` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    pub status: Status,
    /// The init's pid on the host while it runs.
    pub init_pid: Option<u32>,
    /// Memory charged to the container's cgroup, in bytes.
    pub memory_bytes: Option<u64>,
    /// Tasks in the container's cgroup.
    pub processes: Option<u64>,
    /// CPU time used by the container's processes so far.
    pub cpu_time: Option<Duration>,
    /// The init's exit code (128 + signal when killed) once it stopped.
    pub exit_code: Option<i32>,
    /// The addresses inside the container's network namespace while it runs (`lo`'s
    /// included), read over rtnetlink from there; empty when stopped or unreadable.
    pub addresses: Vec<InterfaceAddress>,
}

/// How `stop()` ended the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOutcome {
    /// True when init shut down on its halt signal before the timeout; false when it was
    /// killed or had already stopped.
    pub clean: bool,
    pub exit_code: i32,
}

/// A started system container.
#[derive(Debug)]
pub struct Container {
    name: String,
    directory: PathBuf,
    snapshot: Snapshot,
    cgroup: Cgroup,
    id_map: Option<IdMap>,
    init_system: InitSystem,
    init_pid: libc::pid_t,
    init_pidfd: OwnedFd,
    exit_code: Option<i32>,
    console_controller: OwnedFd,
    console_logger: Option<ConsoleLogger>,
    /// What confines init, and every command `exec` starts.
    confinement: Confinement,
    /// The host end of the bridged nic's veth pair.
    host_interface: Option<HostInterface>,
}

/// Undoes a half-done start when dropped before `disarm`.
struct StartGuard {
    directory: Option<PathBuf>,
    cgroup: Option<Cgroup>,
    snapshot_root: Option<PathBuf>,
    child: Option<libc::pid_t>,
    host_interface: Option<HostInterface>,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.child {
            // SAFETY: kill(2) on our own unreaped child, which cannot be recycled yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = kernel::wait_for_exit(pid);
        }
        if let Some(interface) = &self.host_interface {
            let _ = interface.remove();
        }
        if let Some(cgroup) = &self.cgroup {
            let _ = cgroup.remove(CGROUP_PATIENCE);
        }
        if let Some(root) = &self.snapshot_root {
            let _ = rootfs::unmount_if_mounted(root);
        }
        if let Some(directory) = &self.directory {
            let _ = rootfs::remove_snapshot(directory);
            let _ = std::fs::remove_dir_all(directory);
        }
    }
}

impl Container {
    /// Creates and starts the container described by `config`, returning once its init runs.
    /// A stopped container's directory (from an earlier start, with its `snapshot.json`) is
    /// started again with the files it had; the first start makes it, `delete` removes it.
    pub fn start(config: &ContainerConfig, host: &Host) -> Result<Self, ContainerError> {
        config.validate()?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(ContainerError::NotRoot);
        }
        let confinement = Confinement::for_config(config)?;
        // The bridge is looked up (in the calling thread's network namespace) before anything
        // is created.
        let nic_plan = match &config.network {
            Network::None => None,
            Network::Bridged(nic) => Some(NicPlan::prepare(nic)?),
        };
        let id_map = match (config.privileged, config.id_map) {
            (true, _) => None,
            (false, Some(map)) => Some(map),
            (false, None) => Some(IdMap::for_host()?),
        };
        let (root_uid, root_gid) =
            id_map.map_or((0, 0), |map| (map.uid.host_base, map.gid.host_base));
        let init_system = match config.init {
            InitSystem::Detect => detect_init_system(&config.rootfs),
            known => known,
        };

        let directory = host.containers_directory.join(&config.name);
        let directory_error = |source| ContainerError::Directory {
            path: directory.clone(),
            source,
        };
        std::fs::create_dir_all(&host.containers_directory).map_err(directory_error)?;
        // A stopped container's directory is started again, on the snapshot its first start
        // made; a running one, or a directory that is no container's, is a name clash.
        let restart = match std::fs::create_dir(&directory) {
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                if !rootfs::is_container_directory(&directory) || rootfs::is_mounted(&directory) {
                    return Err(ContainerError::NameTaken(config.name.clone()));
                }
                true
            }
            result => {
                result.map_err(directory_error)?;
                false
            }
        };
        let mut guard = StartGuard {
            // A failed restart must leave the container's files where they are.
            directory: (!restart).then(|| directory.clone()),
            cgroup: None,
            snapshot_root: None,
            child: None,
            host_interface: None,
        };

        let cgroup = Cgroup::create(CgroupLayout::detect()?, &host.cgroup_parent, &config.name)?;
        let cgroup = guard.cgroup.insert(cgroup);
        cgroup.apply_limits(&config.limits)?;

        guard.snapshot_root = Some(directory.join(rootfs::ROOT));
        let snapshot = Snapshot::mount(
            &config.rootfs,
            &directory,
            id_map.as_ref(),
            config.snapshot,
            config.id_shift,
        )?;

        let console = Console::open(root_uid, root_gid + TTY_GROUP)?;
        let console_log = directory.join(CONSOLE_LOG);
        if restart {
            // One log per boot, as LXD's: the previous boot's is kept beside it.
            let _ = std::fs::rename(&console_log, directory.join(PREVIOUS_CONSOLE_LOG));
        }
        let console_logger = console.log_to(&console_log)?;

        let mut plan = FilesystemPlan::new(&snapshot.root, &console.terminal_path, cgroup.layout());
        if config.nesting {
            plan.add_nesting_mounts(&snapshot.root, kmsg_source(config.privileged));
        }
        plan.add_disk_mounts(&snapshot.root, &config.disks)
            .map_err(crate::config::ConfigError::from)?;
        let mut program =
            InitProgram::new(plan, &snapshot.root, &config.hostname, id_map.is_some());
        if let Some(nic) = &nic_plan {
            program
                .interfaces
                .push(crate::network::interface_name(nic.container_name()));
        }
        program.confinement = confinement.clone();
        let spawn_error = |step| move |source| ContainerError::Spawn { step, source };
        let (release_read, release_write) = kernel::pipe().map_err(spawn_error("pipe"))?;
        let (report_read, report_write) = kernel::pipe().map_err(spawn_error("pipe"))?;
        let mut namespaces = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWNET;
        if id_map.is_some() {
            namespaces |= libc::CLONE_NEWUSER;
        }
        // SAFETY: the child only runs `run_in_child`, which is allocation-free and ends in
        // execve or _exit.
        let pid =
            unsafe { kernel::clone_into_namespaces(namespaces) }.map_err(spawn_error("clone"))?;
        if pid == 0 {
            program.run_in_child(
                release_read.as_raw_fd(),
                report_write.as_raw_fd(),
                console.terminal.as_raw_fd(),
            );
        }
        guard.child = Some(pid);
        drop(release_read);
        drop(report_write);

        if let Some(map) = id_map {
            map.write_to(pid)?;
            cgroup.delegate(root_uid, root_gid)?;
        }
        cgroup.add_process(pid)?;
        raise_open_file_limit(pid);
        if let Some(nic) = nic_plan {
            guard.host_interface = Some(nic.attach(pid)?);
        }
        kernel::write_all(release_write.as_raw_fd(), &[1])
            .map_err(|errno| spawn_error("release")(io::Error::from_raw_os_error(errno)))?;
        drop(release_write);
        if let Some((step, errno)) =
            kernel::read_child_failure(&report_read).map_err(spawn_error("read its report"))?
        {
            return Err(ContainerError::Setup {
                name: config.name.clone(),
                step: program.describe(step),
                source: io::Error::from_raw_os_error(errno),
            });
        }
        // The report pipe also closes when the child dies before exec (killed, say).
        if let Ok(Some(code)) = kernel::try_wait(pid) {
            guard.child = None;
            return Err(ContainerError::Setup {
                name: config.name.clone(),
                step: "run /sbin/init".to_string(),
                source: io::Error::other(format!("init exited at once with status {code}")),
            });
        }
        let init_pidfd = kernel::pidfd_open(pid).map_err(spawn_error("pidfd_open"))?;

        let cgroup = guard.cgroup.take().expect("created above");
        // Everything the guard would undo now belongs to the container.
        guard.child = None;
        guard.snapshot_root = None;
        guard.directory = None;
        let host_interface = guard.host_interface.take();
        Ok(Self {
            name: config.name.clone(),
            directory,
            snapshot,
            cgroup,
            id_map,
            init_system,
            init_pid: pid,
            init_pidfd,
            exit_code: None,
            console_controller: console.controller,
            console_logger: Some(console_logger),
            confinement,
            host_interface,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The container's own directory (snapshot, console log).
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// Where the console's output is collected.
    pub fn console_log(&self) -> PathBuf {
        self.directory.join(CONSOLE_LOG)
    }

    /// The container's own files as the host stores them: the overlay's upper directory
    /// (every file the container created or changed), or the whole btrfs snapshot.
    pub fn upper_directory(&self) -> &Path {
        &self.snapshot.upper
    }

    /// How the container's root was made, and how its files came to belong to its ids.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The snapshot as mounted on the host.
    pub fn root_directory(&self) -> &Path {
        &self.snapshot.root
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The id map, `None` for a privileged container.
    pub fn id_map(&self) -> Option<IdMap> {
        self.id_map
    }

    pub fn init_system(&self) -> InitSystem {
        self.init_system
    }

    /// The controlling end of the console, for attaching to it.
    pub fn console(&self) -> &OwnedFd {
        &self.console_controller
    }

    /// The name of the host end of the container's veth pair (LXD's
    /// `volatile.<nic>.host_name`) while it runs with a bridged nic.
    pub fn host_interface(&self) -> Option<&str> {
        self.host_interface.as_ref().map(HostInterface::name)
    }

    /// What confines the container's processes: exec applies it to each command.
    pub(crate) fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    /// The init's host pid while it runs.
    pub fn init_pid(&self) -> Option<u32> {
        self.exit_code.is_none().then_some(self.init_pid as u32)
    }

    /// Reaps init if it has exited.
    fn refresh(&mut self) {
        if self.exit_code.is_none() {
            if let Ok(Some(code)) = kernel::try_wait(self.init_pid) {
                self.exit_code = Some(code);
            }
        }
    }

    pub fn state(&mut self) -> ContainerState {
        self.refresh();
        let running = self.exit_code.is_none();
        ContainerState {
            status: if !running {
                Status::Stopped
            } else if self.cgroup.is_frozen() {
                Status::Frozen
            } else {
                Status::Running
            },
            init_pid: self.init_pid(),
            memory_bytes: running.then(|| self.cgroup.memory_usage().ok()).flatten(),
            processes: running.then(|| self.cgroup.process_count().ok()).flatten(),
            cpu_time: running.then(|| self.cgroup.cpu_time().ok()).flatten(),
            exit_code: self.exit_code,
            addresses: self
                .init_pid()
                .and_then(|pid| network::addresses_of(pid).ok())
                .unwrap_or_default(),
        }
    }

    /// Asks init to shut down (SIGRTMIN+3 for systemd, SIGPWR otherwise) and kills the
    /// container if it has not stopped after `timeout`; then releases its cgroup and snapshot
    /// mount (the directory stays until `delete`).
    pub fn stop(&mut self, timeout: Duration) -> Result<StopOutcome, ContainerError> {
        self.refresh();
        let mut clean = false;
        if self.exit_code.is_none() {
            // Frozen tasks act on no signal (a v1 freezer holds back even SIGKILL).
            if self.cgroup.is_frozen() {
                let _ = self.cgroup.thaw();
            }
            let halt = match self.init_system {
                InitSystem::Systemd => libc::SIGRTMIN() + 3,
                InitSystem::Classic | InitSystem::Detect => libc::SIGPWR,
            };
            self.signal(halt)?;
            clean = self.wait_for_init(timeout);
            if !clean {
                self.signal(libc::SIGKILL)?;
            }
            let code =
                kernel::wait_for_exit(self.init_pid).map_err(|source| ContainerError::Signal {
                    name: self.name.clone(),
                    source,
                })?;
            self.exit_code = Some(code);
        }
        self.release()?;
        Ok(StopOutcome {
            clean,
            exit_code: self.exit_code.unwrap_or_default(),
        })
    }

    /// Stops the container at once if it runs, then removes everything it had: cgroup,
    /// mount and directory.
    pub fn delete(mut self) -> Result<(), ContainerError> {
        self.stop(Duration::ZERO)?;
        rootfs::remove_snapshot(&self.directory)?;
        std::fs::remove_dir_all(&self.directory).map_err(|source| ContainerError::Remove {
            path: self.directory.clone(),
            source,
        })
    }

    fn signal(&self, signal: i32) -> Result<(), ContainerError> {
        match kernel::pidfd_signal(&self.init_pidfd, signal) {
            // ESRCH: init exited on its own in the meantime.
            Err(error) if error.raw_os_error() != Some(libc::ESRCH) => {
                Err(ContainerError::Signal {
                    name: self.name.clone(),
                    source: error,
                })
            }
            _ => Ok(()),
        }
    }

    /// Waits up to `timeout` for init to exit; true if it did.
    fn wait_for_init(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let milliseconds = left.as_millis().min(i32::MAX as u128) as i32;
            match kernel::pidfd_exited(&self.init_pidfd, milliseconds) {
                Ok(true) => return true,
                Ok(false) if left.is_zero() => return false,
                Ok(false) => {}
                Err(_) => return false,
            }
        }
    }

    /// Removes the cgroup and unmounts the snapshot of a stopped container.
    fn release(&mut self) -> Result<(), ContainerError> {
        self.cgroup.remove(CGROUP_PATIENCE)?;
        if let Some(interface) = &self.host_interface {
            interface.remove()?;
        }
        self.host_interface = None;
        self.snapshot.unmount()?;
        if let Some(logger) = self.console_logger.take() {
            logger.stop();
        }
        Ok(())
    }
}

/// Lets the init of a container raise its open-file limit as far as the kernel allows, as the
/// first process of a host may: inside a user namespace it cannot raise the hard limit it
/// inherited, and systemd and dbus-daemon ask for more (dbus: "Failed to set fd limit to
/// 65536"). LXD's containers get the same from its service's `LimitNOFILE=1048576`.
/// Best effort: the container runs with the inherited limit if this fails.
fn raise_open_file_limit(pid: libc::pid_t) {
    let kernel_maximum = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(1 << 20);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on our own child; a null new limit only reads into the live `limit`.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut limit) } != 0 {
        return;
    }
    limit.rlim_max = limit.rlim_max.max(kernel_maximum);
    // SAFETY: as above; the kernel only reads `limit`.
    unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
}

/// What a nesting container sees as `/dev/kmsg`. kubelet will not start unless it can open
/// it for reading. Reading the host's kernel log needs CAP_SYSLOG over the host when the host
/// sets `kernel.dmesg_restrict=1` (Debian's default), which an unprivileged container's root
/// lacks: it then gets `/dev/null` there, which opens and reads as an empty log (kubelet then
/// sees no OOM-kill lines, as with no OOM kills). A privileged container, or any container on a
/// host with `kernel.dmesg_restrict=0`, gets the host's `/dev/kmsg`, which its root may read
/// but, unless privileged, not write (the node is mode 0644, owned by host root).
fn kmsg_source(privileged: bool) -> &'static Path {
    let restricted = std::fs::read_to_string("/proc/sys/kernel/dmesg_restrict")
        .map(|text| text.trim() != "0")
        .unwrap_or(true);
    if privileged || !restricted {
        Path::new("/dev/kmsg")
    } else {
        Path::new("/dev/null")
    }
}

/// systemd if the image's /sbin/init leads to it, else a classic init.
fn detect_init_system(rootfs: &Path) -> InitSystem {
    match std::fs::read_link(rootfs.join("sbin/init")) {
        Ok(target) if target.to_string_lossy().contains("systemd") => InitSystem::Systemd,
        _ => InitSystem::Classic,
    }
}
