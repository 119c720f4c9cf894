//! `POST /1.0/instances/<name>/exec`: a command in a running instance, as LXD runs it.
//!
//! The answer is a `websocket` operation whose metadata lists one secret per stream:
//! `0`, `1`, `2` and `control` for a piped command, `0` (both ways, a terminal) and `control`
//! for an interactive one. Clients connect each to `/1.0/operations/<id>/websocket?secret=`;
//! with `wait-for-websocket` the command starts once all are connected. Data travels as
//! binary messages; a text message or a close on stdin is end-of-file; coved closes each
//! output stream (close frame 1000) once drained. The control stream takes
//! `{"command":"window-resize","args":{"width":"80","height":"25"}}` and
//! `{"command":"signal","signal":2}` (what `lxc exec` sends on Ctrl-C), passed on to the
//! command. The exit code ends in the operation's `metadata.return`.
//!
//! With `record-output` and no websockets, stdout and stderr go to
//! `/1.0/instances/<name>/logs/exec_<operation>.{stdout,stderr}`, named in `metadata.output`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::extract::{Path, State};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::instances::resources;
use super::{accepted, json_body, ApiError, ApiResult};
use crate::api::types::{ExecControl, InstanceExecPost};
use crate::clock;
use crate::daemon::{blocking, Daemon};
use crate::instances::config;
use crate::instances::runtime::{ExecSpec, RuntimeStatus};
use crate::operations::{Class, ConnectedSocket, OperationHandle};

/// The `tty` group in Debian and busybox images.
const TTY_GROUP: u32 = 5;
/// How long an exec waits for its websockets to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long output may still come after the command exited (a background child can hold the
/// pipe open for ever).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an interactive command whose client went away has after its terminal's hangup
/// before it is killed.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two fds, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A terminal pair: (controller, terminal), sized `width` x `height`.
fn terminal(width: u16, height: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut controller = -1;
    let mut terminal = -1;
    let size = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: the out pointers are valid ints; name and termios may be null; size is valid.
    let result = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty just returned these fds, owned by nobody else.
    let pair = unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    };
    for fd in [&pair.0, &pair.1] {
        // SAFETY: fcntl on an fd this function owns.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(pair)
}

