//! From the boot protocol's entry to Rust: the two entry points, the ELF note that names the
//! PVH one, identity page tables, the GDT, the switch to long mode and the boot stacks.
//!
//! The PVH boot protocol enters at a 32-bit physical address with paging off, flat segments,
//! interrupts off and `ebx` pointing at `struct hvm_start_info`. Linux's 64-bit boot protocol
//! enters at the ELF entry point in long mode, on the loader's GDT and identity page tables
//! (which may map as little as the first GiB), with interrupts off and `rsi` pointing at the
//! zero page. Both entries are in every image; the build decides which one a loader uses: the
//! default build carries the PVH note, the `linux64` build leaves it out and makes
//! `linux64_start64` the ELF entry point (see `linker-pvh.ld` and `linker-linux64.ld`). Either entry gets the bootstrap
//! processor onto this file's page tables and GDT and on to `guest_main` in 64-bit mode, with
//! the address of its boot structure. Application processors arrive from the real-mode
//! trampoline (see `trampoline.rs`) at `enter_long_mode32` and share the page tables, GDT and
//! long-mode switch with the bootstrap processor; they leave here for
//! `smp::application_processor_main`. Nothing in this file knows about the devices.

use crate::smp;

/// Selector of the 64-bit code segment in `boot_gdt`.
pub const CODE64_SELECTOR: u16 = 0x08;
/// Selector of the flat data segment in `boot_gdt`.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the flat 32-bit code segment in `boot_gdt`, used on the way up from real mode.
pub const CODE32_SELECTOR: u16 = 0x18;
/// `boot_gdt` has four eight-byte descriptors; the limit is its size minus one.
pub const GDT_LIMIT: u16 = 4 * 8 - 1;

/// Application processors the boot code has stacks for (the bootstrap processor has its own).
pub const MAX_APPLICATION_PROCESSORS: usize = 63;
const BOOTSTRAP_STACK_SIZE: usize = 64 * 1024;
/// Application processors only print a line and halt, so their stacks can be small.
const APPLICATION_STACK_SIZE: usize = 8 * 1024;

/// Page directories for the 2 MiB-page fallback: 16 of them identity-map 0..16 GiB, which
/// covers the 4 GiB the guest touches plus any RAM the VMM places above the MMIO hole in
/// the configurations the tests use. With 1 GiB pages the whole 0..512 GiB is mapped.
const PAGE_DIRECTORY_COUNT: usize = 16;

/// Page table entry bits: present, writable, and (in directories) a large page.
const PAGE_PRESENT_WRITABLE: u32 = 0x3;
const LARGE_PAGE: u32 = 0x80;
/// Write-through and cache-disable: the 3..4 GiB gigabyte holds the MMIO hole, the local
/// APIC and the IOAPIC, which must not be cached whatever the MTRRs say.
const UNCACHED: u32 = 0x18;

/// CR0 in 64-bit mode: PG, WP, NE, ET, MP, PE, with CD and NW clear: INIT leaves those two set
/// on the application processors, and a loader may leave them set on the bootstrap processor.
const CR0_LONG_MODE: u32 = 0x8001_0033;

// PVH entry note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), 32-bit entry address. A
// loader that finds it enters at `pvh_start32`; the `linux64` build leaves it out.
#[cfg(not(feature = "linux64"))]
core::arch::global_asm!(
    ".pushsection .note.Xen, \"a\", @note",
    ".balign 4",
    ".long 4",
    ".long 4",
    ".long 18",
    ".asciz \"Xen\"",
    ".balign 4",
    ".long pvh_start32",
    ".balign 4",
    ".popsection",
);

