//! Shutdown and reboot of the guest.
//!
//! As PID 1 the agent is the init, so it does what an init does: sync, SIGTERM to every other
//! process, SIGKILL to what is left after the grace period, sync again, then reboot(2). In a
//! pid namespace (the host tests) reboot(2) ends the namespace: its init dies of SIGINT
//! (power off) or SIGHUP (restart), which is what the parent sees. A kernel that cannot power
//! off (no ACPI, as the project's microVM kernel) would only halt its CPUs and leave the VM
//! hanging, so the agent restarts it instead: cove-vmm ends a VM whose guest resets.
//!
//! Not as PID 1 the agent asks the init: `systemctl poweroff|reboot` when systemd runs the
//! guest, `poweroff`/`reboot` otherwise.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::children;
use super::{log, Connection, Failure};
use crate::protocol::{AgentMessage, ErrorCode, InvalidRequest, PowerAction};

const DEFAULT_GRACE: Duration = Duration::from_secs(5);
const MAX_GRACE_SECONDS: u32 = 60;
/// How long the init's own helper (systemctl, poweroff) may take to accept the request.
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error("cannot run {program} to ask the init for a {action}")]
    Spawn {
        program: String,
        action: &'static str,
        #[source]
        source: children::SpawnError,
    },
    #[error("{program} did not accept the {action} request ({status})")]
    Refused {
        program: String,
        action: &'static str,
        status: String,
    },
}

impl From<PowerError> for Failure {
    fn from(error: PowerError) -> Self {
        let code = match &error {
            PowerError::Invalid(_) => ErrorCode::BadRequest,
            _ => ErrorCode::Io,
        };
        Failure::new(code, &error)
    }
}

pub(crate) fn shutdown(
    connection: &mut Connection,
    action: PowerAction,
    grace_seconds: Option<u32>,
) -> Result<(), Failure> {
    let grace = match grace_seconds {
        Some(seconds) if seconds > MAX_GRACE_SECONDS => {
            return Err(PowerError::from(InvalidRequest::Grace(seconds)).into())
        }
        Some(seconds) => Duration::from_secs(u64::from(seconds)),
        None => DEFAULT_GRACE,
    };
    if std::process::id() != 1 {
        ask_init(action)?;
        connection.replies.send(&AgentMessage::Done { bytes: 0 })?;
        return Ok(());
    }
    // The answer goes first: after reboot(2) nothing can be said.
    connection.replies.send(&AgentMessage::Done { bytes: 0 })?;
    connection.replies.close();
    act_as_init(action, grace)
}

fn action_name(action: PowerAction) -> &'static str {
    match action {
        PowerAction::Poweroff => "poweroff",
        PowerAction::Reboot => "reboot",
    }
}

fn ask_init(action: PowerAction) -> Result<(), PowerError> {
    let name = action_name(action);
    let mut command = if Path::new("/run/systemd/system").is_dir() {
        let mut command = Command::new("systemctl");
        command.arg(name);
        command
    } else {
        Command::new(name)
    };
    command
        .env_clear()
        .env("PATH", crate::protocol::DEFAULT_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let program = format!("{command:?}");
    let (_child, slot) = children::spawn(&mut command).map_err(|source| PowerError::Spawn {
        program: program.clone(),
        action: name,
        source,
    })?;
    match slot.wait(Some(ASK_TIMEOUT)) {
        Some(status) if status.code == Some(0) => Ok(()),
        Some(status) => Err(PowerError::Refused {
            program,
            action: name,
            status: match (status.code, status.signal) {
                (Some(code), _) => format!("exit status {code}"),
                (_, Some(signal)) => format!("killed by signal {signal}"),
                _ => "no status".into(),
            },
        }),
        None => Err(PowerError::Refused {
            program,
            action: name,
            status: format!("no answer within {} s", ASK_TIMEOUT.as_secs()),
        }),
    }
}

/// Ends every other process, then the system. Returns only if reboot(2) fails.
fn act_as_init(action: PowerAction, grace: Duration) -> Result<(), Failure> {
    log(&format!("{}: stopping all processes", action_name(action)));
    // SAFETY: sync() takes no arguments.
    unsafe { libc::sync() };
    signal_everyone_and_wait(libc::SIGTERM, grace);
    signal_everyone_and_wait(libc::SIGKILL, Duration::from_secs(2));
    // SAFETY: sync() takes no arguments.
    unsafe { libc::sync() };
    let command = match action {
        PowerAction::Reboot => libc::LINUX_REBOOT_CMD_RESTART,
        PowerAction::Poweroff if can_power_off() => libc::LINUX_REBOOT_CMD_POWER_OFF,
        PowerAction::Poweroff => {
            log("this kernel cannot power off (no ACPI): restarting instead");
            libc::LINUX_REBOOT_CMD_RESTART
        }
    };
    // SAFETY: reboot() takes no pointers; as PID 1 (of the guest or of a pid namespace) this
    // ends the system it is the init of.
    unsafe { libc::reboot(command) };
    let error = std::io::Error::last_os_error();
    log(&format!("reboot(2) failed: {error}; exiting instead"));
    std::process::exit(1);
}

/// Sends `signal` to every process but the agent, then waits until none is left or `wait`
/// has passed. Only ever called as PID 1: kill(-1) reaches the whole guest (or pid
/// namespace).
fn signal_everyone_and_wait(signal: i32, wait: Duration) {
    // SAFETY: kill() takes no pointers; -1 is every process the init may signal but itself.
    if unsafe { libc::kill(-1, signal) } != 0 {
        return; // ESRCH: nobody else is left
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        // SAFETY: signal 0 only checks whether any process is left; the reaper reaps them.
        if unsafe { libc::kill(-1, 0) } != 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether power-off would power off: without ACPI (or another power-off driver) the kernel
/// turns it into a halt.
fn can_power_off() -> bool {
    Path::new("/sys/firmware/acpi").exists()
}
