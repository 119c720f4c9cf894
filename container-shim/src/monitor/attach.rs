//! The caller's side of `cove-shim exec`, beyond sending the request: forwarding the signals
//! the caller receives (SIGINT, SIGTERM, SIGHUP, SIGQUIT) to the command over the exec's
//! connection, and, with a terminal (`exec -t`), copying between the caller's stdin and stdout
//! and the command's pseudo-terminal, with the caller's own terminal in raw mode (restored on
//! the way out) and its window size followed (SIGWINCH).
//!
//! The calling process must be single-threaded (the `cove-shim` binary): the signals are
//! blocked for it and read from a signalfd.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::control::{ExecCommand, ExecConnection};
use crate::terminal;

use super::client::{finish_exec, start_exec};
use super::{MonitorError, RunDirectory};

/// What the caller forwards to the command.
const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Runs `command` in container `name` and returns its exit code: on `stdio` (sent along), or,
/// with `command.terminal`, on a new pseudo-terminal relayed to `stdio`.
pub fn exec(
    runs: &RunDirectory,
    name: &str,
    command: &ExecCommand,
    stdio: [BorrowedFd<'_>; 3],
) -> Result<i32, MonitorError> {
    let spawn_error = |step| move |source| MonitorError::Spawn { step, source };
    let mut watched = FORWARDED.to_vec();
    if command.terminal.is_some() {
        watched.push(libc::SIGWINCH);
    }
    let signals = blocked_signalfd(&watched).map_err(spawn_error("signalfd"))?;
    let mut command = command.clone();
    if command.terminal.is_some() {
        // The caller's window size, if its stdin is a terminal.
        if let Ok(size) = terminal::size_of(stdio[0]) {
            command.terminal = Some(size);
        }
        let mut connection = start_exec(runs, name, &command, &[])?;
        let Some(controller) = connection.take_terminal() else {
            // Refused: the answer says why.
            return finish_exec(connection);
        };
        let raw = RawMode::enter(stdio[0]);
        let result = relay_terminal(&connection, &signals, &controller, stdio);
        drop(raw);
        result.map_err(spawn_error("relay the terminal"))?;
        return finish_exec(connection);
    }
    let connection = start_exec(runs, name, &command, &stdio)?;
    loop {
        let mut polled = [pollfd(signals.as_fd()), pollfd(connection.socket())];
        poll(&mut polled).map_err(spawn_error("poll"))?;
        if polled[0].revents != 0 {
            if let Some(signal) = read_signal(&signals) {
                // A monitor gone meanwhile answers (or not) on the connection below.
                let _ = connection.signal(signal);
            }
        }
        if polled[1].revents != 0 {
            return finish_exec(connection);
        }
    }
}

/// Copies stdin to the terminal and the terminal to stdout, forwards signals and window
/// sizes, until the monitor's exit answer is ready to read.
fn relay_terminal(
    connection: &ExecConnection,
    signals: &OwnedFd,
    controller: &OwnedFd,
    stdio: [BorrowedFd<'_>; 3],
) -> io::Result<()> {
    let mut terminal = File::from(controller.try_clone()?);
    let mut input = File::from(stdio[0].try_clone_to_owned()?);
    let mut output = File::from(stdio[1].try_clone_to_owned()?);
    let (mut reading_input, mut reading_terminal) = (true, true);
    let mut buffer = [0u8; 8192];
    loop {
        let mut polled = vec![pollfd(signals.as_fd()), pollfd(connection.socket())];
        let terminal_slot = reading_terminal.then(|| {
            polled.push(pollfd(controller.as_fd()));
            polled.len() - 1
        });
        let input_slot = reading_input.then(|| {
            polled.push(pollfd(input.as_fd()));
            polled.len() - 1
        });
        poll(&mut polled)?;
        if polled[0].revents != 0 {
            match read_signal(signals) {
                Some(libc::SIGWINCH) => {
                    if let Ok(size) = terminal::size_of(stdio[0]) {
                        let _ = terminal::set_size(controller.as_fd(), size);
                    }
                }
                Some(signal) => {
                    let _ = connection.signal(signal);
                }
                None => {}
            }
        }
        if terminal_slot.is_some_and(|slot| polled[slot].revents != 0) {
            match terminal.read(&mut buffer) {
                Ok(read) if read > 0 => output.write_all(&buffer[..read])?,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                // EIO: every terminal end is closed (the command ended).
                _ => reading_terminal = false,
            }
        }
        if input_slot.is_some_and(|slot| polled[slot].revents != 0) {
            match input.read(&mut buffer) {
                Ok(read) if read > 0 => terminal.write_all(&buffer[..read])?,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                _ => reading_input = false,
            }
        }
        if polled[1].revents != 0 {
            // The command has ended: copy what its terminal still holds.
            while reading_terminal {
                let mut pending = [pollfd(controller.as_fd())];
                // SAFETY: one valid pollfd; a zero timeout only checks.
                let ready = unsafe { libc::poll(pending.as_mut_ptr(), 1, 0) };
                if ready <= 0 || pending[0].revents & libc::POLLIN == 0 {
                    break;
                }
                match terminal.read(&mut buffer) {
                    Ok(read) if read > 0 => output.write_all(&buffer[..read])?,
                    _ => reading_terminal = false,
                }
            }
            return output.flush();
        }
    }
}

/// The caller's terminal in raw mode while this lives (nothing when stdin is no terminal).
struct RawMode {
    fd: i32,
    saved: Option<libc::termios>,
}

impl RawMode {
    fn enter(fd: BorrowedFd<'_>) -> Self {
        let fd = fd.as_raw_fd();
        // SAFETY: a zeroed termios is valid storage for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into the live `saved`; it fails on a non-terminal.
        if unsafe { libc::tcgetattr(fd, &mut saved) } < 0 {
            return Self { fd, saved: None };
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw and tcsetattr only read and write the live `raw`.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(fd, libc::TCSADRAIN, &raw);
        }
        Self {
            fd,
            saved: Some(saved),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restores the settings read in `enter` on the same fd, which the caller
            // keeps open (it is its stdin).
            unsafe { libc::tcsetattr(self.fd, libc::TCSADRAIN, saved) };
        }
    }
}

fn pollfd(fd: BorrowedFd<'_>) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits for any of `polled`; EINTR counts as nothing ready.
fn poll(polled: &mut [libc::pollfd]) -> io::Result<()> {
    // SAFETY: `polled` is a live array of pollfds of the length passed.
    let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(())
}

/// Blocks `signals` for the calling thread and returns a signalfd that reads them.
fn blocked_signalfd(signals: &[i32]) -> io::Result<OwnedFd> {
    // SAFETY: a zeroed sigset is valid storage for sigemptyset, which initializes it;
    // sigaddset, pthread_sigmask and signalfd only read or write that local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in signals {
            libc::sigaddset(&mut set, *signal);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The next signal from the signalfd, if one is there.
fn read_signal(signals: &OwnedFd) -> Option<i32> {
    let mut information = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    let read = crate::kernel::read_full(signals.as_raw_fd(), &mut information).ok()?;
    if read != information.len() {
        return None;
    }
    let number = u32::from_ne_bytes([
        information[0],
        information[1],
        information[2],
        information[3],
    ]);
    Some(number as i32)
}
