//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns how many
//! vCPUs it has, where the IOAPIC is and how ISA interrupts reach it.
//!
//! Layout, built byte by byte: the 16-byte floating pointer, then the configuration table header
//! and its entries (one processor per vCPU, one ISA bus, the IOAPIC, the I/O and local interrupt
//! assignments). Each part carries a checksum that makes its bytes sum to zero.

use super::layout::{IOAPIC_START, LAPIC_START, MPTABLE_LIMIT, MPTABLE_START};

/// The IOAPIC takes the APIC ID after the last vCPU, and MP table IDs are one byte.
pub const MAX_VCPUS: u32 = 254;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Interrupt lines of the in-kernel IOAPIC.
const IOAPIC_PINS: u8 = 24;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    #[error("the MP table describes at most {MAX_VCPUS} vCPUs, {0} were asked for")]
    TooManyVcpus(u32),
}

/// Builds the floating pointer and the table for `vcpus` vCPUs, to be written at
/// `MPTABLE_START`.
pub fn build(vcpus: u32) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::TooManyVcpus(vcpus));
    }
    let ioapic_id = vcpus as u8;
    let table_start = MPTABLE_START as u32 + FLOATING_POINTER_SIZE as u32;

    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for apic_id in 0..vcpus as u8 {
        let flags = CPU_ENABLED | if apic_id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, apic_id, APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC), then 8 reserved bytes.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entry_count += 1;
    for pin in 0..IOAPIC_PINS {
        let kind = if pin == 0 {
            INTERRUPT_EXTINT
        } else {
            INTERRUPT_INT
        };
        // Type, kind, flags (conforming polarity and trigger), source bus and IRQ, IOAPIC, pin.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, 0, pin, ioapic_id, pin]);
        entry_count += 1;
    }
    // LINT0 of every LAPIC takes the legacy PIC (ExtINT), LINT1 the NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INTERRUPT_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INTERRUPT_NMI, 0, 0, 0, 0, 0xff, 1]);
    entry_count += 2;

    let table_length = (HEADER_SIZE + entries.len()) as u16;
    let mut table = Vec::with_capacity(table_length as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_length.to_le_bytes());
    table.push(4); // Specification revision 1.4.
    table.push(0); // Checksum, filled below.
    table.extend_from_slice(b"COVE    ");
    table.extend_from_slice(b"cove-vmm    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // No OEM table.
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // No extended entries.
    table.extend_from_slice(&[0, 0]);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_POINTER_SIZE);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_start.to_le_bytes());
    floating.push(1); // Length in 16-byte units.
    floating.push(4); // Specification revision 1.4.
    floating.push(0); // Checksum, filled below.
    floating.extend_from_slice(&[0; 5]); // Feature bytes: 0 means "a table follows".
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    debug_assert!(MPTABLE_START + floating.len() as u64 <= MPTABLE_LIMIT);
    Ok(floating)
}

/// The byte that makes `bytes` sum to zero modulo 256.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte))
    }

    #[test]
    fn table_lists_every_vcpu_with_valid_checksums() {
        let bytes = build(4).unwrap();
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0);
        let table_address = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_address, MPTABLE_START + 16);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let length = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(length, table.len());
        assert_eq!(sum(table), 0);
        let processors: Vec<(u8, u8)> = table[HEADER_SIZE..]
            .chunks(20)
            .take_while(|entry| entry[0] == ENTRY_PROCESSOR)
            .map(|entry| (entry[1], entry[3]))
            .collect();
        assert_eq!(processors, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn the_largest_table_fits_the_bios_area() {
        let bytes = build(MAX_VCPUS).unwrap();
        assert!(MPTABLE_START + bytes.len() as u64 <= MPTABLE_LIMIT);
        assert_eq!(
            build(MAX_VCPUS + 1),
            Err(MptableError::TooManyVcpus(MAX_VCPUS + 1))
        );
    }
}
