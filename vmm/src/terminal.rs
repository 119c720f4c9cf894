//! The host side of the console: stdin in raw mode while the guest owns it (so keys such as
//! Ctrl-C reach the guest), restored when the VMM ends; and the signals that stop the VM,
//! received through a signalfd in the event loop rather than in a handler.

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::unix::io::{AsRawFd, FromRawFd};

/// Puts stdin in raw mode and restores the previous mode on drop.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Returns `None` when stdin is not a terminal.
    pub fn enable() -> Option<Self> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        let mut saved = MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills the termios it is given; we read it only on success.
        if unsafe { libc::tcgetattr(fd, saved.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: tcgetattr succeeded, so `saved` is initialised.
        let saved = unsafe { saved.assume_init() };
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the termios read in `enable`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts later) and returns a
/// signalfd that reports them.
pub fn stop_signals() -> std::io::Result<File> {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signal numbers to it.
    let set = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        set.assume_init()
    };
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let result = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if result != 0 {
        return Err(std::io::Error::from_raw_os_error(result));
    }
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Reads the signal numbers pending on a signalfd.
pub fn read_signal(signals: &File) -> Option<i32> {
    let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`, which has that size.
    let read = unsafe { libc::read(signals.as_raw_fd(), info.as_mut_ptr().cast(), size) };
    if read as usize != size {
        return None;
    }
    // SAFETY: the kernel filled the whole struct.
    Some(unsafe { info.assume_init() }.ssi_signo as i32)
}
