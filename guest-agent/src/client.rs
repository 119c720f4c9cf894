//! The host's side: a client library for cove-agent, over a Unix socket the agent serves on
//! (`cove-agent --unix PATH`) or through cove-vmm's vsock socket (Firecracker's `CONNECT`).
//! Every operation opens a connection of its own, so any number can run at once from any
//! threads; a `Client` is only an address.
//!
//! Readiness is pushed, not polled: the host listens (for vsock, at `<vmm socket>_<announce
//! port>`, see `announce_path`) before it starts the guest, and `wait_ready` returns the
//! agent's announcement.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::protocol::{
    self, AgentHello, AgentMessage, Channel, ErrorCode, ExecRequest, ExitStatus, FileInfo,
    FileKind, Frame, FrameError, FrameReader, FrameWriter, GuestState, HostMessage, InvalidRequest,
    PowerAction, PushRequest, WindowSize, DATA_CHUNK,
};
use crate::transport::Stream;

/// How long connecting, the vsock handshake and the hello may take.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest answer to `CONNECT` that cove-vmm gives (`OK <u32>\n` is 14 bytes).
const MAX_HANDSHAKE_LINE: usize = 64;

/// Where the agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket the agent serves on (`cove-agent --unix PATH`).
    Unix(PathBuf),
    /// A guest port, through the Unix socket of cove-vmm's vsock device.
    Vsock { socket: PathBuf, port: u32 },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(formatter, "unix socket {}", path.display()),
            Endpoint::Vsock { socket, port } => {
                write!(formatter, "vsock port {port} through {}", socket.display())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("cove-vmm's vsock socket {socket} opened no stream to guest port {port}: {reason}")]
    VsockHandshake {
        socket: PathBuf,
        port: u32,
        reason: String,
    },
    #[error("the connection to the agent failed")]
    Frame(#[from] FrameError),
    #[error("the agent closed the connection {during}")]
    Closed { during: &'static str },
    #[error("{message}")]
    Agent { code: ErrorCode, message: String },
    #[error("the agent sent {got} where {expected} was due")]
    Unexpected { expected: &'static str, got: String },
    #[error("the agent speaks protocol version {0}; this client speaks version {v}", v = protocol::VERSION)]
    Version(u32),
    #[error("no agent announced itself within {0:?}")]
    NotReady(Duration),
    #[error("waiting for the agent's announcement failed")]
    Listen(#[source] io::Error),
    #[error("cannot {what}")]
    Local {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
}

impl ClientError {
    /// The agent's error code, when the agent refused the request.
    pub fn agent_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How to reach an agent.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    connect_timeout: Duration,
}

/// Owner and permission bits of a pushed file or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attributes {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A finished command: its output and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Client {
            endpoint,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// How long connecting and the hello may take (30 s unless set).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Opens a connection and exchanges hellos.
    pub fn connect(&self) -> Result<Session, ClientError> {
        let connect_error = |source| ClientError::Connect {
            endpoint: self.endpoint.to_string(),
            source,
        };
        let stream = match &self.endpoint {
            Endpoint::Unix(path) => UnixStream::connect(path).map_err(connect_error)?,
            Endpoint::Vsock { socket, port } => {
                let stream = UnixStream::connect(socket).map_err(connect_error)?;
                vsock_handshake(&stream, socket, *port, self.connect_timeout)?;
                stream
            }
        };
        stream
            .set_read_timeout(Some(self.connect_timeout))
            .map_err(connect_error)?;
        let stream = Stream::from(stream);
        let reader = stream.try_clone().map_err(connect_error)?;
        let mut session = Session {
            reader: FrameReader::new(reader),
            writer: FrameWriter::new(stream),
            agent: None,
        };
        session.send(&HostMessage::Hello {
            version: u32::from(protocol::VERSION),
            client: format!("cove-agent client {}", env!("CARGO_PKG_VERSION")),
        })?;
        match session.next("the agent's hello")? {
            Frame::Control(AgentMessage::Hello(hello)) => {
                if hello.version != u32::from(protocol::VERSION) {
                    return Err(ClientError::Version(hello.version));
                }
                session.agent = Some(hello);
            }
            other => return Err(unexpected("the agent's hello", &other)),
        }
        session
            .reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(connect_error)?;
        Ok(session)
    }

    /// Starts a command; its output, signals and exit come through the returned `Exec`.
    pub fn exec(&self, request: &ExecRequest) -> Result<Exec, ClientError> {
        request.validate()?;
        let mut session = self.connect()?;
        session.send(&HostMessage::Exec(request.clone()))?;
        let pid = match session.next("the exec's start")? {
            Frame::Control(AgentMessage::Started { pid }) => pid,
            other => return Err(unexpected("the exec's start", &other)),
        };
        Ok(Exec {
            pid,
            reader: session.reader,
            control: ExecControl {
                writer: Arc::new(Mutex::new(session.writer)),
            },
            exited: false,
        })
    }

    /// Runs a command to its end, with `stdin` as its input, and collects its output.
    pub fn run(&self, request: &ExecRequest, stdin: &[u8]) -> Result<Output, ClientError> {
        let mut exec = self.exec(request)?;
        let control = exec.control();
        std::thread::scope(|scope| {
            // Input goes in from a thread of its own: a command that writes as much as it
            // reads (cat) needs its output read while its input is still being sent.
            scope.spawn(move || {
                for chunk in stdin.chunks(DATA_CHUNK) {
                    if control.write_stdin(chunk).is_err() {
                        return;
                    }
                }
                let _ = control.close_stdin();
            });
            exec.collect()
        })
    }

    /// Creates or replaces the file at `path` in the guest with what `source` reads.
    /// Returns the bytes written.
    pub fn push_file(
        &self,
        path: &str,
        attributes: Attributes,
        source: &mut dyn Read,
    ) -> Result<u64, ClientError> {
        let request = PushRequest {
            path: path.to_string(),
            kind: FileKind::File,
            mode: attributes.mode,
            uid: attributes.uid,
            gid: attributes.gid,
            target: None,
        };
        request.validate()?;
        let mut session = self.connect()?;
        session.send(&HostMessage::Push(request))?;
        let mut buffer = vec![0u8; DATA_CHUNK];
        loop {
            // The agent answers early only to refuse (a full disk): stop sending then.
            if session.answer_waiting() {
                return session.push_answer();
            }
            let read = match source.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ClientError::Local {
                        what: format!("read what should go to {path}"),
                        source,
                    })
                }
            };
            if let Err(error) = session.writer.data(Channel::File, &buffer[..read]) {
                // The agent may have refused and closed: its answer says why.
                return session.push_answer().and(Err(error.into()));
            }
        }
        session.writer.end(Channel::File)?;
        session.push_answer()
    }

    /// Creates the directory `path` (or gives an existing one these attributes).
    pub fn push_directory(&self, path: &str, attributes: Attributes) -> Result<(), ClientError> {
        self.push_other(PushRequest {
            path: path.to_string(),
            kind: FileKind::Directory,
            mode: attributes.mode,
            uid: attributes.uid,
            gid: attributes.gid,
            target: None,
        })
    }

    /// Creates or replaces the symlink `path`, pointing at `target`.
    pub fn push_symlink(
        &self,
        path: &str,
        target: &str,
        uid: u32,
        gid: u32,
    ) -> Result<(), ClientError> {
        self.push_other(PushRequest {
            path: path.to_string(),
            kind: FileKind::Symlink,
            mode: 0o777,
            uid,
            gid,
            target: Some(target.to_string()),
        })
    }

    fn push_other(&self, request: PushRequest) -> Result<(), ClientError> {
        request.validate()?;
        let mut session = self.connect()?;
        session.send(&HostMessage::Push(request))?;
        session.push_answer().map(|_| ())
    }

    /// What is at `path` in the guest; a file's content goes to `sink`.
    pub fn pull(&self, path: &str, sink: &mut dyn Write) -> Result<FileInfo, ClientError> {
        protocol::check_path("path", path)?;
        let mut session = self.connect()?;
        session.send(&HostMessage::Pull {
            path: path.to_string(),
        })?;
        let info = match session.next("the file's description")? {
            Frame::Control(AgentMessage::FileInfo(info)) => info,
            other => return Err(unexpected("the file's description", &other)),
        };
        if info.kind != FileKind::File {
            return Ok(info);
        }
        loop {
            match session.next("the file's content")? {
                Frame::Data(Channel::File, bytes) => {
                    sink.write_all(&bytes)
                        .map_err(|source| ClientError::Local {
                            what: format!("write what came from {path}"),
                            source,
                        })?
                }
                Frame::End(Channel::File) => return Ok(info),
                other => return Err(unexpected("the file's content", &other)),
            }
        }
    }

    /// The guest's state.
    pub fn state(&self) -> Result<GuestState, ClientError> {
        let mut session = self.connect()?;
        session.send(&HostMessage::State {})?;
        match session.next("the state")? {
            Frame::Control(AgentMessage::State(state)) => Ok(state),
            other => Err(unexpected("the state", &other)),
        }
    }

    /// Powers off or reboots the guest; returns once the agent has accepted.
    pub fn shutdown(
        &self,
        action: PowerAction,
        grace_seconds: Option<u32>,
    ) -> Result<(), ClientError> {
        let mut session = self.connect()?;
        session.send(&HostMessage::Shutdown {
            action,
            grace_seconds,
        })?;
        match session.next("the shutdown's acceptance")? {
            Frame::Control(AgentMessage::Done { .. }) => Ok(()),
            other => Err(unexpected("the shutdown's acceptance", &other)),
        }
    }
}

