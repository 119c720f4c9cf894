//! Interrupts on the bootstrap processor, for the virtio drivers: an IDT whose every vector
//! has a stub, the IOAPIC routing of device GSIs to vectors, a periodic local APIC timer that
//! bounds every halt, and [`halt_until_interrupt`].
//!
//! Interrupts stay disabled except inside [`halt_until_interrupt`], whose `sti; hlt` is the
//! only place a handler can run; the rest of the guest therefore never races with a handler,
//! and the interrupted code is always that one asm block, which leaves the stack's red zone
//! free. Exceptions (vectors 0..31) panic with the vector and RIP, which beats a triple fault
//! when a driver goes wrong; the one exception is the `ud2` that ends `user_mode::run`'s
//! function, which the invalid-opcode handler turns into the return to CPL 0. The 8259 PICs
//! are masked and the local APIC's LINT0 too, so a device GSI (which KVM also routes to the
//! PIC) arrives once, through the IOAPIC.
//!
//! Device vectors are [`FIRST_DEVICE_VECTOR`] + the device's slot; their handler is
//! `virtio::handle_interrupt`. Only the bootstrap processor takes interrupts: every IOAPIC
//! entry names its APIC id, and the application processors sit in `cli; hlt`.

use crate::boot::CODE64_SELECTOR;
use crate::command_line::MAX_VIRTIO_DEVICES;
use crate::cpu;
use crate::smp::{current_apic_id, read_local_apic, write_local_apic};
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// The local APIC timer's vector.
const TIMER_VECTOR: u64 = 0x20;
/// Device slot `n` interrupts on vector `FIRST_DEVICE_VECTOR + n`.
const FIRST_DEVICE_VECTOR: u64 = 0x40;
const SPURIOUS_VECTOR: u64 = 0xff;
const EXCEPTION_VECTORS: u64 = 32;
/// #UD, which also brings `user_mode::run`'s function back to CPL 0.
const INVALID_OPCODE_VECTOR: u64 = 6;

const REGISTER_TASK_PRIORITY: usize = 0x80;
const REGISTER_END_OF_INTERRUPT: usize = 0xb0;
const REGISTER_SPURIOUS_VECTOR: usize = 0xf0;
const REGISTER_LVT_TIMER: usize = 0x320;
const REGISTER_LVT_LINT0: usize = 0x350;
const REGISTER_TIMER_INITIAL_COUNT: usize = 0x380;
const REGISTER_TIMER_DIVIDE: usize = 0x3e0;
const APIC_SOFTWARE_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// Divide configuration 0b1011: the timer counts at the APIC bus frequency.
const TIMER_DIVIDE_BY_1: u32 = 0b1011;
/// About 10 ms at KVM's 1 GHz APIC bus; any period of that order will do, it only bounds the
/// halts so that a lost interrupt costs a tick rather than the whole test.
const TIMER_INITIAL_COUNT: u32 = 10_000_000;

/// The IOAPIC's index and data registers, and the first redirection entry's index.
const IOAPIC_REGISTER_SELECT: usize = 0x00;
const IOAPIC_WINDOW: usize = 0x10;
const IOAPIC_REDIRECTION_TABLE: u32 = 0x10;
/// The IOAPIC pins the MP table and MADT describe.
const IOAPIC_PINS: u32 = 24;

/// The data ports of the master and slave 8259.
const PIC_MASTER_DATA: u16 = 0x21;
const PIC_SLAVE_DATA: u16 = 0xa1;

/// A 64-bit interrupt gate, present, DPL 0.
const INTERRUPT_GATE: u64 = 0x8e;
/// Bytes between two vectors' stubs in `interrupt_stubs`.
const STUB_SIZE: u64 = 16;

static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
static UNEXPECTED_INTERRUPTS: AtomicU64 = AtomicU64::new(0);

/// 256 gates of 16 bytes each.
#[repr(C, align(16))]
struct InterruptDescriptorTable([u64; 512]);

static mut IDT: InterruptDescriptorTable = InterruptDescriptorTable([0; 512]);

