//! Thin wrappers over the Linux system calls the container core needs that `libc` exposes only
//! as raw numbers (the new mount API, pidfds, a fork-like `clone` with namespace flags), and
//! the few fd helpers shared by the modules that start processes.
//!
//! Nothing here knows about containers: each function is one system call with its error turned
//! into `std::io::Error`. Code that runs in a freshly cloned child must not allocate, so the
//! child-side helpers take prepared C strings and return raw errno values.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `open_tree(2)`: make a detached copy of the mount tree at a path.
const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `mount_setattr(2)`: give the mount the id mapping of a user namespace.
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
/// `move_mount(2)`: the source is the fd itself, not a path below it.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// `struct mount_attr` from `<linux/mount.h>`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clear: u64,
    propagation: u64,
    userns_fd: u64,
}

fn check(result: libc::c_long) -> io::Result<libc::c_long> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// A detached clone of the directory tree at `path`, not yet attached anywhere.
pub fn clone_tree(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `path` is a valid NUL-terminated string; the call only reads it.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    })?;
    // SAFETY: open_tree returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Makes the detached mount `mount` show its files through the id map of `user_namespace`.
pub fn idmap_mount(mount: &OwnedFd, user_namespace: &OwnedFd) -> io::Result<()> {
    let attributes = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clear: 0,
        propagation: 0,
        userns_fd: user_namespace.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: both fds are open, `empty` is a valid string and `attributes` is a live struct of
    // the size passed; the kernel only reads it.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attributes as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(())
}

/// Attaches the detached mount `mount` at `target`.
pub fn attach_mount(mount: &OwnedFd, target: &CStr) -> io::Result<()> {
    let empty = c"";
    // SAFETY: the fd is open and both strings are valid NUL-terminated strings.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// `mount(2)` with optional source, file system type and data.
pub fn mount(
    source: Option<&CStr>,
    target: &CStr,
    file_system: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> Result<(), i32> {
    let pointer = |value: Option<&CStr>| value.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is either null or a valid NUL-terminated string that outlives the
    // call; mount(2) only reads them. Allocation-free, so it may run in a cloned child.
    let result = unsafe {
        libc::mount(
            pointer(source),
            target.as_ptr(),
            pointer(file_system),
            flags,
            pointer(data).cast(),
        )
    };
    errno_of(result)
}

/// Lazily detaches the mount at `target`.
pub fn detach_mount(target: &CStr) -> Result<(), i32> {
    // SAFETY: `target` is a valid NUL-terminated string.
    errno_of(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) })
}

/// A pidfd for `pid`: signals sent through it can never reach a recycled pid.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `signal` to the process behind `pidfd`.
pub fn pidfd_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: the fd is open; a null siginfo means "as kill(2) would".
    check(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })?;
    Ok(())
}

/// Whether the process behind `pidfd` has exited, waiting at most `timeout_milliseconds`.
pub fn pidfd_exited(pidfd: &OwnedFd, timeout_milliseconds: i32) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `poll` is one valid pollfd.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout_milliseconds) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(error);
    }
    Ok(ready > 0)
}

/// Like `fork(2)`, but the child starts in the new namespaces named by `namespaces`
/// (`CLONE_NEW*` flags). Returns 0 in the child and the child's pid in the parent.
///
/// # Safety
/// The caller may be multithreaded: in the child, until it execs or exits, only
/// async-signal-safe work is allowed (no allocation, no locks, no panics).
pub unsafe fn clone_into_namespaces(namespaces: libc::c_int) -> io::Result<libc::pid_t> {
    // SAFETY: a null stack makes clone(2) behave like fork(2): the child runs on a copy of the
    // parent's stack. The caller upholds the rules for the child.
    let pid = check(unsafe {
        libc::syscall(
            libc::SYS_clone,
            (namespaces | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    })?;
    Ok(pid as libc::pid_t)
}

/// `struct clone_args` from `<linux/sched.h>`, up to `cgroup` (Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArguments {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `clone3(2)`: the child starts in the cgroup given as `cgroup`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Like `fork(2)`, but the child starts in the v2 cgroup whose directory `cgroup` is open
/// (`clone3` with `CLONE_INTO_CGROUP`): it is never migrated, so it costs none of a
/// migration's synchronization. Fails on kernels before 5.7 (`ENOSYS`, `E2BIG`), on v1
/// hierarchies, and where the cgroup refuses the process. Returns 0 in the child.
///
/// # Safety
/// As [`clone_into_namespaces`]: until it execs or exits, the child may only do
/// async-signal-safe work.
pub unsafe fn fork_into_cgroup(cgroup: RawFd) -> io::Result<libc::pid_t> {
    let arguments = CloneArguments {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup as u64,
        ..CloneArguments::default()
    };
    // SAFETY: `arguments` is a live clone_args of the size passed; with no stack given the
    // child runs on a copy of the parent's, as after fork(2). The caller upholds the rules for
    // the child.
    let pid = check(unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &arguments as *const CloneArguments,
            std::mem::size_of::<CloneArguments>(),
        )
    })?;
    Ok(pid as libc::pid_t)
}

