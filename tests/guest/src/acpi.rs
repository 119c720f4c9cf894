//! Finding and reading the ACPI tables: how many processors and which IOAPIC the MADT lists,
//! where the FADT puts the sleep control register, and the soft-off sleep type that the DSDT's
//! `_S5_` names, so that the guest can power off the way an ACPI operating system does.
//!
//! The RSDP's address comes from the boot information (PVH `rsdp_paddr`, or the zero page's
//! `acpi_rsdp_addr`). When that is 0, the RSDP is searched where the specification says for a
//! machine without UEFI, on 16-byte boundaries of the BIOS area 0xE0000..0x100000; the other
//! place it names, the first KiB of the EBDA, is left out (cove has no EBDA). The RSDP and
//! every table read must have valid checksums. A revision 2 RSDP leads to the XSDT (64-bit entries), an older one to the RSDT
//! (32-bit entries). No AML is executed: only the few bytes of the `_S5_` package are read.

use crate::boot_information::MAPPED_LIMIT;
use crate::cpu;
use core::fmt;

const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const RSDP_SEARCH: (u64, u64) = (0xe0000, 0x10_0000);
const RSDP_ALIGNMENT: usize = 16;
/// The ACPI 1.0 RSDP is 20 bytes; revision 2 extends it to 36, with the XSDT's address.
const RSDP_V1_SIZE: usize = 20;
const RSDP_V2_SIZE: usize = 36;
const RSDP_REVISION: usize = 15;
const RSDP_RSDT_ADDRESS: usize = 16;
const RSDP_XSDT_ADDRESS: usize = 24;

/// Every system description table starts with this header: signature, length, revision,
/// checksum, OEM fields.
const HEADER_SIZE: usize = 36;
/// A cap on table lengths, far above anything real, so that a corrupt length cannot make the
/// guest checksum gigabytes.
const MAX_TABLE_SIZE: usize = 1 << 20;

const FADT_DSDT: usize = 40;
const FADT_X_DSDT: usize = 140;
/// The sleep control register, a Generic Address Structure: address space id, bit width,
/// bit offset, access size, then the 64-bit address.
const FADT_SLEEP_CONTROL: usize = 244;
const GAS_ADDRESS: usize = 4;
const GAS_SIZE: usize = 12;
const ADDRESS_SPACE_SYSTEM_IO: u8 = 1;

/// Interrupt controller structures follow the MADT's local APIC address and flags.
const MADT_STRUCTURES: usize = 44;
const MADT_PROCESSOR_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const LOCAL_APIC_ENABLED: u64 = 1 << 0;

const AML_NAME_OP: u8 = 0x08;
const AML_ROOT_PREFIX: u8 = b'\\';
const AML_PACKAGE_OP: u8 = 0x12;
const AML_BYTE_PREFIX: u8 = 0x0a;
const SOFT_OFF_NAME: &[u8; 4] = b"_S5_";
/// SLP_TYP is three bits of the sleep control register, above two reserved ones.
const MAX_SLEEP_TYPE: u8 = 7;
const SLEEP_TYPE_SHIFT: u32 = 2;
/// SLP_EN: "enter the sleep state in SLP_TYP now".
const SLEEP_ENABLE: u8 = 1 << 5;

/// The first IOAPIC the MADT lists.
pub struct IoApic {
    pub id: u8,
    pub address: u32,
}

/// What the guest uses from the ACPI tables.
pub struct Acpi {
    /// Processor Local APIC structures with the enabled flag.
    pub enabled_processors: u64,
    pub ioapic: IoApic,
    pub sleep_control_port: u16,
    fadt: &'static [u8],
}

/// Why the ACPI tables cannot be used.
pub enum AcpiError {
    NoRsdp,
    OutOfRange {
        what: &'static str,
        address: u64,
    },
    BadSignature {
        what: &'static str,
        address: u64,
    },
    BadLength {
        what: &'static str,
        length: usize,
    },
    BadChecksum {
        what: &'static str,
        address: u64,
    },
    NoTable {
        signature: &'static str,
        root: &'static str,
    },
    BadMadtStructure {
        offset: usize,
    },
    NoIoApic,
    NoSleepControl,
    SleepControlNotIo {
        address_space: u8,
    },
    BadSleepControlPort(u64),
    NoDsdt,
    NoSoftOff,
    SoftOffCutShort,
    BadSleepType(u8),
    StillRunning {
        port: u16,
        value: u8,
    },
}

