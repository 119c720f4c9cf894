//! Running a command inside a running container, as `lxc exec` does.
//!
//! A forked helper joins the container's v1 cgroups, then its ipc, uts, net, pid and mount
//! namespaces. Joining a pid namespace only applies to children, so the helper forks the
//! command, straight into the container's v2 cgroup; the command enters the cgroup namespace
//! and, last, the user namespace (host root may enter the others first), takes its uid, gid,
//! working directory and environment, its stdio, and execs. The helper waits and exits with
//! the command's status, which the caller gets from [`ExecProcess::wait`].
//!
//! Why not one `cgroup.procs` write per hierarchy: moving a process that way takes the
//! kernel's global `cgroup_threadgroup_rwsem` for writing, which waits for an RCU grace period
//! whenever no migration happened lately: 5 to 20 ms per exec on a hybrid host. Writing `0` to
//! a v1 `tasks` file moves only the writing thread and skips that lock (the helper is
//! single-threaded, so that is the whole process), and a child cloned into a v2 cgroup
//! (`CLONE_INTO_CGROUP`) is never migrated at all. Kernels without `clone3`'s cgroup field get
//! the `cgroup.procs` write instead.
//!
//! Like the container's init, both children run in a copy of a possibly multithreaded process:
//! they only use what was prepared before the fork.
//!
//! Signals: the helper is the caller's child, so the caller can always name it safely (its pid
//! is not reused before the caller reaps it); the command's pid is not the caller's to keep.
//! [`ExecProcess::signal`] therefore signals the helper, which forwards the signals of
//! [`FORWARDED_SIGNALS`] to the command from a handler, and only while the command is
//! unreaped (it waits with `WNOWAIT` first). SIGKILL cannot be caught: it kills the helper,
//! and the command, which asked for `PR_SET_PDEATHSIG` = SIGKILL, dies with it.
//!
//! With a terminal ([`ExecRequest::terminal`]) the command's stdio is the terminal end of a
//! pseudo-terminal from the container's devpts (`terminal`); it calls `setsid` and takes it as
//! its controlling terminal, and the caller gets the controlling end.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::confinement::{Confinement, ConfinementStep};
use crate::container::{Container, TTY_GROUP};
use crate::init::reset_signals;
use crate::kernel;
use crate::rootfs::c_path;
use crate::terminal::{self, TerminalPair, TerminalSize};

/// The signals [`ExecProcess::signal`] forwards to a command (SIGKILL is handled apart).
pub const FORWARDED_SIGNALS: [i32; 10] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGTERM,
    libc::SIGCONT,
    libc::SIGTSTP,
    libc::SIGWINCH,
];

/// The PATH a command gets when the request sets none (LXD's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("container \"{0}\" is not running: start it before running commands in it")]
    NotRunning(String),
    #[error("container \"{0}\" is frozen: unfreeze it before running commands in it")]
    Frozen(String),
    #[error("nothing to run: give a command")]
    EmptyCommand,
    #[error("the command, an environment variable or the working directory contains a NUL byte")]
    NulByte,
    #[error("cannot open namespace {path}: {source}")]
    Namespace {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the command ({step}): {source}")]
    Spawn {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {command:?} in container \"{name}\": cannot {step}: {source}")]
    Setup {
        name: String,
        command: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for the command: {0}")]
    Wait(#[source] io::Error),
    #[error(
        "signal {0} cannot be sent to a command: send SIGKILL (9) or one of SIGHUP, SIGINT, \
         SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGTERM, SIGCONT, SIGTSTP, SIGWINCH"
    )]
    Unforwardable(i32),
    #[error("cannot signal the command: {0}")]
    Signal(#[source] io::Error),
    #[error("cannot open a pseudo-terminal for the command: {0}")]
    Terminal(#[source] io::Error),
}

/// What to run and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// The program and its arguments; a program without a `/` is looked up in PATH.
    pub command: Vec<String>,
    pub uid: u32,
    pub gid: u32,
    /// `NAME=value` pairs; PATH defaults to [`DEFAULT_PATH`].
    pub environment: Vec<(String, String)>,
    pub working_directory: PathBuf,
    /// Run on a new pseudo-terminal of this size (`lxc exec -t`) instead of pipes or the
    /// caller's streams.
    pub terminal: Option<TerminalSize>,
}