core::arch::global_asm!(
    // Flat GDT. Accessed bits are preset so the processor never writes to it.
    ".pushsection .data.boot_gdt, \"aw\", @progbits",
    ".balign 16",
    ".global boot_gdt",
    "boot_gdt:",
    ".quad 0",
    ".quad 0x00AF9B000000FFFF", // 0x08: 64-bit code
    ".quad 0x00CF93000000FFFF", // 0x10: flat data
    ".quad 0x00CF9B000000FFFF", // 0x18: flat 32-bit code
    // The pointer is padded to the 64-bit form; 32-bit `lgdt` reads only its first 6 bytes.
    ".balign 8",
    "boot_gdt_pointer:",
    ".word {gdt_limit}",
    ".quad boot_gdt",
    ".popsection",
    //
    // Identity page tables, built by the assembler rather than at boot: under a hypervisor
    // that emulates guest kernel code instruction by instruction, filling 8192 entries at run
    // time would cost tens of milliseconds. Boot code only picks which PDPT the PML4 uses.
    ".pushsection .data.boot_page_tables, \"aw\", @progbits",
    ".balign 4096",
    "boot_pml4:",
    "    .quad boot_pdpt_2mib + {present_writable}",
    "    .fill 511, 8, 0",
    //
    // 1 GiB pages: PDPT entry i maps i GiB, for all of 0..512 GiB.
    "boot_pdpt_1gib:",
    "    .set .Lmapped_address, 0",
    "    .rept 512",
    "    .if (.Lmapped_address >> 30) == 3",
    "    .quad .Lmapped_address + {uncached_large_page}",
    "    .else",
    "    .quad .Lmapped_address + {large_page}",
    "    .endif",
    "    .set .Lmapped_address, .Lmapped_address + (1 << 30)",
    "    .endr",
    //
    // 2 MiB pages: PDPT entry i points at directory i, whose entry j maps i GiB + j * 2 MiB.
    "boot_pdpt_2mib:",
    "    .set .Ldirectory_index, 0",
    "    .rept {page_directory_count}",
    "    .quad boot_page_directories + .Ldirectory_index * 4096 + {present_writable}",
    "    .set .Ldirectory_index, .Ldirectory_index + 1",
    "    .endr",
    "    .fill 512 - {page_directory_count}, 8, 0",
    "boot_page_directories:",
    "    .set .Lmapped_address, 0",
    "    .rept {page_directory_count} * 512",
    "    .if (.Lmapped_address >> 30) == 3",
    "    .quad .Lmapped_address + {uncached_large_page}",
    "    .else",
    "    .quad .Lmapped_address + {large_page}",
    "    .endif",
    "    .set .Lmapped_address, .Lmapped_address + (1 << 21)",
    "    .endr",
    ".popsection",
    ".pushsection .rodata.no_long_mode_message, \"a\", @progbits",
    "no_long_mode_message:",
    ".asciz \"cove-test-guest: panic: the CPU does not support long mode\\n\"",
    ".popsection",
    ".pushsection .stacks, \"aw\", @nobits",
    ".balign 4096",
    "bootstrap_stack_bottom: .skip {bootstrap_stack_size}",
    "bootstrap_stack_top:",
    "application_stacks: .skip {max_application_processors} * {application_stack_size}",
    ".popsection",
    ".pushsection .bss.application_stack_next, \"aw\", @nobits",
    ".balign 4",
    "application_stack_next: .skip 4",
    ".popsection",
    //
    // 32-bit PVH entry. No stack exists yet, so this code uses registers only; esi keeps the
    // start_info address until Rust receives it.
    ".pushsection .text.boot, \"ax\", @progbits",
    ".code32",
    ".global pvh_start32",
    "pvh_start32:",
    "    cli",
    "    cld",
    "    movl %ebx, %esi",
    "    lgdt boot_gdt_pointer",
    "    ljmp ${code32_selector}, $1f",
    "1:  movw ${data_selector}, %ax",
    "    movw %ax, %ds",
    "    movw %ax, %es",
    "    movw %ax, %ss",
    "    movw %ax, %fs",
    "    movw %ax, %gs",
    //
    // Without long mode there is nothing to run; say so on COM1 and stop.
    "    movl $0x80000000, %eax",
    "    cpuid",
    "    cmpl $0x80000001, %eax",
    "    jb .Lno_long_mode",
    "    movl $0x80000001, %eax",
    "    cpuid",
    "    btl $29, %edx",
    "    jnc .Lno_long_mode",
    "    movl %edx, %ebp", // keep the extended feature bits for the 1 GiB page test
    //
    // The PML4 starts out pointing at the 2 MiB-page tables; switch to 1 GiB pages when the
    // processor has them.
    "    btl $26, %ebp",
    "    jnc .Lpage_tables_ready",
    "    movl $(boot_pdpt_1gib + {present_writable}), boot_pml4",
    ".Lpage_tables_ready:",
    "    xorl %ebp, %ebp", // ebp = 0: this is the bootstrap processor
    //
    // Shared with the application processors, which arrive with ebp = 1 and flat segments.
    ".global enter_long_mode32",
    "enter_long_mode32:",
    "    movl $0x20, %eax", // CR4.PAE
    "    movl %eax, %cr4",
    "    movl $boot_pml4, %eax",
    "    movl %eax, %cr3",
    "    movl $0xC0000080, %ecx", // EFER
    "    rdmsr",
    "    orl $0x100, %eax", // EFER.LME
    "    wrmsr",
    "    movl ${cr0_long_mode}, %eax",
    "    movl %eax, %cr0",
    "    ljmp ${code64_selector}, $long_mode_entry64",
    //
    ".Lno_long_mode:",
    "    movl $no_long_mode_message, %esi",
    "    movw $0x3f8, %dx",
    "2:  lodsb",
    "    testb %al, %al",
    "    jz 3f",
    "    outb %al, %dx",
    "    jmp 2b",
    "3:  cli",
    "    hlt",
    "    jmp 3b",
    //
    // 64-bit entry of Linux's boot protocol. It is in long mode already, so the processor has
    // the extended CPUID leaf; it picks the page tables as the PVH entry does, moves to them
    // and to the boot GDT (a far return reloads CS: 64-bit mode has no direct far jump), and
    // joins the PVH path. The loader's stack takes the two pushes; rsi keeps the zero page's
    // address until Rust receives it.
    ".code64",
    ".global linux64_start64",
    "linux64_start64:",
    "    cli",
    "    cld",
    "    movl $0x80000001, %eax",
    "    cpuid",
    "    btl $26, %edx",
    "    jnc 1f",
    "    movl $(boot_pdpt_1gib + {present_writable}), boot_pml4(%rip)",
    "1:  movl ${cr0_long_mode}, %eax",
    "    movq %rax, %cr0",
    "    leaq boot_pml4(%rip), %rax",
    "    movq %rax, %cr3",
    "    lgdt boot_gdt_pointer(%rip)",
    "    xorl %ebp, %ebp", // ebp = 0: this is the bootstrap processor
    "    pushq ${code64_selector}",
    "    leaq long_mode_entry64(%rip), %rax",
    "    pushq %rax",
    "    lretq",
    //
    "long_mode_entry64:",
    "    movw ${data_selector}, %ax",
    "    movw %ax, %ds",
    "    movw %ax, %es",
    "    movw %ax, %ss",
    "    movw %ax, %fs",
    "    movw %ax, %gs",
    "    testl %ebp, %ebp",
    "    jnz .Lapplication_processor",
    //
    // Bootstrap processor: stack, clear .bss (esi survives `rep stosq`), then Rust with the
    // address of the start_info or zero page. The upper halves of the registers are undefined
    // after the PVH entry's mode switch, hence the 32-bit move, which zero-extends; both
    // structures must lie in the first 4 GiB anyway.
    "    leaq bootstrap_stack_top(%rip), %rsp",
    "    leaq guest_bss_start(%rip), %rdi",
    "    leaq guest_bss_end(%rip), %rcx",
    "    subq %rdi, %rcx",
    "    shrq $3, %rcx",
    "    xorl %eax, %eax",
    "    rep stosq",
    "    movl %esi, %edi",
    "    call {guest_main}",
    "    jmp .Lhalt_forever",
    //
    // Application processor: take the next free stack. A processor beyond the supported
    // count has no stack and halts.
    ".Lapplication_processor:",
    "    movl $1, %eax",
    "    lock xaddl %eax, application_stack_next(%rip)",
    "    cmpl ${max_application_processors}, %eax",
    "    jae .Lhalt_forever",
    "    incl %eax",
    "    imull ${application_stack_size}, %eax",
    "    leaq application_stacks(%rip), %rsp",
    "    addq %rax, %rsp",
    "    call {application_processor_main}",
    ".Lhalt_forever:",
    "    cli",
    "    hlt",
    "    jmp .Lhalt_forever",
    ".popsection",
    gdt_limit = const GDT_LIMIT,
    cr0_long_mode = const CR0_LONG_MODE,
    code32_selector = const CODE32_SELECTOR,
    code64_selector = const CODE64_SELECTOR,
    data_selector = const DATA_SELECTOR,
    present_writable = const PAGE_PRESENT_WRITABLE,
    large_page = const PAGE_PRESENT_WRITABLE | LARGE_PAGE,
    uncached_large_page = const PAGE_PRESENT_WRITABLE | LARGE_PAGE | UNCACHED,
    page_directory_count = const PAGE_DIRECTORY_COUNT,
    bootstrap_stack_size = const BOOTSTRAP_STACK_SIZE,
    application_stack_size = const APPLICATION_STACK_SIZE,
    max_application_processors = const MAX_APPLICATION_PROCESSORS,
    guest_main = sym crate::guest_main,
    application_processor_main = sym smp::application_processor_main,
    options(att_syntax)
);
