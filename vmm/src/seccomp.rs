//! Per-thread seccomp filters: each kind of thread may make only the system calls it needs once
//! the VM runs. The lists are data, reviewed like code; they were taken from `strace -f` of every
//! path the test suite drives (boot, API requests, signals, guest failures, exit).
//!
//! A call outside a thread's list is trapped: the SIGSYS handler prints the call's number and
//! the thread kind on stderr and ends the process with status 3, so a missing entry shows up as
//! a clear failure rather than a silent kill. `--seccomp log` allows everything but has the
//! kernel log what a filter would have refused; `--seccomp off` installs nothing.

use std::collections::BTreeMap;
use std::convert::TryInto;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_translation};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

/// How strictly threads are filtered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// Calls outside the lists end the process with status 3.
    #[default]
    On,
    /// Calls outside the lists are allowed and logged by the kernel (audit log).
    Log,
    /// No filter.
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "on" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown seccomp mode \"{other}\": expected on, log or off"
            )),
        }
    }
}

/// The kinds of threads, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs a vCPU: KVM_RUN and the devices its exits reach.
    Vcpu,
    /// The event loop: console input, signals, the API, and the exit.
    EventLoop,
    /// A virtio-blk I/O worker: reads and writes the disk image into guest memory.
    BlockWorker,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::EventLoop => "event loop",
            Self::BlockWorker => "block worker",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0} thread's seccomp filter")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot compile the {0} thread's seccomp filter")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the {0} thread's seccomp filter")]
    Apply(&'static str, #[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler that reports blocked system calls")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

const KVMIO: u64 = 0xae;

/// `_IOR`/`_IOWR` ioctl numbers, as <asm-generic/ioctl.h> encodes them.
const fn ioctl_number(direction: u64, number: u64, size: usize) -> u64 {
    (direction << 30) | ((size as u64) << 16) | (KVMIO << 8) | number
}

const KVM_RUN: u64 = ioctl_number(0, 0x80, 0);
const KVM_GET_REGS: u64 = ioctl_number(2, 0x81, std::mem::size_of::<kvm_regs>());
const KVM_GET_SREGS: u64 = ioctl_number(2, 0x83, std::mem::size_of::<kvm_sregs>());
const KVM_TRANSLATE: u64 = ioctl_number(3, 0x85, std::mem::size_of::<kvm_translation>());
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const FIONBIO: u64 = 0x5421;
/// `_IOW('T', 208, unsigned int)`: a tap's offloads, set when a virtio-net device activates.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// System calls with no argument checks that every thread makes: memory, locks, signals, exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Debug builds check each descriptor with F_GETFD before closing it.
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
];

/// The event loop's calls beyond `COMMON`, the virtio devices' included: disk I/O (`lseek`,
/// `pread64`, `pwrite64`, `fdatasync`, `fallocate`), entropy (`getrandom`), the devices' own
/// epoll sets, and the vsock device's Unix sockets (`accept4`, `connect`, `shutdown`,
/// `getsockopt`; `socket` is allowed for AF_UNIX only, below) and its time-out timer.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_connect,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_getppid,
    libc::SYS_getrandom,
    libc::SYS_getsockopt,
    libc::SYS_lseek,
    libc::SYS_nanosleep,
    libc::SYS_pause,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_timerfd_settime,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// What a vCPU thread may call beyond `COMMON`: a status write that activates or resets a
/// virtio device runs the device's activation or reset there (a net device's offloads and
/// epoll set, a vsock device closing its streams and re-arming its time-out timer).
const VCPU: &[i64] = &[
    libc::SYS_epoll_ctl,
    libc::SYS_shutdown,
    libc::SYS_timerfd_settime,
];

/// What a block I/O worker may call beyond `COMMON` (whose `write` signals the completion
/// eventfd): vectored I/O straight into guest memory, positioned I/O through the O_DIRECT
/// bounce buffer, flush, and the discard and write-zeroes ranges.
const BLOCK_WORKER: &[i64] = &[
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
];

