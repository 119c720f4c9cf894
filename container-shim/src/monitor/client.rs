//! What callers do with a container that a monitor started: the `state`, `exec`, `stop`,
//! `freeze`, `unfreeze` and `delete` of `cove-shim`, over the control socket.
//!
//! When a monitor was killed (`kill -9`), its container keeps running, as LXC's does: init is
//! reparented to the host's init. `state` then answers from `state.json` with `orphaned`, and
//! `stop` and `delete` act without a monitor: they name init by pid and start time (never a
//! later process with a reused pid), halt or kill it through a pidfd, and release the cgroup
//! and the mount. `exec`, `freeze` and `unfreeze` need the monitor and say so.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::cgroup::{Cgroup, CgroupLayout};
use crate::container::ContainerError;
use crate::control::{
    ControlClient, ExecCommand, ExecConnection, HaltSignal, RecordedStatus, Request, Response,
    StateRecord,
};
use crate::kernel;
use crate::rootfs;

use super::run_directory::{is_same_process, rfc3339};
use super::{MonitorError, RunDirectory};

/// How long removing an orphan's cgroup waits for its last processes to leave.
const CGROUP_PATIENCE: Duration = Duration::from_secs(5);
/// How long a killed init or an ending monitor may take to be gone.
const EXIT_PATIENCE: Duration = Duration::from_secs(10);

/// How `stop` ended the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// True when init halted on its signal before the timeout.
    pub clean: bool,
    /// Init's exit code; unknown (`None`) for an orphan, which the host's init reaped.
    pub exit_code: Option<i32>,
}

/// The container's state: live from its monitor, else as recorded, with `orphaned` set when
/// the monitor is gone and init still runs.
pub fn state(runs: &RunDirectory, name: &str) -> Result<StateRecord, MonitorError> {
    let mut record = runs.read_state(name)?;
    if record.status == RecordedStatus::Stopped {
        return Ok(record);
    }
    if monitor_alive(&record) {
        return match call(runs, name, &Request::State, &[], "state") {
            Ok(Response {
                state: Some(state), ..
            }) => Ok(state),
            // Still starting (no socket yet), or stopping right now: the record says which.
            _ => runs.read_state(name),
        };
    }
    if init_alive(&record) {
        record.orphaned = true;
    } else {
        record.status = RecordedStatus::Stopped;
        record.init_pid = None;
        record.init_start_time = None;
    }
    Ok(record)
}

