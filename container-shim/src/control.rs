//! What a container's monitor publishes, and how its callers talk to it: the documents of the
//! run directory (`state.json`) and the control socket's protocol, with the client side of it.
//! Both are a stable interface (the supervisor drives every container through them) and are
//! described in docs/containers.md; change them only compatibly.
//!
//! The protocol: one request per connection on a Unix stream socket. The caller sends one JSON
//! object on one line (at most [`MAX_REQUEST_BYTES`]); the monitor answers with one JSON line
//! and closes the connection. `exec` carries the caller's stdin, stdout and stderr as three
//! file descriptors (`SCM_RIGHTS`) attached to the request's bytes, so the command reads and
//! writes the caller's own streams; its answer comes when the command has exited.
//!
//! ```text
//! → {"request":"exec","command":["sh","-c","echo hi"],"environment":{"GREETING":"hello"}}  + fds 0 1 2
//! ← {"ok":true,"exit_code":0}
//! ```
//!
//! While an `exec` runs, its connection stays open both ways: the caller may send
//! `{"signal":15}` lines ([`ExecSignal`]) for the command. With `"terminal":{"rows":R,
//! "columns":C}` the caller sends no fds; the monitor first answers `{"ok":true,"started":true}`
//! with the controlling end of the command's new pseudo-terminal attached, then the exit line.
//!
//! What must not live here: anything that acts on a container (that is the monitor's job).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::exec::ExecRequest;
use crate::network::InterfaceAddress;
use crate::terminal::TerminalSize;

/// The version of `state.json` and of the protocol; bumped only for incompatible changes.
pub const FORMAT_VERSION: u32 = 1;
/// The longest request line the monitor accepts.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The longest answer line a client accepts.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// The most file descriptors one message may carry (exec's stdin, stdout and stderr).
pub const MAX_FDS: usize = 3;
/// How long `stop` waits for init to halt when the request names no timeout.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One request to a monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// The container's state and usage now.
    State,
    /// Runs a command in the container with the three fds sent along as its stdio.
    Exec(ExecCommand),
    /// Halts init (SIGKILL after `timeout_ms`, default 10 s), releases the cgroup and the
    /// mount, and ends the monitor.
    Stop {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    Freeze,
    Unfreeze,
}

/// What `exec` runs, and as whom.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecCommand {
    /// The program and its arguments; a program without `/` is looked up in PATH.
    pub command: Vec<String>,
    /// Added to (and overriding) the defaults PATH and HOME=/root.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    /// The working directory, absolute; `/` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// Run on a new pseudo-terminal of this size: the request then carries no fds, and the
    /// first answer (`started`) carries the terminal's controlling end. With fds (the
    /// caller's terminal, three times), the command takes the caller's terminal as its
    /// controlling terminal in a session of its own instead, and no `started` answer comes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<TerminalSize>,
}

/// What a caller may send on an `exec` connection while the command runs, one JSON line each:
/// `{"signal":15}`. The monitor answers none of them; a line it cannot use is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSignal {
    /// SIGKILL, or one of the signals `exec::FORWARDED_SIGNALS` names.
    pub signal: i32,
}

impl ExecSignal {
    /// The line sent on the socket.
    pub fn to_line(&self) -> Vec<u8> {
        to_line(self)
    }
}

/// The monitor's answer. Fields that do not apply to a request are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `state` (and the starter's report): the container's record with its usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateRecord>,
    /// `exec`: the command's exit code (128 + signal when killed); `stop`: init's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// `stop`: true when init halted on its signal before the timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean: Option<bool>,
    /// `exec` with a terminal, first answer: the command runs; the terminal's controlling end
    /// is attached (`SCM_RIGHTS`). The exit line follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<bool>,
}

impl Response {
    pub fn success() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }

    pub fn failure(error: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: Some(error.to_string()),
            ..Self::default()
        }
    }
}