// One 16-byte stub per vector: push a zero where the processor pushes no error code, push the
// vector, join the common path, which saves the registers the C ABI lets a callee clobber,
// calls `interrupt_dispatch(vector, error_code, frame)` and returns with `iretq`. The stack is
// 16-byte aligned at the call: the processor aligns it before pushing its 5-word frame, and
// the stub and the common path push 11 more words.
core::arch::global_asm!(
    ".pushsection .text.interrupt_stubs, \"ax\", @progbits",
    ".balign {stub_size}",
    ".global interrupt_stubs",
    "interrupt_stubs:",
    ".set .Lvector, 0",
    ".rept 256",
    ".balign {stub_size}",
    ".if (.Lvector == 8) || ((.Lvector >= 10) && (.Lvector <= 14)) || (.Lvector == 17) || (.Lvector == 21) || (.Lvector == 29) || (.Lvector == 30)",
    ".else",
    "    pushq $0",
    ".endif",
    "    pushq $.Lvector",
    "    jmp interrupt_common",
    ".set .Lvector, .Lvector + 1",
    ".endr",
    "interrupt_common:",
    "    cld",
    "    pushq %rax",
    "    pushq %rcx",
    "    pushq %rdx",
    "    pushq %rsi",
    "    pushq %rdi",
    "    pushq %r8",
    "    pushq %r9",
    "    pushq %r10",
    "    pushq %r11",
    "    movq 72(%rsp), %rdi",
    "    movq 80(%rsp), %rsi",
    "    leaq 88(%rsp), %rdx",
    "    call {dispatch}",
    "    popq %r11",
    "    popq %r10",
    "    popq %r9",
    "    popq %r8",
    "    popq %rdi",
    "    popq %rsi",
    "    popq %rdx",
    "    popq %rcx",
    "    popq %rax",
    "    addq $16, %rsp",
    "    iretq",
    ".popsection",
    stub_size = const STUB_SIZE,
    dispatch = sym interrupt_dispatch,
    options(att_syntax)
);

extern "C" {
    static interrupt_stubs: u8;
}

/// Called by the common stub path with interrupts disabled.
extern "C" fn interrupt_dispatch(vector: u64, error_code: u64, frame: *mut u64) {
    // SAFETY: `frame` is where the processor pushed RIP, CS, RFLAGS, RSP and SS on this
    // stack; the stub passes its address, and it stays valid for this call.
    if vector == INVALID_OPCODE_VECTOR && crate::user_mode::is_exit(unsafe { frame.read() }) {
        // SAFETY: as above; the stub's `iretq` returns through this frame.
        unsafe { crate::user_mode::leave(frame) };
        return;
    }
    if vector < EXCEPTION_VECTORS {
        // SAFETY: `frame` is where the processor pushed RIP, CS, RFLAGS, RSP and SS on this
        // stack; the stub passes its address, and it stays valid for this call.
        let rip = unsafe { frame.read() };
        panic!("exception {vector} (error code {error_code:#x}) at RIP {rip:#x}");
    }
    match vector {
        SPURIOUS_VECTOR => return, // a spurious interrupt takes no end-of-interrupt
        TIMER_VECTOR => {
            TIMER_TICKS.fetch_add(1, Ordering::Relaxed);
        }
        _ if (FIRST_DEVICE_VECTOR..FIRST_DEVICE_VECTOR + MAX_VIRTIO_DEVICES as u64)
            .contains(&vector) =>
        {
            crate::virtio::handle_interrupt((vector - FIRST_DEVICE_VECTOR) as usize);
        }
        _ => {
            UNEXPECTED_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
        }
    }
    write_local_apic(REGISTER_END_OF_INTERRUPT, 0);
}

