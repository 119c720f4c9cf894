//! The container's console: a pseudo-terminal whose terminal end is the init's stdin, stdout,
//! stderr and `/dev/console`, and whose controlling end stays on the host, where everything
//! the container writes to its console is appended to a log file.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

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

    /// Copies everything written to the console into `log` (appending) until every terminal
    /// end is closed, that is until the container has stopped.
    pub fn log_to(&self, log: &Path) -> Result<JoinHandle<()>, ConsoleError> {
        let log_error = |source| ConsoleError::Log {
            path: log.to_path_buf(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(log_error)?;
        let mut controller = File::from(self.controller.try_clone().map_err(log_error)?);
        Ok(std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            loop {
                match controller.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(read) => {
                        if file.write_all(&buffer[..read]).is_err() {
                            return;
                        }
                    }
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    // EIO: the last terminal end closed.
                    Err(_) => return,
                }
            }
        }))
    }
}
