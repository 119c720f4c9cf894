//! Running one function at CPL 3, for the benchmarks' polling drivers.
//!
//! Where the hypervisor is kvm-pvm, every instruction the guest runs at CPL 0 goes through an
//! instruction emulator (about a microsecond each), while code at CPL 3 runs natively. A
//! driver loop that must keep a device busy therefore runs at CPL 3: [`run`] enters it with
//! `iretq` on the current stack, with interrupts disabled, and when the function returns it
//! executes `ud2` at [`user_mode_exit`]; the invalid-opcode handler recognises that address
//! and, through [`leave`], returns to CPL 0 where [`run`] was called. (SYSCALL would be the
//! usual way back, but kvm-pvm then resumes the guest at its entry point still at CPL 3.)
//! The function may touch any memory below 4 GiB (the identity mapping's first four gigabytes
//! are made user-accessible) and MMIO there, but must not halt, use I/O ports, load system
//! registers or take interrupts; any other exception lands on a stack of its own (the TSS's
//! RSP0) and panics as it would at CPL 0.
//!
//! [`prepare`] sets up what that takes, once: a GDT with user code and data segments and a
//! TSS, and the U bit in the page tables. The GDT keeps the boot GDT's kernel selectors, so
//! the IDT and the code already running are unaffected.

use crate::boot::{CODE64_SELECTOR, DATA_SELECTOR};
use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// The user segments' selectors (with RPL 3) and the TSS's, in [`GDT`].
const USER_DATA_SELECTOR: u64 = 0x18 | 3;
const USER_CODE64_SELECTOR: u64 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;

/// RFLAGS at CPL 3, and back at CPL 0: only the always-one bit 1; IF clear, so no interrupt
/// is taken.
const RFLAGS_INTERRUPTS_DISABLED: u64 = 0x2;

const PAGE_PRESENT: u64 = 1;
const PAGE_USER: u64 = 4;
const PAGE_LARGE: u64 = 0x80;
const PAGE_ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
/// The gigabytes made user-accessible: all the guest touches.
const USER_GIGABYTES: usize = 4;

/// Where exceptions at CPL 3 run. It lives with the boot stacks in `.stacks`, which is not
/// cleared at boot (clearing is emulated, and the boot time is measured).
const EXCEPTION_STACK_SIZE: usize = 16 * 1024;

core::arch::global_asm!(
    ".pushsection .stacks, \"aw\", @nobits",
    ".balign 16",
    "user_mode_exception_stack_bottom: .skip {size}",
    "user_mode_exception_stack_top:",
    ".popsection",
    size = const EXCEPTION_STACK_SIZE,
);

/// The 64-bit TSS: only RSP0 matters; the I/O map base points past the end (no bitmap).
#[repr(C, packed)]
struct TaskStateSegment {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    interrupt_stacks: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    io_map_base: u16,
}

const TSS_SIZE: usize = core::mem::size_of::<TaskStateSegment>();

static mut TSS: TaskStateSegment = TaskStateSegment {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    interrupt_stacks: [0; 7],
    reserved2: 0,
    reserved3: 0,
    io_map_base: TSS_SIZE as u16,
};

/// Null, the boot GDT's 64-bit code (0x08) and flat data (0x10), user data (0x18), user
/// 64-bit code (0x20), and the TSS's 16-byte descriptor (0x28), filled in by [`prepare`].
/// Accessed bits are preset so the processor never writes to it.
#[repr(C, align(16))]
struct GlobalDescriptorTable([u64; 7]);

static mut GDT: GlobalDescriptorTable = GlobalDescriptorTable([
    0,
    0x00AF_9B00_0000_FFFF,
    0x00CF_9300_0000_FFFF,
    0x00CF_F300_0000_FFFF,
    0x00AF_FB00_0000_FFFF,
    0,
    0,
]);

static PREPARED: AtomicBool = AtomicBool::new(false);

