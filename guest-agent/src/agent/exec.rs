//! Exec: runs one command per connection, on three pipes or on a new pseudo-terminal.
//!
//! Two threads serve it. The connection's thread reads what the client sends (stdin, end of
//! stdin, signals, resizes) and passes it on. A pump thread sends the command's output as it
//! comes, then, once the command has ended and its output is drained, the end of each output
//! stream and the exit status, and closes the connection.
//!
//! Every command starts in a session of its own (so a signal can reach its whole process
//! group, and a terminal can become its controlling terminal). When the client goes away
//! before the command ends, the command's process group gets SIGHUP, as on a terminal hangup.
//!
//! Output written after the command has ended, by descendants it left running with the same
//! pipes, is not waited for: pipes are drained of what is in them, a terminal until 100 ms
//! pass without output.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::children::{self, ExitSlot, SpawnError};
use super::{code_for_io, describe, Connection, Failure, Replies};
use crate::protocol::{
    AgentMessage, Channel, ErrorCode, ExecRequest, Frame, HostMessage, InvalidRequest, WindowSize,
    DATA_CHUNK, DEFAULT_PATH,
};

/// After the command ends, how long a terminal may stay silent before its output is over.
const TERMINAL_DRAIN: Duration = Duration::from_millis(100);
/// Signals are 1 to SIGRTMAX.
const MAX_SIGNAL: i32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error("command not found: {program:?} is in none of the directories of PATH={path}")]
    NotFound { program: String, path: String },
    #[error("working directory {0} does not exist or is not a directory")]
    WorkingDirectory(String),
    #[error("cannot allocate a pseudo-terminal")]
    Terminal(#[source] io::Error),
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: SpawnError,
    },
    #[error("cannot set the terminal's window size")]
    WindowSize(#[source] io::Error),
    #[error("signal {0} is not a signal number (1 to 64)")]
    SignalNumber(i32),
    #[error("cannot send signal {signal} to the command")]
    Signal {
        signal: i32,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Unexpected(String),
}

impl ExecError {
    fn code(&self) -> ErrorCode {
        match self {
            ExecError::Invalid(_)
            | ExecError::SignalNumber(_)
            | ExecError::Unexpected(_)
            | ExecError::WindowSize(_) => ErrorCode::BadRequest,
            ExecError::NotFound { .. } | ExecError::WorkingDirectory(_) => ErrorCode::NotFound,
            ExecError::Terminal(error) | ExecError::Signal { source: error, .. } => {
                code_for_io(error)
            }
            ExecError::Spawn { .. } => ErrorCode::ExecFailed,
        }
    }
}

impl From<ExecError> for Failure {
    fn from(error: ExecError) -> Self {
        Failure::new(error.code(), &error)
    }
}

/// Where the client's stdin goes.
enum Input {
    Pipe(Option<File>),
    Terminal { master: File, end_of_file: u8 },
}

pub(crate) fn serve(connection: &mut Connection, request: ExecRequest) -> Result<(), Failure> {
    request.validate().map_err(ExecError::from)?;
    let program = find_program(&request)?;
    let cwd = request.cwd.clone().unwrap_or_else(|| "/".to_string());
    if !Path::new(&cwd).is_dir() {
        return Err(ExecError::WorkingDirectory(cwd).into());
    }

    let mut command = Command::new(&program);
    command
        .arg0(&request.argv[0])
        .args(&request.argv[1..])
        .env_clear()
        .envs(&request.environment)
        .current_dir(&cwd);
    match (request.uid, request.gid) {
        (Some(uid), gid) => {
            command.uid(uid).gid(gid.unwrap_or(uid));
        }
        (None, Some(gid)) => {
            command.gid(gid);
        }
        (None, None) => {}
    }
    let terminal = match request.pty {
        Some(size) => Some(Terminal::open(size).map_err(ExecError::Terminal)?),
        None => None,
    };
    let with_terminal = terminal.is_some();
    match &terminal {
        Some(terminal) => {
            let slave = |terminal: &Terminal| -> Result<Stdio, ExecError> {
                Ok(Stdio::from(
                    terminal.slave.try_clone().map_err(ExecError::Terminal)?,
                ))
            };
            command
                .stdin(slave(terminal)?)
                .stdout(slave(terminal)?)
                .stderr(slave(terminal)?);
        }
        None => {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    // SAFETY: the closure runs in the forked child before exec and calls only setsid() and
    // ioctl(), which are async-signal-safe, and reads errno.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // stdin is the terminal's slave side: make it the new session's controlling
            // terminal.
            if with_terminal && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (mut child, slot) = children::spawn(&mut command).map_err(|source| ExecError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    // The command holds the only copies of the terminal's slave side from now on, so the
    // master sees end of file once the command and its descendants have closed it.
    drop(command);

    let (input, outputs) = match terminal {
        Some(terminal) => {
            drop(terminal.slave);
            let master_for_output = terminal.master.try_clone().map_err(ExecError::Terminal)?;
            let end_of_file = terminal_end_of_file(&terminal.master);
            (
                Input::Terminal {
                    master: File::from(terminal.master),
                    end_of_file,
                },
                vec![(Channel::Stdout, master_for_output)],
            )
        }
        None => {
            let mut outputs = Vec::new();
            if let Some(stdout) = child.stdout.take() {
                outputs.push((Channel::Stdout, OwnedFd::from(stdout)));
            }
            if let Some(stderr) = child.stderr.take() {
                outputs.push((Channel::Stderr, OwnedFd::from(stderr)));
            }
            let stdin = child
                .stdin
                .take()
                .map(|stdin| File::from(OwnedFd::from(stdin)));
            (Input::Pipe(stdin), outputs)
        }
    };

    if let Err(error) = connection
        .replies
        .send(&AgentMessage::Started { pid: slot.pid() })
    {
        let _ = slot.signal(libc::SIGHUP, true);
        return Err(error.into());
    }
    let pump = {
        let slot = slot.clone();
        let replies = connection.replies.clone();
        std::thread::Builder::new()
            .name("exec-output".into())
            .spawn(move || pump_output(outputs, &slot, &replies, with_terminal))
    };
    let result = forward_input(connection, input, &slot);
    // Whatever ended the input (the pump closing the connection after the exit status, the
    // client hanging up, a bad frame), a command still running has lost its client.
    let _ = slot.signal(libc::SIGHUP, true);
    if let Err(failure) = &result {
        // The pump may still be sending: the error goes first, then nothing more.
        if let Some(code) = failure.code {
            let _ = connection
                .replies
                .send(&AgentMessage::Error(crate::protocol::ErrorReply {
                    code,
                    message: failure.message.clone(),
                }));
        }
        connection.replies.close();
    }
    match pump {
        Ok(pump) => {
            let _ = pump.join();
        }
        Err(_) => {
            // No pump thread: nobody reads the output, so the command is ended for good.
            let _ = slot.signal(libc::SIGKILL, true);
        }
    }
    // The error (if any) has been sent already.
    result.map_err(|failure| Failure {
        code: None,
        message: failure.message,
    })
}

/// Looks the program up the way execvp would, in the command's PATH or `DEFAULT_PATH`.
fn find_program(request: &ExecRequest) -> Result<PathBuf, ExecError> {
    let program = &request.argv[0];
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = request
        .environment
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(DEFAULT_PATH);
    for directory in path.split(':').filter(|directory| !directory.is_empty()) {
        let candidate = Path::new(directory).join(program);
        if let Ok(metadata) = std::fs::metadata(&candidate) {
            if metadata.is_file() && metadata.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(ExecError::NotFound {
        program: program.clone(),
        path: path.to_string(),
    })
}

/// Passes what the client sends on to the command until the connection ends.
fn forward_input(
    connection: &mut Connection,
    mut input: Input,
    slot: &ExitSlot,
) -> Result<(), Failure> {
    loop {
        let frame = match connection.reader.read::<HostMessage>() {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        match frame {
            Frame::Data(Channel::Stdin, bytes) => match &mut input {
                Input::Pipe(stdin) => {
                    // A command that closed its stdin gets no more input; that is its choice,
                    // not an error.
                    if let Some(pipe) = stdin {
                        if pipe.write_all(&bytes).is_err() {
                            *stdin = None;
                        }
                    }
                }
                Input::Terminal { master, .. } => {
                    let _ = master.write_all(&bytes);
                }
            },
            Frame::End(Channel::Stdin) => match &mut input {
                Input::Pipe(stdin) => *stdin = None,
                Input::Terminal {
                    master,
                    end_of_file,
                } => {
                    let _ = master.write_all(&[*end_of_file]);
                }
            },
            Frame::Control(HostMessage::Signal { signal, group }) => {
                if !(1..=MAX_SIGNAL).contains(&signal) {
                    return Err(ExecError::SignalNumber(signal).into());
                }
                slot.signal(signal, group)
                    .map_err(|source| ExecError::Signal { signal, source })?;
            }
            Frame::Control(HostMessage::Resize(size)) => match &input {
                Input::Terminal { master, .. } => {
                    size.validate().map_err(ExecError::from)?;
                    set_window_size(master.as_raw_fd(), size).map_err(ExecError::WindowSize)?;
                }
                Input::Pipe(_) => {
                    return Err(ExecError::Unexpected(
                        "resize applies to an exec with a pty only".into(),
                    )
                    .into())
                }
            },
            Frame::Control(other) => {
                return Err(ExecError::Unexpected(format!(
                    "during an exec the client may send stdin, signals and resizes, not {}",
                    describe(&other)
                ))
                .into())
            }
            Frame::Data(channel, _) | Frame::End(channel) => {
                return Err(ExecError::Unexpected(format!(
                    "during an exec the client may send stdin, not {}",
                    channel.name()
                ))
                .into())
            }
        }
    }
}

/// Sends the command's output until it has ended, then its exit status; closes the connection.
fn pump_output(
    mut open: Vec<(Channel, OwnedFd)>,
    slot: &Arc<ExitSlot>,
    replies: &Replies,
    terminal: bool,
) {
    let mut buffer = vec![0u8; DATA_CHUNK];
    let mut exited = false;
    // Once sending fails the client is gone; output is still read, so the command never
    // blocks on a full pipe, and dropped.
    let mut sending = true;
    while !open.is_empty() {
        let mut poll_fds: Vec<libc::pollfd> = open
            .iter()
            .map(|(_, fd)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if !exited {
            poll_fds.push(libc::pollfd {
                fd: slot.event_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = match (exited, terminal) {
            (false, _) => -1,
            (true, false) => 0,
            (true, true) => TERMINAL_DRAIN.as_millis() as libc::c_int,
        };
        // SAFETY: `poll_fds` is a valid array of its length for the whole call.
        let ready = unsafe {
            libc::poll(
                poll_fds.as_mut_ptr(),
                poll_fds.len() as libc::nfds_t,
                timeout,
            )
        };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if ready == 0 {
            // The command has ended and nothing more is waiting: its output is over.
            break;
        }
        if !exited && poll_fds[open.len()].revents != 0 {
            exited = true;
        }
        let mut still_open = Vec::with_capacity(open.len());
        for (index, (channel, fd)) in open.drain(..).enumerate() {
            let revents = poll_fds[index].revents;
            if revents == 0 {
                still_open.push((channel, fd));
                continue;
            }
            let mut file = File::from(fd);
            match file.read(&mut buffer) {
                Ok(0) => {}
                Ok(read) => {
                    sending = sending && replies.data(channel, &buffer[..read]).is_ok();
                    still_open.push((channel, OwnedFd::from(file)));
                    continue;
                }
                // EIO: a terminal whose slave side every process has closed.
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {
                    still_open.push((channel, OwnedFd::from(file)));
                    continue;
                }
                Err(_) => {}
            }
            sending = sending && replies.end(channel).is_ok();
        }
        open = still_open;
    }
    for (channel, _) in &open {
        sending = sending && replies.end(*channel).is_ok();
    }
    drop(open);
    let status = slot.wait(None);
    if sending {
        if let Some(status) = status {
            let _ = replies.send(&AgentMessage::Exited(status));
        }
    }
    replies.close();
}

/// A new pseudo-terminal: the master stays with the agent, the slave becomes the command's
/// stdin, stdout and stderr.
struct Terminal {
    master: OwnedFd,
    slave: OwnedFd,
}

impl Terminal {
    fn open(size: WindowSize) -> io::Result<Terminal> {
        // SAFETY: posix_openpt() takes no pointers.
        let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if master < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: posix_openpt() just returned this descriptor, and nothing else owns it.
        let master = unsafe { OwnedFd::from_raw_fd(master) };
        // SAFETY: grantpt() and unlockpt() on the master this function owns; no pointers.
        if unsafe { libc::grantpt(master.as_raw_fd()) } != 0
            // SAFETY: as above.
            || unsafe { libc::unlockpt(master.as_raw_fd()) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `name` is valid for writes of its length, which is passed.
        let result = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if result != 0 {
            return Err(io::Error::from_raw_os_error(result));
        }
        // SAFETY: ptsname_r() succeeded, so `name` holds a NUL-terminated path.
        let slave = unsafe {
            libc::open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        if slave < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: open() just returned this descriptor, and nothing else owns it.
        let slave = unsafe { OwnedFd::from_raw_fd(slave) };
        set_window_size(master.as_raw_fd(), size)?;
        Ok(Terminal { master, slave })
    }
}

fn set_window_size(fd: i32, size: WindowSize) -> io::Result<()> {
    let window = libc::winsize {
        ws_row: size.rows,
        ws_col: size.columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `window` is a valid winsize that outlives the call.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &window) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The terminal's end-of-file character (^D unless changed).
fn terminal_end_of_file(master: &OwnedFd) -> u8 {
    // SAFETY: an all-zero termios is a valid output buffer.
    let mut attributes: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `attributes` is valid for writes for the whole call.
    if unsafe { libc::tcgetattr(master.as_raw_fd(), &mut attributes) } == 0 {
        let character = attributes.c_cc[libc::VEOF];
        if character != 0 {
            return character;
        }
    }
    4
}