/// A container's status as the run directory records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordedStatus {
    /// The monitor runs and is starting the container.
    Starting,
    Running,
    Frozen,
    /// Init has exited and the cgroup and mount are released; the container's directory stays
    /// until `delete`.
    Stopped,
}

/// How init is asked to halt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaltSignal {
    /// SIGRTMIN+3, for systemd.
    Systemd,
    /// SIGPWR, for SysV and busybox init.
    Classic,
}

/// `<run dir>/<name>/state.json`, written atomically by the monitor at each change, and the
/// answer to `state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    pub name: String,
    pub status: RecordedStatus,
    pub monitor_pid: u32,
    /// The monitor's start time in clock ticks after boot (`/proc/<pid>/stat`, field 22):
    /// with the pid it names the process even after the pid is reused.
    pub monitor_start_time: u64,
    /// The init's host pid while it runs.
    pub init_pid: Option<u32>,
    /// As `monitor_start_time`, for init.
    pub init_start_time: Option<u64>,
    pub halt_signal: HaltSignal,
    /// When init started running, RFC 3339 in UTC.
    pub started_at: Option<String>,
    pub stopped_at: Option<String>,
    /// Init's exit code (128 + signal when killed) once stopped; absent when unknown.
    pub exit_code: Option<i32>,
    /// `<containers dir>/<name>`: snapshot, console log; kept until `delete`.
    pub container_directory: PathBuf,
    pub console_log: PathBuf,
    /// The cgroup parent (`cove`): the container's cgroup is `<cgroup_parent>/<name>` in every
    /// hierarchy.
    pub cgroup_parent: String,
    /// Only in live answers: what the cgroup counts now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Only in live answers: the addresses inside the container's network namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<InterfaceAddress>>,
    /// Only in answers made without a monitor: the monitor is gone (killed) while init still
    /// runs, reparented to the host's init. `state`, `stop` and `delete` still work; `exec`,
    /// `freeze` and `unfreeze` need a monitor.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub orphaned: bool,
}

/// What a running container uses, from its cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub memory_bytes: Option<u64>,
    pub processes: Option<u64>,
    pub cpu_time_ns: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("the request is longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    #[error(
        "malformed request: {0}; send one JSON object on one line, such as \
         {{\"request\":\"state\"}}"
    )]
    Malformed(String),
    #[error("exec needs a command: give \"command\": [\"program\", \"argument\", ...]")]
    EmptyCommand,
    #[error("invalid environment variable name {0:?}: it must be non-empty and hold no '='")]
    EnvironmentName(String),
    #[error("invalid working directory {0:?}: give an absolute path")]
    WorkingDirectory(String),
    #[error("the command, the environment or the working directory holds a NUL byte")]
    NulByte,
    #[error(
        "exec needs the caller's stdin, stdout and stderr: send 3 file descriptors with the \
         request (SCM_RIGHTS), got {0}"
    )]
    StdioMissing(usize),
}

impl Request {
    /// Parses one request line (without or with its newline).
    pub fn parse(line: &[u8]) -> Result<Self, ProtocolError> {
        if line.len() > MAX_REQUEST_BYTES {
            return Err(ProtocolError::TooLong);
        }
        let malformed = |error: serde_json::Error| ProtocolError::Malformed(error.to_string());
        let value: serde_json::Value = serde_json::from_slice(line).map_err(malformed)?;
        let request = Request::deserialize(&value).map_err(malformed)?;
        // serde lets unit variants of a tagged enum ignore other fields; refuse them here, as
        // the other variants do.
        if matches!(
            request,
            Request::State | Request::Freeze | Request::Unfreeze
        ) {
            if let Some(field) = value
                .as_object()
                .and_then(|object| object.keys().find(|key| *key != "request"))
            {
                return Err(ProtocolError::Malformed(format!(
                    "unknown field `{field}`: this request takes no fields"
                )));
            }
        }
        Ok(request)
    }

    /// The request as the line sent on the socket.
    pub fn to_line(&self) -> Vec<u8> {
        to_line(self)
    }
}

