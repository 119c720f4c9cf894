//! Thin wrappers over the processor instructions the guest needs: port I/O, CPUID, the time
//! stamp counter and halting. Anything about devices or boot structures lives elsewhere.

use core::arch::asm;
pub use core::arch::x86_64::CpuidResult;

/// Writes one byte to an I/O port.
pub fn write_port(port: u16, value: u8) {
    // SAFETY: the guest owns the whole machine and runs at ring 0; the callers only use the
    // ports of devices the VMM provides (COM1, the i8042, the ACPI sleep control register),
    // where a write has no memory effect.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Executes CPUID for `leaf`, sub-leaf 0.
pub fn cpuid(leaf: u32) -> CpuidResult {
    core::arch::x86_64::__cpuid(leaf)
}

/// Reads the time stamp counter.
pub fn time_stamp_counter() -> u64 {
    let low: u32;
    let high: u32;
    // SAFETY: RDTSC only writes edx:eax; the boot code leaves CR4.TSD clear, so it is allowed.
    unsafe {
        asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    }
    (u64::from(high) << 32) | u64::from(low)
}

/// The guest has no calibrated clock. Delays assume the time stamp counter runs at most this
/// fast, so a delay lasts at least as long as asked on any slower counter.
const ASSUMED_MAXIMUM_TSC_HZ: u64 = 4_000_000_000;

/// Time stamp counter ticks in `microseconds` at [`ASSUMED_MAXIMUM_TSC_HZ`].
pub fn microseconds_to_ticks(microseconds: u64) -> u64 {
    microseconds * (ASSUMED_MAXIMUM_TSC_HZ / 1_000_000)
}

/// Spins for at least `microseconds` (see [`ASSUMED_MAXIMUM_TSC_HZ`]).
pub fn delay_microseconds(microseconds: u64) {
    delay_ticks(microseconds_to_ticks(microseconds));
}

/// Spins until the time stamp counter has advanced by `ticks`.
pub fn delay_ticks(ticks: u64) {
    let start = time_stamp_counter();
    while time_stamp_counter().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}

/// Spins for `loops` iterations of an empty loop the compiler cannot remove: a delay measured
/// in work rather than time, for tests that want to control it directly.
pub fn spin_loops(loops: u64) {
    for _ in 0..loops {
        // SAFETY: a NOP has no effect; the asm block only keeps the loop from being removed.
        unsafe { asm!("nop", options(nomem, nostack, preserves_flags)) }
    }
}

/// Disables interrupts and halts this processor for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: with interrupts disabled HLT only stops this processor; nothing is lost.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