/// One connection to the agent, after the hellos.
pub struct Session {
    reader: FrameReader<Stream>,
    writer: FrameWriter<Stream>,
    agent: Option<AgentHello>,
}

impl Session {
    /// The agent's hello.
    pub fn agent(&self) -> Option<&AgentHello> {
        self.agent.as_ref()
    }

    /// Sends a control message.
    pub fn send(&mut self, message: &HostMessage) -> Result<(), ClientError> {
        self.writer.control(message).map_err(ClientError::from)
    }

    /// Sends raw bytes on a stream (for tests and tools that speak the protocol by hand).
    pub fn send_data(&mut self, channel: Channel, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer.data(channel, bytes).map_err(ClientError::from)
    }

    /// The next frame; an agent's error message becomes `ClientError::Agent`.
    pub fn next(&mut self, during: &'static str) -> Result<Frame<AgentMessage>, ClientError> {
        match self.reader.read::<AgentMessage>() {
            Ok(Some(Frame::Control(AgentMessage::Error(reply)))) => Err(ClientError::Agent {
                code: reply.code,
                message: reply.message,
            }),
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(ClientError::Closed { during }),
            Err(error) if error.is_disconnect() => Err(ClientError::Closed { during }),
            Err(error) => Err(error.into()),
        }
    }

