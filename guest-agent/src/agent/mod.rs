//! The agent: what runs inside the guest. It listens (vsock, or a Unix socket), announces
//! itself to the host, and serves each connection in a thread of its own: the hello exchange,
//! then one request (exec, push, pull, state or shutdown) and its conversation.
//!
//! As the guest's init (PID 1, or `--init`) it first prepares the system (`init`); a single
//! reaper (`children`) collects every child's exit status. A connection that sends something
//! malformed gets an error message and is closed; nothing a client sends ends the agent.

mod children;
mod exec;
mod files;
mod init;
mod power;
mod state;

use std::error::Error;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::protocol::{
    self, AgentHello, AgentMessage, BootFacts, Channel, ErrorCode, ErrorReply, Frame, FrameError,
    FrameReader, FrameWriter, HostMessage,
};
use crate::transport::{Address, Listener, Stream, TransportError};

pub use children::block_sigchld;

/// How long a new connection may take to send its hello and its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the agent does, from its command line.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: Address,
    /// Where to announce readiness (the host's vsock port, or a Unix socket).
    pub announce: Option<Address>,
    /// Prepare the system as its init would: mount /proc and friends, bring up `lo`, reap
    /// orphans. Always done when the agent is PID 1.
    pub init: bool,
    /// Connections served at once; more are told `busy` and closed.
    pub max_connections: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Children(#[from] children::ChildrenError),
    #[error(transparent)]
    Listen(TransportError),
    #[error("the listening socket failed")]
    Accept(#[source] TransportError),
}

/// Serves until the guest goes down. `block_sigchld` must have been called first, before any
/// thread was started.
pub fn run(config: AgentConfig) -> Result<(), AgentError> {
    let pid = std::process::id() as i32;
    if config.init || pid == 1 {
        init::prepare_system(pid == 1);
    }
    children::start_reaper()?;
    let listener = Listener::bind(&config.listen).map_err(AgentError::Listen)?;
    if let Some(announce) = config.announce.clone() {
        let serving = config.listen.to_string();
        // In a thread: a host that is slow to accept must not delay serving.
        let _ = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || announce_ready(&announce, serving));
    }
    log(&format!("serving on {}", config.listen));
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(TransportError::Accept(error)) if is_transient(&error) => {
                // Out of descriptors or memory: wait for connections to end rather than spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(error) => return Err(AgentError::Accept(error)),
        };
        let count = active.fetch_add(1, Ordering::SeqCst) + 1;
        let guard = ActiveConnection(active.clone());
        let busy = count > config.max_connections;
        let spawned = std::thread::Builder::new()
            .name("connection".into())
            .spawn(move || {
                let _guard = guard;
                if busy {
                    refuse_busy(stream);
                } else {
                    serve_connection(stream);
                }
            });
        if let Err(error) = spawned {
            log(&format!("cannot start a thread for a connection: {error}"));
        }
    }
}

fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}

struct ActiveConnection(Arc<AtomicUsize>);

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One line on stderr (the console, for the guest's init). A console that fails is ignored:
/// eprintln! would panic, and a panic ends the agent.
pub(crate) fn log(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "cove-agent: {message}");
}

/// The writing half of a connection, shared by the threads of one exec.
#[derive(Clone)]
pub(crate) struct Replies {
    writer: Arc<Mutex<FrameWriter<Stream>>>,
}

impl Replies {
    fn lock(&self) -> MutexGuard<'_, FrameWriter<Stream>> {
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn send(&self, message: &AgentMessage) -> Result<(), FrameError> {
        self.lock().control(message)
    }

    pub(crate) fn data(&self, channel: Channel, bytes: &[u8]) -> Result<(), FrameError> {
        self.lock().data(channel, bytes)
    }

    pub(crate) fn end(&self, channel: Channel) -> Result<(), FrameError> {
        self.lock().end(channel)
    }

    /// Ends the connection both ways: the peer reads what was sent, then end of stream.
    pub(crate) fn close(&self) {
        let _ = self.lock().get_ref().shutdown(Shutdown::Both);
    }
}

/// One accepted connection, after its hello.
pub(crate) struct Connection {
    pub(crate) reader: FrameReader<Stream>,
    pub(crate) replies: Replies,
}

/// Why a request failed: what the client is told (nothing, when it is gone) before the
/// connection closes.
#[derive(Debug)]
pub(crate) struct Failure {
    code: Option<ErrorCode>,
    message: String,
}

