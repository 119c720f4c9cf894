//! The monitor process itself: it starts the container, then runs one `poll` loop on one
//! thread (plus the library's console-logging thread) over init's pidfd, a signalfd, the
//! control socket, the connections reading a request and the pidfds of running `exec`s. Two
//! things end it: init exiting (a halt inside, a crash) or a `stop` (a request, or SIGTERM or
//! SIGINT to the monitor); either way it releases the cgroup and the mount, records `Stopped`
//! and exits. The container's directory stays until `delete`, as a stopped LXD container
//! persists.
//!
//! Requests are served one at a time: `state`, `freeze`, `unfreeze` and starting an `exec`
//! take microseconds to milliseconds; `stop` holds the loop until init is gone (its timeout at
//! most), which is the end of the monitor anyway. A running `exec` does not hold the loop: its
//! answer goes out when its pidfd says the command has exited. Meanwhile its connection is
//! read for `{"signal":N}` lines, which are passed on to the command.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant, SystemTime};

use crate::container::{Container, Status};
use crate::control::{
    receive_with_fds, send_with_fds, ExecSignal, HaltSignal, ProtocolError, RecordedStatus,
    Request, Response, StateRecord, Usage, DEFAULT_STOP_TIMEOUT, FORMAT_VERSION, MAX_REQUEST_BYTES,
};
use crate::exec::ExecProcess;
use crate::kernel;
use crate::InitSystem;

use super::run_directory::{process_start_time, rfc3339};
use super::{MonitorError, RunDirectory, StartOptions};

/// How long a caller may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the monitor waits, once init is gone, for running `exec`s to end (their commands
/// die with the container's pid namespace).
const EXEC_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the monitor is idle before it unmaps the code pages its work mapped.
const IDLE_TRIM_DELAY: Duration = Duration::from_secs(1);

/// The monitor's body, in the process forked off by `start`: never returns.
pub(super) fn run_monitor(
    options: &StartOptions,
    report: OwnedFd,
    log: OwnedFd,
    null: OwnedFd,
) -> ! {
    detach_stdio(&log, &null);
    drop((log, null));
    let runs = &options.run_directory;
    let name = &options.config.name;
    match Monitor::start(options) {
        Err(error) => {
            eprintln!("cove-shim: container \"{name}\" did not start: {error}");
            let _ = runs.remove_entry(name);
            let _ = kernel::write_all(report.as_raw_fd(), &Response::failure(&error).to_line());
            std::process::exit(1)
        }
        Ok(monitor) => {
            let answer = Response {
                state: Some(monitor.record.clone()),
                ..Response::success()
            };
            let _ = kernel::write_all(report.as_raw_fd(), &answer.to_line());
            drop(report);
            monitor.serve()
        }
    }
}

/// stdin from /dev/null, stdout and stderr to the log; `/` as the working directory so the
/// monitor pins no mount.
fn detach_stdio(log: &OwnedFd, null: &OwnedFd) {
    // SAFETY: dup2 onto 0, 1 and 2 of fds this process owns, and chdir to a constant path.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
        libc::chdir(c"/".as_ptr());
    }
}

/// A caller's connection.
struct Connection {
    stream: UnixStream,
    phase: Phase,
}

enum Phase {
    /// Collecting the request line and any fds sent with it.
    Reading {
        line: Vec<u8>,
        fds: Vec<OwnedFd>,
        deadline: Instant,
    },
    /// An `exec` runs; the answer goes out when its helper exits.
    Running {
        process: ExecProcess,
        pidfd: OwnedFd,
        /// What the caller sent after the request, up to a whole `{"signal":N}` line.
        input: Vec<u8>,
        /// False once the caller closed its side (or sent too long a line): it is then no
        /// longer polled.
        listening: bool,
    },
}

struct Monitor {
    container: Container,
    runs: RunDirectory,
    record: StateRecord,
    listener: UnixListener,
    init_pidfd: OwnedFd,
    signals: OwnedFd,
    connections: Vec<Connection>,
    /// Code pages were mapped since the last trim (see `unmap_code_pages`).
    trim_due: bool,
}

