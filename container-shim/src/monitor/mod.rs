//! The per-container monitor (as LXC's monitor or conmon): one small process per container
//! that started it, is its init's parent and reaper, holds its console, publishes its state in
//! the run directory and serves its control socket, and cleans up when it stops.
//!
//! [`start`] is the starter's side: it makes the run-directory entry, forks the monitor off
//! into its own session (a double fork, so it outlives the starter and never gets a
//! controlling terminal), and returns once the container's init runs, with its state, or with
//! the container's start error once the monitor has undone everything and exited. The
//! monitor's loop lives in `serve`; callers' operations (state, exec, stop, freeze, delete),
//! including those that still work when a monitor was killed, in [`client`].
//!
//! What must not live here: how a container is built (the library's `Container`) or the wire
//! format (`control`).

pub mod attach;
pub mod client;
pub mod run_directory;
mod serve;

use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{ConfigError, ContainerConfig};
use crate::container::{ContainerError, Host};
use crate::control::{ControlError, Response, StateRecord};
use crate::kernel;

pub use run_directory::{RunDirectory, DEFAULT_RUN_DIRECTORY};

/// How long the starter waits for the monitor's report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("containers need root: run cove-shim as root (uid 0)")]
    NotRoot,
    #[error(
        "cove-shim's monitor must be started from a single-threaded process (it forks): run the \
         cove-shim binary rather than calling monitor::start from a threaded program"
    )]
    Threaded,
    #[error(
        "container \"{name}\" already exists and is running in {}: choose another name, or \
         stop it first (cove-shim stop {name})", run_directory.display()
    )]
    NameTaken {
        name: String,
        run_directory: PathBuf,
    },
    #[error("no container \"{name}\" in {}", run_directory.display())]
    NotFound {
        name: String,
        run_directory: PathBuf,
    },
    #[error("cannot create the run directory entry {}: {source}", path.display())]
    RunDirectory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    ReadState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    WriteState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is malformed ({reason}): remove the entry by hand", path.display())]
    MalformedState { path: PathBuf, reason: String },
    #[error("cannot start the monitor ({step}): {source}")]
    Spawn {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// The container did not start; the monitor's words.
    #[error("{0}")]
    Start(String),
    #[error("the monitor exited without reporting whether the container started; its log:\n{0}")]
    MonitorDied(String),
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The monitor refused a request; its words.
    #[error("{0}")]
    Refused(String),
    #[error("container \"{0}\" is not running")]
    NotRunning(String),
    #[error(
        "container \"{0}\" is running: stop it first (cove-shim stop {0}) or delete it with \
         --force"
    )]
    StillRunning(String),
    #[error(
        "the monitor of container \"{name}\" is gone (killed?) while the container still runs: \
         {what} needs a monitor; stop the container (cove-shim stop {name}) and start it again"
    )]
    Orphaned { name: String, what: &'static str },
    #[error("container \"{name}\" did not end within {waited:?} of SIGKILL")]
    Unkillable { name: String, waited: Duration },
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error("cannot remove {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What `cove-shim start` was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartOptions {
    /// Validated when the monitor starts; nothing is created before that passes.
    pub config: ContainerConfig,
    pub host: Host,
    pub run_directory: RunDirectory,
}

/// Starts a monitor for `options.config`'s container and returns once its init runs, with
/// its state; or fails with the container's start error, leaving nothing behind (no
/// run-directory entry, container directory, cgroup, mount or process).
///
/// The calling process must be single-threaded: it forks, and the forked monitor goes on to
/// allocate and start threads (the `cove-shim` binary is such a caller).
pub fn start(options: &StartOptions) -> Result<StateRecord, MonitorError> {
    options.config.validate()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(MonitorError::NotRoot);
    }
    if std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count) != 1 {
        return Err(MonitorError::Threaded);
    }
    let name = &options.config.name;
    let runs = &options.run_directory;
    // A stopped container is started again: its old entry goes (the container directory,
    // with its files, stays for `Container::start` to reuse).
    if runs
        .read_state(name)
        .is_ok_and(|record| client::has_stopped(&record))
    {
        client::delete_record(runs, name)?;
    }
    runs.create_entry(name)?;
    let result = spawn_monitor(options);
    if result.is_err() {
        // The monitor removes its entry itself when the container fails to start; this
        // covers a monitor that could not be made or that died without a word.
        let _ = runs.remove_entry(name);
    }
    result
}

/// Forks the monitor and reads its report.
fn spawn_monitor(options: &StartOptions) -> Result<StateRecord, MonitorError> {
    let spawn_error = |step| move |source| MonitorError::Spawn { step, source };
    let runs = &options.run_directory;
    let name = &options.config.name;
    let log_path = runs.monitor_log(name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(spawn_error("open its log"))?;
    let null = std::fs::File::open("/dev/null").map_err(spawn_error("open /dev/null"))?;
    let (report_read, report_write) = kernel::pipe().map_err(spawn_error("pipe"))?;

    // SAFETY: this process is single-threaded (checked in `start`), so the child may run any
    // code: no lock can be held by a thread that does not exist there.
    let intermediate = unsafe { libc::fork() };
    if intermediate < 0 {
        return Err(spawn_error("fork")(io::Error::last_os_error()));
    }
    if intermediate == 0 {
        drop(report_read);
        // SAFETY: setsid and fork in a single-threaded child, as above. The intermediate
        // process leads the new session and exits at once, so the monitor is in no one's
        // session or process group and can never gain a controlling terminal.
        unsafe {
            libc::setsid();
            match libc::fork() {
                0 => serve::run_monitor(options, report_write, log.into(), null.into()),
                _ => libc::_exit(0),
            }
        }
    }
    drop(report_write);
    drop((log, null));
    let _ = kernel::wait_for_exit(intermediate);
    let report = read_report(&report_read).map_err(spawn_error("read its report"))?;
    let line = report.split(|byte| *byte == b'\n').next().unwrap_or(&[]);
    match serde_json::from_slice::<Response>(line) {
        Ok(Response {
            ok: true,
            state: Some(state),
            ..
        }) => Ok(state),
        Ok(Response {
            error: Some(error), ..
        }) => Err(MonitorError::Start(error)),
        _ => {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            Err(MonitorError::MonitorDied(log))
        }
    }
}

/// Reads the monitor's report until it closes the pipe (it does once the container runs, or
/// by exiting after a failed start).
fn read_report(pipe: &OwnedFd) -> io::Result<Vec<u8>> {
    let mut report = Vec::new();
    let mut poll = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let mut file = std::fs::File::from(pipe.try_clone()?);
    let mut buffer = [0u8; 4096];
    loop {
        let timeout = REPORT_TIMEOUT.as_millis() as i32;
        // SAFETY: `poll` is one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout) };
        if ready == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the monitor did not report within 60 seconds",
            ));
        }
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        match file.read(&mut buffer) {
            Ok(0) => return Ok(report),
            Ok(read) => report.extend_from_slice(&buffer[..read]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}
