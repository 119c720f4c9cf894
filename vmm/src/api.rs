//! The VMM's HTTP API on a Unix socket, served from the event loop: accept, read a request as
//! its bytes arrive, answer, close. Routes:
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | /api/v1/vmm.ping | 200 `{"version", "pid"}` |
//! | GET | /api/v1/vm.info | 200 state, config, boot time, vCPUs, memory |
//! | PUT | /api/v1/vm.pause | 204, or 409 if not running |
//! | PUT | /api/v1/vm.resume | 204, or 409 if not paused |
//! | PUT | /api/v1/vm.shutdown | 204, then the VMM exits 0 |
//!
//! A malformed request gets a 4xx with `{"error": ...}` and changes nothing.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;

use crate::control::ControlError;
use crate::http::{parse_request, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the API socket {0} is in use by a running process: choose another path")]
    InUse(PathBuf),
    #[error("cannot remove the stale API socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the API can ask of the VM.
pub trait VmApi {
    fn info(&self) -> serde_json::Value;
    fn pause(&self) -> Result<(), ControlError>;
    fn resume(&self) -> Result<(), ControlError>;
}

/// What to do after a response has been sent.
#[derive(Debug, PartialEq, Eq)]
enum After {
    Nothing,
    Shutdown,
}

fn route(request: &Request, vm: &dyn VmApi) -> (Response, After) {
    let conflict = |error: ControlError| match error {
        ControlError::PauseTimeout(_) => Response::error(500, error),
        _ => Response::error(409, error),
    };
    let answer = |response| (response, After::Nothing);
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/api/v1/vmm.ping") => answer(Response::json(
            200,
            serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id() }),
        )),
        ("GET", "/api/v1/vm.info") => answer(Response::json(200, vm.info())),
        ("PUT", "/api/v1/vm.pause") => answer(
            vm.pause()
                .map_or_else(conflict, |()| Response::no_content()),
        ),
        ("PUT", "/api/v1/vm.resume") => answer(
            vm.resume()
                .map_or_else(conflict, |()| Response::no_content()),
        ),
        ("PUT", "/api/v1/vm.shutdown") => (Response::no_content(), After::Shutdown),
        (
            method,
            path @ ("/api/v1/vmm.ping"
            | "/api/v1/vm.info"
            | "/api/v1/vm.pause"
            | "/api/v1/vm.resume"
            | "/api/v1/vm.shutdown"),
        ) => {
            let allowed = if path.ends_with("ping") || path.ends_with("info") {
                "GET"
            } else {
                "PUT"
            };
            answer(Response::error(
                405,
                format!("{method} is not allowed on {path}: use {allowed}"),
            ))
        }
        (_, path) => answer(Response::error(
            404,
            format!("no such endpoint {path}: see cove-vmm --help"),
        )),
    }
}

struct Connection {
    stream: UnixStream,
    received: Vec<u8>,
}

/// The listening socket and the connections being read.
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    connections: HashMap<RawFd, Connection>,
}

impl ApiServer {
    /// Binds `path`. A socket file left behind by a VMM that is gone is replaced; one that a
    /// live process answers on is not.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|source| ApiError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let bind_error = |source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            connections: HashMap::new(),
        })
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    pub fn owns(&self, fd: RawFd) -> bool {
        fd == self.listener.as_raw_fd() || self.connections.contains_key(&fd)
    }

    /// Handles readiness on the listener or a connection. Returns true if the VM must shut down.
    pub fn handle(&mut self, fd: RawFd, ops: &mut EventOps, vm: &dyn VmApi) -> bool {
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return false;
        }
        let Some(connection) = self.connections.get_mut(&fd) else {
            return false;
        };
        let mut chunk = [0u8; 4096];
        let outcome = loop {
            match connection.stream.read(&mut chunk) {
                Ok(0) => break Some((None, After::Nothing)),
                Ok(read) => {
                    connection.received.extend_from_slice(&chunk[..read]);
                    match parse_request(&connection.received) {
                        Ok(None) => continue,
                        Ok(Some(request)) => {
                            let (response, after) = route(&request, vm);
                            break Some((Some(response), after));
                        }
                        Err(error) => {
                            break Some((
                                Some(Response::error(error.status(), error)),
                                After::Nothing,
                            ))
                        }
                    }
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => break None,
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break Some((None, After::Nothing)),
            }
        };
        let Some((response, after)) = outcome else {
            return false;
        };
        let connection = self
            .connections
            .remove(&fd)
            .expect("the connection was just found");
        let _ = ops.remove(Events::new(&connection.stream, EventSet::IN));
        if let Some(response) = response {
            send(&connection.stream, &response);
        }
        after == After::Shutdown
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                self.connections.insert(
                    stream.as_raw_fd(),
                    Connection {
                        stream,
                        received: Vec::new(),
                    },
                );
            }
        }
    }
}

/// Writes a response; a client that does not read it within a second loses it.
fn send(stream: &UnixStream, response: &Response) {
    let mut stream = stream;
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&response.to_bytes());
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Stands in for the VM to check routing alone; the real VM is tested in tests/.
    #[derive(Default)]
    struct RecordingVm {
        paused: Cell<bool>,
    }

    impl VmApi for RecordingVm {
        fn info(&self) -> serde_json::Value {
            serde_json::json!({ "state": if self.paused.get() { "Paused" } else { "Running" } })
        }
        fn pause(&self) -> Result<(), ControlError> {
            if self.paused.replace(true) {
                Err(ControlError::AlreadyPaused)
            } else {
                Ok(())
            }
        }
        fn resume(&self) -> Result<(), ControlError> {
            if self.paused.replace(false) {
                Ok(())
            } else {
                Err(ControlError::NotPaused)
            }
        }
    }

    fn request(method: &str, path: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: Vec::new(),
        }
    }

    #[test]
    fn routes_answer_with_the_right_status() {
        let vm = RecordingVm::default();
        let status = |method: &str, path: &str| route(&request(method, path), &vm).0.status;
        assert_eq!(status("GET", "/api/v1/vmm.ping"), 200);
        assert_eq!(status("PUT", "/api/v1/vm.pause"), 204);
        assert_eq!(status("PUT", "/api/v1/vm.pause"), 409);
        assert_eq!(
            route(&request("GET", "/api/v1/vm.info"), &vm)
                .0
                .body
                .unwrap()["state"],
            "Paused"
        );
        assert_eq!(status("PUT", "/api/v1/vm.resume"), 204);
        assert_eq!(status("PUT", "/api/v1/vm.resume"), 409);
        assert_eq!(status("GET", "/api/v1/vm.pause"), 405);
        assert_eq!(status("DELETE", "/api/v1/vm.info"), 405);
        assert_eq!(status("GET", "/api/v1/vm.nothing"), 404);
        assert_eq!(
            route(&request("PUT", "/api/v1/vm.shutdown"), &vm).1,
            After::Shutdown
        );
    }
}