impl Response {
    /// The answer as the line sent on the socket.
    pub fn to_line(&self) -> Vec<u8> {
        to_line(self)
    }
}

fn to_line(value: &impl Serialize) -> Vec<u8> {
    // Serializing these plain structs (string keys, no maps with other keys) cannot fail.
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    line
}

impl ExecCommand {
    /// `command` as root in `/`.
    pub fn new(command: &[&str]) -> Self {
        Self {
            command: command.iter().map(|part| part.to_string()).collect(),
            ..Self::default()
        }
    }

    /// The library's request, checked: a command, sane variable names, an absolute directory.
    pub fn to_exec_request(&self) -> Result<ExecRequest, ProtocolError> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(ProtocolError::EmptyCommand);
        }
        let strings = self
            .command
            .iter()
            .chain(self.environment.keys())
            .chain(self.environment.values())
            .chain(self.cwd.iter());
        for text in strings {
            if text.contains('\0') {
                return Err(ProtocolError::NulByte);
            }
        }
        let mut request = ExecRequest::new(&[]);
        request.command = self.command.clone();
        for (name, value) in &self.environment {
            if name.is_empty() || name.contains('=') {
                return Err(ProtocolError::EnvironmentName(name.clone()));
            }
            request.environment.retain(|(existing, _)| existing != name);
            request.environment.push((name.clone(), value.clone()));
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') {
                return Err(ProtocolError::WorkingDirectory(cwd.clone()));
            }
            request.working_directory = PathBuf::from(cwd);
        }
        request.uid = self.uid;
        request.gid = self.gid;
        request.terminal = self.terminal;
        Ok(request)
    }
}

/// Room for the control message of [`MAX_FDS`] and more (extra ones are closed), 8-aligned as
/// `struct cmsghdr` needs.
type ControlBuffer = [u64; 16];

/// Sends all of `bytes` on `socket`, with `fds` attached to the first part (`SCM_RIGHTS`).
pub fn send_with_fds(socket: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} fds per message");
    if bytes.is_empty() {
        return Ok(());
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut control: ControlBuffer = [0; 16];
    let mut part = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers) before the fields are set.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut part;
    message.msg_iovlen = 1;
    if !raw.is_empty() {
        let payload = std::mem::size_of_val(raw.as_slice()) as u32;
        message.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        message.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as usize;
        // SAFETY: msg_control points at `control`, which is larger than CMSG_SPACE(payload)
        // (at most 3 fds), so the first header and its data fit inside it.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(header).cast::<RawFd>(),
                raw.len(),
            );
        }
    }
    let sent = loop {
        // SAFETY: `message` points at `part` and `control`, both alive for the call.
        let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &message, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            break sent as usize;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    };
    // The fds went with the first part; the rest is plain bytes.
    (&*socket).write_all(&bytes[sent..])
}