impl ExecRequest {
    /// `command` as root in `/`, with PATH and HOME set.
    pub fn new(command: &[&str]) -> Self {
        Self {
            command: command.iter().map(|part| part.to_string()).collect(),
            uid: 0,
            gid: 0,
            environment: vec![
                ("PATH".to_string(), DEFAULT_PATH.to_string()),
                ("HOME".to_string(), "/root".to_string()),
            ],
            working_directory: PathBuf::from("/"),
            terminal: None,
        }
    }
}

/// A started command: write its stdin, read its stdout and stderr (or its terminal), then
/// wait.
#[derive(Debug)]
pub struct ExecProcess {
    helper: libc::pid_t,
    /// Set once the helper is reaped: its pid may then belong to another process.
    exit_code: Option<i32>,
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    /// With a terminal: its controlling end (write the command's input, read its output).
    pub terminal: Option<File>,
}

/// A finished command's exit code and output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit code, or 128 + the signal that killed it.
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl ExecProcess {
    /// The pid of the helper that waits for the command and exits with its status (a child of
    /// the caller, which may watch it through a pidfd).
    pub fn id(&self) -> u32 {
        self.helper as u32
    }

    /// The command's exit code if it has finished (the helper is reaped then), else `None`.
    pub fn try_wait(&mut self) -> Result<Option<i32>, ExecError> {
        if self.exit_code.is_none() {
            self.exit_code = kernel::try_wait(self.helper).map_err(ExecError::Wait)?;
        }
        Ok(self.exit_code)
    }

    /// Waits for the command; returns its exit code (128 + signal when killed).
    pub fn wait(mut self) -> Result<i32, ExecError> {
        drop(self.stdin.take());
        match self.exit_code {
            Some(code) => Ok(code),
            None => kernel::wait_for_exit(self.helper).map_err(ExecError::Wait),
        }
    }

    /// Sends `signal` to the command: one of [`FORWARDED_SIGNALS`] (forwarded by the helper)
    /// or SIGKILL. A command that has already ended is left alone.
    pub fn signal(&mut self, signal: i32) -> Result<(), ExecError> {
        if signal != libc::SIGKILL && !FORWARDED_SIGNALS.contains(&signal) {
            return Err(ExecError::Unforwardable(signal));
        }
        if self.exit_code.is_some() {
            return Ok(());
        }
        // SAFETY: kill(2) on our own child, not yet reaped (exit_code is unset), so its pid
        // cannot have been reused.
        if unsafe { libc::kill(self.helper, signal) } < 0 {
            return Err(ExecError::Signal(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Sets the window size of the command's terminal (the kernel sends it SIGWINCH). A
    /// command without a terminal has no size to set.
    pub fn resize(&self, size: TerminalSize) -> Result<(), ExecError> {
        let terminal = self.terminal.as_ref().ok_or_else(|| {
            ExecError::Terminal(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the command runs without a terminal",
            ))
        })?;
        terminal::set_size(terminal.as_fd(), size).map_err(ExecError::Terminal)
    }

    /// Feeds `input` to stdin, collects stdout and stderr, and waits.
    pub fn output(mut self, input: &[u8]) -> Result<ExecOutput, ExecError> {
        let reader = |stream: Option<File>| {
            std::thread::spawn(move || {
                let mut text = Vec::new();
                if let Some(mut stream) = stream {
                    let _ = stream.read_to_end(&mut text);
                }
                String::from_utf8_lossy(&text).into_owned()
            })
        };
        let stdout = reader(self.stdout.take());
        let stderr = reader(self.stderr.take());
        if let Some(mut stdin) = self.stdin.take() {
            // A command that does not read its input closes the pipe: not an error.
            let _ = stdin.write_all(input);
        }
        let exit_code = self.wait()?;
        Ok(ExecOutput {
            exit_code,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }
}

/// Where the helper and the command keep the report pipe.
const REPORT_FD: RawFd = 3;

/// The steps a failure report can name.
const STEPS: [&str; 12] = [
    "join the container's cgroup",
    "enter the container's namespaces",
    "fork the command",
    "set the groups",
    "set the gid",
    "set the uid",
    "change to the working directory",
    "execute the command (is it installed in the container?)",
    "drop capabilities from the bounding set",
    "install the seccomp filter",
    "take the terminal as the controlling terminal",
    "ask to die with the helper (PR_SET_PDEATHSIG)",
];

/// Init's v2 cgroup: its directory, open (numbered 4 and up), for `CLONE_INTO_CGROUP`, and its
/// `cgroup.procs` for kernels without it.
type UnifiedCgroup = (OwnedFd, CString);

/// Everything the two children need, prepared before forking.
struct Prepared {
    /// The `tasks` files of init's v1 cgroups (see the module's doc).
    cgroup_task_files: Vec<CString>,
    unified_cgroup: Option<UnifiedCgroup>,
    /// Entered by the helper: ipc, uts, net, pid, mount.
    namespaces: Vec<(OwnedFd, libc::c_int)>,
    /// Entered by the command, once it is in its cgroups: cgroup, then user. Numbered 4 and
    /// up, so the helper's stdio and report pipe never take their numbers.
    command_namespaces: Vec<(OwnedFd, libc::c_int)>,
    candidates: Vec<CString>,
    arguments: Vec<CString>,
    environment: Vec<CString>,
    working_directory: CString,
    uid: u32,
    gid: u32,
    confinement: Confinement,
    /// The command takes its stdin as its controlling terminal, in a new session.
    controlling_terminal: bool,
}

impl Container {
    /// Starts `request` inside the container with piped stdin, stdout and stderr, or, when it
    /// asks for a terminal, on a new pseudo-terminal whose controlling end the returned
    /// process holds (`terminal`).
    pub fn exec(&self, request: &ExecRequest) -> Result<ExecProcess, ExecError> {
        if request.terminal.is_some() {
            let pair = self.open_terminal(request)?;
            let terminal = pair.terminal.as_fd();
            let mut process = self.exec_with_stdio(request, [terminal, terminal, terminal])?;
            process.terminal = Some(File::from(pair.controller));
            return Ok(process);
        }
        let spawn_error = |step| move |source| ExecError::Spawn { step, source };
        let (stdin_read, stdin_write) = kernel::pipe().map_err(spawn_error("pipe"))?;
        let (stdout_read, stdout_write) = kernel::pipe().map_err(spawn_error("pipe"))?;
        let (stderr_read, stderr_write) = kernel::pipe().map_err(spawn_error("pipe"))?;
        let mut process = self.exec_with_stdio(
            request,
            [
                stdin_read.as_fd(),
                stdout_write.as_fd(),
                stderr_write.as_fd(),
            ],
        )?;
        process.stdin = Some(File::from(stdin_write));
        process.stdout = Some(File::from(stdout_read));
        process.stderr = Some(File::from(stderr_read));
        Ok(process)
    }

    /// A pseudo-terminal for `request` (its size, or 24x80), from the container's devpts,
    /// its terminal end owned by the request's user and the `tty` group as the container maps
    /// them. Pass the terminal end as all three of [`Container::exec_with_stdio`]'s streams
    /// (with `request.terminal` set, the command makes it its controlling terminal); the
    /// controlling end is the caller's.
    pub fn open_terminal(&self, request: &ExecRequest) -> Result<TerminalPair, ExecError> {
        let init_pid = self
            .init_pid()
            .ok_or_else(|| ExecError::NotRunning(self.name().to_string()))?;
        let host_id = |id: u32, range: Option<crate::idmap::IdRange>| match range {
            Some(range) if id < range.size => range.host_base + id,
            _ => id,
        };
        let map = self.id_map();
        let owner = (
            host_id(request.uid, map.map(|map| map.uid)),
            host_id(TTY_GROUP, map.map(|map| map.gid)),
        );
        let size = request.terminal.unwrap_or_default();
        terminal::open_for_container(init_pid, owner, size).map_err(ExecError::Terminal)
    }

    /// Starts `request` inside the container with `stdio` as its stdin, stdout and stderr (a
    /// caller's own streams, passed on as they are); the returned process has no pipes. The
    /// caller's copies may be closed as soon as this returns. With `request.terminal` set,
    /// stdin must be a terminal (see [`Container::open_terminal`]): the command makes it its
    /// controlling terminal.
    pub fn exec_with_stdio(
        &self,
        request: &ExecRequest,
        stdio: [BorrowedFd<'_>; 3],
    ) -> Result<ExecProcess, ExecError> {
        let prepared = self.prepare(request)?;
        let spawn_error = |step| move |source| ExecError::Spawn { step, source };
        // The helper moves these to 0, 1 and 2: copies numbered 3 and up are never overwritten
        // on the way, and a fresh dup2 clears close-on-exec.
        let high_copy = |fd: BorrowedFd<'_>| -> Result<OwnedFd, ExecError> {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd the caller keeps open for this call.
            let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if copy < 0 {
                return Err(spawn_error("duplicate stdio")(io::Error::last_os_error()));
            }
            // SAFETY: fcntl returned a new fd that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(copy) })
        };
        let [stdin, stdout, stderr] = stdio;
        let copies = [high_copy(stdin)?, high_copy(stdout)?, high_copy(stderr)?];
        let (report_read, report_write) = kernel::pipe().map_err(spawn_error("pipe"))?;
        let stdio = copies.each_ref().map(AsRawFd::as_raw_fd);
        // SAFETY: the helper only runs `run_helper`, allocation-free, ending in _exit.
        let helper = unsafe { kernel::clone_into_namespaces(0) }.map_err(spawn_error("fork"))?;
        if helper == 0 {
            run_helper(&prepared, stdio, report_write.as_raw_fd());
        }
        drop((copies, report_write));
        match kernel::read_child_failure(&report_read) {
            Ok(None) => Ok(ExecProcess {
                helper,
                exit_code: None,
                stdin: None,
                stdout: None,
                stderr: None,
                terminal: None,
            }),
            Ok(Some((step, errno))) => {
                let _ = kernel::wait_for_exit(helper);
                Err(ExecError::Setup {
                    name: self.name().to_string(),
                    command: request.command.join(" "),
                    step: STEPS.get(step as usize).copied().unwrap_or("set up"),
                    source: io::Error::from_raw_os_error(errno),
                })
            }
            Err(source) => {
                // SAFETY: kill(2) on our own unreaped child.
                unsafe { libc::kill(helper, libc::SIGKILL) };
                let _ = kernel::wait_for_exit(helper);
                Err(ExecError::Spawn {
                    step: "read its report",
                    source,
                })
            }
        }
    }

    /// Runs `request` to completion with `input` on stdin.
    pub fn exec_output(
        &self,
        request: &ExecRequest,
        input: &[u8],
    ) -> Result<ExecOutput, ExecError> {
        self.exec(request)?.output(input)
    }

    /// The cgroups init is in now: an init such as systemd moves itself into a sub-cgroup
    /// (`init.scope`), and on the unified hierarchy the container's top cgroup then may hold
    /// no processes. Falls back to the container's own cgroup.
    fn process_files_beside_init(&self, init_pid: u32) -> Vec<PathBuf> {
        let files = std::fs::read_to_string(format!("/proc/{init_pid}/cgroup"))
            .map(|text| self.cgroup().layout().process_files_from(&text))
            .unwrap_or_default();
        if files.is_empty() {
            self.cgroup().process_files()
        } else {
            files
        }
    }

    /// Init's cgroups as the helper joins them: the `tasks` file of each v1 one, and the v2
    /// one opened for `CLONE_INTO_CGROUP` with its `cgroup.procs` (see the module's doc).
    fn cgroups_beside_init(
        &self,
        init_pid: u32,
    ) -> Result<(Vec<CString>, Option<UnifiedCgroup>), ExecError> {
        let layout = self.cgroup().layout();
        let mut task_files = Vec::new();
        let mut unified = None;
        for file in self.process_files_beside_init(init_pid) {
            let Some(directory) = file.parent() else {
                continue;
            };
            let legacy = layout
                .legacy
                .iter()
                .any(|hierarchy| directory.starts_with(&hierarchy.mount));
            if legacy || layout.unified.is_none() {
                task_files.push(c_path(&directory.join("tasks")));
                continue;
            }
            let open_error = |source| ExecError::Spawn {
                step: "open the container's cgroup",
                source,
            };
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_PATH)
                .open(directory)
                .map_err(open_error)?;
            let opened = numbered_above_report(opened.into()).map_err(open_error)?;
            unified = Some((opened, c_path(&file)));
        }
        Ok((task_files, unified))
    }

    fn prepare(&self, request: &ExecRequest) -> Result<Prepared, ExecError> {
        let program = request.command.first().ok_or(ExecError::EmptyCommand)?;
        let text = |value: &str| CString::new(value).map_err(|_| ExecError::NulByte);
        let init_pid = self
            .init_pid()
            .ok_or_else(|| ExecError::NotRunning(self.name().to_string()))?;
        // The command would join the frozen cgroup and hang there.
        if self.is_frozen() {
            return Err(ExecError::Frozen(self.name().to_string()));
        }
        let mut kinds = vec![
            ("cgroup", libc::CLONE_NEWCGROUP),
            ("ipc", libc::CLONE_NEWIPC),
            ("uts", libc::CLONE_NEWUTS),
            ("net", libc::CLONE_NEWNET),
            ("pid", libc::CLONE_NEWPID),
            ("mnt", libc::CLONE_NEWNS),
        ];
        if self.id_map().is_some() {
            kinds.push(("user", libc::CLONE_NEWUSER));
        }
        let mut namespaces = Vec::new();
        let mut command_namespaces = Vec::new();
        for (kind, flag) in kinds {
            let path = format!("/proc/{init_pid}/ns/{kind}");
            let file = File::open(&path).map_err(|source| {
                if source.kind() == io::ErrorKind::NotFound {
                    ExecError::NotRunning(self.name().to_string())
                } else {
                    ExecError::Namespace {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
            if matches!(flag, libc::CLONE_NEWCGROUP | libc::CLONE_NEWUSER) {
                let fd = numbered_above_report(file.into())
                    .map_err(|source| ExecError::Namespace { path, source })?;
                command_namespaces.push((fd, flag));
            } else {
                namespaces.push((OwnedFd::from(file), flag));
            }
        }
        let (cgroup_task_files, unified_cgroup) = self.cgroups_beside_init(init_pid)?;
        let path = request
            .environment
            .iter()
            .find(|(name, _)| name == "PATH")
            .map_or(DEFAULT_PATH, |(_, value)| value.as_str());
        let candidates = if program.contains('/') {
            vec![text(program)?]
        } else {
            path.split(':')
                .filter(|directory| !directory.is_empty())
                .map(|directory| text(&format!("{directory}/{program}")))
                .collect::<Result<_, _>>()?
        };
        let mut environment: Vec<CString> = request
            .environment
            .iter()
            .map(|(name, value)| text(&format!("{name}={value}")))
            .collect::<Result<_, _>>()?;
        if !request.environment.iter().any(|(name, _)| name == "PATH") {
            environment.push(text(&format!("PATH={DEFAULT_PATH}"))?);
        }
        Ok(Prepared {
            cgroup_task_files,
            unified_cgroup,
            namespaces,
            command_namespaces,
            candidates,
            arguments: request
                .command
                .iter()
                .map(|argument| text(argument))
                .collect::<Result<_, _>>()?,
            environment,
            working_directory: text(&request.working_directory.to_string_lossy())?,
            uid: request.uid,
            gid: request.gid,
            confinement: self.confinement().clone(),
            controlling_terminal: request.terminal.is_some(),
        })
    }
}

/// The helper: joins the container, forks the command and exits with its status.
fn run_helper(prepared: &Prepared, stdio: [RawFd; 3], report: RawFd) -> ! {
    let fail = |step: usize, errno: i32| -> ! { kernel::fail_child(report, step as u32, errno) };
    // Held back until the command exists and the forwarding handlers are in place: a signal
    // the caller sends early is then forwarded, not lost (nor fatal to the helper alone).
    set_forwarded_signals_blocked(true);
    for file in &prepared.cgroup_task_files {
        // "0" in a v1 `tasks` file moves the writing thread: all of this single-threaded
        // helper.
        if let Err(errno) = write_zero(file) {
            fail(0, errno);
        }
    }
    for (namespace, kind) in &prepared.namespaces {
        // SAFETY: an open namespace fd and its matching type.
        if unsafe { libc::setns(namespace.as_raw_fd(), *kind) } < 0 {
            fail(1, kernel::last_errno());
        }
    }
    // Keep only what the command needs, at fixed numbers: its stdio at 0, 1 and 2 and the
    // report pipe at 3. Copies of the caller's other fds (other commands' pipes among them)
    // would otherwise stay open here until this command ends.
    for (target, fd) in stdio.into_iter().enumerate() {
        // SAFETY: dup2 on open fds; the pipes are numbered above 2, so none is overwritten.
        if unsafe { libc::dup2(fd, target as RawFd) } < 0 {
            fail(1, kernel::last_errno());
        }
    }
    // SAFETY: as above; fd 3 is then marked close-on-exec so a successful exec closes it.
    if unsafe { libc::dup2(report, REPORT_FD) } < 0
        // SAFETY: fcntl on the fd just made.
        || unsafe { libc::fcntl(REPORT_FD, libc::F_SETFD, libc::FD_CLOEXEC) } < 0
    {
        fail(1, kernel::last_errno());
    }
    let mut keep = [-1; 3];
    for (slot, fd) in keep.iter_mut().zip(
        prepared
            .command_namespaces
            .iter()
            .map(|(fd, _)| fd.as_raw_fd())
            .chain(prepared.unified_cgroup.iter().map(|(fd, _)| fd.as_raw_fd())),
    ) {
        *slot = fd;
    }
    close_fds_above_report(keep);
    let cloned = match &prepared.unified_cgroup {
        // SAFETY: here and below, the command child again only uses prepared data. (Not
        // glibc's fork: its handlers take locks that another thread of the original process
        // may have held.)
        None => unsafe { kernel::clone_into_namespaces(0) },
        // SAFETY: see above.
        Some((cgroup, procs)) => match unsafe { kernel::fork_into_cgroup(cgroup.as_raw_fd()) } {
            Ok(pid) => Ok(pid),
            // No clone3 with a cgroup here: migrate this helper the old way, then fork.
            Err(_) => match write_zero(procs) {
                // SAFETY: see above.
                Ok(()) => unsafe { kernel::clone_into_namespaces(0) },
                Err(errno) => kernel::fail_child(REPORT_FD, 0, errno),
            },
        },
    };
    let command = match cloned {
        Ok(pid) => pid,
        Err(error) => kernel::fail_child(REPORT_FD, 2, error.raw_os_error().unwrap_or(0)),
    };
    if command == 0 {
        run_command(prepared);
    }
    // The caller sees end-of-file on the pipes only once no copy of their write ends is left.
    for fd in 0..=REPORT_FD {
        // SAFETY: closing this process's copies of fds it no longer uses.
        unsafe { libc::close(fd) };
    }
    kernel::exit_child(forward_signals_until_exit(command))
}

/// The command's pid while the helper may signal it (set in the helper only).
static COMMAND_PID: AtomicI32 = AtomicI32::new(0);

/// The helper's handler: passes the signal on to the command.
extern "C" fn forward_signal(signal: libc::c_int) {
    // SAFETY: reading and restoring this thread's errno, which kill(2) may change.
    let saved = unsafe { *libc::__errno_location() };
    let pid = COMMAND_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe; `pid` is the helper's unreaped child (the store
        // of 0 happens with these signals blocked, before the reaping).
        unsafe { libc::kill(pid, signal) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

/// Blocks or unblocks [`FORWARDED_SIGNALS`] for the calling thread; allocation-free.
fn set_forwarded_signals_blocked(blocked: bool) {
    // SAFETY: a zeroed sigset is valid storage for sigemptyset; sigaddset and sigprocmask
    // only touch that local set and this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        let how = if blocked {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::sigprocmask(how, &set, std::ptr::null_mut());
    }
}

/// In the helper: forwards [`FORWARDED_SIGNALS`] to `command` until it exits, then reaps it
/// and returns its exit code. Allocation-free.
fn forward_signals_until_exit(command: libc::pid_t) -> i32 {
    COMMAND_PID.store(command, Ordering::SeqCst);
    for signal in FORWARDED_SIGNALS {
        // SAFETY: a zeroed sigaction is valid (empty mask); the handler is an extern "C" fn
        // that only does async-signal-safe work.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    set_forwarded_signals_blocked(false);
    // Wait without reaping: while the command is a zombie its pid stays its own, so a
    // forwarded signal cannot reach another process.
    loop {
        // SAFETY: a zeroed siginfo is valid storage for waitid to fill.
        let mut information: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child, writing into the live `information`.
        let waited = unsafe {
            libc::waitid(
                libc::P_PID,
                command as libc::id_t,
                &mut information,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if waited == 0 || kernel::last_errno() != libc::EINTR {
            break;
        }
    }
    set_forwarded_signals_blocked(true);
    COMMAND_PID.store(0, Ordering::SeqCst);
    kernel::wait_for_exit(command).unwrap_or(127)
}

/// Writes "0" to a cgroup file (moving the writer), allocation-free; returns the errno.
fn write_zero(file: &CString) -> Result<(), i32> {
    // SAFETY: a valid NUL-terminated path; the fd is closed right after the write.
    let fd = unsafe { libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(kernel::last_errno());
    }
    let written = kernel::write_all(fd, b"0");
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    written
}

/// Closes every fd above the report pipe except those in `keep` (-1 for none), allocation-free.
fn close_fds_above_report(mut keep: [RawFd; 3]) {
    keep.sort_unstable();
    let mut first = REPORT_FD + 1;
    for fd in keep {
        if fd < first {
            continue;
        }
        if fd > first {
            // SAFETY: close_range takes integers; it closes only this process's copies.
            unsafe { libc::syscall(libc::SYS_close_range, first, fd - 1, 0) };
        }
        first = fd + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 0) };
}

/// `fd` moved to a number above the report pipe's (close-on-exec), so that the helper's stdio
/// and report pipe never land on it.
fn numbered_above_report(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > REPORT_FD {
        return Ok(fd);
    }
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an open fd.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, REPORT_FD + 1) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// The command: takes its identity, stdio and directory, and execs.
fn run_command(prepared: &Prepared) -> ! {
    let fail =
        |step: usize| -> ! { kernel::fail_child(REPORT_FD, step as u32, kernel::last_errno()) };
    for (namespace, kind) in &prepared.command_namespaces {
        // SAFETY: an open namespace fd and its matching type; user comes last.
        if unsafe { libc::setns(namespace.as_raw_fd(), *kind) } < 0 {
            fail(1);
        }
    }
    if prepared.controlling_terminal {
        // A session of its own, with the terminal (its stdin) as the controlling terminal, so
        // that the terminal's signals (^C, SIGWINCH, hangup) reach it.
        // SAFETY: setsid and an ioctl on fd 0 take no pointers.
        if unsafe { libc::setsid() } < 0 || unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            fail(10);
        }
    }
    // The same bounding set and seccomp filter as init, applied while the command still holds
    // the capabilities both need (it is root in the container's user namespace here).
    if let Err((step, errno)) = prepared.confinement.apply() {
        let step = match step {
            ConfinementStep::DropCapability(_) => 8,
            ConfinementStep::InstallSeccomp => 9,
        };
        kernel::fail_child(REPORT_FD, step, errno);
    }
    if let Err((index, errno)) = kernel::set_identity(prepared.uid, prepared.gid) {
        kernel::fail_child(REPORT_FD, 3 + index, errno);
    }
    // Dies with the helper (SIGKILL to it is how a command is killed). Set after the identity
    // change, which clears it. The helper is outside the command's pid namespace, so the
    // parent pid reads 0 while it lives; anything else means it is already gone.
    // SAFETY: prctl and getppid take no pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } < 0 {
        fail(11);
    }
    // SAFETY: as above.
    if unsafe { libc::getppid() } != 0 {
        kernel::exit_child(128 + libc::SIGKILL);
    }
    // SAFETY: a prepared, NUL-terminated path.
    if unsafe { libc::chdir(prepared.working_directory.as_ptr()) } < 0 {
        fail(6);
    }
    reset_signals();
    let mut arguments = [std::ptr::null(); 256];
    let mut environment = [std::ptr::null(); 256];
    for (slot, value) in arguments[..255].iter_mut().zip(&prepared.arguments) {
        *slot = value.as_ptr();
    }
    for (slot, value) in environment[..255].iter_mut().zip(&prepared.environment) {
        *slot = value.as_ptr();
    }
    let mut errno = libc::ENOENT;
    for candidate in &prepared.candidates {
        // SAFETY: prepared strings; both arrays end in a null pointer.
        unsafe { libc::execve(candidate.as_ptr(), arguments.as_ptr(), environment.as_ptr()) };
        let error = kernel::last_errno();
        // Keep the most telling error: "permission denied" over "not found".
        if error != libc::ENOENT && error != libc::ENOTDIR {
            errno = error;
        }
    }
    kernel::fail_child(REPORT_FD, 7, errno)
}