extern "C" {
    /// `run`'s assembly: enters `function(argument)` at CPL 3, returns when it has returned.
    fn enter_user_mode(function: extern "C" fn(*mut u8), argument: *mut u8);
    /// The `ud2` executed at CPL 3 when the function has returned.
    fn user_mode_exit();
    /// Where [`leave`] resumes, back at CPL 0.
    fn user_mode_return();
    /// The stack pointer `enter_user_mode` saved.
    static user_mode_saved_stack: u64;
    /// The end of the stack exceptions at CPL 3 run on.
    static user_mode_exception_stack_top: u8;
}

// `enter_user_mode(function, argument)`: saves the callee-saved registers and the stack
// pointer, and `iretq`s to CPL 3 on the same stack (16-byte aligned for the call), where it
// calls `function(argument)` and then executes `ud2` at `user_mode_exit`. The invalid-opcode
// handler sends it to `user_mode_return` at CPL 0 (see `leave`), which restores the stack and
// the registers and returns to `run`.
core::arch::global_asm!(
    ".pushsection .text.user_mode, \"ax\", @progbits",
    ".global enter_user_mode",
    "enter_user_mode:",
    "    pushq %rbx",
    "    pushq %rbp",
    "    pushq %r12",
    "    pushq %r13",
    "    pushq %r14",
    "    pushq %r15",
    "    movq %rsp, user_mode_saved_stack(%rip)",
    "    movq %rsp, %rax",
    "    andq $-16, %rax",
    "    pushq ${user_data}",
    "    pushq %rax",
    "    pushq ${user_rflags}",
    "    pushq ${user_code}",
    "    leaq 1f(%rip), %rax",
    "    pushq %rax",
    "    iretq",
    "1:  movq %rdi, %rax",
    "    movq %rsi, %rdi",
    "    callq *%rax",
    ".global user_mode_exit",
    "user_mode_exit:",
    "    ud2",
    ".global user_mode_return",
    "user_mode_return:",
    "    movq user_mode_saved_stack(%rip), %rsp",
    "    popq %r15",
    "    popq %r14",
    "    popq %r13",
    "    popq %r12",
    "    popq %rbp",
    "    popq %rbx",
    "    retq",
    ".popsection",
    ".pushsection .bss.user_mode_saved_stack, \"aw\", @nobits",
    ".balign 8",
    ".global user_mode_saved_stack",
    "user_mode_saved_stack: .skip 8",
    ".popsection",
    user_data = const USER_DATA_SELECTOR,
    user_code = const USER_CODE64_SELECTOR,
    user_rflags = const RFLAGS_INTERRUPTS_DISABLED,
    options(att_syntax)
);

/// Sets the U bit on the identity mapping of the first [`USER_GIGABYTES`] gigabytes, through
/// the tables CR3 points at (1 GiB pages, or 2 MiB pages in directories), and flushes the TLB.
fn make_low_memory_user_accessible() {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
    let pml4 = (cr3 & PAGE_ADDRESS_MASK) as *mut u64;
    // SAFETY: the page tables are the boot code's, in this image's writable data, identity
    // mapped; only the U bit of present entries covering the first gigabytes is added, which
    // keeps every translation and only widens who may use it. Nothing else writes them.
    unsafe {
        let entry = pml4.read_volatile();
        pml4.write_volatile(entry | PAGE_USER);
        let pdpt = (entry & PAGE_ADDRESS_MASK) as *mut u64;
        for gigabyte in 0..USER_GIGABYTES {
            let entry = pdpt.add(gigabyte).read_volatile();
            if entry & PAGE_PRESENT == 0 {
                continue;
            }
            pdpt.add(gigabyte).write_volatile(entry | PAGE_USER);
            if entry & PAGE_LARGE == 0 {
                let directory = (entry & PAGE_ADDRESS_MASK) as *mut u64;
                for index in 0..512 {
                    let entry = directory.add(index).read_volatile();
                    directory.add(index).write_volatile(entry | PAGE_USER);
                }
            }
        }
        asm!("mov cr3, {}", in(reg) cr3, options(nostack, preserves_flags));
    }
}

