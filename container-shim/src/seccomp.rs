//! The container's seccomp filter, as LXD applies it: a deny list on top of "allow everything",
//! installed by init before `execve` (every process in the container inherits it) and by every
//! command `exec` starts.
//!
//! LXD's default policy (`security.syscalls.deny_default`, on unless set to false;
//! `lxd/seccomp/seccomp.go`, `defaultSeccompPolicy`) is LXC's `reject_force_umount` (`umount2`
//! with `MNT_FORCE` fails with EACCES) and `kexec_load`, `open_by_handle_at`, `init_module`,
//! `finit_module` and `delete_module` failing with ENOSYS. LXC applies a `[all]` section to
//! every ABI the kernel runs: on x86_64 to x86_64, x32 and i386 system calls alike, each with
//! its own numbers. `security.syscalls.deny_compat=true` also refuses LXD's list of x86_64
//! `compat_sys_*` entry points: the x32-only system calls 512 to 545.
//!
//! Like LXD, the filter is installed **without** `no_new_privs` (setuid binaries keep working
//! inside), which the kernel allows to a task holding CAP_SYS_ADMIN in its user namespace, as
//! the container's root does there.
//!
//! The BPF is written here rather than by `seccompiler` (which `vmm/` uses for its threads):
//! seccompiler compiles for one architecture and kills any process calling in with another
//! (an i386 program in the container), and has no i386 target to compile that ABI's numbers.
//! The program is a few dozen instructions, built before the clone and checked by an
//! interpreter in the tests and by the kernel in the container tests.

use crate::config::SyscallPolicy;

/// `struct seccomp_data` offsets.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARGS: u32 = 16;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGT_K: u16 = 0x25;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_JMP_JSET_K: u16 = 0x45;
const BPF_RET_K: u16 = 0x06;

const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
/// x32 system calls come in on the x86_64 architecture with this bit set in the number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const MNT_FORCE: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeccompError {
    #[error(
        "cove has no default seccomp policy for this architecture ({0}): set \
         security.syscalls.deny_default=false to start containers without one"
    )]
    UnsupportedArchitecture(&'static str),
}

/// One classic BPF instruction, laid out as `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instruction {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

const fn statement(code: u16, k: u32) -> Instruction {
    Instruction {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Instruction {
    Instruction { code, jt, jf, k }
}

/// One deny rule of a policy, for the system call numbers of one ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// The call fails with `errno`.
    Deny { number: u32, errno: u32 },
    /// The call fails with `errno` when any of `flags` is set in argument `argument`.
    DenyWithFlags {
        number: u32,
        argument: u32,
        flags: u32,
        errno: u32,
    },
    /// Every call numbered `first..=last` fails with `errno`.
    DenyRange { first: u32, last: u32, errno: u32 },
}

impl Rule {
    /// The rule's instructions: they expect the call's number in the accumulator and leave it
    /// there when they let the call through.
    fn encode(self, program: &mut Vec<Instruction>) {
        let refuse = |errno: u32| statement(BPF_RET_K, SECCOMP_RET_ERRNO | (errno & 0xffff));
        match self {
            Rule::Deny { number, errno } => {
                program.push(jump(BPF_JMP_JEQ_K, number, 0, 1));
                program.push(refuse(errno));
            }
            Rule::DenyWithFlags {
                number,
                argument,
                flags,
                errno,
            } => {
                // The low 32 bits of the argument (little-endian): enough for flag words.
                program.push(jump(BPF_JMP_JEQ_K, number, 0, 4));
                program.push(statement(BPF_LD_W_ABS, DATA_ARGS + 8 * argument));
                program.push(jump(BPF_JMP_JSET_K, flags, 0, 1));
                program.push(refuse(errno));
                program.push(statement(BPF_LD_W_ABS, DATA_NR));
            }
            Rule::DenyRange { first, last, errno } => {
                program.push(jump(BPF_JMP_JGE_K, first, 0, 2));
                program.push(jump(BPF_JMP_JGT_K, last, 1, 0));
                program.push(refuse(errno));
            }
        }
    }
}

/// The numbers LXD's default policy refuses, in one ABI.
struct DefaultNumbers {
    kexec_load: u32,
    open_by_handle_at: u32,
    init_module: u32,
    finit_module: u32,
    delete_module: u32,
    umount2: u32,
}

const X86_64: DefaultNumbers = DefaultNumbers {
    kexec_load: 246,
    open_by_handle_at: 304,
    init_module: 175,
    finit_module: 313,
    delete_module: 176,
    umount2: 166,
};

/// x32 shares x86_64's numbers except for kexec_load (its own compat entry point).
const X32: DefaultNumbers = DefaultNumbers {
    kexec_load: 528,
    ..X86_64
};

const I386: DefaultNumbers = DefaultNumbers {
    kexec_load: 283,
    open_by_handle_at: 342,
    init_module: 128,
    finit_module: 350,
    delete_module: 129,
    umount2: 52,
};

const AARCH64: DefaultNumbers = DefaultNumbers {
    kexec_load: 104,
    open_by_handle_at: 265,
    init_module: 105,
    finit_module: 273,
    delete_module: 106,
    umount2: 39,
};

/// LXD's `compat_sys_*` list (`compatBlockingPolicy`): x86_64's x32 entry points 512
/// (`rt_sigaction`) to 545 (`execveat`).
const X32_COMPAT_FIRST: u32 = 512;
const X32_COMPAT_LAST: u32 = 545;

fn default_rules(numbers: &DefaultNumbers, offset: u32) -> Vec<Rule> {
    let deny = |number: u32| Rule::Deny {
        number: number | offset,
        errno: libc::ENOSYS as u32,
    };
    vec![
        // LXC's reject_force_umount.
        Rule::DenyWithFlags {
            number: numbers.umount2 | offset,
            argument: 1,
            flags: MNT_FORCE,
            errno: libc::EACCES as u32,
        },
        deny(numbers.kexec_load),
        deny(numbers.open_by_handle_at),
        deny(numbers.init_module),
        deny(numbers.finit_module),
        deny(numbers.delete_module),
    ]
}

/// A section of the program for one ABI: loads the number, applies the rules, allows the rest.
fn section(rules: &[Rule]) -> Vec<Instruction> {
    let mut program = vec![statement(BPF_LD_W_ABS, DATA_NR)];
    for rule in rules {
        rule.encode(&mut program);
    }
    program.push(statement(BPF_RET_K, SECCOMP_RET_ALLOW));
    program
}

/// A compiled filter, ready to install in a cloned child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompFilter {
    program: Vec<Instruction>,
}