/// A pipe whose both ends close on exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits for the child `pid` and returns its exit code, or 128 + the signal that killed it.
pub fn wait_for_exit(pid: libc::pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let result = unsafe { libc::waitpid(pid, &mut status, 0) };
        if result >= 0 {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(exit_code(status))
}

/// Reaps the child `pid` if it has exited; returns its exit code then.
pub fn try_wait(pid: libc::pid_t) -> io::Result<Option<i32>> {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer.
    let result = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    match result {
        0 => Ok(None),
        result if result > 0 => Ok(Some(exit_code(status))),
        _ => Err(io::Error::last_os_error()),
    }
}

fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

/// Drops supplementary groups and sets the real, effective and saved gid and uid, through the
/// raw system calls: glibc's wrappers signal every thread the parent had and wait for them,
/// which hangs forever in a cloned child. Returns which of the three failed (0, 1, 2).
pub fn set_identity(uid: u32, gid: u32) -> Result<(), (u32, i32)> {
    // SAFETY: plain system calls on integers; a zero-length group list needs no pointer.
    let results = unsafe {
        [
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
            libc::syscall(libc::SYS_setresgid, gid, gid, gid),
            libc::syscall(libc::SYS_setresuid, uid, uid, uid),
        ]
    };
    match results.iter().position(|result| *result < 0) {
        None => Ok(()),
        Some(index) => Err((index as u32, last_errno())),
    }
}

/// The errno of the last failed call, for allocation-free child code.
pub fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Turns a libc-style return value into the errno it set.
pub fn errno_of(result: libc::c_int) -> Result<(), i32> {
    if result < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// Writes all of `bytes` to `fd`, allocation-free.
pub fn write_all(fd: RawFd, mut bytes: &[u8]) -> Result<(), i32> {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a live slice of the length passed.
        let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if written < 0 {
            let errno = last_errno();
            if errno == libc::EINTR {
                continue;
            }
            return Err(errno);
        }
        bytes = &bytes[written as usize..];
    }
    Ok(())
}

/// Reads until `buffer` is full or the writer closes; returns how much was read.
pub fn read_full(fd: RawFd, buffer: &mut [u8]) -> Result<usize, i32> {
    let mut filled = 0;
    while filled < buffer.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buffer`.
        let read = unsafe {
            libc::read(
                fd,
                buffer[filled..].as_mut_ptr().cast(),
                buffer.len() - filled,
            )
        };
        match read {
            0 => break,
            read if read > 0 => filled += read as usize,
            _ => {
                let errno = last_errno();
                if errno != libc::EINTR {
                    return Err(errno);
                }
            }
        }
    }
    Ok(filled)
}

/// Ends a cloned child without running the parent's atexit handlers or destructors.
pub fn exit_child(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

/// Reports a failed step from a cloned child over `error_pipe` (the parent reads eight bytes:
/// the step and the errno) and exits.
pub fn fail_child(error_pipe: RawFd, step: u32, errno: i32) -> ! {
    let mut report = [0u8; 8];
    report[..4].copy_from_slice(&step.to_ne_bytes());
    report[4..].copy_from_slice(&errno.to_ne_bytes());
    let _ = write_all(error_pipe, &report);
    exit_child(1)
}

/// How long a child may take to report before the parent gives up on it.
pub const CHILD_REPORT_TIMEOUT_MILLISECONDS: i32 = 30_000;

/// Reads a child's failure report: `None` when the pipe closed without one (the child exec'd
/// or died). A child that neither reports nor closes the pipe in time is an error.
pub fn read_child_failure(error_pipe: &OwnedFd) -> io::Result<Option<(u32, i32)>> {
    let mut poll = libc::pollfd {
        fd: error_pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `poll` is one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, CHILD_REPORT_TIMEOUT_MILLISECONDS) };
        match ready {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the child did not finish its setup within 30 seconds",
                ))
            }
            ready if ready > 0 => break,
            _ if last_errno() == libc::EINTR => {}
            _ => return Err(io::Error::last_os_error()),
        }
    }
    let mut report = [0u8; 8];
    let read =
        read_full(error_pipe.as_raw_fd(), &mut report).map_err(io::Error::from_raw_os_error)?;
    if read < report.len() {
        return Ok(None);
    }
    let step = u32::from_ne_bytes(report[..4].try_into().unwrap_or_default());
    let errno = i32::from_ne_bytes(report[4..].try_into().unwrap_or_default());
    Ok(Some((step, errno)))
}