/// What to do after a request.
enum Next {
    Continue,
    /// The container stopped (`stop`): record it and exit.
    Finish,
}

impl Monitor {
    /// Publishes `Starting`, starts the container and the control socket, publishes
    /// `Running`. On failure everything is undone.
    fn start(options: &StartOptions) -> Result<Self, MonitorError> {
        let config = &options.config;
        let runs = options.run_directory.clone();
        let monitor_pid = std::process::id();
        let mut record = StateRecord {
            version: FORMAT_VERSION,
            name: config.name.clone(),
            status: RecordedStatus::Starting,
            monitor_pid,
            monitor_start_time: process_start_time(monitor_pid).unwrap_or_default(),
            init_pid: None,
            init_start_time: None,
            halt_signal: HaltSignal::Classic,
            started_at: None,
            stopped_at: None,
            exit_code: None,
            container_directory: options.host.containers_directory.join(&config.name),
            console_log: options
                .host
                .containers_directory
                .join(&config.name)
                .join("console.log"),
            cgroup_parent: options.host.cgroup_parent.clone(),
            usage: None,
            addresses: None,
            orphaned: false,
        };
        runs.write_state(&record)?;
        // Blocked before the container starts, so that only the signalfd sees them; init and
        // exec'd commands reset their mask before they exec.
        let signals = signalfd(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]).map_err(|source| {
            MonitorError::Spawn {
                step: "signalfd",
                source,
            }
        })?;

