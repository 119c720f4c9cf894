//! The ways the guest ends, chosen by `exit=` on the command line; each is a distinct
//! outcome the VMM's tests look for.

use crate::acpi::Acpi;
use crate::command_line::ExitAction;
use crate::cpu;
use crate::serial::{println, Console};
use core::arch::asm;

const I8042_COMMAND: u16 = 0x64;
const I8042_PULSE_RESET: u8 = 0xfe;

/// Time stamp counter ticks between two `tick` lines by default: 100 ms at 2.5 GHz, and
/// within 50..200 ms for any counter between 1.25 and 5 GHz. Time rather than a loop count,
/// because the guest runs thousands of times slower where the hypervisor emulates it than
/// under hardware virtualization.
const DEFAULT_TICK_INTERVAL_TSC: u64 = 250_000_000;

/// Performs `action`; `tick_loops` is only used by [`ExitAction::Tick`], and `acpi` (the
/// tables, when they were usable) by [`ExitAction::PowerOff`].
pub fn perform(action: ExitAction, tick_loops: Option<u64>, acpi: Option<&Acpi>) -> ! {
    match action {
        ExitAction::Reset => {
            Console::lock().text("cove-test-guest: reset").end_line();
            reset()
        }
        ExitAction::TripleFault => triple_fault(),
        ExitAction::Halt => cpu::halt_forever(),
        ExitAction::Cmpxchg16b => {
            let outcome = if compare_exchange_16_bytes() {
                "ok"
            } else {
                "failed"
            };
            Console::lock()
                .text("cmpxchg16b: ")
                .text(outcome)
                .end_line();
            Console::lock().text("cove-test-guest: reset").end_line();
            reset()
        }
        ExitAction::Tick => tick_forever(tick_loops),
        ExitAction::PowerOff => {
            Console::lock().text("cove-test-guest: poweroff").end_line();
            power_off(acpi)
        }
    }
}

/// Powers off through the ACPI sleep control register, which cove-vmm treats as a clean exit.
/// Where there are no usable tables, or the write leaves the machine running, it says why and
/// resets instead.
fn power_off(acpi: Option<&Acpi>) -> ! {
    match acpi {
        Some(acpi) => {
            let error = acpi.power_off();
            println!("error: acpi: cannot power off, resetting instead: {error}");
        }
        // The `acpi:` error line printed at boot said what was wrong with the tables.
        None => {
            println!("error: acpi: cannot power off without the ACPI tables, resetting instead")
        }
    }
    reset()
}

/// Pause-loop iterations [`reset`] gives the i8042 write before it falls back to a triple
/// fault: plenty for a VMM that handles the write asynchronously, and short enough not to
/// matter where the hypervisor emulates the guest.
const RESET_GRACE_PAUSES: u32 = 5_000;

/// Asks the i8042 to pulse the reset line, which the VMM treats as a clean exit. A machine
/// without an i8042 (QEMU's microvm) ignores the write, so if the guest is still running a
/// moment later it resets by triple fault instead. cove-vmm stops the vCPU on the write
/// itself, so there the fallback never runs.
pub fn reset() -> ! {
    cpu::write_port(I8042_COMMAND, I8042_PULSE_RESET);
    for _ in 0..RESET_GRACE_PAUSES {
        core::hint::spin_loop();
    }
    triple_fault()
}

/// Takes an exception with an empty IDT: the invalid-opcode fault cannot be delivered, nor
/// the general protection fault that follows, nor the double fault, so the processor shuts
/// down. `ud2` rather than `int3`: where the hypervisor emulates the guest, KVM's instruction
/// emulator cannot execute a protected-mode `int n` and reports an emulation failure instead
/// of a shutdown, while it raises #UD for `ud2` like hardware does.
fn triple_fault() -> ! {
    #[repr(C, packed)]
    struct DescriptorTablePointer {
        limit: u16,
        base: u64,
    }
    let empty = DescriptorTablePointer { limit: 0, base: 0 };
    // SAFETY: the whole point is to bring the machine down; nothing runs afterwards, and
    // `lidt` only reads the 10-byte pointer, which lives on this stack frame.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &empty, options(noreturn)) }
}

/// A 16-byte aligned pair of words for CMPXCHG16B, which faults on unaligned operands.
#[repr(C, align(16))]
struct AlignedPair {
    words: [u64; 2],
}

static mut COMPARE_EXCHANGE_TARGET: AlignedPair = AlignedPair { words: [0, 0] };

/// Executes `lock cmpxchg16b`, expecting the zeroed pair and replacing it; true when the
/// instruction reports success and memory holds the new value. Executed regardless of what
/// CPUID says: the point is to see how the VMM handles the instruction.
fn compare_exchange_16_bytes() -> bool {
    const NEW: [u64; 2] = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
    let target = &raw mut COMPARE_EXCHANGE_TARGET;
    let swapped: u8;
    // SAFETY: the target is a 16-byte aligned static only this function touches, and only the
    // bootstrap processor runs it. LLVM reserves rbx, so the low new word goes through a
    // scratch register and rbx is restored afterwards.
    unsafe {
        asm!(
            "xchg {new_low}, rbx",
            "lock cmpxchg16b xmmword ptr [{target}]",
            "mov rbx, {new_low}",
            "sete {swapped}",
            target = in(reg) target,
            new_low = inout(reg) NEW[0] => _,
            in("rcx") NEW[1],
            inout("rax") 0u64 => _,
            inout("rdx") 0u64 => _,
            swapped = out(reg_byte) swapped,
        )
    }
    // SAFETY: as above, nothing else accesses the target; the asm block has finished with it.
    let words = unsafe { core::ptr::read_volatile(&raw const (*target).words) };
    swapped == 1 && words == NEW
}

/// Prints `tick 1`, `tick 2`, ... forever, `loops` busy-loop iterations or (by default)
/// [`DEFAULT_TICK_INTERVAL_TSC`] apart.
fn tick_forever(loops: Option<u64>) -> ! {
    for tick in 1u64.. {
        match loops {
            Some(loops) => cpu::spin_loops(loops),
            None => cpu::delay_ticks(DEFAULT_TICK_INTERVAL_TSC),
        }
        Console::lock().text("tick ").decimal(tick).end_line();
    }
    cpu::halt_forever()
}