/// A terminal pair in the container's own devpts (reached through its init's root), so that
/// the command sees `/dev/pts/N` as LXD gives it; the terminal belongs to `owner`.
fn container_terminal(
    init_pid: u32,
    owner: (u32, u32),
    width: u16,
    height: u16,
) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let path = std::ffi::CString::new(format!("/proc/{init_pid}/root/dev/pts/ptmx"))
        .map_err(|_| std::io::Error::other("bad path"))?;
    // SAFETY: `path` is NUL-terminated.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open returned a new fd.
    let controller = unsafe { OwnedFd::from_raw_fd(fd) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from a valid pointer; the fd is a ptmx.
    if unsafe { libc::ioctl(controller.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open flags and returns a new fd for the peer terminal.
    let peer = unsafe {
        libc::ioctl(
            controller.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if peer < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a new fd.
    let terminal = unsafe { OwnedFd::from_raw_fd(peer) };
    // SAFETY: fchown on a terminal this function opened.
    unsafe { libc::fchown(terminal.as_raw_fd(), owner.0, owner.1) };
    resize(&controller, width, height);
    Ok((controller, terminal))
}

fn resize(controller: &OwnedFd, width: u16, height: u16) {
    let size = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer; the fd is a terminal controller.
    unsafe { libc::ioctl(controller.as_raw_fd(), libc::TIOCSWINSZ, &size) };
}

fn async_file(fd: OwnedFd) -> tokio::fs::File {
    tokio::fs::File::from_std(std::fs::File::from(fd))
}

/// The environment LXD gives a command: `environment.*` keys, the request's, then defaults.
fn environment(
    expanded: &BTreeMap<String, String>,
    request: &InstanceExecPost,
    uid: u32,
) -> BTreeMap<String, String> {
    let mut environment = config::environment(expanded);
    if let Some(extra) = &request.environment {
        environment.extend(extra.clone());
    }
    environment
        .entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    if uid == 0 {
        environment
            .entry("HOME".into())
            .or_insert_with(|| "/root".into());
        environment
            .entry("USER".into())
            .or_insert_with(|| "root".into());
    }
    environment
        .entry("LANG".into())
        .or_insert_with(|| "C.UTF-8".into());
    environment
}

pub async fn exec(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    let request: InstanceExecPost = json_body(body).await?;
    let record = daemon.store.instance(&name).map_err(|error| match error {
        crate::store::StoreError::NotFound { .. } => {
            ApiError::not_found(format!("instance \"{name}\" not found"))
        }
        other => other.into(),
    })?;
    if request.command.is_empty() || request.command[0].is_empty() {
        return Err(ApiError::bad_request(
            "the request has no command: give \"command\": [\"program\", \"argument\", ...]",
        ));
    }
    if let Some(cwd) = &request.cwd {
        if !cwd.is_empty() && !cwd.starts_with('/') {
            return Err(ApiError::bad_request(format!(
                "invalid cwd \"{cwd}\": give an absolute path"
            )));
        }
    }
    let status = daemon.status_of(&name);
    if status != RuntimeStatus::Running {
        return Err(ApiError::bad_request(format!(
            "instance \"{name}\" is not running: start it before running commands in it"
        )));
    }
    let (expanded, _) = daemon.expand(&record.profiles, &record.config, &record.devices)?;
    let uid = request.user.unwrap_or(0);
    let gid = request.group.unwrap_or(0);
    let id_base = daemon.id_base(&expanded)?;
    let command = Command {
        name: name.clone(),
        id_base,
        environment: environment(&expanded, &request, uid),
        request,
        uid,
        gid,
    };
    if command.request.record_output && !command.request.wait_for_websocket {
        return recorded(daemon, command);
    }
    let mut fds = vec!["0".to_string(), "control".to_string()];
    if !command.request.interactive {
        fds.extend(["1".to_string(), "2".to_string()]);
    }
    let required = fds.len() - 1;
    let secrets: BTreeMap<String, String> =
        fds.iter().map(|fd| (fd.clone(), clock::secret())).collect();
    let operation = daemon.operations.create(
        Class::Websocket,
        "Executing command",
        resources(&name),
        json!({ "fds": secrets }),
        false,
    );
    let sockets = operation.accept_websockets(&secrets);
    let task_operation = operation.clone();
    tokio::spawn(async move {
        let result = streamed(daemon, command, sockets, required, &task_operation).await;
        match result {
            Ok(code) => task_operation.succeed(Some(json!({ "return": code }))),
            Err(message) => task_operation.fail(&message),
        }
    });
    accepted(&operation)
}

struct Command {
    name: String,
    /// The host ids of the instance's uid 0 and gid 0.
    id_base: (u32, u32),
    request: InstanceExecPost,
    environment: BTreeMap<String, String>,
    uid: u32,
    gid: u32,
}

impl Command {
    fn spec(&self, stdin: OwnedFd, stdout: OwnedFd, stderr: OwnedFd) -> ExecSpec {
        ExecSpec {
            command: self.request.command.clone(),
            environment: self.environment.clone(),
            cwd: self.request.cwd.clone().filter(|cwd| !cwd.is_empty()),
            uid: self.uid,
            gid: self.gid,
            stdin,
            stdout,
            stderr,
            terminal: false,
            signals: None,
        }
    }
}

/// Runs the command with its output recorded to log files.
fn recorded(daemon: Arc<Daemon>, command: Command) -> ApiResult {
    let operation = daemon.operations.create(
        Class::Task,
        "Executing command",
        resources(&command.name),
        Value::Object(Default::default()),
        false,
    );
    let id = operation.id().to_string();
    crate::operations::Operations::run(operation.clone(), async move {
        let directory = daemon.settings.logs().join(&command.name);
        let stdout_name = format!("exec_{id}.stdout");
        let stderr_name = format!("exec_{id}.stderr");
        let open = |file: &str| -> Result<OwnedFd, String> {
            std::fs::create_dir_all(&directory)
                .and_then(|()| std::fs::File::create(directory.join(file)))
                .map(OwnedFd::from)
                .map_err(|error| format!("cannot create the exec log {file}: {error}"))
        };
        let stdout = open(&stdout_name)?;
        let stderr = open(&stderr_name)?;
        let stdin = std::fs::File::open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|error| format!("cannot open /dev/null: {error}"))?;
        let spec = command.spec(stdin, stdout, stderr);
        let runtime = daemon.runtime.clone();
        let name = command.name.clone();
        let code = blocking(move || runtime.exec(&name, spec))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| error.to_string())?;
        let base = format!("/1.0/instances/{}/logs", command.name);
        Ok(Some(json!({
            "return": code,
            "output": {"1": format!("{base}/{stdout_name}"), "2": format!("{base}/{stderr_name}")},
        })))
    });
    accepted(&operation)
}

/// Waits until every stream but `control` is connected (LXD starts the command then; the
/// control stream may come later or never), or the timeout, or a cancel.
async fn connect_required(
    sockets: &mut tokio::sync::mpsc::UnboundedReceiver<ConnectedSocket>,
    required: usize,
    operation: &OperationHandle,
) -> Result<HashMap<String, WebSocket>, String> {
    let mut connected = HashMap::new();
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    while connected.keys().filter(|fd| *fd != "control").count() < required {
        tokio::select! {
            socket = sockets.recv() => match socket {
                Some((fd, socket)) => { connected.insert(fd, socket); }
                None => return Err("the operation ended before its websockets connected".into()),
            },
            () = tokio::time::sleep_until(deadline) => {
                return Err(format!(
                    "the command's websockets did not all connect within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            }
            () = operation.cancel_requested() => return Err("cancelled".into()),
        }
    }
    Ok(connected)
}

async fn close(sink: &mut SplitSink<WebSocket, Message>) {
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "".into(),
        })))
        .await;
}

/// Copies `reader` to the websocket as binary messages, then closes it (and marks `closed`
/// first, so that the client's answering close is not taken for a client gone). Keeps reading
/// after the client went away, so that the command never blocks on a full pipe.
async fn forward_output(
    mut reader: tokio::fs::File,
    mut sink: SplitSink<WebSocket, Message>,
    closed: Arc<AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 32 * 1024];
    let mut client_gone = false;
    loop {
        let read = tokio::select! {
            read = reader.read(&mut buffer) => read,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(read) => {
                if !client_gone
                    && sink
                        .send(Message::Binary(buffer[..read].to_vec().into()))
                        .await
                        .is_err()
                {
                    client_gone = true;
                }
            }
        }
    }
    closed.store(true, Ordering::SeqCst);
    close(&mut sink).await;
}

