//! `cove exec`: a command in a running instance over LXD's exec websockets, as `lxc exec`
//! runs it.
//!
//! Non-interactive: one websocket each for stdin, stdout and stderr, plus the control socket;
//! stdin's end is an empty text message. Interactive (`-t`, or stdin and stdout both
//! terminals): one websocket carries the remote terminal both ways while the local terminal
//! is in raw mode, and each SIGWINCH sends the new size as a `window-resize` message on the
//! control socket. Either way the exit code is the remote command's (`metadata.return`).

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

use super::arguments::{Exec, Terminal};
use super::client::{encode, plain_error, Client};
use super::CliError;
use crate::api::types::{ExecControl, InstanceExecPost};

/// The secrets coved handed out, by stream (`0`, `1`, `2`, `control`).
struct Streams {
    operation: String,
    secrets: BTreeMap<String, String>,
}

impl Streams {
    fn open(&self, client: &Client, fd: &str) -> Result<WebSocket<UnixStream>, CliError> {
        let secret = self.secrets.get(fd).ok_or_else(|| {
            CliError::Protocol(format!("the exec operation has no secret for stream {fd}"))
        })?;
        client.websocket(&self.operation, secret)
    }
}

/// The local terminal's size (columns, rows), if stdout is one.
fn window_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize to a valid pointer; fd 1 is ours to query.
    let result = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (result == 0 && size.ws_col > 0 && size.ws_row > 0).then_some((size.ws_col, size.ws_row))
}

pub fn exec(client: &Client, request: &Exec) -> Result<i32, CliError> {
    let interactive = match request.terminal {
        Terminal::Forced => true,
        Terminal::Refused => false,
        Terminal::Automatic => io::stdin().is_terminal() && io::stdout().is_terminal(),
    };
    let mut environment: BTreeMap<String, String> = request.environment.iter().cloned().collect();
    if interactive && !environment.contains_key("TERM") {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        environment.insert("TERM".into(), term);
    }
    let (width, height) = window_size().unwrap_or((80, 24));
    let body = InstanceExecPost {
        command: request.command.clone(),
        environment: Some(environment),
        wait_for_websocket: true,
        interactive,
        width: interactive.then_some(u32::from(width)),
        height: interactive.then_some(u32::from(height)),
        record_output: false,
        user: request.user,
        group: request.group,
        cwd: request.cwd.clone(),
    };
    let body = serde_json::to_value(&body)
        .map_err(|error| CliError::Protocol(format!("cannot encode the exec request: {error}")))?;
    let url = format!("/1.0/instances/{}/exec", encode(&request.name));
    let response = client.request("POST", &url, Some(&body))?;
    let secrets = response.metadata["metadata"]["fds"]
        .as_object()
        .map(|fds| {
            fds.iter()
                .filter_map(|(fd, secret)| Some((fd.clone(), secret.as_str()?.to_string())))
                .collect()
        })
        .ok_or_else(|| CliError::Protocol("the exec operation lists no websockets".into()))?;
    let streams = Streams {
        operation: response.operation.clone(),
        secrets,
    };
    if interactive {
        run_interactive(client, &streams)
    } else {
        run_piped(client, &streams, request.no_stdin)
    }
}

/// The exit code in a finished exec operation.
fn exit_code(client: &Client, operation: &str) -> Result<i32, CliError> {
    let done = client.wait(operation)?;
    done.metadata["return"]
        .as_i64()
        .map(|code| code as i32)
        .ok_or_else(|| CliError::Protocol("the exec operation has no exit code".into()))
}

/// How long output may still arrive once the operation has ended (a background child can
/// hold a stream open for ever; coved stops forwarding then, but may not close the socket).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits for the exec operation in a thread; its exit code (or error) arrives on the channel.
fn watch_operation(client: &Client, operation: &str) -> mpsc::Receiver<Result<i32, CliError>> {
    let (sender, receiver) = mpsc::channel();
    let client = Client::new(client.directory.clone());
    let operation = operation.to_string();
    std::thread::spawn(move || {
        let _ = sender.send(exit_code(&client, &operation));
    });
    receiver
}

