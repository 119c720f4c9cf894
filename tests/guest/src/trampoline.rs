//! The real-mode trampoline that application processors start in after a startup IPI.
//!
//! A startup IPI with vector V starts a processor in 16-bit real mode at physical address
//! V * 4096, so the trampoline must live below 1 MiB on a page boundary; the image itself is
//! at 1 MiB. The bootstrap processor copies the code between `application_trampoline_start`
//! and `application_trampoline_end` to [`TRAMPOLINE_ADDRESS`]. The copied code only loads the
//! boot GDT and enters 32-bit protected mode; from there `enter_long_mode32` in `boot.rs`
//! takes over, with `ebp` = 1 marking an application processor.

use crate::boot::{CODE32_SELECTOR, DATA_SELECTOR, GDT_LIMIT};

/// Physical page the trampoline is copied to; cove keeps it free for this purpose.
pub const TRAMPOLINE_ADDRESS: usize = 0x8000;

/// The startup IPI vector that starts a processor at [`TRAMPOLINE_ADDRESS`].
pub const STARTUP_VECTOR: u8 = (TRAMPOLINE_ADDRESS >> 12) as u8;

core::arch::global_asm!(
    ".pushsection .text.application_trampoline, \"ax\", @progbits",
    ".code16",
    ".global application_trampoline_start",
    "application_trampoline_start:",
    "    cli",
    "    cld",
    // The code runs at CS = STARTUP_VECTOR * 256, IP = 0; with DS = 0 every address below is
    // its absolute physical address inside the copy.
    "    xorw %ax, %ax",
    "    movw %ax, %ds",
    "    lgdtl {trampoline_address} + (application_trampoline_gdt_pointer - application_trampoline_start)",
    "    movl %cr0, %eax",
    "    orl $1, %eax",
    "    movl %eax, %cr0",
    "    ljmpl ${code32_selector}, $application_protected_mode_entry32",
    ".balign 8",
    "application_trampoline_gdt_pointer:",
    ".word {gdt_limit}",
    ".long boot_gdt",
    ".global application_trampoline_end",
    "application_trampoline_end:",
    //
    // Runs in place in the image, in 32-bit protected mode with the boot GDT.
    ".code32",
    "application_protected_mode_entry32:",
    "    movw ${data_selector}, %ax",
    "    movw %ax, %ds",
    "    movw %ax, %es",
    "    movw %ax, %ss",
    "    movw %ax, %fs",
    "    movw %ax, %gs",
    "    movl $1, %ebp",
    "    jmp enter_long_mode32",
    ".code64",
    ".popsection",
    trampoline_address = const TRAMPOLINE_ADDRESS,
    code32_selector = const CODE32_SELECTOR,
    data_selector = const DATA_SELECTOR,
    gdt_limit = const GDT_LIMIT,
    options(att_syntax)
);

extern "C" {
    static application_trampoline_start: u8;
    static application_trampoline_end: u8;
}

/// Copies the trampoline to [`TRAMPOLINE_ADDRESS`], where the startup IPIs will point.
pub fn install() {
    // Both symbols are labels in the same section of this image, so the range between them
    // is the trampoline's code; taking their addresses reads nothing.
    let start = &raw const application_trampoline_start;
    let end = &raw const application_trampoline_end;
    let length = end as usize - start as usize;
    assert!(length <= 4096, "the trampoline does not fit in one page");
    // SAFETY: the page at TRAMPOLINE_ADDRESS is identity-mapped RAM that the VMM reserves for
    // this trampoline (it holds none of the start_info or zero page, the command line or the
    // image; the 64-bit entry's loader stack below 0x8ff0 was left before Rust ran), and the
    // source lies in the image at 1 MiB, so the ranges do not overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE_ADDRESS as *mut u8, length);
    }
}