impl fmt::Display for AcpiError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::NoRsdp => write!(
                formatter,
                "the boot information has no RSDP address, and 0xe0000..0x100000 has no \
                 \"RSD PTR \" with a valid checksum"
            ),
            AcpiError::OutOfRange { what, address } => {
                write!(formatter, "{what} at {address:#x} is not in the first 4 GiB")
            }
            AcpiError::BadSignature { what, address } => {
                write!(formatter, "no {what} signature at {address:#x}")
            }
            AcpiError::BadLength { what, length } => {
                write!(formatter, "{what} claims to be {length} bytes long")
            }
            AcpiError::BadChecksum { what, address } => {
                write!(formatter, "bad checksum in {what} at {address:#x}")
            }
            AcpiError::NoTable { signature, root } => {
                write!(formatter, "the {root} lists no {signature} table")
            }
            AcpiError::BadMadtStructure { offset } => write!(
                formatter,
                "the MADT structure at offset {offset} runs past the table or is empty"
            ),
            AcpiError::NoIoApic => write!(formatter, "the MADT lists no IOAPIC"),
            AcpiError::NoSleepControl => {
                write!(formatter, "the FADT has no sleep control register")
            }
            AcpiError::SleepControlNotIo { address_space } => write!(
                formatter,
                "the FADT's sleep control register is in address space {address_space}, \
                 not system I/O (1)"
            ),
            AcpiError::BadSleepControlPort(address) => write!(
                formatter,
                "the FADT's sleep control register is at {address:#x}, which is not an I/O port"
            ),
            AcpiError::NoDsdt => write!(formatter, "the FADT names no DSDT"),
            AcpiError::NoSoftOff => write!(formatter, "the DSDT has no _S5_ package"),
            AcpiError::SoftOffCutShort => {
                write!(formatter, "the DSDT's _S5_ package is cut short or empty")
            }
            AcpiError::BadSleepType(byte) => write!(
                formatter,
                "the DSDT's _S5_ package starts with {byte:#04x}, which this guest does not \
                 read as a sleep type (0 to 7)"
            ),
            AcpiError::StillRunning { port, value } => write!(
                formatter,
                "the machine still runs after writing {value:#x} to the sleep control port {port:#x}"
            ),
        }
    }
}

/// Borrows `length` bytes of guest-physical memory.
fn physical(what: &'static str, address: u64, length: usize) -> Result<&'static [u8], AcpiError> {
    if address == 0 || address.saturating_add(length as u64) > MAPPED_LIMIT {
        return Err(AcpiError::OutOfRange { what, address });
    }
    // SAFETY: the range is non-null and inside the identity-mapped first 4 GiB (checked above),
    // nothing in the guest writes the firmware tables read here, and bytes are valid with any
    // content.
    Ok(unsafe { core::slice::from_raw_parts(address as *const u8, length) })
}

/// True when the bytes sum to 0 modulo 256. They are added eight at a time, in four 16-bit
/// lanes that each keep only their low byte between words (what they drop is a multiple of
/// 256): where the hypervisor emulates every instruction, a loop over single bytes costs
/// about 3 us a byte, a millisecond for the tables cove-vmm writes.
fn checksum_is_valid(bytes: &[u8]) -> bool {
    const LOW_BYTES: u64 = 0x00ff_00ff_00ff_00ff;
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    let lanes = words.fold(0, |lanes, word| {
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        (lanes & LOW_BYTES) + (word & LOW_BYTES) + (word >> 8 & LOW_BYTES)
    });
    // The multiplication adds the four lanes into the top 16 bits.
    let words_sum = ((lanes & LOW_BYTES).wrapping_mul(0x0001_0001_0001_0001) >> 48) as u8;
    tail.iter()
        .fold(words_sum, |sum, &byte| sum.wrapping_add(byte))
        == 0
}

/// The little-endian integer of `SIZE` (at most 8) bytes at `offset`; 0 where `bytes` is too
/// short.
fn field<const SIZE: usize>(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0; 8];
    if let Some(field) = bytes.get(offset..offset + SIZE) {
        word[..SIZE].copy_from_slice(field);
    }
    u64::from_le_bytes(word)
}