        let container = Container::start(config, &options.host)?;
        let socket = runs.control_socket(&config.name);
        let published = (|| {
            let init_pid = container.init_pid().unwrap_or_default();
            let init_pidfd = kernel::pidfd_open(init_pid as libc::pid_t)?;
            let listener = UnixListener::bind(&socket)?;
            listener.set_nonblocking(true)?;
            Ok::<_, io::Error>((init_pid, init_pidfd, listener))
        })();
        let (init_pid, init_pidfd, listener) = match published {
            Ok(parts) => parts,
            Err(source) => {
                let _ = container.delete();
                return Err(MonitorError::Spawn {
                    step: "bind the control socket",
                    source,
                });
            }
        };
        record.status = RecordedStatus::Running;
        record.init_pid = Some(init_pid);
        record.init_start_time = process_start_time(init_pid);
        record.halt_signal = match container.init_system() {
            InitSystem::Systemd => HaltSignal::Systemd,
            InitSystem::Classic | InitSystem::Detect => HaltSignal::Classic,
        };
        record.started_at = Some(rfc3339(SystemTime::now()));
        if let Err(error) = runs.write_state(&record) {
            let _ = container.delete();
            return Err(error);
        }
        Ok(Self {
            container,
            runs,
            record,
            listener,
            init_pidfd,
            signals,
            connections: Vec::new(),
            trim_due: true,
        })
    }

    /// The loop; exits the process when the container has stopped.
    fn serve(mut self) -> ! {
        loop {
            let mut polled = vec![
                pollfd(&self.init_pidfd),
                pollfd(&self.signals),
                pollfd(&self.listener),
            ];
            let now = Instant::now();
            let mut timeout: Option<Duration> = None;
            // Where each connection's entries are in `polled`: its first (the stream, or a
            // running exec's pidfd) and, for a running exec, its stream.
            let mut slots: Vec<(usize, Option<usize>)> = Vec::new();
            for connection in &self.connections {
                let first = polled.len();
                match &connection.phase {
                    Phase::Reading { deadline, .. } => {
                        let left = deadline.saturating_duration_since(now);
                        timeout = Some(timeout.map_or(left, |shortest| shortest.min(left)));
                        polled.push(pollfd(&connection.stream));
                        slots.push((first, None));
                    }
                    Phase::Running {
                        pidfd, listening, ..
                    } => {
                        polled.push(pollfd(pidfd));
                        if *listening {
                            polled.push(pollfd(&connection.stream));
                            slots.push((first, Some(first + 1)));
                        } else {
                            slots.push((first, None));
                        }
                    }
                }
            }
            if self.trim_due && self.connections.is_empty() {
                timeout = Some(IDLE_TRIM_DELAY);
            }
            let milliseconds = timeout.map_or(-1, |left| left.as_millis().min(60_000) as i32 + 1);
            // SAFETY: `polled` is a live array of pollfds of the length passed.
            let ready = unsafe {
                libc::poll(
                    polled.as_mut_ptr(),
                    polled.len() as libc::nfds_t,
                    milliseconds,
                )
            };
            if ready < 0 {
                continue; // EINTR
            }
            if ready == 0 && self.trim_due && self.connections.is_empty() {
                unmap_code_pages();
                self.trim_due = false;
                continue;
            }
            self.trim_due = true;
            if polled[0].revents != 0 {
                self.finish();
            }
            if polled[1].revents != 0 && self.take_stop_signal() {
                if let Err(error) = self.container.stop(DEFAULT_STOP_TIMEOUT) {
                    eprintln!("cove-shim: {error}");
                }
                self.finish();
            }
            if polled[2].revents != 0 {
                self.accept();
            }
            // Connections accepted just now have no entry in `polled`: they are polled next
            // time round.
            let is_set = |slot: Option<usize>| {
                slot.and_then(|index| polled.get(index))
                    .is_some_and(|entry| entry.revents != 0)
            };
            let ready: Vec<[bool; 2]> = slots
                .iter()
                .map(|(first, second)| [is_set(Some(*first)), is_set(*second)])
                .collect();
            let mut index = 0;
            let mut finish = false;
            self.connections = std::mem::take(&mut self.connections)
                .into_iter()
                .filter_map(|connection| {
                    let is_ready = ready.get(index).copied().unwrap_or([false; 2]);
                    index += 1;
                    if finish {
                        return Some(connection);
                    }
                    let (kept, next) = self.advance(connection, is_ready, Instant::now());
                    finish = matches!(next, Next::Finish);
                    kept
                })
                .collect();
            if finish {
                self.finish();
            }
        }
    }

    /// Whether the signalfd delivered SIGTERM or SIGINT (SIGHUP is read and ignored).
    fn take_stop_signal(&self) -> bool {
        let mut information = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        let read = kernel::read_full(self.signals.as_raw_fd(), &mut information);
        if read != Ok(information.len()) {
            return false;
        }
        let signal = u32::from_ne_bytes([
            information[0],
            information[1],
            information[2],
            information[3],
        ]) as i32;
        signal == libc::SIGTERM || signal == libc::SIGINT
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.connections.push(Connection {
                            stream,
                            phase: Phase::Reading {
                                line: Vec::new(),
                                fds: Vec::new(),
                                deadline: Instant::now() + REQUEST_TIMEOUT,
                            },
                        });
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // WouldBlock: none left
            }
        }
    }

    /// Moves one connection on; returns it if it stays open.
    fn advance(
        &mut self,
        mut connection: Connection,
        [ready, stream_ready]: [bool; 2],
        now: Instant,
    ) -> (Option<Connection>, Next) {
        match &mut connection.phase {
            Phase::Running {
                process,
                input,
                listening,
                ..
            } => {
                if stream_ready {
                    *listening = read_exec_input(&connection.stream, input);
                    for signal in take_signals(input) {
                        if let Err(error) = process.signal(signal) {
                            eprintln!("cove-shim: {error}");
                        }
                    }
                }
                if !ready {
                    return (Some(connection), Next::Continue);
                }
                match process.try_wait() {
                    Ok(None) => (Some(connection), Next::Continue),
                    Ok(Some(code)) => {
                        let answer = Response {
                            exit_code: Some(code),
                            ..Response::success()
                        };
                        answer_and_close(connection.stream, &answer);
                        (None, Next::Continue)
                    }
                    Err(error) => {
                        answer_and_close(connection.stream, &Response::failure(error));
                        (None, Next::Continue)
                    }
                }
            }
            Phase::Reading {
                line,
                fds,
                deadline,
            } => {
                if !ready {
                    if now >= *deadline {
                        let error = "no request within 10 seconds: send one JSON line";
                        answer_and_close(connection.stream, &Response::failure(error));
                        return (None, Next::Continue);
                    }
                    return (Some(connection), Next::Continue);
                }
                let mut buffer = [0u8; 4096];
                match receive_with_fds(&connection.stream, &mut buffer, fds) {
                    Ok(0) => return (None, Next::Continue), // gone without a request
                    Ok(read) => line.extend_from_slice(&buffer[..read]),
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        return (Some(connection), Next::Continue)
                    }
                    Err(_) => return (None, Next::Continue),
                }
                let Some(end) = line.iter().position(|byte| *byte == b'\n') else {
                    if line.len() > MAX_REQUEST_BYTES {
                        let answer = Response::failure(ProtocolError::TooLong);
                        answer_and_close(connection.stream, &answer);
                        return (None, Next::Continue);
                    }
                    return (Some(connection), Next::Continue);
                };
                let request = Request::parse(&line[..end]);
                let fds = std::mem::take(fds);
                // What came after the request line: an exec's first signal lines, maybe.
                let rest = line[end + 1..].to_vec();
                match request {
                    Err(error) => {
                        answer_and_close(connection.stream, &Response::failure(error));
                        (None, Next::Continue)
                    }
                    Ok(request) => self.handle(connection.stream, request, fds, rest),
                }
            }
        }
    }

    /// Carries out one request; returns the connection if it waits for an `exec`.
    fn handle(
        &mut self,
        stream: UnixStream,
        request: Request,
        fds: Vec<OwnedFd>,
        rest: Vec<u8>,
    ) -> (Option<Connection>, Next) {
        match request {
            Request::State => {
                let answer = Response {
                    state: Some(self.current_state()),
                    ..Response::success()
                };
                answer_and_close(stream, &answer);
            }
            Request::Exec(command) => match self.start_exec(&stream, &command, fds, rest) {
                Ok(phase) => return (Some(Connection { stream, phase }), Next::Continue),
                Err(error) => answer_and_close(stream, &Response::failure(error)),
            },
            Request::Stop { timeout_ms } => {
                let timeout = timeout_ms.map_or(DEFAULT_STOP_TIMEOUT, Duration::from_millis);
                let result = self.container.stop(timeout);
                let answer = match result {
                    Ok(outcome) => Response {
                        exit_code: Some(outcome.exit_code),
                        clean: Some(outcome.clean),
                        ..Response::success()
                    },
                    Err(error) => Response::failure(error),
                };
                // A failure after init ended (releasing the cgroup, say) still ends the
                // monitor: there is nothing left to watch. One before leaves it serving.
                let stopped = self.container.state().status == Status::Stopped;
                if stopped {
                    self.record_stopped();
                }
                // The answer goes out once the run directory says Stopped; the caller then
                // waits for this process to end.
                answer_and_close(stream, &answer);
                return (
                    None,
                    if stopped {
                        Next::Finish
                    } else {
                        Next::Continue
                    },
                );
            }
            Request::Freeze | Request::Unfreeze => {
                let freeze = matches!(request, Request::Freeze);
                let result = if freeze {
                    self.container.freeze()
                } else {
                    self.container.unfreeze()
                };
                let answer = match result {
                    Ok(()) => {
                        self.record.status = if freeze {
                            RecordedStatus::Frozen
                        } else {
                            RecordedStatus::Running
                        };
                        match self.runs.write_state(&self.record) {
                            Ok(()) => Response::success(),
                            Err(error) => Response::failure(error),
                        }
                    }
                    Err(error) => Response::failure(error),
                };
                answer_and_close(stream, &answer);
            }
        }
        (None, Next::Continue)
    }

    fn start_exec(
        &mut self,
        stream: &UnixStream,
        command: &crate::control::ExecCommand,
        fds: Vec<OwnedFd>,
        input: Vec<u8>,
    ) -> Result<Phase, String> {
        let request = command
            .to_exec_request()
            .map_err(|error| error.to_string())?;
        let mut process = if request.terminal.is_some() && fds.is_empty() {
            let pair = self
                .container
                .open_terminal(&request)
                .map_err(|error| error.to_string())?;
            let terminal = pair.terminal.as_fd();
            let process = self
                .container
                .exec_with_stdio(&request, [terminal, terminal, terminal])
                .map_err(|error| error.to_string())?;
            let started = Response {
                started: Some(true),
                ..Response::success()
            };
            // A caller gone already misses its terminal; the command then sees a hangup
            // once the last controlling end (ours) closes.
            let _ = stream.set_nonblocking(false);
            let _ = send_with_fds(stream, &started.to_line(), &[pair.controller.as_fd()]);
            let _ = stream.set_nonblocking(true);
            process
        } else {
            let [stdin, stdout, stderr]: [OwnedFd; 3] = fds
                .try_into()
                .map_err(|fds: Vec<OwnedFd>| ProtocolError::StdioMissing(fds.len()).to_string())?;
            // The caller's streams then belong to the command alone: closing them here (at
            // the end of this block) is what lets the caller see end-of-file when it ends.
            // With `terminal` as well, they are the caller's own terminal, which the command
            // takes as its controlling terminal (so that its hangup reaches the command).
            self.container
                .exec_with_stdio(&request, [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()])
                .map_err(|error| error.to_string())?
        };
        let pidfd = match kernel::pidfd_open(process.id() as libc::pid_t) {
            Ok(pidfd) => pidfd,
            Err(error) => {
                let _ = process.signal(libc::SIGKILL);
                let _ = process.try_wait();
                return Err(format!("cannot watch the command: {error}"));
            }
        };
        // Signal lines sent right behind the request; a partial one stays for later.
        let mut input = input;
        for signal in take_signals(&mut input) {
            let _ = process.signal(signal);
        }
        Ok(Phase::Running {
            process,
            pidfd,
            input,
            listening: true,
        })
    }

    /// The record with the container's status and usage now.
    fn current_state(&mut self) -> StateRecord {
        let state = self.container.state();
        let mut record = self.record.clone();
        record.status = match state.status {
            Status::Running => RecordedStatus::Running,
            Status::Frozen => RecordedStatus::Frozen,
            Status::Stopped => RecordedStatus::Stopped,
        };
        record.usage = Some(Usage {
            memory_bytes: state.memory_bytes,
            processes: state.processes,
            cpu_time_ns: state.cpu_time.map(|time| time.as_nanos() as u64),
        });
        record.addresses = Some(state.addresses);
        record
    }

    /// Records `Stopped` with init's exit code and removes the control socket.
    fn record_stopped(&mut self) {
        let state = self.container.state();
        self.record.status = RecordedStatus::Stopped;
        self.record.init_pid = None;
        self.record.init_start_time = None;
        self.record.exit_code = state.exit_code;
        self.record.stopped_at = Some(rfc3339(SystemTime::now()));
        if let Err(error) = self.runs.write_state(&self.record) {
            eprintln!("cove-shim: {error}");
        }
        let _ = std::fs::remove_file(self.runs.control_socket(&self.record.name));
    }

    /// Ends the monitor once init is gone or stopping failed: releases what is left, answers
    /// the running `exec`s and exits.
    fn finish(mut self) -> ! {
        let name = self.record.name.clone();
        if self.record.status != RecordedStatus::Stopped {
            // Init exited by itself (or a signal asked for the stop): reap it, release the
            // cgroup and the mount.
            if let Err(error) = self.container.stop(Duration::ZERO) {
                eprintln!("cove-shim: cannot clean up after container \"{name}\": {error}");
            }
            self.record_stopped();
        }
        let deadline = Instant::now() + EXEC_DRAIN_TIMEOUT;
        for connection in std::mem::take(&mut self.connections) {
            if let Phase::Running {
                mut process, pidfd, ..
            } = connection.phase
            {
                let left = deadline.saturating_duration_since(Instant::now());
                let _ = kernel::pidfd_exited(&pidfd, left.as_millis() as i32);
                let answer = match process.try_wait() {
                    Ok(Some(code)) => Response {
                        exit_code: Some(code),
                        ..Response::success()
                    },
                    _ => Response::failure(format!("container \"{name}\" stopped")),
                };
                answer_and_close(connection.stream, &answer);
            }
        }
        eprintln!("cove-shim: container \"{name}\" stopped");
        std::process::exit(0)
    }
}

