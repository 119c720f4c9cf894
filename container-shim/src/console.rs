//! The container's console: a pseudo-terminal whose terminal end is the init's stdin, stdout,
//! stderr and `/dev/console`, and whose controlling end stays on the host, where everything
//! the container writes to its console is appended to a log file by a copier thread that runs
//! until the container is released.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot open a pseudo-terminal for the console ({step}): {source}")]
    Open {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot hand the console {path} to the container's root: {source}")]
    Owner {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the console log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Both ends of the console's pseudo-terminal.
#[derive(Debug)]
pub struct Console {
    pub controller: OwnedFd,
    pub terminal: OwnedFd,
    pub terminal_path: PathBuf,
}

fn open_error(step: &'static str) -> impl FnOnce(io::Error) -> ConsoleError {
    move |source| ConsoleError::Open { step, source }
}

impl Console {
    /// Opens a new pseudo-terminal whose terminal end belongs to host ids `uid`:`gid` (the
    /// container's root, which could not open it otherwise).
    pub fn open(uid: u32, gid: u32) -> Result<Self, ConsoleError> {
        // SAFETY: posix_openpt takes flags only.
        let controller =
            unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if controller < 0 {
            return Err(open_error("posix_openpt")(io::Error::last_os_error()));
        }
        // SAFETY: posix_openpt returned a new fd that nothing else owns.
        let controller = unsafe { OwnedFd::from_raw_fd(controller) };
        // SAFETY: the fd is an open pseudo-terminal controller.
        if unsafe { libc::unlockpt(controller.as_raw_fd()) } < 0 {
            return Err(open_error("unlockpt")(io::Error::last_os_error()));
        }
        let mut name = [0 as libc::c_char; 64];
        // SAFETY: `name` has room for the length passed; ptsname_r NUL-terminates it.
        let result =
            unsafe { libc::ptsname_r(controller.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if result != 0 {
            return Err(open_error("ptsname_r")(io::Error::from_raw_os_error(
                result,
            )));
        }
        // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let terminal_path = PathBuf::from(name.to_string_lossy().into_owned());
        let terminal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&terminal_path)
            .map_err(open_error("open the terminal end"))?;
        std::os::unix::fs::fchown(&terminal, Some(uid), Some(gid)).map_err(|source| {
            ConsoleError::Owner {
                path: terminal_path.clone(),
                source,
            }
        })?;
        Ok(Self {
            controller,
            terminal: terminal.into(),
            terminal_path,
        })
    }

    /// Copies everything written to the console into `log` (appending) until the returned
    /// logger is stopped or dropped.
    ///
    /// The copier holds a terminal end of its own: an init such as systemd closes every
    /// console descriptor for a moment while it starts (its stdio becomes `/dev/null` before it
    /// opens `/dev/console` again), and a pseudo-terminal whose terminal ends are all closed
    /// fails reads on its controlling end with EIO. A hangup (`vhangup`, as gettys do) still
    /// takes that end away too; the copier then opens the terminal again.
    pub fn log_to(&self, log: &Path) -> Result<ConsoleLogger, ConsoleError> {
        let log_error = |source| ConsoleError::Log {
            path: log.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(log_error)?;
        let controller = File::from(self.controller.try_clone().map_err(log_error)?);
        let terminal = self.terminal.try_clone().map_err(log_error)?;
        let (stop_read, stop_write) = crate::kernel::pipe().map_err(log_error)?;
        let copier = Copier {
            controller,
            terminal: Some(terminal),
            terminal_path: self.terminal_path.clone(),
            log: file,
            stop: stop_read,
        };
        Ok(ConsoleLogger {
            stop: stop_write,
            thread: std::thread::spawn(move || copier.run()),
        })
    }
}

/// The thread that copies the console into its log; stop it with [`ConsoleLogger::stop`].
#[derive(Debug)]
pub struct ConsoleLogger {
    /// Closing this pipe end wakes the copier, which then copies what is left and ends.
    stop: OwnedFd,
    thread: JoinHandle<()>,
}

/// How long [`ConsoleLogger::stop`] waits for the copier to finish.
const STOP_PATIENCE: Duration = Duration::from_secs(2);

impl ConsoleLogger {
    /// Copies what the console still holds into the log and ends the copier. A copier that
    /// does not end in time (another thread's child holds a copy of the stop pipe until it
    /// execs) is left to end on its own.
    pub fn stop(self) {
        drop(self.stop);
        let deadline = Instant::now() + STOP_PATIENCE;
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        }
    }
}

struct Copier {
    controller: File,
    /// The copier's own terminal end; `None` while a hangup has taken it.
    terminal: Option<OwnedFd>,
    terminal_path: PathBuf,
    log: File,
    stop: OwnedFd,
}

impl Copier {
    fn run(mut self) {
        loop {
            let mut polls = [
                libc::pollfd {
                    fd: self.controller.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `polls` is an array of two valid pollfds of the length passed.
            let ready = unsafe { libc::poll(polls.as_mut_ptr(), 2, -1) };
            if ready < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if polls[1].revents != 0 {
                self.drain();
                return;
            }
            if polls[0].revents & libc::POLLIN != 0 {
                if !self.copy_once() {
                    return;
                }
            } else if polls[0].revents != 0 {
                // POLLHUP: no terminal end is open, our own was hung up.
                self.reopen_terminal();
            }
        }
    }

    /// Copies one read's worth; false when the log cannot be written.
    fn copy_once(&mut self) -> bool {
        let mut buffer = [0u8; 4096];
        match self.controller.read(&mut buffer) {
            Ok(0) => {
                self.reopen_terminal();
                true
            }
            Ok(read) => self.log.write_all(&buffer[..read]).is_ok(),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => true,
            // EIO: every terminal end is closed or hung up.
            Err(_) => {
                self.reopen_terminal();
                true
            }
        }
    }

    fn reopen_terminal(&mut self) {
        self.terminal = None;
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&self.terminal_path)
        {
            Ok(terminal) => self.terminal = Some(terminal.into()),
            // Mid-hangup the terminal refuses to open for a moment.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }

    /// Copies what the console holds now, without waiting for more.
    fn drain(&mut self) {
        loop {
            let mut poll = libc::pollfd {
                fd: self.controller.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `poll` is one valid pollfd.
            let ready = unsafe { libc::poll(&mut poll, 1, 0) };
            if ready <= 0 || poll.revents & libc::POLLIN == 0 {
                return;
            }
            let mut buffer = [0u8; 4096];
            match self.controller.read(&mut buffer) {
                Ok(read) if read > 0 => {
                    if self.log.write_all(&buffer[..read]).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    }
}
