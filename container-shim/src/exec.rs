//! Running a command inside a running container, as `lxc exec` does.
//!
//! A forked helper joins the container's cgroup, then each of its namespaces (cgroup, ipc, uts,
//! net, pid, mount, and user last, since host root may enter the others first). Joining a pid
//! namespace only applies to children, so the helper forks the command, which takes its uid,
//! gid, working directory and environment, its stdio pipes, and execs. The helper waits and
//! exits with the command's status, which the caller gets from [`ExecProcess::wait`].
//!
//! Like the container's init, both children run in a copy of a possibly multithreaded process:
//! they only use what was prepared before the fork.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use crate::container::Container;
use crate::init::reset_signals;
use crate::kernel;
use crate::rootfs::c_path;

/// The PATH a command gets when the request sets none (LXD's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("container \"{0}\" is not running: start it before running commands in it")]
    NotRunning(String),
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
        }
    }
}

/// A started command: write its stdin, read its stdout and stderr, then wait.
#[derive(Debug)]
pub struct ExecProcess {
    helper: libc::pid_t,
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
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
    /// Waits for the command; returns its exit code (128 + signal when killed).
    pub fn wait(mut self) -> Result<i32, ExecError> {
        drop(self.stdin.take());
        kernel::wait_for_exit(self.helper).map_err(ExecError::Wait)
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
const STEPS: [&str; 8] = [
    "join the container's cgroup",
    "enter the container's namespaces",
    "fork the command",
    "set the groups",
    "set the gid",
    "set the uid",
    "change to the working directory",
    "execute the command (is it installed in the container?)",
];

/// Everything the two children need, prepared before forking.
struct Prepared {
    cgroup_process_files: Vec<CString>,
    namespaces: Vec<(OwnedFd, libc::c_int)>,
    candidates: Vec<CString>,
    arguments: Vec<CString>,
    environment: Vec<CString>,
    working_directory: CString,
    uid: u32,
    gid: u32,
}

impl Container {
    /// Starts `request` inside the container with piped stdin, stdout and stderr.
    pub fn exec(&self, request: &ExecRequest) -> Result<ExecProcess, ExecError> {
        let prepared = self.prepare(request)?;
        let spawn_error = |step| move |source| ExecError::Spawn { step, source };
        let (stdin_read, stdin_write) = kernel::pipe().map_err(spawn_error("pipe"))?;
        let (stdout_read, stdout_write) = kernel::pipe().map_err(spawn_error("pipe"))?;
        let (stderr_read, stderr_write) = kernel::pipe().map_err(spawn_error("pipe"))?;
        let (report_read, report_write) = kernel::pipe().map_err(spawn_error("pipe"))?;
        let stdio = [
            stdin_read.as_raw_fd(),
            stdout_write.as_raw_fd(),
            stderr_write.as_raw_fd(),
        ];
        // SAFETY: the helper only runs `run_helper`, allocation-free, ending in _exit.
        let helper = unsafe { kernel::clone_into_namespaces(0) }.map_err(spawn_error("fork"))?;
        if helper == 0 {
            run_helper(&prepared, stdio, report_write.as_raw_fd());
        }
        drop((stdin_read, stdout_write, stderr_write, report_write));
        match kernel::read_child_failure(&report_read) {
            Ok(None) => Ok(ExecProcess {
                helper,
                stdin: Some(File::from(stdin_write)),
                stdout: Some(File::from(stdout_read)),
                stderr: Some(File::from(stderr_read)),
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

    fn prepare(&self, request: &ExecRequest) -> Result<Prepared, ExecError> {
        let program = request.command.first().ok_or(ExecError::EmptyCommand)?;
        let text = |value: &str| CString::new(value).map_err(|_| ExecError::NulByte);
        let init_pid = self
            .init_pid()
            .ok_or_else(|| ExecError::NotRunning(self.name().to_string()))?;
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
        for (kind, flag) in kinds {
            let path = format!("/proc/{init_pid}/ns/{kind}");
            let file = File::open(&path).map_err(|source| {
                if source.kind() == io::ErrorKind::NotFound {
                    ExecError::NotRunning(self.name().to_string())
                } else {
                    ExecError::Namespace { path, source }
                }
            })?;
            namespaces.push((OwnedFd::from(file), flag));
        }
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
            cgroup_process_files: self
                .process_files_beside_init(init_pid)
                .iter()
                .map(|path| c_path(path))
                .collect(),
            namespaces,
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
        })
    }
}

/// The helper: joins the container, forks the command and exits with its status.
fn run_helper(prepared: &Prepared, stdio: [RawFd; 3], report: RawFd) -> ! {
    let fail = |step: usize, errno: i32| -> ! { kernel::fail_child(report, step as u32, errno) };
    for file in &prepared.cgroup_process_files {
        // SAFETY: a valid NUL-terminated path; the fd is closed right after the write.
        let fd = unsafe { libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            fail(0, kernel::last_errno());
        }
        // "0" moves the writing process.
        let written = kernel::write_all(fd, b"0");
        // SAFETY: `fd` was opened above and is closed once.
        unsafe { libc::close(fd) };
        if let Err(errno) = written {
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
    // SAFETY: close_range takes integers; it closes only this process's copies.
    unsafe { libc::syscall(libc::SYS_close_range, REPORT_FD + 1, libc::c_uint::MAX, 0) };
    // SAFETY: the command child again only uses prepared data. (Not glibc's fork: its handlers
    // take locks that another thread of the original process may have held.)
    let command = match unsafe { kernel::clone_into_namespaces(0) } {
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
    kernel::exit_child(kernel::wait_for_exit(command).unwrap_or(127))
}

/// The command: takes its identity, stdio and directory, and execs.
fn run_command(prepared: &Prepared) -> ! {
    let fail =
        |step: usize| -> ! { kernel::fail_child(REPORT_FD, step as u32, kernel::last_errno()) };
    if let Err((index, errno)) = kernel::set_identity(prepared.uid, prepared.gid) {
        kernel::fail_child(REPORT_FD, 3 + index, errno);
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