fn argument_is(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|call| (*call, Vec::new())).collect();
    let ioctls: &[u64] = match kind {
        ThreadKind::Vcpu => {
            rules.extend(VCPU.iter().map(|call| (*call, Vec::new())));
            &[
                KVM_RUN,
                KVM_GET_REGS,
                KVM_GET_SREGS,
                KVM_TRANSLATE,
                TUNSETOFFLOAD,
            ]
        }
        ThreadKind::EventLoop => {
            rules.extend(EVENT_LOOP.iter().map(|call| (*call, Vec::new())));
            rules.insert(
                libc::SYS_socket,
                vec![argument_is(0, libc::AF_UNIX as u64)?],
            );
            // The teardown hand-over: a child sharing the address space, and nothing else.
            let flags = (libc::CLONE_VM | libc::SIGCHLD) as u64;
            rules.insert(libc::SYS_clone, vec![argument_is(0, flags)?]);
            &[TCGETS, TCSETS, FIONBIO, TUNSETOFFLOAD]
        }
        ThreadKind::BlockWorker => {
            rules.extend(BLOCK_WORKER.iter().map(|call| (*call, Vec::new())));
            &[]
        }
    };
    let ioctl_rules: Vec<SeccompRule> = ioctls
        .iter()
        .map(|request| argument_is(1, *request))
        .collect::<Result<_, _>>()?;
    if !ioctl_rules.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_rules);
    }
    Ok(rules)
}

/// Compiles the filter for `kind`.
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::On => SeccompAction::Trap,
    };
    let rules = rules(kind).map_err(|error| SeccompError::Build(kind.name(), error))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|error| SeccompError::Build(kind.name(), error))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|error| SeccompError::Compile(kind.name(), error))?;
    Ok(Some(program))
}

/// Installs `program` on the calling thread.
pub fn apply(kind: ThreadKind, program: &Option<BpfProgram>) -> Result<(), SeccompError> {
    match program {
        Some(program) => seccompiler::apply_filter(program)
            .map_err(|error| SeccompError::Apply(kind.name(), error)),
        None => Ok(()),
    }
}

/// Installs the SIGSYS handler that reports a blocked call; call once, before any filter.
pub fn install_report_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, report_blocked_call)
        .map_err(SeccompError::Handler)
}

extern "C" fn report_blocked_call(
    _: libc::c_int,
    info: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    // For SIGSYS, the kernel puts the system call number in `si_syscall`, 24 bytes into
    // siginfo_t on x86_64 (after si_signo, si_errno, si_code, padding and si_call_addr).
    // SAFETY: the kernel passes a valid siginfo_t for a signal delivered with SA_SIGINFO.
    let call = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let mut number = [0u8; 10];
    let mut start = number.len();
    let mut rest = call.unsigned_abs();
    loop {
        start -= 1;
        number[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let parts: [&[u8]; 3] = [
        b"cove-vmm: seccomp blocked system call ",
        &number[start..],
        b"; this is a bug in cove-vmm\n",
    ];
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid for its length.
    unsafe {
        for part in parts {
            libc::write(libc::STDERR_FILENO, part.as_ptr().cast(), part.len());
        }
        libc::_exit(3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_TRANSLATE, 0xc018_ae85);
    }

    #[test]
    fn filters_compile_for_every_thread_and_mode() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::EventLoop,
            ThreadKind::BlockWorker,
        ] {
            assert!(filter(kind, SeccompMode::On).unwrap().is_some());
            assert!(filter(kind, SeccompMode::Log).unwrap().is_some());
            assert!(filter(kind, SeccompMode::Off).unwrap().is_none());
        }
    }

    #[test]
    fn a_thread_under_the_vcpu_filter_cannot_open_files() {
        // The filter is installed on a thread of its own: filters cannot be removed.
        let program = filter(ThreadKind::Vcpu, SeccompMode::On).unwrap();
        let outcome = std::thread::spawn(move || {
            // Refuse with an errno instead of trapping, so the test process survives.
            let rules = rules(ThreadKind::Vcpu).unwrap();
            let refusing = SeccompFilter::new(
                rules,
                SeccompAction::Errno(libc::EPERM as u32),
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .unwrap();
            let refusing: BpfProgram = refusing.try_into().unwrap();
            assert!(program.is_some());
            seccompiler::apply_filter(&refusing).unwrap();
            std::fs::File::open("/etc/hostname")
                .map(|_| ())
                .map_err(|error| error.raw_os_error())
        })
        .join()
        .unwrap();
        assert_eq!(outcome, Err(Some(libc::EPERM)));
    }
}