impl SeccompFilter {
    /// The filter for `policy` on the architecture cove was built for; `None` when the policy
    /// denies nothing (LXD then installs no filter either).
    pub fn for_policy(policy: &SyscallPolicy) -> Result<Option<Self>, SeccompError> {
        if !policy.deny_default && !policy.deny_compat {
            return Ok(None);
        }
        let architectures = if cfg!(target_arch = "x86_64") {
            vec![
                (AUDIT_ARCH_X86_64, Abis::X86_64AndX32),
                (AUDIT_ARCH_I386, Abis::I386),
            ]
        } else if cfg!(target_arch = "aarch64") {
            vec![(AUDIT_ARCH_AARCH64, Abis::Aarch64)]
        } else {
            return Err(SeccompError::UnsupportedArchitecture(
                std::env::consts::ARCH,
            ));
        };
        Ok(Some(Self::build(policy, &architectures)))
    }

    fn build(policy: &SyscallPolicy, architectures: &[(u32, Abis)]) -> Self {
        let sections: Vec<Vec<Instruction>> = architectures
            .iter()
            .map(|(_, abis)| abis.section(policy))
            .collect();
        // The dispatch on the architecture: a JEQ and a (32-bit) JA per section, then a kill
        // for an architecture this kernel should never show.
        let header_length = 1 + 2 * sections.len() + 1;
        let mut program = vec![statement(BPF_LD_W_ABS, DATA_ARCH)];
        let mut start = header_length;
        for (index, ((audit_arch, _), section)) in architectures.iter().zip(&sections).enumerate() {
            let ja_position = 1 + 2 * index + 1;
            program.push(jump(BPF_JMP_JEQ_K, *audit_arch, 0, 1));
            program.push(statement(BPF_JMP_JA, (start - ja_position - 1) as u32));
            start += section.len();
        }
        program.push(statement(BPF_RET_K, SECCOMP_RET_KILL_PROCESS));
        for section in sections {
            program.extend(section);
        }
        Self { program }
    }

    pub fn instructions(&self) -> usize {
        self.program.len()
    }

    /// Installs the filter on the calling process (and what it execs and forks). Needs
    /// CAP_SYS_ADMIN in the caller's user namespace, since no_new_privs is left off.
    /// Allocation-free, for a cloned child before `execve`; returns the errno on failure.
    pub fn install(&self) -> Result<(), i32> {
        let program = libc::sock_fprog {
            len: self.program.len().min(u16::MAX as usize) as u16,
            // Instruction has sock_filter's layout; the kernel only reads the program.
            filter: self.program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `program` points at `len` live instructions laid out as sock_filter; the
        // kernel copies them and keeps no pointer.
        let result = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &program as *const libc::sock_fprog,
            )
        };
        if result < 0 {
            Err(crate::kernel::last_errno())
        } else {
            Ok(())
        }
    }
}

