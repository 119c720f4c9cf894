//! Console input from a Unix socket (`--serial-input PATH`): what a client writes there is
//! typed into COM1, as stdin is with `--serial tty`. One client at a time; a new one replaces
//! the old. Output still goes where `--serial` says (a file), so a supervisor can keep the log
//! and still offer an interactive console. Served from the event loop like the API socket.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cove_devices::legacy::SerialPort;
use event_manager::{EventOps, EventSet, Events};

#[derive(Debug, thiserror::Error)]
pub enum SerialInputError {
    #[error("the serial input socket {0} is in use by a running process")]
    InUse(PathBuf),
    #[error("cannot remove the stale serial input socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on the serial input socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The listening socket and the client typing into the console, if any.
#[derive(Debug)]
pub struct SerialInput {
    path: PathBuf,
    listener: UnixListener,
    client: Option<UnixStream>,
}

impl SerialInput {
    /// Listens on `path`, replacing a stale socket file no process answers on.
    pub fn bind(path: &Path) -> Result<Self, SerialInputError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(SerialInputError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|source| SerialInputError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let bind_error = |source| SerialInputError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            client: None,
        })
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    pub fn owns(&self, fd: RawFd) -> bool {
        fd == self.listener.as_raw_fd()
            || self
                .client
                .as_ref()
                .is_some_and(|client| client.as_raw_fd() == fd)
    }

    fn drop_client(&mut self, ops: &mut EventOps) {
        if let Some(client) = self.client.take() {
            let _ = ops.remove(Events::new(&client, EventSet::IN));
        }
    }

    /// Handles readiness on the listener (a new client) or the client (input, or its end).
    pub fn handle(&mut self, fd: RawFd, ops: &mut EventOps, serial: &Arc<Mutex<SerialPort>>) {
        if fd == self.listener.as_raw_fd() {
            while let Ok((stream, _)) = self.listener.accept() {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                self.drop_client(ops);
                if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                    self.client = Some(stream);
                }
            }
            return;
        }
        let mut buffer = [0u8; 64];
        let read = match self.client.as_mut() {
            Some(client) => client.read(&mut buffer),
            None => return,
        };
        match read {
            Ok(0) => self.drop_client(ops),
            Ok(count) => {
                // Input beyond what the guest's receive FIFO holds is dropped, as a real UART
                // would overrun.
                let _ = cove_devices::bus::lock(serial).enqueue_input(&buffer[..count]);
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.drop_client(ops),
        }
    }
}

impl Drop for SerialInput {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let directory =
            std::env::temp_dir().join(format!("cove-serial-input-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("console.sock");
        drop(UnixListener::bind(&path).unwrap());
        let input = SerialInput::bind(&path).expect("a stale socket file is replaced");
        assert!(matches!(
            SerialInput::bind(&path),
            Err(SerialInputError::InUse(_))
        ));
        drop(input);
        assert!(!path.exists(), "the socket goes with cove-vmm");
        let _ = std::fs::remove_dir_all(&directory);
    }
}