/// Copies the websocket's binary messages to `writer` until end-of-file (a text message or a
/// close), then closes `writer`.
async fn forward_input(mut stream: SplitStream<WebSocket>, mut writer: tokio::fs::File) {
    while let Some(Ok(message)) = stream.next().await {
        let data = match message {
            Message::Binary(data) => data,
            Message::Text(_) | Message::Close(_) => break,
            _ => continue,
        };
        if writer.write_all(&data).await.is_err() || writer.flush().await.is_err() {
            break;
        }
    }
    let _ = writer.flush().await;
}

/// Consumes what a client sends on an output stream (its close, mostly). A client that goes
/// away (close or lost connection) before coved closed the stream (`closed`) while the command
/// runs gets the command killed, as LXD kills it when its stdout websocket goes.
async fn watch_output_client(
    mut stream: SplitStream<WebSocket>,
    closed: Arc<AtomicBool>,
    signals: Sender<i32>,
    exited: tokio::sync::watch::Receiver<bool>,
) {
    while let Some(Ok(message)) = stream.next().await {
        if matches!(message, Message::Close(_)) {
            break;
        }
    }
    if !closed.load(Ordering::SeqCst) && !*exited.borrow() {
        let _ = signals.send(libc::SIGKILL);
    }
}

/// Reads control messages (window size, signals for the command) until the client closes
/// the stream or the command has finished, then closes it. A client that closes it (or goes
/// away) while the command runs gets the command killed, as LXD does.
async fn control(
    socket: WebSocket,
    resizes: Option<UnboundedSender<(u16, u16)>>,
    signals: Sender<i32>,
    mut finished: tokio::sync::watch::Receiver<bool>,
    exited: tokio::sync::watch::Receiver<bool>,
) {
    let (mut sink, mut stream) = socket.split();
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            _ = finished.wait_for(|done| *done) => break,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                if !*exited.borrow() {
                    let _ = signals.send(libc::SIGKILL);
                }
                break;
            }
            Some(Ok(_)) => continue,
        };
        let Ok(request) = serde_json::from_str::<ExecControl>(&text) else {
            continue;
        };
        if request.command == "window-resize" {
            let dimension = |key: &str| request.args.get(key).and_then(|value| value.parse().ok());
            if let (Some(resizes), Some(width), Some(height)) =
                (&resizes, dimension("width"), dimension("height"))
            {
                let _ = resizes.send((width, height));
            }
        } else if request.command == "signal" && request.signal > 0 {
            let _ = signals.send(request.signal);
        }
    }
    close(&mut sink).await;
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd the caller owns.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fcntl on an fd the caller owns.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn read_fd(fd: &OwnedFd, buffer: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buffer` is valid for writes of its length.
    let read = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
    if read < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(read as usize)
}

fn write_fd(fd: &OwnedFd, data: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `data` is valid for reads of its length.
    let written = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if written < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(written as usize)
}

/// What woke a terminal session.
enum Event {
    Nothing,
    /// This many bytes of output are in the buffer.
    Output(usize),
    /// The command's side of the terminal is closed (or coved stops waiting for it).
    Drained,
    ClientGone,
}

/// What an interactive exec's terminal session needs besides the terminal.
struct Session {
    socket: Option<WebSocket>,
    resizes: UnboundedReceiver<(u16, u16)>,
    signals: Sender<i32>,
    /// Set once the command has exited.
    exited: tokio::sync::watch::Receiver<bool>,
    /// Set when the output may no longer be waited for (a background child holds the
    /// terminal after the command exited).
    stop: tokio::sync::watch::Receiver<bool>,
}

/// Carries an interactive command's terminal over websocket `0`, both ways, as LXD does:
/// output goes out until the terminal's last command side closes (the controller reads EIO),
/// then coved closes the websocket (close frame 1000). A client that goes away (its close, or
/// a lost connection) first gets the terminal hung up (coved closes the controller, so the
/// kernel sends SIGHUP to the command's session), and the command killed if it still runs
/// after a short grace.
async fn terminal_session(controller: OwnedFd, session: Session) {
    let Session {
        socket,
        mut resizes,
        signals,
        mut exited,
        mut stop,
    } = session;
    if set_nonblocking(&controller).is_err() {
        return;
    }
    // SAFETY: an OwnedFd's raw fd stays open, and the same, for as long as it is owned.
    let Ok(controller) = (unsafe { AsyncFd::register(controller) }) else {
        return;
    };
    let (mut sink, mut stream) = match socket {
        Some(socket) => {
            let (sink, stream) = socket.split();
            (Some(sink), Some(stream))
        }
        None => (None, None),
    };
    let mut buffer = vec![0u8; 32 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut client_gone = false;
    loop {
        let event = tokio::select! {
            ready = controller.readable() => match ready {
                Ok(mut guard) => match guard.try_io(|inner| read_fd(inner.get_ref(), &mut buffer)) {
                    // EIO: the command's side is closed, the output drained.
                    Ok(Ok(0)) | Ok(Err(_)) => Event::Drained,
                    Ok(Ok(read)) => Event::Output(read),
                    Err(_would_block) => Event::Nothing,
                },
                Err(_) => Event::Drained,
            },
            ready = controller.writable(), if !pending.is_empty() => {
                if let Ok(mut guard) = ready {
                    match guard.try_io(|inner| write_fd(inner.get_ref(), &pending)) {
                        Ok(Ok(written)) => {
                            pending.drain(..written);
                        }
                        Ok(Err(_)) => pending.clear(),
                        Err(_would_block) => {}
                    }
                } else {
                    pending.clear();
                }
                Event::Nothing
            }
            message = next_message(&mut stream), if stream.is_some() && pending.is_empty() => {
                match message {
                    Some(Ok(Message::Binary(data))) => {
                        pending.extend_from_slice(&data);
                        Event::Nothing
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => Event::ClientGone,
                    Some(Ok(_)) => Event::Nothing,
                }
            }
            Some((width, height)) = resizes.recv() => {
                resize(controller.get_ref(), width, height);
                Event::Nothing
            }
            _ = stop.wait_for(|stop| *stop) => Event::Drained,
        };
        match event {
            Event::Nothing => {}
            Event::Drained => break,
            Event::ClientGone => {
                client_gone = true;
                break;
            }
            Event::Output(read) => {
                if let Some(open) = sink.as_mut() {
                    let message = Message::Binary(buffer[..read].to_vec().into());
                    if open.send(message).await.is_err() {
                        client_gone = true;
                        break;
                    }
                }
            }
        }
    }
    if client_gone {
        // The hangup: the kernel sends SIGHUP to the command's session as the controller
        // closes; a command that ignores it is killed.
        drop(controller);
        drop(sink);
        tokio::select! {
            _ = exited.wait_for(|done| *done) => {}
            () = tokio::time::sleep(HANGUP_GRACE) => { let _ = signals.send(libc::SIGKILL); }
        }
        return;
    }
    if let Some(sink) = sink.as_mut() {
        close(sink).await;
    }
}

async fn next_message(
    stream: &mut Option<SplitStream<WebSocket>>,
) -> Option<Result<Message, axum::Error>> {
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

async fn streamed(
    daemon: Arc<Daemon>,
    command: Command,
    mut sockets: tokio::sync::mpsc::UnboundedReceiver<ConnectedSocket>,
    required: usize,
    operation: &OperationHandle,
) -> Result<i32, String> {
    let mut connected = if command.request.wait_for_websocket {
        connect_required(&mut sockets, required, operation).await?
    } else {
        HashMap::new()
    };
    let io_error = |error: std::io::Error| format!("cannot set up the command's streams: {error}");
    let (signal_sender, signal_receiver) = std::sync::mpsc::channel();
    let (exited, exited_receiver) = tokio::sync::watch::channel(false);
    let (stop, stop_receiver) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let mut sinks_to_close = Vec::new();
    let resizes;
    let spec;
    if command.request.interactive {
        let width = command.request.width.unwrap_or(80).clamp(1, 1000) as u16;
        let height = command.request.height.unwrap_or(24).clamp(1, 1000) as u16;
        let state = daemon.full_state(&command.name).await.ok();
        let inside = state.and_then(|state| state.init_pid).and_then(|pid| {
            let owner = (
                command.id_base.0.saturating_add(command.uid),
                command.id_base.1.saturating_add(TTY_GROUP),
            );
            container_terminal(pid, owner, width, height).ok()
        });
        let (terminal_controller, terminal) = match inside {
            Some(pair) => pair,
            None => terminal(width, height).map_err(io_error)?,
        };
        let stdin = terminal.try_clone().map_err(io_error)?;
        let stdout = terminal.try_clone().map_err(io_error)?;
        spec = ExecSpec {
            terminal: true,
            ..command.spec(stdin, stdout, terminal)
        };
        let (resize_sender, resize_receiver) = tokio::sync::mpsc::unbounded_channel();
        resizes = Some(resize_sender);
        let session = Session {
            socket: connected.remove("0"),
            resizes: resize_receiver,
            signals: signal_sender.clone(),
            exited: exited_receiver.clone(),
            stop: stop_receiver.clone(),
        };
        // The session holds the only copy of the controller: its closing is the hangup.
        tasks.push(tokio::spawn(terminal_session(terminal_controller, session)));
    } else {
        resizes = None;
        let (stdin_read, stdin_write) = pipe().map_err(io_error)?;
        let (stdout_read, stdout_write) = pipe().map_err(io_error)?;
        let (stderr_read, stderr_write) = pipe().map_err(io_error)?;
        spec = command.spec(stdin_read, stdout_write, stderr_write);
        match connected.remove("0") {
            Some(socket) => {
                let (sink, stream) = socket.split();
                sinks_to_close.push(sink);
                tokio::spawn(forward_input(stream, async_file(stdin_write)));
            }
            None => drop(stdin_write),
        }
        for (fd, reader) in [("1", stdout_read), ("2", stderr_read)] {
            let reader = async_file(reader);
            match connected.remove(fd) {
                Some(socket) => {
                    let (sink, stream) = socket.split();
                    let closed = Arc::new(AtomicBool::new(false));
                    tasks.push(tokio::spawn(forward_output(
                        reader,
                        sink,
                        closed.clone(),
                        stop_receiver.clone(),
                    )));
                    tokio::spawn(watch_output_client(
                        stream,
                        closed,
                        signal_sender.clone(),
                        exited_receiver.clone(),
                    ));
                }
                None => tasks.push(tokio::spawn(drain(reader, stop_receiver.clone()))),
            }
        }
    }
    let spec = ExecSpec {
        signals: Some(signal_receiver),
        ..spec
    };
    let (finished, finished_receiver) = tokio::sync::watch::channel(false);
    if let Some(socket) = connected.remove("control") {
        tokio::spawn(control(
            socket,
            resizes.clone(),
            signal_sender.clone(),
            finished_receiver.clone(),
            exited_receiver.clone(),
        ));
    }
    // A control stream that connects later.
    {
        let resizes = resizes.clone();
        let signals = signal_sender;
        let mut finished = finished_receiver.clone();
        let exited = exited_receiver.clone();
        tokio::spawn(async move {
            loop {
                let socket = tokio::select! {
                    socket = sockets.recv() => socket,
                    _ = finished.wait_for(|done| *done) => return,
                };
                match socket {
                    Some((fd, socket)) if fd == "control" => {
                        tokio::spawn(control(
                            socket,
                            resizes.clone(),
                            signals.clone(),
                            finished.clone(),
                            exited.clone(),
                        ));
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        });
    }

    let runtime = daemon.runtime.clone();
    let name = command.name.clone();
    // The spec (with coved's copies of the command's ends) goes with the exec, so that the
    // output ends when the command's side closes.
    let result = blocking(move || runtime.exec(&name, spec)).await;
    exited.send_replace(true);
    let mut tasks = tasks;
    let drained = async {
        for task in tasks.iter_mut() {
            let _ = task.await;
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
        // A background child holds the output open: stop waiting for it, closing the
        // websockets all the same.
        stop.send_replace(true);
        for task in tasks {
            let _ = task.await;
        }
    }
    for mut sink in sinks_to_close {
        close(&mut sink).await;
    }
    finished.send_replace(true);
    let code = result
        .map_err(|error| error.to_string())?
        .map_err(|error| error.to_string())?;
    Ok(code)
}

/// Reads and discards output nobody listens to.
async fn drain(mut reader: tokio::fs::File, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = reader.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
}