impl Failure {
    pub(crate) fn new(code: ErrorCode, error: &dyn Error) -> Self {
        Failure {
            code: Some(code),
            message: error_chain(error),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Failure {
            code: Some(ErrorCode::BadRequest),
            message: message.into(),
        }
    }
}

impl From<FrameError> for Failure {
    fn from(error: FrameError) -> Self {
        if error.is_disconnect() {
            return Failure {
                code: None,
                message: error_chain(&error),
            };
        }
        Failure::new(ErrorCode::BadRequest, &error)
    }
}

impl From<protocol::InvalidRequest> for Failure {
    fn from(error: protocol::InvalidRequest) -> Self {
        Failure::new(ErrorCode::BadRequest, &error)
    }
}

/// An error and its sources, as one line.
pub(crate) fn error_chain(error: &dyn Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// The error code for an operating-system error.
pub(crate) fn code_for_io(error: &io::Error) -> ErrorCode {
    match error.raw_os_error() {
        Some(libc::ENOENT) => ErrorCode::NotFound,
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorCode::NoSpace,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorCode::PermissionDenied,
        Some(libc::EISDIR | libc::ENOTDIR | libc::ENOTEMPTY | libc::ELOOP) => ErrorCode::WrongKind,
        _ => ErrorCode::Io,
    }
}

fn serve_connection(stream: Stream) {
    let reader = match stream.try_clone() {
        Ok(reader) => reader,
        Err(error) => {
            log(&format!("cannot duplicate a connection: {error}"));
            return;
        }
    };
    let mut connection = Connection {
        reader: FrameReader::new(reader),
        replies: Replies {
            writer: Arc::new(Mutex::new(FrameWriter::new(stream))),
        },
    };
    let replies = connection.replies.clone();
    if let Err(failure) = converse(&mut connection) {
        if let Some(code) = failure.code {
            if code == ErrorCode::BadRequest || code == ErrorCode::UnsupportedVersion {
                log(&format!("closing a connection: {}", failure.message));
            }
            let _ = replies.send(&AgentMessage::Error(ErrorReply {
                code,
                message: failure.message,
            }));
        }
    }
    replies.close();
}

/// The hello exchange, then the one request of this connection.
fn converse(connection: &mut Connection) -> Result<(), Failure> {
    let stream = connection.reader.get_ref();
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    match next_control(connection, "a hello")? {
        HostMessage::Hello { version, .. } if version == u32::from(protocol::VERSION) => {}
        HostMessage::Hello { version, .. } => {
            return Err(Failure {
                code: Some(ErrorCode::UnsupportedVersion),
                message: format!(
                    "the client speaks protocol version {version}; this agent speaks version {}",
                    protocol::VERSION
                ),
            })
        }
        other => {
            return Err(Failure::bad_request(format!(
                "the first message must be a hello, not {}",
                describe(&other)
            )))
        }
    }
    connection.replies.send(&AgentMessage::Hello(AgentHello {
        version: u32::from(protocol::VERSION),
        agent: protocol::agent_name(),
        boot: None,
    }))?;
    let request = next_control(connection, "a request")?;
    let _ = connection.reader.get_ref().set_read_timeout(None);
    match request {
        HostMessage::Exec(request) => exec::serve(connection, request),
        HostMessage::Push(request) => files::push(connection, request),
        HostMessage::Pull { path } => files::pull(connection, &path),
        HostMessage::State {} => {
            let state = state::collect();
            connection.replies.send(&AgentMessage::State(state))?;
            Ok(())
        }
        HostMessage::Shutdown {
            action,
            grace_seconds,
        } => power::shutdown(connection, action, grace_seconds),
        other => Err(Failure::bad_request(format!(
            "expected a request (exec, push, pull, state or shutdown), not {}",
            describe(&other)
        ))),
    }
}

/// The next frame, which must be a control message.
fn next_control(connection: &mut Connection, wanted: &str) -> Result<HostMessage, Failure> {
    match connection.reader.read::<HostMessage>() {
        Ok(Some(Frame::Control(message))) => Ok(message),
        Ok(Some(Frame::Data(channel, _))) => Err(Failure::bad_request(format!(
            "expected {wanted}, not {} data",
            channel.name()
        ))),
        Ok(Some(Frame::End(channel))) => Err(Failure::bad_request(format!(
            "expected {wanted}, not the end of {}",
            channel.name()
        ))),
        Ok(None) => Err(Failure {
            code: None,
            message: "the client closed the connection".into(),
        }),
        Err(FrameError::Io(error)) if error.kind() == io::ErrorKind::WouldBlock => {
            Err(Failure::bad_request(format!(
                "no {wanted} within {} s",
                REQUEST_TIMEOUT.as_secs()
            )))
        }
        Err(error) => Err(error.into()),
    }
}

/// A message's type, for error messages.
pub(crate) fn describe(message: &HostMessage) -> &'static str {
    match message {
        HostMessage::Hello { .. } => "a hello",
        HostMessage::Exec(_) => "an exec request",
        HostMessage::Signal { .. } => "a signal",
        HostMessage::Resize(_) => "a resize",
        HostMessage::Push(_) => "a push request",
        HostMessage::Pull { .. } => "a pull request",
        HostMessage::State {} => "a state request",
        HostMessage::Shutdown { .. } => "a shutdown request",
    }
}

fn refuse_busy(stream: Stream) {
    let mut writer = FrameWriter::new(stream);
    let _ = writer.control(&AgentMessage::Error(ErrorReply {
        code: ErrorCode::Busy,
        message: "the agent has too many connections open; try again when some have ended".into(),
    }));
    let _ = writer.get_ref().shutdown(Shutdown::Both);
}

/// Connects to the host and says the agent is up.
fn announce_ready(address: &Address, serving: String) {
    let facts = BootFacts {
        pid: std::process::id() as i32,
        uptime_seconds: state::uptime_seconds().unwrap_or(0.0),
        kernel: state::kernel_release(),
        hostname: state::hostname(),
        serving,
    };
    let hello = AgentMessage::Hello(AgentHello {
        version: u32::from(protocol::VERSION),
        agent: protocol::agent_name(),
        boot: Some(facts),
    });
    let result = Stream::connect(address)
        .map_err(|error| error_chain(&error))
        .and_then(|stream| {
            let mut writer = FrameWriter::new(stream);
            writer
                .control(&hello)
                .map_err(|error| error_chain(&error))?;
            let _ = writer.get_ref().shutdown(Shutdown::Write);
            Ok(())
        });
    match result {
        Ok(()) => log(&format!("announced to {address}")),
        Err(error) => log(&format!("cannot announce readiness: {error}")),
    }
}

/// An agent error and its causes, as one line.
pub fn describe_error(error: &AgentError) -> String {
    error_chain(error)
}