/// Receives into `buffer` and appends the fds that came along (close-on-exec) to `fds`.
/// Returns how many bytes were read; 0 means the peer closed the connection.
pub fn receive_with_fds(
    socket: &UnixStream,
    buffer: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut control: ControlBuffer = [0; 16];
    let mut part = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: an all-zero msghdr is valid before the fields are set.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut part;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = std::mem::size_of::<ControlBuffer>();
    let read = loop {
        // SAFETY: `message` points at `part` (the caller's buffer) and `control`, alive for the
        // call and as large as the lengths given.
        let read =
            unsafe { libc::recvmsg(socket.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
        if read >= 0 {
            break read as usize;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    };
    // SAFETY: the kernel filled `control` up to msg_controllen with well-formed headers; the
    // CMSG_* macros walk them within that length, and each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 new fds that this process now owns.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*header).cmsg_len - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for index in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(index).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    Ok(read)
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the monitor at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot send the request to the monitor: {0}")]
    Send(#[source] io::Error),
    #[error("cannot read the monitor's answer: {0}")]
    Receive(#[source] io::Error),
    #[error("the monitor closed the connection without answering (did it stop meanwhile?)")]
    NoAnswer,
    #[error("the monitor's answer is malformed: {0}")]
    MalformedAnswer(String),
}

/// One connection to a monitor's control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
}

impl ControlClient {
    pub fn connect(socket: &Path) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
        Ok(Self { stream })
    }

    /// Sends `request` with `fds` attached and waits for the answer (for `exec`, until the
    /// command exits).
    pub fn call(self, request: &Request, fds: &[BorrowedFd<'_>]) -> Result<Response, ControlError> {
        send_with_fds(&self.stream, &request.to_line(), fds).map_err(ControlError::Send)?;
        let mut buffered = Vec::new();
        read_answer(&self.stream, &mut buffered, &mut Vec::new())
    }

    /// Starts `command` (with `fds` as its stdio, or none with a terminal) and returns the
    /// running exec: signal it, take its terminal, wait for its exit. With a terminal and
    /// `fds`, the fds are the caller's own terminal (three times), which the command takes as
    /// its controlling terminal; no terminal comes back then.
    pub fn exec(
        self,
        command: &ExecCommand,
        fds: &[BorrowedFd<'_>],
    ) -> Result<ExecConnection, ControlError> {
        let request = Request::Exec(command.clone());
        send_with_fds(&self.stream, &request.to_line(), fds).map_err(ControlError::Send)?;
        let mut connection = ExecConnection {
            stream: self.stream,
            buffered: Vec::new(),
            terminal: None,
            answer: None,
        };
        if command.terminal.is_some() && fds.is_empty() {
            let mut received = Vec::new();
            let first = read_answer(&connection.stream, &mut connection.buffered, &mut received)?;
            if first.ok && first.started == Some(true) {
                connection.terminal = received.pop();
            } else {
                connection.answer = Some(first);
            }
        }
        Ok(connection)
    }
}

/// Reads one answer line (keeping what follows it in `buffered`), collecting the fds that
/// come along in `fds`.
fn read_answer(
    stream: &UnixStream,
    buffered: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> Result<Response, ControlError> {
    let mut buffer = [0u8; 4096];
    while !buffered.contains(&b'\n') && buffered.len() <= MAX_RESPONSE_BYTES {
        let read = match receive_with_fds(stream, &mut buffer, fds) {
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(ControlError::Receive(error)),
        };
        if read == 0 {
            break;
        }
        buffered.extend_from_slice(&buffer[..read]);
    }
    let end = buffered
        .iter()
        .position(|byte| *byte == b'\n')
        .unwrap_or(buffered.len());
    let line: Vec<u8> = buffered.drain(..end).collect();
    if !buffered.is_empty() {
        buffered.remove(0);
    }
    if line.is_empty() {
        return Err(ControlError::NoAnswer);
    }
    serde_json::from_slice(&line).map_err(|error| ControlError::MalformedAnswer(error.to_string()))
}

/// A running `exec` on its open connection.
#[derive(Debug)]
pub struct ExecConnection {
    stream: UnixStream,
    /// Bytes read past the first answer line.
    buffered: Vec<u8>,
    terminal: Option<OwnedFd>,
    /// The final answer when it came first (the exec was refused).
    answer: Option<Response>,
}

impl ExecConnection {
    /// With a terminal: its controlling end (the command's input and output).
    pub fn take_terminal(&mut self) -> Option<OwnedFd> {
        self.terminal.take()
    }

    /// Asks the monitor to send `signal` to the command (see [`ExecSignal`]).
    pub fn signal(&self, signal: i32) -> Result<(), ControlError> {
        (&self.stream)
            .write_all(&ExecSignal { signal }.to_line())
            .map_err(ControlError::Send)
    }

    /// The connection, to poll: it becomes readable when the exit answer comes.
    pub fn socket(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.stream)
    }

    /// Waits for the final answer (the command's exit code, or why it did not run).
    pub fn wait(mut self) -> Result<Response, ControlError> {
        if let Some(answer) = self.answer.take() {
            return Ok(answer);
        }
        read_answer(&self.stream, &mut self.buffered, &mut Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    #[test]
    fn requests_parse_from_their_documented_lines() {
        assert_eq!(
            Request::parse(br#"{"request":"state"}"#),
            Ok(Request::State)
        );
        assert_eq!(
            Request::parse(b"{\"request\":\"freeze\"}\n"),
            Ok(Request::Freeze)
        );
        assert_eq!(
            Request::parse(br#"{"request":"unfreeze"}"#),
            Ok(Request::Unfreeze)
        );
        assert_eq!(
            Request::parse(br#"{"request":"stop"}"#),
            Ok(Request::Stop { timeout_ms: None })
        );
        assert_eq!(
            Request::parse(br#"{"request":"stop","timeout_ms":250}"#),
            Ok(Request::Stop {
                timeout_ms: Some(250)
            })
        );
        let exec = Request::parse(
            br#"{"request":"exec","command":["sh","-c","echo $A"],"environment":{"A":"b"},
                 "cwd":"/tmp","uid":1000,"gid":100}"#,
        )
        .expect("a valid exec");
        assert_eq!(
            exec,
            Request::Exec(ExecCommand {
                command: vec!["sh".into(), "-c".into(), "echo $A".into()],
                environment: [("A".to_string(), "b".to_string())].into(),
                cwd: Some("/tmp".into()),
                uid: 1000,
                gid: 100,
                terminal: None,
            })
        );
        assert_eq!(
            Request::parse(br#"{"request":"exec","command":["true"]}"#),
            Ok(Request::Exec(ExecCommand::new(&["true"])))
        );
    }

    #[test]
    fn requests_survive_a_round_trip() {
        let mut exec = ExecCommand::new(&["cat", "/etc/hostname"]);
        exec.environment.insert("TERM".into(), "dumb".into());
        for request in [
            Request::State,
            Request::Exec(exec),
            Request::Stop {
                timeout_ms: Some(0),
            },
            Request::Freeze,
            Request::Unfreeze,
        ] {
            let line = request.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|byte| **byte == b'\n').count(), 1);
            assert_eq!(Request::parse(&line), Ok(request));
        }
        assert_eq!(
            Request::State.to_line(),
            b"{\"request\":\"state\"}\n".to_vec()
        );
    }

    #[test]
    fn bad_requests_are_named() {
        let error = |line: &[u8]| Request::parse(line).expect_err("refused").to_string();
        assert!(error(b"state").starts_with("malformed request: "));
        assert!(error(br#"{"request":"reboot"}"#).contains("unknown variant `reboot`"));
        assert!(error(br#"{"command":["true"]}"#).contains("missing field `request`"));
        assert!(error(br#"{"request":"exec"}"#).contains("missing field `command`"));
        assert!(
            error(br#"{"request":"exec","command":["true"],"user":"root"}"#)
                .contains("unknown field `user`")
        );
        assert!(error(br#"{"request":"stop","timeout_ms":-1}"#).contains("malformed"));
        assert!(error(br#"{"request":"state","verbose":true}"#).contains("unknown field"));
        let long = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert_eq!(Request::parse(&long), Err(ProtocolError::TooLong));
    }

    #[test]
    fn exec_commands_are_checked_before_they_reach_the_container() {
        let request = |command: ExecCommand| command.to_exec_request();
        assert_eq!(
            request(ExecCommand::new(&[])),
            Err(ProtocolError::EmptyCommand)
        );
        assert_eq!(
            request(ExecCommand::new(&[""])),
            Err(ProtocolError::EmptyCommand)
        );
        let mut bad_name = ExecCommand::new(&["true"]);
        bad_name.environment.insert("A=B".into(), "c".into());
        assert_eq!(
            request(bad_name),
            Err(ProtocolError::EnvironmentName("A=B".into()))
        );
        let mut relative = ExecCommand::new(&["true"]);
        relative.cwd = Some("tmp".into());
        assert_eq!(
            request(relative),
            Err(ProtocolError::WorkingDirectory("tmp".into()))
        );
        assert_eq!(
            request(ExecCommand::new(&["a\0b"])),
            Err(ProtocolError::NulByte)
        );

        let mut command = ExecCommand::new(&["env"]);
        command.environment.insert("PATH".into(), "/bin".into());
        command
            .environment
            .insert("GREETING".into(), "hello".into());
        command.uid = 7;
        let request = command.to_exec_request().expect("valid");
        assert_eq!(request.command, ["env"]);
        assert_eq!(request.uid, 7);
        assert_eq!(request.working_directory, PathBuf::from("/"));
        let paths: Vec<_> = request
            .environment
            .iter()
            .filter(|(name, _)| name == "PATH")
            .collect();
        assert_eq!(paths, [&("PATH".to_string(), "/bin".to_string())]);
        assert!(request
            .environment
            .contains(&("HOME".to_string(), "/root".to_string())));
        assert!(request
            .environment
            .contains(&("GREETING".to_string(), "hello".to_string())));
    }

    #[test]
    fn terminal_execs_and_signal_lines_parse() {
        let exec = Request::parse(
            br#"{"request":"exec","command":["sh"],"terminal":{"rows":24,"columns":80}}"#,
        )
        .expect("a terminal exec");
        let Request::Exec(command) = exec else {
            panic!("not an exec: {exec:?}");
        };
        let size = TerminalSize {
            rows: 24,
            columns: 80,
        };
        assert_eq!(command.terminal, Some(size));
        assert_eq!(
            command.to_exec_request().expect("valid").terminal,
            Some(size)
        );
        assert!(
            Request::parse(br#"{"request":"exec","command":["sh"],"terminal":{"rows":24}}"#)
                .is_err()
        );
        // Absent, it is left out: older monitors never see the field.
        assert!(
            !String::from_utf8_lossy(&Request::Exec(ExecCommand::new(&["true"])).to_line())
                .contains("terminal")
        );
        assert_eq!(
            ExecSignal { signal: 15 }.to_line(),
            b"{\"signal\":15}\n".to_vec()
        );
        assert!(serde_json::from_str::<ExecSignal>(r#"{"signal":15,"to":"all"}"#).is_err());
    }

    #[test]
    fn an_exec_connection_takes_its_terminal_then_its_exit() {
        let (client, monitor) = UnixStream::pair().expect("a socket pair");
        let (read_end, _write_end) = crate::kernel::pipe().expect("a pipe");
        let mut command = ExecCommand::new(&["sh"]);
        command.terminal = Some(TerminalSize::default());
        // The monitor's side, answered ahead: both lines at once, the fd on the first.
        let started = Response {
            started: Some(true),
            ..Response::success()
        };
        send_with_fds(&monitor, &started.to_line(), &[read_end.as_fd()]).expect("send");
        let exit = Response {
            exit_code: Some(4),
            ..Response::success()
        };
        (&monitor).write_all(&exit.to_line()).expect("send");
        let mut connection = ControlClient { stream: client }
            .exec(&command, &[])
            .expect("exec");
        assert!(connection.take_terminal().is_some());
        connection.signal(2).expect("signal");
        let mut request = String::new();
        let mut buffer = [0u8; 256];
        let read = (&monitor).read(&mut buffer).expect("read");
        request.push_str(&String::from_utf8_lossy(&buffer[..read]));
        assert!(request.starts_with("{\"request\":\"exec\""), "{request}");
        assert_eq!(connection.wait().expect("the exit").exit_code, Some(4));

        // A refused terminal exec: the one answer is the final one.
        let (client, monitor) = UnixStream::pair().expect("a socket pair");
        (&monitor)
            .write_all(&Response::failure("no").to_line())
            .expect("send");
        let mut connection = ControlClient { stream: client }
            .exec(&command, &[])
            .expect("exec");
        assert!(connection.take_terminal().is_none());
        assert_eq!(
            connection.wait().expect("the answer").error.as_deref(),
            Some("no")
        );
    }

    #[test]
    fn responses_leave_out_what_does_not_apply() {
        assert_eq!(Response::success().to_line(), b"{\"ok\":true}\n".to_vec());
        let exec = Response {
            exit_code: Some(3),
            ..Response::success()
        };
        assert_eq!(exec.to_line(), b"{\"ok\":true,\"exit_code\":3}\n".to_vec());
        let failed = Response::failure("container \"web\" is frozen");
        let line = failed.to_line();
        assert_eq!(
            String::from_utf8_lossy(&line),
            "{\"ok\":false,\"error\":\"container \\\"web\\\" is frozen\"}\n"
        );
        let parsed: Response = serde_json::from_slice(&line).expect("parses back");
        assert_eq!(parsed, failed);
        // Answers from a newer monitor may carry fields this client does not know.
        let newer: Response =
            serde_json::from_str(r#"{"ok":true,"exit_code":0,"elapsed_ms":3}"#).expect("parses");
        assert_eq!(newer.exit_code, Some(0));
    }

    #[test]
    fn state_records_keep_their_documented_shape() {
        let record = StateRecord {
            version: FORMAT_VERSION,
            name: "web".into(),
            status: RecordedStatus::Running,
            monitor_pid: 10,
            monitor_start_time: 100,
            init_pid: Some(11),
            init_start_time: Some(101),
            halt_signal: HaltSignal::Classic,
            started_at: Some("2026-01-02T03:04:05.678Z".into()),
            stopped_at: None,
            exit_code: None,
            container_directory: "/var/lib/cove/containers/web".into(),
            console_log: "/var/lib/cove/containers/web/console.log".into(),
            cgroup_parent: "cove".into(),
            usage: None,
            addresses: None,
            orphaned: false,
        };
        let text = serde_json::to_string(&record).expect("serializes");
        assert_eq!(
            text,
            "{\"version\":1,\"name\":\"web\",\"status\":\"Running\",\"monitor_pid\":10,\
             \"monitor_start_time\":100,\"init_pid\":11,\"init_start_time\":101,\
             \"halt_signal\":\"classic\",\"started_at\":\"2026-01-02T03:04:05.678Z\",\
             \"stopped_at\":null,\"exit_code\":null,\
             \"container_directory\":\"/var/lib/cove/containers/web\",\
             \"console_log\":\"/var/lib/cove/containers/web/console.log\",\
             \"cgroup_parent\":\"cove\"}"
        );
        let parsed: StateRecord = serde_json::from_str(&text).expect("parses back");
        assert_eq!(parsed, record);
    }

    #[test]
    fn fds_travel_with_the_request() {
        let (client, server) = UnixStream::pair().expect("a socket pair");
        let (read_end, write_end) = crate::kernel::pipe().expect("a pipe");
        let line = Request::State.to_line();
        send_with_fds(&client, &line, &[write_end.as_fd(), write_end.as_fd()])
            .expect("send with fds");
        drop(write_end);
        let mut buffer = [0u8; 64];
        let mut fds = Vec::new();
        let read = receive_with_fds(&server, &mut buffer, &mut fds).expect("receive");
        assert_eq!(&buffer[..read], line.as_slice());
        assert_eq!(fds.len(), 2);
        // The received fd is the pipe's write end: what goes in comes out of the read end.
        let mut received = std::fs::File::from(fds.remove(0));
        received.write_all(b"through the socket").expect("write");
        drop((received, fds));
        let mut text = String::new();
        std::fs::File::from(read_end)
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "through the socket");

        send_with_fds(&client, b"no fds\n", &[]).expect("send");
        let mut fds = Vec::new();
        let read = receive_with_fds(&server, &mut buffer, &mut fds).expect("receive");
        assert_eq!(&buffer[..read], b"no fds\n");
        assert!(fds.is_empty());
    }
}