/// Reads what an `exec`'s caller sent into `input`, without blocking; false once the caller
/// has closed its side, the connection failed, or a line grew past the request limit (the
/// connection is then no longer read; the answer still goes out).
fn read_exec_input(stream: &UnixStream, input: &mut Vec<u8>) -> bool {
    let mut buffer = [0u8; 1024];
    loop {
        match (&*stream).read(&mut buffer) {
            Ok(0) => return false,
            Ok(read) => {
                input.extend_from_slice(&buffer[..read]);
                if input.len() > MAX_REQUEST_BYTES && !input.contains(&b'\n') {
                    input.clear();
                    return false;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

/// Takes the whole lines out of `input` and returns the signals they name; lines that are
/// not `{"signal":N}` are dropped (the protocol has no answer for them).
fn take_signals(input: &mut Vec<u8>) -> Vec<i32> {
    let Some(end) = input.iter().rposition(|byte| *byte == b'\n') else {
        return Vec::new();
    };
    let lines: Vec<u8> = input.drain(..=end).collect();
    lines
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .filter_map(|line| match serde_json::from_slice::<ExecSignal>(line) {
            Ok(message) => Some(message.signal),
            Err(error) => {
                eprintln!("cove-shim: ignored an exec input line: {error}");
                None
            }
        })
        .collect()
}

/// Sends the answer line and closes the connection. Answers are small, so a socket buffer
/// always takes them; a caller that went away just misses its answer.
fn answer_and_close(stream: UnixStream, answer: &Response) {
    let _ = stream.set_nonblocking(false);
    let _ = (&stream).write_all(&answer.to_line());
}

/// Unmaps this process's code pages (its `r-xp` file mappings: cove-shim's, libc's, the
/// loader's), so that an idle monitor's RSS is what it uses, not what its start touched.
///
/// Starting a container runs much code once, and the kernel maps code in 64 KiB
/// "fault-around" windows: about 1.6 MB of code pages stay mapped, all of them page cache
/// shared with every other monitor and process (their PSS is a fraction of that). Dropping the
/// mappings frees nothing shared; the few pages the next request needs fault back in from the
/// page cache in microseconds. Code is never written, so no data is lost (read-only *data*
/// mappings are left alone: RELRO pages were written before they became read-only).
fn unmap_code_pages() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [range, "r-xp", _, _, inode, ..] = fields.as_slice() else {
            continue;
        };
        if *inode == "0" {
            continue; // [vdso] and other kernel-provided code
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        // SAFETY: [start, end) is a private, never-written file mapping of this process's own
        // code, as /proc/self/maps lists it; MADV_DONTNEED only drops its page-table entries,
        // and the next access maps the same file pages again.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

fn pollfd(fd: &impl AsRawFd) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Blocks `signals` for this thread (and the threads and children it makes) and returns a
/// signalfd that reads them.
fn signalfd(signals: &[i32]) -> io::Result<OwnedFd> {
    // SAFETY: a zeroed sigset is valid storage for sigemptyset, which initializes it;
    // sigaddset, pthread_sigmask and signalfd only read or write that local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in signals {
            libc::sigaddset(&mut set, *signal);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_lines_are_taken_whole_and_bad_ones_dropped() {
        let mut input = b"{\"signal\":15}\nnonsense\n\n{\"signal\":2}\n{\"sig".to_vec();
        assert_eq!(take_signals(&mut input), [15, 2]);
        assert_eq!(input, b"{\"sig");
        input.extend_from_slice(b"nal\":1}\n");
        assert_eq!(take_signals(&mut input), [1]);
        assert!(input.is_empty());
        assert!(take_signals(&mut b"{\"signal\":3}".to_vec()).is_empty());
    }
}