    /// True when the agent has sent something that is waiting to be read.
    fn answer_waiting(&self) -> bool {
        let mut poll_fd = libc::pollfd {
            fd: self.reader.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, which outlives the call; no waiting.
        unsafe { libc::poll(&mut poll_fd, 1, 0) > 0 }
    }

    fn push_answer(&mut self) -> Result<u64, ClientError> {
        match self.next("the push's answer")? {
            Frame::Control(AgentMessage::Done { bytes }) => Ok(bytes),
            other => Err(unexpected("the push's answer", &other)),
        }
    }

    /// The raw stream, for tests that send malformed bytes on purpose.
    pub fn raw_stream(&self) -> &Stream {
        self.writer.get_ref()
    }
}

fn unexpected(expected: &'static str, frame: &Frame<AgentMessage>) -> ClientError {
    let got = match frame {
        Frame::Control(message) => serde_json::to_string(message)
            .map(|json| format!("the message {json}"))
            .unwrap_or_else(|_| "a control message".into()),
        Frame::Data(channel, bytes) => format!("{} bytes of {}", bytes.len(), channel.name()),
        Frame::End(channel) => format!("the end of {}", channel.name()),
    };
    ClientError::Unexpected { expected, got }
}

/// Firecracker's handshake on cove-vmm's vsock socket: `CONNECT <port>\n`, answered
/// `OK <host port>\n`. Reads the answer a byte at a time: what follows it is the agent's.
fn vsock_handshake(
    stream: &UnixStream,
    socket: &Path,
    port: u32,
    timeout: Duration,
) -> Result<(), ClientError> {
    let failed = |reason: String| ClientError::VsockHandshake {
        socket: socket.to_path_buf(),
        port,
        reason,
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|error| failed(error.to_string()))?;
    (&*stream)
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|error| failed(format!("cannot send CONNECT: {error}")))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match (&*stream).read(&mut byte) {
            Ok(0) => {
                return Err(failed(
                    "cove-vmm closed the connection: nothing listens on that port in the guest \
                     (is the agent up?)"
                        .into(),
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_HANDSHAKE_LINE {
                    return Err(failed("the answer to CONNECT is too long".into()));
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(failed(format!("no answer to CONNECT: {error}"))),
        }
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        return Err(failed(format!("cove-vmm answered {line:?}")));
    }
    Ok(())
}

/// A running command.
pub struct Exec {
    pid: i32,
    reader: FrameReader<Stream>,
    control: ExecControl,
    exited: bool,
}

/// What a running command did next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Output on stdout or stderr (with a pty, all of it is stdout).
    Output(Channel, Vec<u8>),
    /// The command's stdout or stderr is over.
    Closed(Channel),
    /// The command ended; nothing comes after this.
    Exited(ExitStatus),
}

impl Exec {
    /// The command's pid in the guest.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A handle for stdin, signals and resizes, usable from other threads.
    pub fn control(&self) -> ExecControl {
        self.control.clone()
    }

    /// The next event; after `Exited`, an error.
    pub fn next_event(&mut self) -> Result<ExecEvent, ClientError> {
        if self.exited {
            return Err(ClientError::Closed {
                during: "after the command ended",
            });
        }
        let frame = match self.reader.read::<AgentMessage>() {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                return Err(ClientError::Closed {
                    during: "before the command ended",
                })
            }
            Err(error) if error.is_disconnect() => {
                return Err(ClientError::Closed {
                    during: "before the command ended",
                })
            }
            Err(error) => return Err(error.into()),
        };
        match frame {
            Frame::Data(channel @ (Channel::Stdout | Channel::Stderr), bytes) => {
                Ok(ExecEvent::Output(channel, bytes))
            }
            Frame::End(channel @ (Channel::Stdout | Channel::Stderr)) => {
                Ok(ExecEvent::Closed(channel))
            }
            Frame::Control(AgentMessage::Exited(status)) => {
                if status.code.is_some() == status.signal.is_some() {
                    return Err(ClientError::Unexpected {
                        expected: "an exit code or a signal",
                        got: format!("{status:?}"),
                    });
                }
                self.exited = true;
                Ok(ExecEvent::Exited(status))
            }
            Frame::Control(AgentMessage::Error(reply)) => Err(ClientError::Agent {
                code: reply.code,
                message: reply.message,
            }),
            other => Err(unexpected("the command's output or exit", &other)),
        }
    }

    /// Reads everything up to the exit.
    pub fn collect(&mut self) -> Result<Output, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        loop {
            match self.next_event()? {
                ExecEvent::Output(Channel::Stderr, bytes) => stderr.extend_from_slice(&bytes),
                ExecEvent::Output(_, bytes) => stdout.extend_from_slice(&bytes),
                ExecEvent::Closed(_) => {}
                ExecEvent::Exited(status) => {
                    return Ok(Output {
                        stdout,
                        stderr,
                        status,
                    })
                }
            }
        }
    }
}