/// Runs `command` in the container with `stdio` as its stdin, stdout and stderr; returns its
/// exit code once it has ended.
pub fn exec(
    runs: &RunDirectory,
    name: &str,
    command: &ExecCommand,
    stdio: [BorrowedFd<'_>; 3],
) -> Result<i32, MonitorError> {
    let request = Request::Exec(command.clone());
    let answer = call(runs, name, &request, &stdio, "exec")?;
    exit_code_of(answer)
}

/// Starts `command` in the container and returns the open exec: with `command.terminal`, no
/// `fds` and the terminal's controlling end to take; otherwise `fds` are its stdin, stdout and
/// stderr. Signal it through the connection, then [`finish_exec`].
pub fn start_exec(
    runs: &RunDirectory,
    name: &str,
    command: &ExecCommand,
    fds: &[BorrowedFd<'_>],
) -> Result<ExecConnection, MonitorError> {
    let client = connect(runs, name, "exec")?;
    Ok(client.exec(command, fds)?)
}

/// Waits for a started exec's command to end; returns its exit code.
pub fn finish_exec(connection: ExecConnection) -> Result<i32, MonitorError> {
    exit_code_of(connection.wait()?)
}

fn exit_code_of(answer: Response) -> Result<i32, MonitorError> {
    if !answer.ok {
        return Err(MonitorError::Refused(answer.error.unwrap_or_default()));
    }
    answer
        .exit_code
        .ok_or_else(|| MonitorError::Refused("the monitor's answer has no exit code".into()))
}

pub fn freeze(runs: &RunDirectory, name: &str) -> Result<(), MonitorError> {
    call(runs, name, &Request::Freeze, &[], "freeze").map(drop)
}

pub fn unfreeze(runs: &RunDirectory, name: &str) -> Result<(), MonitorError> {
    call(runs, name, &Request::Unfreeze, &[], "unfreeze").map(drop)
}

/// Halts init (SIGKILL after `timeout`), releases the cgroup and the mount, and returns once
/// the monitor has exited too. Works without a monitor (see the module's doc).
pub fn stop(runs: &RunDirectory, name: &str, timeout: Duration) -> Result<Stopped, MonitorError> {
    let record = runs.read_state(name)?;
    if record.status == RecordedStatus::Stopped {
        return Err(MonitorError::NotRunning(name.to_string()));
    }
    if let Some(monitor) = open_process(record.monitor_pid, record.monitor_start_time) {
        let request = Request::Stop {
            timeout_ms: Some(timeout.as_millis() as u64),
        };
        let answer = call(runs, name, &request, &[], "stop")?;
        // The answer comes once the run directory says Stopped; the monitor exits right after.
        let _ = kernel::pidfd_exited(&monitor, EXIT_PATIENCE.as_millis() as i32);
        return Ok(Stopped {
            clean: answer.clean.unwrap_or(false),
            exit_code: answer.exit_code,
        });
    }
    stop_without_monitor(runs, record, timeout)
}

/// Removes a stopped container: its run-directory entry, its directory, and whatever a killed
/// monitor left (cgroup, mount). A running one is refused unless `force`, which stops it at
/// once first.
pub fn delete(runs: &RunDirectory, name: &str, force: bool) -> Result<(), MonitorError> {
    let record = runs.read_state(name)?;
    let running =
        record.status != RecordedStatus::Stopped && (monitor_alive(&record) || init_alive(&record));
    if running {
        if !force {
            return Err(MonitorError::StillRunning(name.to_string()));
        }
        stop(runs, name, Duration::ZERO)?;
    }
    release(&record)?;
    let directory = &record.container_directory;
    // The path comes from a file: remove nothing but a directory named for this container.
    if directory.file_name() == Some(name.as_ref()) {
        rootfs::remove_snapshot(directory).map_err(ContainerError::from)?;
        remove_directory(directory)?;
    }
    runs.remove_entry(name)
}

/// Forgets a stopped container's run-directory entry, releasing whatever a killed monitor
/// left (cgroup, mount), but keeps its directory and files: for a rename, or before it is
/// started again.
pub fn delete_record(runs: &RunDirectory, name: &str) -> Result<(), MonitorError> {
    let record = runs.read_state(name)?;
    if !has_stopped(&record) {
        return Err(MonitorError::StillRunning(name.to_string()));
    }
    release(&record)?;
    runs.remove_entry(name)
}

/// Sends `request` to the monitor; a connection that fails is explained from the record.
fn call(
    runs: &RunDirectory,
    name: &str,
    request: &Request,
    fds: &[BorrowedFd<'_>],
    what: &'static str,
) -> Result<Response, MonitorError> {
    let client = connect(runs, name, what)?;
    let answer = client.call(request, fds)?;
    if answer.ok {
        Ok(answer)
    } else {
        Err(MonitorError::Refused(answer.error.unwrap_or_default()))
    }
}

/// A connection to the monitor; a failure is explained from the record.
fn connect(
    runs: &RunDirectory,
    name: &str,
    what: &'static str,
) -> Result<ControlClient, MonitorError> {
    ControlClient::connect(&runs.control_socket(name)).or_else(|error| {
        let record = runs.read_state(name)?;
        Err(if record.status == RecordedStatus::Stopped {
            MonitorError::NotRunning(name.to_string())
        } else if monitor_alive(&record) {
            MonitorError::Control(error)
        } else if init_alive(&record) {
            MonitorError::Orphaned {
                name: name.to_string(),
                what,
            }
        } else {
            MonitorError::NotRunning(name.to_string())
        })
    })
}

/// True when neither the container's monitor nor its init runs (whatever the record says):
/// what is left of it may be released and the container started again.
pub(super) fn has_stopped(record: &StateRecord) -> bool {
    record.status == RecordedStatus::Stopped || !(monitor_alive(record) || init_alive(record))
}

fn monitor_alive(record: &StateRecord) -> bool {
    is_same_process(record.monitor_pid, record.monitor_start_time)
}

fn init_alive(record: &StateRecord) -> bool {
    match (record.init_pid, record.init_start_time) {
        (Some(pid), Some(start)) => is_same_process(pid, start),
        _ => false,
    }
}

/// A pidfd for the process `pid` that started at `start_time`, if it still runs. Checked
/// after opening, so the pidfd cannot name a later process with the same pid.
fn open_process(pid: u32, start_time: u64) -> Option<std::os::fd::OwnedFd> {
    let pidfd = kernel::pidfd_open(pid as libc::pid_t).ok()?;
    is_same_process(pid, start_time).then_some(pidfd)
}

/// `stop` for a container whose monitor was killed.
fn stop_without_monitor(
    runs: &RunDirectory,
    mut record: StateRecord,
    timeout: Duration,
) -> Result<Stopped, MonitorError> {
    let name = record.name.clone();
    let init = match (record.init_pid, record.init_start_time) {
        (Some(pid), Some(start)) => open_process(pid, start),
        _ => None,
    };
    let mut clean = false;
    if let Some(init) = init {
        let halt = match record.halt_signal {
            HaltSignal::Systemd => libc::SIGRTMIN() + 3,
            HaltSignal::Classic => libc::SIGPWR,
        };
        let signal_error = |source| {
            MonitorError::Container(ContainerError::Signal {
                name: name.clone(),
                source,
            })
        };
        kernel::pidfd_signal(&init, halt).map_err(signal_error)?;
        clean = wait_for_exit(&init, timeout);
        if !clean {
            kernel::pidfd_signal(&init, libc::SIGKILL).map_err(signal_error)?;
            if !wait_for_exit(&init, EXIT_PATIENCE) {
                return Err(MonitorError::Unkillable {
                    name,
                    waited: EXIT_PATIENCE,
                });
            }
        }
    }
    release(&record)?;
    record.status = RecordedStatus::Stopped;
    record.init_pid = None;
    record.init_start_time = None;
    record.exit_code = None;
    record.stopped_at = Some(rfc3339(SystemTime::now()));
    record.orphaned = false;
    runs.write_state(&record)?;
    let _ = std::fs::remove_file(runs.control_socket(&name));
    Ok(Stopped {
        clean,
        exit_code: None,
    })
}

/// Waits up to `timeout` for the process behind `pidfd` to exit.
fn wait_for_exit(pidfd: &std::os::fd::OwnedFd, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match kernel::pidfd_exited(pidfd, left.as_millis().min(i32::MAX as u128) as i32) {
            Ok(true) => return true,
            Ok(false) if left.is_zero() => return false,
            Ok(false) => {}
            Err(_) => return false,
        }
    }
}

/// Removes the cgroup and unmounts the snapshot of a container whose init is gone; does
/// nothing where they are gone already.
fn release(record: &StateRecord) -> Result<(), MonitorError> {
    let layout = CgroupLayout::detect().map_err(ContainerError::from)?;
    Cgroup::existing(layout, &record.cgroup_parent, &record.name)
        .remove(CGROUP_PATIENCE)
        .map_err(ContainerError::from)?;
    rootfs::unmount_if_mounted(&record.container_directory.join(rootfs::ROOT))
        .map_err(ContainerError::from)?;
    Ok(())
}

fn remove_directory(directory: &Path) -> Result<(), MonitorError> {
    match std::fs::remove_dir_all(directory) {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(MonitorError::Remove {
            path: directory.to_path_buf(),
            source,
        }),
        _ => Ok(()),
    }
}