/// The RSDP at `address`, or found by searching when `address` is 0: 20 bytes, or 36 for
/// revision 2 and later.
fn find_rsdp(address: u64) -> Result<&'static [u8], AcpiError> {
    let address = match address {
        0 => search_rsdp().ok_or(AcpiError::NoRsdp)?,
        address => address,
    };
    let rsdp = physical("the RSDP", address, RSDP_V1_SIZE)?;
    if !rsdp.starts_with(RSDP_SIGNATURE) {
        return Err(AcpiError::BadSignature {
            what: "\"RSD PTR \"",
            address,
        });
    }
    if !checksum_is_valid(rsdp) {
        return Err(AcpiError::BadChecksum {
            what: "the RSDP",
            address,
        });
    }
    if rsdp[RSDP_REVISION] < 2 {
        return Ok(rsdp);
    }
    let rsdp = physical("the RSDP", address, RSDP_V2_SIZE)?;
    if !checksum_is_valid(rsdp) {
        return Err(AcpiError::BadChecksum {
            what: "the RSDP's extended part",
            address,
        });
    }
    Ok(rsdp)
}

/// The first 16-byte boundary in the BIOS area with an RSDP signature and a valid ACPI 1.0
/// checksum. The signature is compared as one 64-bit word: the hypervisor may emulate every
/// instruction of this loop, 8192 times.
fn search_rsdp() -> Option<u64> {
    let signature = u64::from_le_bytes(*RSDP_SIGNATURE);
    (RSDP_SEARCH.0..RSDP_SEARCH.1)
        .step_by(RSDP_ALIGNMENT)
        .find(|&address| {
            physical("the RSDP", address, RSDP_V1_SIZE).is_ok_and(|candidate| {
                field::<8>(candidate, 0) == signature && checksum_is_valid(candidate)
            })
        })
}

/// The table at `address`, which must carry `signature`, as long as its header says and with
/// a valid checksum.
fn read_table(signature: &'static str, address: u64) -> Result<&'static [u8], AcpiError> {
    let header = physical(signature, address, HEADER_SIZE)?;
    if header[..4] != *signature.as_bytes() {
        return Err(AcpiError::BadSignature {
            what: signature,
            address,
        });
    }
    let length = field::<4>(header, 4) as usize;
    if !(HEADER_SIZE..=MAX_TABLE_SIZE).contains(&length) {
        return Err(AcpiError::BadLength {
            what: signature,
            length,
        });
    }
    let table = physical(signature, address, length)?;
    if !checksum_is_valid(table) {
        return Err(AcpiError::BadChecksum {
            what: signature,
            address,
        });
    }
    Ok(table)
}

/// The table with `signature` that the XSDT or RSDT lists. Only the signatures of the other
/// entries are read.
fn find_table(
    root: &[u8],
    root_signature: &'static str,
    entry_size: usize,
    signature: &'static str,
) -> Result<&'static [u8], AcpiError> {
    let address = root[HEADER_SIZE..]
        .chunks_exact(entry_size)
        .map(|entry| match entry_size {
            8 => field::<8>(entry, 0),
            _ => field::<4>(entry, 0),
        })
        .find(|&address| {
            physical(signature, address, 4).is_ok_and(|found| found == signature.as_bytes())
        })
        .ok_or(AcpiError::NoTable {
            signature,
            root: root_signature,
        })?;
    read_table(signature, address)
}

/// Counts the enabled local APICs and finds the first IOAPIC.
fn read_madt(madt: &[u8]) -> Result<(u64, IoApic), AcpiError> {
    let mut enabled_processors = 0;
    let mut ioapic = None;
    let mut offset = MADT_STRUCTURES;
    while let Some(&[structure_type, length]) = madt.get(offset..offset + 2) {
        let structure = madt
            .get(offset..offset + usize::from(length))
            .filter(|structure| structure.len() >= 2)
            .ok_or(AcpiError::BadMadtStructure { offset })?;
        match structure_type {
            MADT_PROCESSOR_LOCAL_APIC if field::<4>(structure, 4) & LOCAL_APIC_ENABLED != 0 => {
                enabled_processors += 1;
            }
            MADT_IO_APIC if structure.len() >= 8 && ioapic.is_none() => {
                ioapic = Some(IoApic {
                    id: structure[2],
                    address: field::<4>(structure, 4) as u32,
                });
            }
            _ => {}
        }
        offset += structure.len();
    }
    Ok((enabled_processors, ioapic.ok_or(AcpiError::NoIoApic)?))
}