/// The sending half of an exec: stdin, signals, resizes.
#[derive(Clone)]
pub struct ExecControl {
    writer: Arc<Mutex<FrameWriter<Stream>>>,
}

impl ExecControl {
    fn lock(&self) -> MutexGuard<'_, FrameWriter<Stream>> {
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn write_stdin(&self, bytes: &[u8]) -> Result<(), ClientError> {
        Ok(self.lock().data(Channel::Stdin, bytes)?)
    }

    /// Ends the command's stdin (with a pty: types the end-of-file character).
    pub fn close_stdin(&self) -> Result<(), ClientError> {
        Ok(self.lock().end(Channel::Stdin)?)
    }

    /// Sends `signal` to the command, or to its whole process group.
    pub fn signal(&self, signal: i32, group: bool) -> Result<(), ClientError> {
        Ok(self
            .lock()
            .control(&HostMessage::Signal { signal, group })?)
    }

    /// Tells the command's terminal its new size (pty execs only).
    pub fn resize(&self, size: WindowSize) -> Result<(), ClientError> {
        Ok(self.lock().control(&HostMessage::Resize(size))?)
    }
}

/// Where a guest's announcement arrives for a VM started with `--vsock ...,socket=SOCKET`:
/// `SOCKET_<port>`, the Unix listener cove-vmm connects a guest's connection to host port
/// `port` to.
pub fn announce_path(vsock_socket: &Path, port: u32) -> PathBuf {
    let mut path = vsock_socket.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Waits for an agent's announcement on `listener` (which the host set up before starting
/// the guest) and returns it.
pub fn wait_ready(listener: &UnixListener, timeout: Duration) -> Result<AgentHello, ClientError> {
    let deadline = Instant::now() + timeout;
    listener
        .set_nonblocking(true)
        .map_err(ClientError::Listen)?;
    let result = (|| loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(ClientError::Listen)?;
                let left = deadline.saturating_duration_since(Instant::now());
                stream
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .map_err(ClientError::Listen)?;
                let mut reader = FrameReader::new(stream);
                return match reader.read::<AgentMessage>()? {
                    Some(Frame::Control(AgentMessage::Hello(hello))) if hello.boot.is_some() => {
                        Ok(hello)
                    }
                    Some(other) => Err(unexpected("the agent's announcement", &other)),
                    None => Err(ClientError::Closed {
                        during: "before announcing itself",
                    }),
                };
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ClientError::NotReady(timeout));
                }
                let mut poll_fd = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let millis = left.as_millis().clamp(1, 60_000) as libc::c_int;
                // SAFETY: one valid pollfd, which outlives the call.
                unsafe { libc::poll(&mut poll_fd, 1, millis) };
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(ClientError::Listen(error)),
        }
    })();
    let _ = listener.set_nonblocking(false);
    result
}
