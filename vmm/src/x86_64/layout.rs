//! The guest-physical memory map. Low addresses hold the boot structures, the kernel loads at
//! 1 MiB, RAM runs up to 3 GiB and continues at 4 GiB, leaving 3–4 GiB for MMIO (the boot timer,
//! the IOAPIC, the LAPICs).

/// The boot GDT (also the target of the guest's first `lgdt`).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: interrupts stay off until the kernel installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// The PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The stack the 64-bit Linux entry starts on.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit Linux entry: PML4, one PDPT, one PD of 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Where conventional memory ends: the EBDA and the BIOS area above it are not RAM.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables, RSDP first, in the BIOS area where Linux scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_LIMIT: u64 = 0xf0000;
/// The MP floating pointer and table, in the BIOS area the MP spec says to search.
pub const MPTABLE_START: u64 = 0xf0000;
/// The end of the BIOS area the MP table must fit in.
pub const MPTABLE_LIMIT: u64 = 0x10_0000;
/// Kernels load here.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; RAM past this point continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// The first address past 32 bits, where RAM resumes.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// The boot-timer device, first page of the MMIO hole.
pub const BOOT_TIMER_START: u64 = MMIO_HOLE_START;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// The virtio-mmio devices, one 4 KiB region each, from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// The IOAPIC pin of the first virtio device; the next ones follow (4 is COM1's, 0–3 legacy).
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// The in-kernel IOAPIC and the LAPIC base, as the MP table reports them.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS on Intel hosts; placed in the hole, out of RAM's way.
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// The RAM ranges of a guest with `size` bytes of memory, as (start, length).
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

/// The end of the RAM below 4 GiB, where the initramfs goes.
pub fn low_memory_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of memory the OS must leave alone.
pub const E820_RESERVED: u32 = 2;

/// The guest's memory map, as (start, length, e820 type), in address order: conventional memory,
/// the BIOS area holding the ACPI and MP tables (reserved), then the RAM from 1 MiB on, with the
/// MMIO hole cut out.
pub fn e820_map(size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (ACPI_START, HIGH_MEMORY_START - ACPI_START, E820_RESERVED),
    ];
    let low_end = low_memory_end(size);
    if low_end > HIGH_MEMORY_START {
        map.push((HIGH_MEMORY_START, low_end - HIGH_MEMORY_START, E820_RAM));
    }
    if size > MMIO_HOLE_START {
        map.push((MMIO_HOLE_END, size - MMIO_HOLE_START, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_above_three_gib_continues_at_four() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(
            e820_map(4 << 30),
            vec![
                (0, EBDA_START, E820_RAM),
                (ACPI_START, HIGH_MEMORY_START - ACPI_START, E820_RESERVED),
                (HIGH_MEMORY_START, (3 << 30) - HIGH_MEMORY_START, E820_RAM),
                (4 << 30, 1 << 30, E820_RAM)
            ]
        );
        assert_eq!(e820_map(3 << 30).len(), 3);
    }
}