/// The I/O port of the FADT's sleep control register.
fn sleep_control_port(fadt: &[u8]) -> Result<u16, AcpiError> {
    let register = fadt
        .get(FADT_SLEEP_CONTROL..FADT_SLEEP_CONTROL + GAS_SIZE)
        .ok_or(AcpiError::NoSleepControl)?;
    let address = field::<8>(register, GAS_ADDRESS);
    if address == 0 {
        return Err(AcpiError::NoSleepControl);
    }
    if register[0] != ADDRESS_SPACE_SYSTEM_IO {
        return Err(AcpiError::SleepControlNotIo {
            address_space: register[0],
        });
    }
    u16::try_from(address).map_err(|_| AcpiError::BadSleepControlPort(address))
}

/// The SLP_TYP value of the first element of the DSDT's `Name (_S5_, Package () {...})`: the
/// AML bytes NameOp, the name (optionally from the root), PackageOp, PkgLength, NumElements.
/// The element may be a ByteConst (0x0A and the value), Zero (0x00), One (0x01) or, as some
/// firmware writes it, a bare small value.
fn soft_off_sleep_type(dsdt: &[u8]) -> Result<u8, AcpiError> {
    let aml = &dsdt[HEADER_SIZE..];
    let package = (0..aml.len())
        .find(|&at| {
            aml[at..].starts_with(SOFT_OFF_NAME)
                && aml.get(at + SOFT_OFF_NAME.len()) == Some(&AML_PACKAGE_OP)
                && matches!(
                    aml[..at],
                    [.., AML_NAME_OP] | [.., AML_NAME_OP, AML_ROOT_PREFIX]
                )
        })
        .map(|at| &aml[at + SOFT_OFF_NAME.len() + 1..])
        .ok_or(AcpiError::NoSoftOff)?;
    // The top two bits of PkgLength's lead byte count the bytes that follow it.
    let &lead_byte = package.first().ok_or(AcpiError::SoftOffCutShort)?;
    let element_count_offset = 1 + usize::from(lead_byte >> 6);
    let elements = match package.get(element_count_offset..) {
        Some([count, elements @ ..]) if *count > 0 => elements,
        _ => return Err(AcpiError::SoftOffCutShort),
    };
    let sleep_type = match *elements {
        [AML_BYTE_PREFIX, value, ..] => value,
        [AML_BYTE_PREFIX] | [] => return Err(AcpiError::SoftOffCutShort),
        [value, ..] => value,
    };
    if sleep_type > MAX_SLEEP_TYPE {
        return Err(AcpiError::BadSleepType(sleep_type));
    }
    Ok(sleep_type)
}

impl Acpi {
    /// Finds and checks the tables, starting from the RSDP at `rsdp_address` (0: search).
    pub fn find(rsdp_address: u64) -> Result<Self, AcpiError> {
        let rsdp = find_rsdp(rsdp_address)?;
        let (root_signature, root_address, entry_size) = if rsdp[RSDP_REVISION] >= 2 {
            ("XSDT", field::<8>(rsdp, RSDP_XSDT_ADDRESS), 8)
        } else {
            ("RSDT", field::<4>(rsdp, RSDP_RSDT_ADDRESS), 4)
        };
        let root = read_table(root_signature, root_address)?;
        let fadt = find_table(root, root_signature, entry_size, "FACP")?;
        let madt = find_table(root, root_signature, entry_size, "APIC")?;
        let (enabled_processors, ioapic) = read_madt(madt)?;
        Ok(Acpi {
            enabled_processors,
            ioapic,
            sleep_control_port: sleep_control_port(fadt)?,
            fadt,
        })
    }

    /// Powers the machine off: writes the soft-off sleep type from the DSDT's `_S5_` with
    /// SLP_EN to the sleep control register. Returns, with the reason, only if it could not.
    pub fn power_off(&self) -> AcpiError {
        let dsdt_address = match field::<8>(self.fadt, FADT_X_DSDT) {
            0 => field::<4>(self.fadt, FADT_DSDT),
            address => address,
        };
        if dsdt_address == 0 {
            return AcpiError::NoDsdt;
        }
        let sleep_type = match read_table("DSDT", dsdt_address).and_then(soft_off_sleep_type) {
            Ok(sleep_type) => sleep_type,
            Err(error) => return error,
        };
        let value = sleep_type << SLEEP_TYPE_SHIFT | SLEEP_ENABLE;
        cpu::write_port(self.sleep_control_port, value);
        AcpiError::StillRunning {
            port: self.sleep_control_port,
            value,
        }
    }
}