/// The ABIs that share one audit architecture.
#[derive(Debug, Clone, Copy)]
enum Abis {
    /// x86_64, and x32 (the same architecture, numbers with [`X32_SYSCALL_BIT`]).
    X86_64AndX32,
    I386,
    Aarch64,
}

impl Abis {
    fn section(self, policy: &SyscallPolicy) -> Vec<Instruction> {
        let defaults = |numbers: &DefaultNumbers, offset: u32| {
            if policy.deny_default {
                default_rules(numbers, offset)
            } else {
                Vec::new()
            }
        };
        match self {
            Abis::I386 => section(&defaults(&I386, 0)),
            Abis::Aarch64 => section(&defaults(&AARCH64, 0)),
            Abis::X86_64AndX32 => {
                let native = section(&defaults(&X86_64, 0));
                let mut x32_rules = defaults(&X32, X32_SYSCALL_BIT);
                if policy.deny_compat {
                    x32_rules.push(Rule::DenyRange {
                        first: X32_SYSCALL_BIT | X32_COMPAT_FIRST,
                        last: X32_SYSCALL_BIT | X32_COMPAT_LAST,
                        errno: libc::ENOSYS as u32,
                    });
                }
                let x32 = section(&x32_rules);
                // Number loaded; x32 calls jump over the native rules to their own.
                let mut program = vec![
                    statement(BPF_LD_W_ABS, DATA_NR),
                    jump(BPF_JMP_JSET_K, X32_SYSCALL_BIT, 0, 1),
                    statement(BPF_JMP_JA, native.len() as u32),
                ];
                program.extend(native);
                program.extend(x32);
                program
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `program` as the kernel would on a system call: returns the action.
    fn run(program: &[Instruction], arch: u32, number: u32, arguments: [u64; 6]) -> u32 {
        let word = |offset: u32| -> u32 {
            match offset {
                DATA_NR => number,
                DATA_ARCH => arch,
                offset if (DATA_ARGS..DATA_ARGS + 48).contains(&offset) => {
                    let argument = arguments[((offset - DATA_ARGS) / 8) as usize];
                    if (offset - DATA_ARGS) % 8 == 0 {
                        argument as u32
                    } else {
                        (argument >> 32) as u32
                    }
                }
                other => panic!("load from offset {other}"),
            }
        };
        let mut accumulator = 0u32;
        let mut position = 0usize;
        for _ in 0..program.len() {
            let instruction = program[position];
            let branch = |taken: bool| {
                1 + usize::from(if taken {
                    instruction.jt
                } else {
                    instruction.jf
                })
            };
            position += match instruction.code {
                BPF_LD_W_ABS => {
                    accumulator = word(instruction.k);
                    1
                }
                BPF_JMP_JA => 1 + instruction.k as usize,
                BPF_JMP_JEQ_K => branch(accumulator == instruction.k),
                BPF_JMP_JGT_K => branch(accumulator > instruction.k),
                BPF_JMP_JGE_K => branch(accumulator >= instruction.k),
                BPF_JMP_JSET_K => branch(accumulator & instruction.k != 0),
                BPF_RET_K => return instruction.k,
                code => panic!("unexpected instruction {code:#x}"),
            };
        }
        panic!("the program ran off its end or looped");
    }

    const ENOSYS: u32 = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    const EACCES: u32 = SECCOMP_RET_ERRNO | libc::EACCES as u32;
    const ALLOW: u32 = SECCOMP_RET_ALLOW;

    fn x86_filter(policy: SyscallPolicy) -> SeccompFilter {
        SeccompFilter::build(
            &policy,
            &[
                (AUDIT_ARCH_X86_64, Abis::X86_64AndX32),
                (AUDIT_ARCH_I386, Abis::I386),
            ],
        )
    }

    #[test]
    fn lxd_default_policy_on_every_x86_abi() {
        let filter = x86_filter(SyscallPolicy::default());
        let program = &filter.program;
        let call = |arch, number| run(program, arch, number, [0; 6]);
        for number in [246, 304, 175, 313, 176] {
            assert_eq!(call(AUDIT_ARCH_X86_64, number), ENOSYS, "x86_64 {number}");
        }
        for number in [528, 304, 175, 313, 176] {
            assert_eq!(
                call(AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | number),
                ENOSYS,
                "x32 {number}"
            );
        }
        for number in [283, 342, 128, 350, 129] {
            assert_eq!(call(AUDIT_ARCH_I386, number), ENOSYS, "i386 {number}");
        }
        // Everything else goes through: read, write, and i386's own 175 (rt_sigprocmask).
        for (arch, number) in [
            (AUDIT_ARCH_X86_64, 0),
            (AUDIT_ARCH_X86_64, 1),
            (AUDIT_ARCH_X86_64, X32_SYSCALL_BIT),
            (AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 512),
            (AUDIT_ARCH_I386, 175),
            (AUDIT_ARCH_I386, 3),
        ] {
            assert_eq!(call(arch, number), ALLOW, "arch {arch:#x} call {number}");
        }
        assert_eq!(call(0x1234, 0), SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn only_forced_unmounts_are_refused() {
        let filter = x86_filter(SyscallPolicy::default());
        let umount2 =
            |arch, number, flags: u64| run(&filter.program, arch, number, [0, flags, 0, 0, 0, 0]);
        let detach = libc::MNT_DETACH as u64;
        assert_eq!(umount2(AUDIT_ARCH_X86_64, 166, 1), EACCES);
        assert_eq!(umount2(AUDIT_ARCH_X86_64, 166, 1 | detach), EACCES);
        assert_eq!(umount2(AUDIT_ARCH_X86_64, 166, detach), ALLOW);
        assert_eq!(umount2(AUDIT_ARCH_X86_64, 166, 0), ALLOW);
        assert_eq!(umount2(AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 166, 1), EACCES);
        assert_eq!(umount2(AUDIT_ARCH_I386, 52, 1), EACCES);
        assert_eq!(umount2(AUDIT_ARCH_I386, 52, 0), ALLOW);
        // The flag in the high half of the 64-bit argument is no MNT_FORCE.
        assert_eq!(umount2(AUDIT_ARCH_X86_64, 166, 1 << 32), ALLOW);
    }

    #[test]
    fn deny_compat_refuses_the_x32_entry_points_only() {
        let both = x86_filter(SyscallPolicy {
            deny_default: true,
            deny_compat: true,
        });
        let call = |filter: &SeccompFilter, number| {
            run(&filter.program, AUDIT_ARCH_X86_64, number, [0; 6])
        };
        for number in [512, 520, 545] {
            assert_eq!(call(&both, X32_SYSCALL_BIT | number), ENOSYS, "{number}");
        }
        assert_eq!(call(&both, X32_SYSCALL_BIT | 546), ALLOW);
        assert_eq!(call(&both, X32_SYSCALL_BIT | 511), ALLOW);
        assert_eq!(call(&both, 520), ALLOW, "native 520 is not x32's");
        assert_eq!(call(&both, 246), ENOSYS, "the default list still applies");

        let compat_only = x86_filter(SyscallPolicy {
            deny_default: false,
            deny_compat: true,
        });
        assert_eq!(call(&compat_only, X32_SYSCALL_BIT | 512), ENOSYS);
        assert_eq!(call(&compat_only, 246), ALLOW);
    }

    #[test]
    fn no_policy_means_no_filter() {
        let none = SyscallPolicy {
            deny_default: false,
            deny_compat: false,
        };
        assert_eq!(SeccompFilter::for_policy(&none), Ok(None));
        let filter = SeccompFilter::for_policy(&SyscallPolicy::default())
            .expect("this architecture has a policy")
            .expect("the default policy denies something");
        assert!(filter.instructions() < 100, "{}", filter.instructions());
    }

    /// The kernel accepts the program and refuses what it should. The child installs it with
    /// no_new_privs, which needs no privilege, so this runs as any user.
    #[test]
    fn the_kernel_applies_the_filter() {
        let filter = SeccompFilter::for_policy(&SyscallPolicy::default())
            .expect("a policy")
            .expect("a filter");
        let target = c"/nonexistent-cove-seccomp-test";
        // SAFETY: the child only makes system calls on prepared data and exits.
        let pid = unsafe { crate::kernel::clone_into_namespaces(0) }.expect("fork");
        if pid == 0 {
            // SAFETY: plain system calls on integers and a prepared string.
            let code = unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                    10
                } else if filter.install().is_err() {
                    11
                } else if libc::syscall(libc::SYS_init_module, 0usize, 0usize, 0usize) != -1
                    || crate::kernel::last_errno() != libc::ENOSYS
                {
                    12
                } else if libc::syscall(libc::SYS_delete_module, 0usize, 0usize) != -1
                    || crate::kernel::last_errno() != libc::ENOSYS
                {
                    13
                } else if libc::syscall(libc::SYS_open_by_handle_at, -1, 0usize, 0) != -1
                    || crate::kernel::last_errno() != libc::ENOSYS
                {
                    16
                } else if libc::umount2(target.as_ptr(), libc::MNT_FORCE) != -1
                    || crate::kernel::last_errno() != libc::EACCES
                {
                    14
                } else if libc::umount2(target.as_ptr(), libc::MNT_DETACH) != -1
                    || crate::kernel::last_errno() == libc::EACCES
                {
                    15
                } else {
                    0
                }
            };
            crate::kernel::exit_child(code);
        }
        let code = crate::kernel::wait_for_exit(pid).expect("wait");
        assert_eq!(code, 0, "the filtered child failed check {code}");
    }
}