/// Loads the GDT with user segments and the TSS and makes low memory user-accessible; once per
/// boot, on the bootstrap processor, before [`run`].
pub fn prepare() {
    if PREPARED.swap(true, Ordering::Relaxed) {
        return;
    }
    let tss = &raw mut TSS;
    let gdt = &raw mut GDT;
    // Taking the address of a label in this image reads nothing.
    let stack_top = &raw const user_mode_exception_stack_top as u64;
    let base = tss as u64;
    let limit = (TSS_SIZE - 1) as u64;
    // Available 64-bit TSS (type 9), present, DPL 0.
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    #[repr(C, packed)]
    struct DescriptorTablePointer {
        limit: u16,
        base: u64,
    }
    let pointer = DescriptorTablePointer {
        limit: (core::mem::size_of::<GlobalDescriptorTable>() - 1) as u16,
        base: gdt as u64,
    };
    // SAFETY: only the bootstrap processor runs this, once, with interrupts disabled; the TSS
    // and GDT are statics nothing else touches. The new GDT has the boot GDT's code and data
    // descriptors at the same selectors, so CS, SS and the IDT's gates stay valid across
    // `lgdt`; `ltr` marks the TSS descriptor busy, which is why it is written first.
    unsafe {
        (*tss).rsp[0] = stack_top;
        (*gdt).0[5] = low;
        (*gdt).0[6] = base >> 32;
        asm!(
            "lgdt [{pointer}]",
            "ltr {selector:x}",
            pointer = in(reg) &pointer,
            selector = in(reg) TSS_SELECTOR,
            options(readonly, nostack, preserves_flags)
        );
    }
    make_low_memory_user_accessible();
}

/// Runs `function(argument)` at CPL 3 and returns when it has (see the module documentation
/// for what it may do). [`prepare`] must have run, and `interrupts::install`, whose
/// invalid-opcode handler brings the function back.
pub fn run(function: extern "C" fn(*mut u8), argument: *mut u8) {
    assert!(
        PREPARED.load(Ordering::Relaxed),
        "user_mode::run before user_mode::prepare"
    );
    // SAFETY: `prepare` set up the segments, TSS and page permissions the entry code relies
    // on, and the invalid-opcode handler brings `user_mode_exit` back through `leave`. The
    // assembly saves and restores every callee-saved register and the stack pointer, and
    // clobbers only what the C ABI lets a call clobber; `function` runs on this stack below
    // the saved registers and has returned before the `ud2`.
    unsafe { enter_user_mode(function, argument) }
}

/// Whether an invalid-opcode exception at `rip` is the way back from [`run`]'s function.
pub fn is_exit(rip: u64) -> bool {
    PREPARED.load(Ordering::Relaxed) && rip == user_mode_exit as *const () as u64
}

/// Rewrites the exception frame of the `ud2` at `user_mode_exit` (RIP, CS, RFLAGS, RSP, SS, as
/// the processor pushed them) so that the handler's `iretq` resumes at `user_mode_return` at
/// CPL 0, interrupts disabled, on the stack `enter_user_mode` saved.
///
/// # Safety
///
/// `frame` must point at the live, writable interrupt frame of that exception, which the
/// handler returns through.
pub unsafe fn leave(frame: *mut u64) {
    // SAFETY: `enter_user_mode` wrote the saved stack before entering CPL 3, and nothing
    // writes it since; the caller guarantees `frame` (five words).
    unsafe {
        frame.write(user_mode_return as *const () as u64);
        frame.add(1).write(u64::from(CODE64_SELECTOR));
        frame.add(2).write(RFLAGS_INTERRUPTS_DISABLED);
        frame
            .add(3)
            .write((&raw const user_mode_saved_stack).read_volatile());
        frame.add(4).write(u64::from(DATA_SELECTOR));
    }
}
