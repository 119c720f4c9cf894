//! The container's first process, from `clone` to `execve` of the image's `/sbin/init`.
//!
//! It is cloned straight into its new namespaces and then waits on a pipe while the parent
//! writes its id map, moves it into its cgroup, creates its nic and hands it the console. Once
//! released it becomes root of its user namespace, enters a cgroup namespace rooted at its own
//! cgroup, takes the console as its controlling terminal, brings its network interfaces up,
//! builds its mounts, sets the hostname, pivots into the snapshot, confines itself
//! (capabilities, seccomp) and execs init as PID 1.
//!
//! Everything the child touches is prepared beforehand: it runs in a copy of a possibly
//! multithreaded process and must not allocate. A failure is reported to the parent as a step
//! number and an errno over a close-on-exec pipe; a clean close of that pipe means init runs.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::Path;

use crate::confinement::{Confinement, ConfinementStep};
use crate::filesystem::FilesystemPlan;
use crate::kernel;
use crate::network::{self, INTERFACE_NAME_SIZE};
use crate::rootfs::c_path;

/// The fixed steps around the filesystem plan, numbered after the plan's own steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum InitStep {
    BecomeRoot = 100_000,
    CgroupNamespace,
    Session,
    Console,
    Hostname,
    PivotRoot,
    DetachHostRoot,
    Exec,
    RaiseInterfaces,
    DropCapabilities,
    Seccomp,
}

impl InitStep {
    const ALL: [InitStep; 11] = [
        InitStep::BecomeRoot,
        InitStep::CgroupNamespace,
        InitStep::Session,
        InitStep::Console,
        InitStep::Hostname,
        InitStep::PivotRoot,
        InitStep::DetachHostRoot,
        InitStep::Exec,
        InitStep::RaiseInterfaces,
        InitStep::DropCapabilities,
        InitStep::Seccomp,
    ];

    fn describe(self) -> &'static str {
        match self {
            InitStep::BecomeRoot => "become root of the user namespace",
            InitStep::CgroupNamespace => "enter a new cgroup namespace",
            InitStep::Session => "start a new session",
            InitStep::Console => "take the console as stdin, stdout, stderr and terminal",
            InitStep::Hostname => "set the hostname",
            InitStep::PivotRoot => "pivot_root into the snapshot",
            InitStep::DetachHostRoot => "detach the host's root",
            InitStep::Exec => "execute /sbin/init",
            InitStep::RaiseInterfaces => "bring up the network interfaces",
            InitStep::DropCapabilities => "drop capabilities from the bounding set",
            InitStep::Seccomp => "install the seccomp filter",
        }
    }
}

/// Everything the child needs, prepared in the parent.
#[derive(Debug)]
pub struct InitProgram {
    pub plan: FilesystemPlan,
    root: CString,
    hostname: CString,
    init: CString,
    arguments: Vec<CString>,
    environment: Vec<CString>,
    pub user_namespace: bool,
    /// Brought up inside before the mounts: loopback, and the nic if the container has one.
    pub interfaces: Vec<[u8; INTERFACE_NAME_SIZE]>,
    /// Applied just before execve.
    pub confinement: Confinement,
}

