//! The local side of an exec: the terminal in raw mode while a pty exec runs, its size and
//! changes to it, stdin copied to the command, and signals forwarded to it.

use std::io::Read;

use cove_agent::client::ExecControl;
use cove_agent::protocol::{WindowSize, DATA_CHUNK};

/// Signals cove-agent-ctl passes on to the command instead of dying of them.
const FORWARDED: [i32; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

pub(crate) fn is_terminal(fd: i32) -> bool {
    // SAFETY: isatty() takes no pointers.
    unsafe { libc::isatty(fd) == 1 }
}

/// The size of the terminal on stdout (or stdin).
pub(crate) fn window_size() -> Option<WindowSize> {
    for fd in [1, 0] {
        // SAFETY: an all-zero winsize is a valid output buffer.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: `size` is valid for writes during the call.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } == 0
            && size.ws_row > 0
            && size.ws_col > 0
        {
            return Some(WindowSize {
                rows: size.ws_row,
                columns: size.ws_col,
            });
        }
    }
    None
}

/// The local terminal in raw mode, restored when dropped.
pub(crate) struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    pub(crate) fn enter(fd: i32) -> Option<RawMode> {
        // SAFETY: an all-zero termios is a valid output buffer.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is valid for writes during the call.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is an initialised termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios that outlives the call.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: `saved` is the termios read from this terminal at the start.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Blocks the forwarded signals in this thread (and the threads it starts later), so that
/// only `forward_signals`'s thread receives them.
pub(crate) fn block_forwarded_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set before sigaddset and pthread_sigmask
    // read it; the old mask is not asked for.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Passes the blocked signals on: a window change becomes a resize (pty execs), any other
/// one is sent to the command.
pub(crate) fn forward_signals(set: libc::sigset_t, control: ExecControl, pty: bool) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut signal = 0;
            // SAFETY: `set` is an initialised sigset_t and `signal` is valid for writes.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                return;
            }
            let sent = if signal == libc::SIGWINCH {
                match (pty, window_size()) {
                    (true, Some(size)) => control.resize(size),
                    _ => Ok(()),
                }
            } else {
                control.signal(signal, false)
            };
            if sent.is_err() {
                return;
            }
        });
}

/// Copies stdin to the command until it ends.
pub(crate) fn forward_stdin(control: ExecControl) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buffer = vec![0u8; DATA_CHUNK];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(read) => {
                        if control.write_stdin(&buffer[..read]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = control.close_stdin();
        });
}
