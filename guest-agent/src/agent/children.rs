//! Child processes: the one place the agent starts them and the one thread that reaps them.
//!
//! As the guest's init the agent inherits every orphan, so something has to reap all children;
//! and an exec has to learn its own command's exit status. A single reaper does both: SIGCHLD
//! is blocked in every thread and read from a signalfd, and each child that ends is looked up in
//! a table of the children execs started. A tracked child's status goes to its `ExitSlot`; an
//! untracked one (an orphan) is simply reaped.
//!
//! The reaper peeks at an ended child with `waitid(WNOWAIT)` and reaps it only while holding
//! that child's slot lock, so a pid held by an unreaped child can be signalled safely under the
//! same lock: it cannot have been reused. Children are started with the table locked, so the
//! reaper cannot see a child before it is in the table. Nothing else in the agent may wait for
//! children (std's `Child::wait` would race the reaper); `spawn` hands out std's `Child` only
//! for its pipes.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::protocol::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum ChildrenError {
    #[error("cannot block SIGCHLD")]
    BlockSignal(#[source] io::Error),
    #[error("cannot create the signalfd the reaper reads SIGCHLD from")]
    SignalFd(#[source] io::Error),
    #[error("cannot start the reaper thread")]
    Thread(#[source] io::Error),
    #[error("the reaper is not running: call children::start_reaper first")]
    NoReaper,
    #[error("cannot create the exit notification of a child")]
    EventFd(#[source] io::Error),
}

/// Where the reaper leaves one tracked child's exit status.
#[derive(Debug)]
pub struct ExitSlot {
    pid: i32,
    status: Mutex<Option<ExitStatus>>,
    changed: Condvar,
    /// Readable (an eventfd) once the status is in: lets a thread poll it with other fds.
    event: OwnedFd,
}

impl ExitSlot {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits for the exit status, up to `timeout` (forever when `None`).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitStatus> {
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        let mut status = lock(&self.status);
        while status.is_none() {
            match deadline {
                None => {
                    status = self
                        .changed
                        .wait(status)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                }
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    status = self
                        .changed
                        .wait_timeout(status, left)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0;
                }
            }
        }
        *status
    }

    /// An eventfd that becomes readable when the status is in.
    pub fn event_fd(&self) -> i32 {
        self.event.as_raw_fd()
    }

    /// Sends `signal` to the child (or its process group) if it has not been reaped yet.
    /// Returns false when it has already ended.
    pub fn signal(&self, signal: i32, group: bool) -> io::Result<bool> {
        let status = lock(&self.status);
        if status.is_some() {
            return Ok(false);
        }
        let target = if group { -self.pid } else { self.pid };
        // SAFETY: kill() takes no pointers. The child is not reaped (its status is not in and
        // the reaper reaps only under this lock), so its pid and group id are still its own.
        if unsafe { libc::kill(target, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
        drop(status);
        Ok(true)
    }
}

struct Reaper {
    table: Mutex<HashMap<i32, Arc<ExitSlot>>>,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Blocks SIGCHLD in the calling thread. Call it first thing in `main`, before any thread
/// exists: threads inherit the mask, and a SIGCHLD delivered to a thread that does not block
/// it would be lost to the reaper. (Children get a clean mask: std resets it before exec.)
pub fn block_sigchld() -> Result<(), ChildrenError> {
    let set = sigchld_set();
    // SAFETY: `set` is an initialised sigset_t; the old mask is not asked for.
    let result = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if result != 0 {
        return Err(ChildrenError::BlockSignal(io::Error::from_raw_os_error(
            result,
        )));
    }
    Ok(())
}

fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set before sigaddset reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

/// Starts the reaper thread (once; later calls do nothing).
pub fn start_reaper() -> Result<(), ChildrenError> {
    if REAPER.get().is_some() {
        return Ok(());
    }
    let set = sigchld_set();
    // SAFETY: `set` is an initialised sigset_t; -1 asks for a new signalfd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(ChildrenError::SignalFd(io::Error::last_os_error()));
    }
    // SAFETY: signalfd() just returned this descriptor, and nothing else owns it.
    let signal_fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = REAPER.set(Reaper {
        table: Mutex::new(HashMap::new()),
    });
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reap_forever(signal_fd))
        .map_err(ChildrenError::Thread)?;
    Ok(())
}

fn reap_forever(signal_fd: OwnedFd) {
    let Some(reaper) = REAPER.get() else { return };
    loop {
        // Children that ended before the first signal (or between two) are found too: each
        // round reaps until none is left.
        reap_ended(reaper);
        let mut info = [0u8; size_of::<libc::signalfd_siginfo>()];
        // SAFETY: `info` is valid for writes of its length for the whole call.
        let read =
            unsafe { libc::read(signal_fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        if read < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // The signalfd cannot fail in practice; fall back to polling rather than spin.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn reap_ended(reaper: &Reaper) {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid output buffer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid for writes; WNOWAIT leaves the child unreaped.
        let result = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid filled `info` (or left it zeroed, which reads as pid 0).
        let pid = unsafe { info.si_pid() };
        if result != 0 || pid == 0 {
            return; // no child has ended (or none is left)
        }
        // Both reaps happen under the table lock, so no spawn can reuse the pid in between.
        let mut table = lock(&reaper.table);
        match table.remove(&pid) {
            Some(slot) => {
                let mut status = lock(&slot.status);
                // waitid said it ended, so waitpid cannot fail; 255 stands in if it does.
                *status = Some(reap(pid).unwrap_or(ExitStatus {
                    code: Some(255),
                    signal: None,
                }));
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from `one` to the slot's eventfd.
                unsafe { libc::write(slot.event.as_raw_fd(), (&one as *const u64).cast(), 8) };
                slot.changed.notify_all();
                drop(status);
            }
            None => {
                reap(pid);
            }
        }
        drop(table);
    }
}

/// Reaps `pid`, which has ended, and returns how.
fn reap(pid: i32) -> Option<ExitStatus> {
    let mut raw = 0;
    loop {
        // SAFETY: `raw` is valid for writes; `pid` is a child that has ended.
        let result = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) };
        if result == pid {
            break;
        }
        if result < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
    if libc::WIFEXITED(raw) {
        Some(ExitStatus {
            code: Some(libc::WEXITSTATUS(raw)),
            signal: None,
        })
    } else if libc::WIFSIGNALED(raw) {
        Some(ExitStatus {
            code: None,
            signal: Some(libc::WTERMSIG(raw)),
        })
    } else {
        None
    }
}

/// Starts `command` and tracks it: its exit status arrives in the returned slot.
pub fn spawn(command: &mut Command) -> Result<(Child, Arc<ExitSlot>), SpawnError> {
    let reaper = REAPER
        .get()
        .ok_or(SpawnError::Setup(ChildrenError::NoReaper))?;
    // SAFETY: eventfd() takes no pointers.
    let event = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if event < 0 {
        return Err(SpawnError::Setup(ChildrenError::EventFd(
            io::Error::last_os_error(),
        )));
    }
    // SAFETY: eventfd() just returned this descriptor, and nothing else owns it.
    let event = unsafe { OwnedFd::from_raw_fd(event) };
    // Held across the start: the reaper cannot look the child up before it is in the table,
    // and std's own wait for a child whose exec failed cannot race it.
    let mut table = lock(&reaper.table);
    let child = command.spawn().map_err(SpawnError::Spawn)?;
    let slot = Arc::new(ExitSlot {
        pid: child.id() as i32,
        status: Mutex::new(None),
        changed: Condvar::new(),
        event,
    });
    table.insert(slot.pid, slot.clone());
    drop(table);
    Ok((child, slot))
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Setup(ChildrenError),
    #[error(transparent)]
    Spawn(io::Error),
}