impl InitProgram {
    pub fn new(plan: FilesystemPlan, root: &Path, hostname: &str, user_namespace: bool) -> Self {
        let text = |value: &str| CString::new(value).unwrap_or_default();
        Self {
            plan,
            root: c_path(root),
            hostname: text(hostname),
            init: text("/sbin/init"),
            arguments: vec![text("/sbin/init")],
            // As LXD does: systemd and others recognize a container by `container=lxc`.
            environment: vec![
                text("container=lxc"),
                text("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
                text("TERM=linux"),
            ],
            user_namespace,
            interfaces: vec![network::interface_name("lo")],
            confinement: Confinement::default(),
        }
    }

    /// A failure report from the child in words.
    pub fn describe(&self, step: u32) -> String {
        InitStep::ALL
            .iter()
            .find(|known| **known as u32 == step)
            .map(|known| known.describe().to_string())
            .unwrap_or_else(|| self.plan.describe(step as usize))
    }

    /// Runs in the cloned child: waits for `release`, sets up and execs init. Never returns.
    pub fn run_in_child(&self, release: RawFd, report: RawFd, console: RawFd) -> ! {
        let mut byte = [0u8; 1];
        // The parent closes the pipe without a byte when it gave up on this start.
        if kernel::read_full(release, &mut byte) != Ok(1) {
            kernel::exit_child(1);
        }
        let fail =
            |step: InitStep, errno: i32| -> ! { kernel::fail_child(report, step as u32, errno) };
        let check = |step: InitStep, result: libc::c_int| {
            if let Err(errno) = kernel::errno_of(result) {
                fail(step, errno)
            }
        };
        // SAFETY: here and below, plain system calls on integers and on pointers to
        // prepared, NUL-terminated strings and arrays that outlive them; all async-signal-safe.
        if self.user_namespace {
            if let Err((_, errno)) = kernel::set_identity(0, 0) {
                fail(InitStep::BecomeRoot, errno);
            }
        }
        // SAFETY: see above.
        check(InitStep::CgroupNamespace, unsafe {
            libc::unshare(libc::CLONE_NEWCGROUP)
        });
        // SAFETY: see above.
        check(InitStep::Session, unsafe { libc::setsid() });
        for target in 0..3 {
            // SAFETY: see above.
            check(InitStep::Console, unsafe { libc::dup2(console, target) });
        }
        // SAFETY: see above.
        check(InitStep::Console, unsafe {
            libc::ioctl(0, libc::TIOCSCTTY, 0)
        });
        if let Err(errno) = network::raise_interfaces(&self.interfaces) {
            fail(InitStep::RaiseInterfaces, errno);
        }
        if let Err((index, errno)) = self.plan.run() {
            kernel::fail_child(report, index as u32, errno);
        }
        // SAFETY: see above.
        check(InitStep::Hostname, unsafe {
            libc::sethostname(self.hostname.as_ptr(), self.hostname.as_bytes().len())
        });
        // pivot_root(".", ".") stacks the old root under the new one; detaching "." then
        // removes the host's root from the container's view.
        // SAFETY: see above.
        check(InitStep::PivotRoot, unsafe {
            libc::chdir(self.root.as_ptr())
        });
        let here = c".";
        // SAFETY: see above.
        let pivoted = unsafe {
            libc::syscall(libc::SYS_pivot_root, here.as_ptr(), here.as_ptr()) as libc::c_int
        };
        check(InitStep::PivotRoot, pivoted);
        if let Err(errno) = kernel::detach_mount(here) {
            fail(InitStep::DetachHostRoot, errno);
        }
        // SAFETY: see above.
        check(InitStep::DetachHostRoot, unsafe {
            libc::chdir(c"/".as_ptr())
        });
        reset_signals();
        if let Err((step, errno)) = self.confinement.apply() {
            match step {
                ConfinementStep::DropCapability(_) => fail(InitStep::DropCapabilities, errno),
                ConfinementStep::InstallSeccomp => fail(InitStep::Seccomp, errno),
            }
        }
        let mut arguments = [std::ptr::null(); 8];
        let mut environment = [std::ptr::null(); 8];
        for (slot, value) in arguments.iter_mut().zip(&self.arguments) {
            *slot = value.as_ptr();
        }
        for (slot, value) in environment.iter_mut().zip(&self.environment) {
            *slot = value.as_ptr();
        }
        // SAFETY: see above; both arrays end in a null pointer (they hold at most 7 entries).
        unsafe { libc::execve(self.init.as_ptr(), arguments.as_ptr(), environment.as_ptr()) };
        fail(InitStep::Exec, kernel::last_errno())
    }
}

/// Gives an exec'd program default signal handling: Rust ignores SIGPIPE, and the mask is
/// inherited across execve.
pub fn reset_signals() {
    // SAFETY: signal(2) and sigprocmask(2) on a zeroed, then emptied, local set are
    // async-signal-safe and touch no shared state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}