/// Copies an output websocket to `output` until coved closes it.
fn copy_output(mut socket: WebSocket<UnixStream>, mut output: impl Write) {
    let mut output_gone = false;
    loop {
        match socket.read() {
            Ok(Message::Binary(data)) if !output_gone => {
                output_gone = output
                    .write_all(&data)
                    .and_then(|()| output.flush())
                    .is_err();
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn run_piped(client: &Client, streams: &Streams, no_stdin: bool) -> Result<i32, CliError> {
    // The control socket only has to be open: coved has no signals to forward yet.
    let control = streams.open(client, "control")?;
    let mut input = streams.open(client, "0")?;
    let stdout = streams.open(client, "1")?;
    let stderr = streams.open(client, "2")?;
    let (drained, outputs_done) = mpsc::channel();
    let stdout_drained = drained.clone();
    std::thread::spawn(move || {
        copy_output(stdout, io::stdout());
        let _ = stdout_drained.send(());
    });
    std::thread::spawn(move || {
        copy_output(stderr, io::stderr());
        let _ = drained.send(());
    });
    // Not joined: a terminal on stdin may never reach its end after the command has exited.
    std::thread::spawn(move || {
        if !no_stdin {
            let mut stdin = io::stdin().lock();
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(read) => {
                        if input
                            .send(Message::Binary(buffer[..read].to_vec().into()))
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        // An empty text message is end-of-file, as LXD's clients send it.
        let _ = input.send(Message::Text("".into()));
        while let Ok(message) = input.read() {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    });
    let code = exit_code(client, &streams.operation);
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if outputs_done.recv_timeout(left).is_err() {
            break;
        }
    }
    drop(control);
    code
}

/// The local terminal in raw mode for as long as this lives.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> Result<Self, CliError> {
        let failed = || {
            CliError::Local(format!(
                "cannot put the terminal in raw mode: {}",
                plain_error(&io::Error::last_os_error())
            ))
        };
        // SAFETY: termios is plain data; zeroes are a valid value for tcgetattr to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes a termios to a valid pointer.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Err(failed());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the termios it is given, a valid local.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(failed());
        }
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads the termios saved at entry.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// The write end of the self-pipe SIGWINCH writes to; -1 until installed.
static RESIZE_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_window_change(_signal: libc::c_int) {
    let fd = RESIZE_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = 0u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is one valid byte. A full pipe
        // (O_NONBLOCK) only drops a wake-up that is already pending.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// Installs the SIGWINCH handler; returns the read end of its pipe.
fn watch_window_changes() -> io::Result<OwnedFd> {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these fds, owned by nobody else. The write end is kept open
    // for the life of the process: the signal handler may use it at any time.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // The reader blocks; only the handler's end must never block.
    // SAFETY: fcntl on the read end this function owns.
    unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFL, 0) };
    RESIZE_PIPE.store(fds[1], Ordering::Relaxed);
    // SAFETY: sigaction is plain data; zeroes are a valid empty mask and no flags.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_window_change as extern "C" fn(libc::c_int) as usize;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: installs a handler that only calls write(2) on a pipe; `action` is valid.
    if unsafe { libc::sigaction(libc::SIGWINCH, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(read)
}

fn resize_message(width: u16, height: u16) -> String {
    let control = ExecControl {
        command: "window-resize".into(),
        args: [
            ("width".to_string(), width.to_string()),
            ("height".to_string(), height.to_string()),
        ]
        .into(),
        signal: 0,
    };
    serde_json::to_string(&control).unwrap_or_default()
}

/// Sends the terminal's size on `control` at each SIGWINCH, for the life of the process.
fn forward_window_changes(mut control: WebSocket<UnixStream>) {
    let Ok(pipe) = watch_window_changes() else {
        return;
    };
    std::thread::spawn(move || {
        let mut pipe = std::fs::File::from(pipe);
        let mut byte = [0u8; 64];
        while pipe.read(&mut byte).is_ok_and(|read| read > 0) {
            if let Some((width, height)) = window_size() {
                if control
                    .send(Message::Text(resize_message(width, height).into()))
                    .is_err()
                {
                    return;
                }
            }
        }
    });
}

fn run_interactive(client: &Client, streams: &Streams) -> Result<i32, CliError> {
    let mut terminal = streams.open(client, "0")?;
    let control = streams.open(client, "control")?;
    let stdin_is_terminal = io::stdin().is_terminal();
    let raw_mode = if stdin_is_terminal {
        Some(RawMode::enter()?)
    } else {
        None
    };
    if io::stdout().is_terminal() {
        forward_window_changes(control);
    }
    let (input_sender, input) = mpsc::channel::<Option<Vec<u8>>>();
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => {
                    if input_sender.send(Some(buffer[..read].to_vec())).is_err() {
                        return;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = input_sender.send(None);
    });
    // One thread owns the socket: reads time out briefly so that input goes out promptly.
    let _ = terminal
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(20)));
    let finished = watch_operation(client, &streams.operation);
    let mut result = None;
    let mut drain_until: Option<Instant> = None;
    let mut stdout = io::stdout().lock();
    'session: loop {
        if drain_until.is_none() {
            if let Ok(outcome) = finished.try_recv() {
                result = Some(outcome);
                drain_until = Some(Instant::now() + DRAIN_TIMEOUT);
            }
        }
        if drain_until.is_some_and(|until| Instant::now() >= until) {
            break;
        }
        match terminal.read() {
            Ok(Message::Binary(data)) => {
                let _ = stdout.write_all(&data).and_then(|()| stdout.flush());
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(tungstenite::Error::Io(error))
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
        while let Ok(item) = input.try_recv() {
            // A piped stdin's end is the terminal's end-of-file character.
            let bytes = item.unwrap_or_else(|| {
                if stdin_is_terminal {
                    Vec::new()
                } else {
                    vec![0x04]
                }
            });
            if !bytes.is_empty() && terminal.send(Message::Binary(bytes.into())).is_err() {
                break 'session;
            }
        }
    }
    drop(raw_mode);
    let _ = stdout.flush();
    match result {
        Some(outcome) => outcome,
        None => finished.recv().unwrap_or_else(|_| {
            Err(CliError::Protocol(
                "lost track of the exec operation".into(),
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn resize_is_lxd_window_resize() {
        let message: Value = serde_json::from_str(&resize_message(120, 40)).unwrap();
        assert_eq!(
            message,
            serde_json::json!({"command": "window-resize", "args": {"width": "120", "height": "40"}, "signal": 0})
        );
    }
}