/// Installs the IDT, masks the PICs and LINT0, enables the local APIC and starts its
/// periodic timer. Interrupts stay disabled.
pub fn install() {
    // Taking the address of a label in this image reads nothing.
    let stubs = &raw const interrupt_stubs as u64;
    let idt = &raw mut IDT;
    for vector in 0..256 {
        let handler = stubs + vector as u64 * STUB_SIZE;
        let low = (handler & 0xffff)
            | u64::from(CODE64_SELECTOR) << 16
            | INTERRUPT_GATE << 40
            | ((handler >> 16) & 0xffff) << 48;
        // SAFETY: only the bootstrap processor runs this, with interrupts disabled, before
        // the IDT is loaded; nothing else reads or writes it.
        unsafe {
            (*idt).0[2 * vector] = low;
            (*idt).0[2 * vector + 1] = handler >> 32;
        }
    }
    #[repr(C, packed)]
    struct DescriptorTablePointer {
        limit: u16,
        base: u64,
    }
    let pointer = DescriptorTablePointer {
        limit: (core::mem::size_of::<InterruptDescriptorTable>() - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the IDT is a static that lives forever and holds a valid gate for every vector;
    // `lidt` reads only the 10-byte pointer on this frame.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };

    cpu::write_port(PIC_MASTER_DATA, 0xff);
    cpu::write_port(PIC_SLAVE_DATA, 0xff);
    write_local_apic(REGISTER_LVT_LINT0, LVT_MASKED);
    write_local_apic(REGISTER_TASK_PRIORITY, 0);
    let spurious = read_local_apic(REGISTER_SPURIOUS_VECTOR) & !0xff;
    write_local_apic(
        REGISTER_SPURIOUS_VECTOR,
        spurious | APIC_SOFTWARE_ENABLE | SPURIOUS_VECTOR as u32,
    );
    write_local_apic(REGISTER_TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
    write_local_apic(REGISTER_LVT_TIMER, LVT_TIMER_PERIODIC | TIMER_VECTOR as u32);
    write_local_apic(REGISTER_TIMER_INITIAL_COUNT, TIMER_INITIAL_COUNT);
}

/// Stops the timer and masks the given IOAPIC pins again; interrupts stay disabled.
pub fn uninstall(ioapic_address: u32, gsis: impl Iterator<Item = u32>) {
    write_local_apic(REGISTER_TIMER_INITIAL_COUNT, 0);
    write_local_apic(REGISTER_LVT_TIMER, LVT_MASKED | TIMER_VECTOR as u32);
    for gsi in gsis.filter(|&gsi| gsi < IOAPIC_PINS) {
        write_ioapic(
            ioapic_address,
            IOAPIC_REDIRECTION_TABLE + 2 * gsi,
            LVT_MASKED,
        );
    }
}

/// Why a GSI cannot be routed.
pub struct BadGsi(pub u32);

impl core::fmt::Display for BadGsi {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            formatter,
            "GSI {} is not a pin of the IOAPIC, which has {IOAPIC_PINS}",
            self.0
        )
    }
}

/// Routes IOAPIC pin `gsi` to device slot `slot`'s vector on this processor: fixed delivery,
/// physical destination, active high, edge-triggered (KVM's irqfd sends edges).
pub fn route_device(ioapic_address: u32, gsi: u32, slot: usize) -> Result<(), BadGsi> {
    if gsi >= IOAPIC_PINS {
        return Err(BadGsi(gsi));
    }
    let entry = IOAPIC_REDIRECTION_TABLE + 2 * gsi;
    // The destination first, so the entry is never unmasked with a stale one.
    write_ioapic(
        ioapic_address,
        entry + 1,
        u32::from(current_apic_id()) << 24,
    );
    write_ioapic(
        ioapic_address,
        entry,
        (FIRST_DEVICE_VECTOR + slot as u64) as u32,
    );
    Ok(())
}

fn write_ioapic(ioapic_address: u32, register: u32, value: u32) {
    let base = ioapic_address as usize;
    // SAFETY: the IOAPIC's two registers lie in the uncached 3..4 GiB gigabyte of the identity
    // mapping, at the address the ACPI tables (or the architectural default) give; 32-bit
    // accesses are what it expects, and they touch no guest memory.
    unsafe {
        core::ptr::write_volatile((base + IOAPIC_REGISTER_SELECT) as *mut u32, register);
        core::ptr::write_volatile((base + IOAPIC_WINDOW) as *mut u32, value);
    }
}

/// Enables interrupts, halts until one has been handled and disables them again. With the
/// periodic timer running, this returns within a tick even when no device interrupts.
pub fn halt_until_interrupt() {
    // SAFETY: the IDT installed by `install` handles every vector, and the handlers preserve
    // every register the interrupted code uses. `sti` takes effect after `hlt` has begun, so
    // an interrupt that is already pending wakes the `hlt` rather than being taken before it.
    // The block may touch memory (the handlers do) and does not promise `nostack`, so the
    // compiler keeps nothing in the red zone that an interrupt frame would overwrite.
    unsafe { asm!("sti", "hlt", "cli") }
}

/// Timer interrupts so far, and interrupts on vectors nobody asked for.
pub fn counts() -> (u64, u64) {
    (
        TIMER_TICKS.load(Ordering::Relaxed),
        UNEXPECTED_INTERRUPTS.load(Ordering::Relaxed),
    )
}
