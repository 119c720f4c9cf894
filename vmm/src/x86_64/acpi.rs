//! ACPI tables for guests that find their CPUs (and how to power off) through ACPI rather than
//! the MP table: Debian's cloud kernels, for one, are built without MP-table support.
//!
//! The tables describe a hardware-reduced ACPI machine (no PM timer, no SCI, no legacy ACPI
//! blocks), built with rust-vmm's acpi_tables crate and placed in the BIOS area where Linux also
//! scans for the RSDP: the RSDP at `ACPI_START`, then the XSDT, FADT, DSDT and MADT.
//! - FADT: hardware-reduced, with the sleep control and status registers on the ACPI power port
//!   and the i8042's reset command as the reset register;
//! - DSDT: only `_S5_`, the soft-off sleep type a guest writes to power off;
//! - MADT: one local APIC per vCPU (APIC IDs 0…N−1) and the IOAPIC (ID N) at GSI base 0.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};

use cove_devices::legacy::SOFT_OFF_SLEEP_TYPE;

use super::layout::{ACPI_LIMIT, ACPI_START, IOAPIC_START, LAPIC_START};

const OEM_ID: [u8; 6] = *b"COVE  ";
const OEM_TABLE_ID: [u8; 8] = *b"COVEVMM ";
const OEM_REVISION: u32 = 1;

/// The port of the FADT's sleep control and status registers.
pub const ACPI_POWER_PORT: u16 = 0x600;
/// The FADT's reset register: the i8042 command port and its "pulse reset line" command.
const RESET_PORT: u64 = 0x64;
const RESET_VALUE: u8 = 0xfe;
/// FADT IA-PC boot architecture flags (ACPI 6.5, table 5.11).
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("the ACPI tables for {vcpus} vCPUs take {size} bytes, more than the {limit} bytes reserved for them")]
    TooLarge { vcpus: u32, size: usize, limit: u64 },
}

/// The tables, laid out from `ACPI_START`; `bytes[0]` is the RSDP.
pub struct AcpiTables {
    pub bytes: Vec<u8>,
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Appends `table` 16-byte aligned and returns its guest-physical address.
fn place(image: &mut Vec<u8>, table: &[u8]) -> u64 {
    image.resize(image.len().next_multiple_of(16), 0);
    let address = ACPI_START + image.len() as u64;
    image.extend_from_slice(table);
    address
}

/// Builds the tables for `vcpus` vCPUs.
pub fn build(vcpus: u32) -> Result<AcpiTables, AcpiError> {
    let mut image = vec![0u8; std::mem::size_of::<Rsdp>()];

    let soft_off = aml::Package::new(vec![&SOFT_OFF_SLEEP_TYPE, &0u8]);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&aml_bytes(&aml::Name::new("_S5_".into(), &soft_off)));
    let dsdt_address = place(&mut image, dsdt.as_slice());

    let power_register = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_POWER_PORT.into(),
    );
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_address)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // No CMOS RTC and no VGA: Linux would otherwise probe them at ports nothing answers.
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        RESET_PORT,
    );
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = power_register;
    fadt.sleep_status_reg = power_register;
    let fadt_address = place(&mut image, &aml_bytes(&fadt.finalize()));

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for apic_id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            apic_id as u8,
            apic_id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(vcpus as u8, IOAPIC_START as u32, 0));
    let madt_address = place(&mut image, &aml_bytes(&madt));

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_address);
    xsdt.add_entry(madt_address);
    let xsdt_address = place(&mut image, &aml_bytes(&xsdt));

    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_address));
    image[..rsdp.len()].copy_from_slice(&rsdp);

    if ACPI_START + image.len() as u64 > ACPI_LIMIT {
        return Err(AcpiError::TooLarge {
            vcpus,
            size: image.len(),
            limit: ACPI_LIMIT - ACPI_START,
        });
    }
    Ok(AcpiTables { bytes: image })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::mptable::MAX_VCPUS;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte))
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// The table at a guest-physical address, as long as its header says.
    fn table(image: &[u8], address: u64) -> &[u8] {
        let offset = (address - ACPI_START) as usize;
        let length = u32_at(image, offset + 4) as usize;
        &image[offset..offset + length]
    }

    #[test]
    fn rsdp_leads_to_a_madt_listing_every_vcpu() {
        let image = build(3).unwrap().bytes;
        assert_eq!(&image[..8], b"RSD PTR ");
        assert_eq!(sum(&image[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&image[..36]), 0, "RSDP extended checksum");
        let xsdt = table(&image, u64_at(&image, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let entries: Vec<&[u8]> = (36..xsdt.len())
            .step_by(8)
            .map(|at| table(&image, u64_at(xsdt, at)))
            .collect();
        let signatures: Vec<&[u8]> = entries.iter().map(|entry| &entry[..4]).collect();
        assert_eq!(signatures, [b"FACP", b"APIC"]);
        for entry in &entries {
            assert_eq!(
                sum(entry),
                0,
                "{:?} checksum",
                std::str::from_utf8(&entry[..4])
            );
        }
        let madt = entries[1];
        assert_eq!(u32_at(madt, 36), LAPIC_START as u32);
        // Interrupt controller structures: type, length, then the type's fields.
        let mut structures = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let length = madt[at + 1] as usize;
            structures.push(&madt[at..at + length]);
            at += length;
        }
        let apic_ids: Vec<u8> = structures
            .iter()
            .filter(|entry| entry[0] == 0)
            .map(|entry| entry[3])
            .collect();
        assert_eq!(apic_ids, [0, 1, 2]);
        let ioapic: Vec<&&[u8]> = structures.iter().filter(|entry| entry[0] == 1).collect();
        assert_eq!(ioapic.len(), 1);
        assert_eq!(
            ioapic[0][2], 3,
            "the IOAPIC takes the ID after the last vCPU"
        );
        assert_eq!(u32_at(ioapic[0], 4), IOAPIC_START as u32);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_a_dsdt_that_has_s5() {
        let image = build(1).unwrap().bytes;
        let xsdt = table(&image, u64_at(&image, 24));
        let fadt = table(&image, u64_at(xsdt, 36));
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(
            u16::from_le_bytes([fadt[109], fadt[110]]),
            0b10_0100,
            "no VGA, no CMOS RTC"
        );
        // The sleep control register (offset 244) is an 8-bit I/O register at the power port.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(fadt, 248), u64::from(ACPI_POWER_PORT));
        // The reset register (offset 116) is the i8042 command port, with its reset command.
        assert_eq!(
            (fadt[116], u64_at(fadt, 120), fadt[128]),
            (1, RESET_PORT, RESET_VALUE)
        );
        let dsdt = table(&image, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        assert!(dsdt.windows(4).any(|name| name == b"_S5_"));
    }

    #[test]
    fn the_largest_vm_fits() {
        let image = build(MAX_VCPUS).unwrap().bytes;
        assert!(ACPI_START + image.len() as u64 <= ACPI_LIMIT);
    }
}
