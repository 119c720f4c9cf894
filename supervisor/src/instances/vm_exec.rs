//! Exec in a VM: the command runs through the guest's cove-agent, and coved carries bytes
//! between the agent's streams and the file descriptors the exec route handed over (three
//! pipes, or one terminal three times), passing on signals and terminal size changes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cove_agent::client::{Client, ClientError, ExecControl, ExecEvent};
use cove_agent::protocol::{Channel, ErrorCode, ExecRequest, WindowSize};

use super::runtime::{ExecSpec, RuntimeError};

/// How often the helper threads look at whether the command has ended.
const POLL_MILLISECONDS: i32 = 100;

/// Puts the host side's terminal in raw mode: the guest's own terminal echoes and translates,
/// so bytes must pass through this one unchanged.
fn make_raw(fd: BorrowedFd<'_>) {
    // SAFETY: an all-zero termios is valid storage for tcgetattr to fill.
    let mut settings: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `settings` is a live termios; the fd is a terminal the caller owns.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut settings) } == 0 {
        // SAFETY: cfmakeraw only changes the struct it is given.
        unsafe { libc::cfmakeraw(&mut settings) };
        // SAFETY: as above; tcsetattr reads the struct.
        unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &settings) };
    }
}

fn window(fd: BorrowedFd<'_>) -> WindowSize {
    let size = cove_shim::terminal::size_of(fd).unwrap_or_default();
    WindowSize {
        rows: size.rows.max(1),
        columns: size.columns.max(1),
    }
}

/// True when `fd` has input (or its end) within the poll interval.
fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd that outlives the call.
    unsafe { libc::poll(&mut poll, 1, POLL_MILLISECONDS) > 0 }
}

/// Copies the caller's stdin to the command until its end (or until the command ended).
fn pump_input(stdin: OwnedFd, control: ExecControl, done: Arc<AtomicBool>) {
    let mut input = File::from(stdin);
    let mut buffer = vec![0u8; 64 << 10];
    while !done.load(Ordering::Relaxed) {
        if !readable(input.as_fd()) {
            continue;
        }
        match input.read(&mut buffer) {
            // The end of a pipe, or a terminal whose controller closed (EIO).
            Ok(0) | Err(_) => {
                let _ = control.close_stdin();
                return;
            }
            Ok(count) => {
                if control.write_stdin(&buffer[..count]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Passes on signals and, on a terminal, size changes, until the command ended.
fn pump_control(
    spec_signals: Option<std::sync::mpsc::Receiver<i32>>,
    terminal: Option<OwnedFd>,
    control: ExecControl,
    done: Arc<AtomicBool>,
) {
    let mut size = terminal.as_ref().map(|fd| window(fd.as_fd()));
    let interval = Duration::from_millis(POLL_MILLISECONDS as u64);
    while !done.load(Ordering::Relaxed) {
        match &spec_signals {
            Some(signals) => {
                if let Ok(signal) = signals.recv_timeout(interval) {
                    let _ = control.signal(signal, false);
                }
            }
            None => std::thread::sleep(interval),
        }
        if let Some(fd) = &terminal {
            let now = window(fd.as_fd());
            if Some(now) != size {
                size = Some(now);
                let _ = control.resize(now);
            }
        }
    }
}

/// Runs `spec` through `agent`; returns the exit code (128 + signal; 127 for a program that is
/// not found and 126 for one that cannot run, as a shell reports them).
pub fn run(agent: &Client, spec: ExecSpec) -> Result<i32, RuntimeError> {
    let pty = spec.terminal.then(|| {
        make_raw(spec.stdin.as_fd());
        window(spec.stdin.as_fd())
    });
    let request = ExecRequest {
        argv: spec.command,
        environment: spec.environment,
        cwd: spec.cwd,
        uid: Some(spec.uid),
        gid: Some(spec.gid),
        pty,
    };
    let mut stdout = File::from(spec.stdout);
    let mut stderr = File::from(spec.stderr);
    let mut exec = match agent.exec(&request) {
        Ok(exec) => exec,
        Err(ClientError::Agent { code, message }) => {
            let status = match code {
                ErrorCode::NotFound => 127,
                ErrorCode::ExecFailed => 126,
                _ => return Err(RuntimeError::Failed(message)),
            };
            let _ = writeln!(stderr, "{message}");
            return Ok(status);
        }
        Err(error) => return Err(RuntimeError::Failed(error.to_string())),
    };
    let done = Arc::new(AtomicBool::new(false));
    let terminal = if spec.terminal {
        spec.stdin.try_clone().ok()
    } else {
        None
    };
    let input = {
        let (control, done) = (exec.control(), done.clone());
        let stdin = spec.stdin;
        std::thread::spawn(move || pump_input(stdin, control, done))
    };
    let controls = {
        let (control, done) = (exec.control(), done.clone());
        let signals = spec.signals;
        std::thread::spawn(move || pump_control(signals, terminal, control, done))
    };
    let result = loop {
        match exec.next_event() {
            Ok(ExecEvent::Output(Channel::Stderr, bytes)) => {
                let _ = stderr.write_all(&bytes);
            }
            Ok(ExecEvent::Output(_, bytes)) => {
                let _ = stdout.write_all(&bytes);
            }
            Ok(ExecEvent::Closed(_)) => {}
            Ok(ExecEvent::Exited(status)) => break Ok(status.shell_status()),
            Err(error) => break Err(RuntimeError::Failed(format!("the exec failed: {error}"))),
        }
    };
    done.store(true, Ordering::Relaxed);
    let _ = input.join();
    let _ = controls.join();
    result
}
