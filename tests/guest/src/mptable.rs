//! Finding and reading the Intel MultiProcessor Specification 1.4 tables, to learn which
//! processors exist and which one is the bootstrap processor.
//!
//! The floating pointer structure ("_MP_", 16-byte aligned) is searched where the
//! specification says: the first KiB of the EBDA, the last KiB of base memory, and the BIOS
//! ROM at 0xF0000..0x100000. Both it and the configuration table ("PCMP") must have valid
//! checksums. Only processor entries are kept; bus, IOAPIC and interrupt entries are walked
//! over by their fixed sizes.

use core::fmt;

const FLOATING_POINTER_SIGNATURE: &[u8; 4] = b"_MP_";
const CONFIGURATION_SIGNATURE: &[u8; 4] = b"PCMP";
const FLOATING_POINTER_ALIGNMENT: usize = 16;
/// BIOS data area words: the EBDA segment, and base memory size in KiB.
const EBDA_SEGMENT_ADDRESS: usize = 0x40e;
const BASE_MEMORY_KIB_ADDRESS: usize = 0x413;
/// Where base memory ends when the BIOS data area does not say (639 KiB).
const DEFAULT_BASE_MEMORY_END: usize = 0xa0000;
const BIOS_ROM: (usize, usize) = (0xf0000, 0x100000);
/// The configuration table header is 44 bytes; entries follow it.
const CONFIGURATION_HEADER_SIZE: usize = 44;

const ENTRY_PROCESSOR: u8 = 0;
const PROCESSOR_ENTRY_SIZE: usize = 20;
/// Bus, IOAPIC, I/O interrupt and local interrupt entries are all 8 bytes.
const OTHER_ENTRY_SIZE: usize = 8;
const PROCESSOR_ENABLED: u8 = 1 << 0;
const PROCESSOR_BOOTSTRAP: u8 = 1 << 1;

/// xAPIC ids are 8 bits wide, so no table can list more processors than this.
pub const MAX_PROCESSORS: usize = 256;

/// One processor entry.
#[derive(Clone, Copy, Default)]
pub struct Processor {
    pub apic_id: u8,
    pub enabled: bool,
    pub bootstrap: bool,
}

/// The processors the MP table lists, in table order.
pub struct MpTable {
    processors: [Processor; MAX_PROCESSORS],
    processor_count: usize,
}

impl MpTable {
    pub fn processors(&self) -> &[Processor] {
        &self.processors[..self.processor_count]
    }

    /// The APIC id of the entry flagged as the bootstrap processor.
    pub fn bootstrap_apic_id(&self) -> Option<u8> {
        self.processors()
            .iter()
            .find(|processor| processor.bootstrap)
            .map(|processor| processor.apic_id)
    }
}

/// Why no usable MP table was found.
pub enum MpTableError {
    NotFound,
    DefaultConfiguration(u8),
    BadConfigurationAddress(u32),
    BadConfigurationSignature(u32),
    BadConfigurationChecksum(u32),
    UnknownEntryType { entry_type: u8, offset: usize },
    TooManyProcessors,
}

impl fmt::Display for MpTableError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MpTableError::NotFound => write!(
                formatter,
                "no floating pointer \"_MP_\" with a valid checksum in the EBDA, \
                 the last KiB of base memory or 0xf0000..0x100000"
            ),
            MpTableError::DefaultConfiguration(number) => write!(
                formatter,
                "the floating pointer asks for default configuration {number}, which this guest does not support"
            ),
            MpTableError::BadConfigurationAddress(address) => {
                write!(formatter, "configuration table address {address:#x} is not usable")
            }
            MpTableError::BadConfigurationSignature(address) => {
                write!(formatter, "no \"PCMP\" signature at {address:#x}")
            }
            MpTableError::BadConfigurationChecksum(address) => {
                write!(formatter, "bad checksum in the configuration table at {address:#x}")
            }
            MpTableError::UnknownEntryType { entry_type, offset } => write!(
                formatter,
                "unknown entry type {entry_type} at offset {offset} of the configuration table"
            ),
            MpTableError::TooManyProcessors => {
                write!(formatter, "more than {MAX_PROCESSORS} processor entries")
            }
        }
    }
}

/// Borrows `length` bytes of low physical memory.
fn low_memory(address: usize, length: usize) -> &'static [u8] {
    assert!(address != 0 && address + length <= 1 << 32);
    // SAFETY: the range is non-null and inside the identity-mapped first 4 GiB (asserted), the
    // guest never writes the firmware areas searched here, and bytes are valid with any content.
    unsafe { core::slice::from_raw_parts(address as *const u8, length) }
}

fn checksum_is_valid(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, &byte| sum.wrapping_add(byte)) == 0
}

fn read_u16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes([
        bytes[offset],
        bytes[offset + 1],
        bytes[offset + 2],
        bytes[offset + 3],
    ])
}

/// The first valid floating pointer structure in `start..end`. The scan is a plain walk over
/// 16-byte chunks: where the hypervisor emulates each guest instruction, scanning the BIOS
/// ROM area costs milliseconds per extra instruction in the loop.
fn search_floating_pointer(start: usize, end: usize) -> Option<&'static [u8]> {
    let start = start.next_multiple_of(FLOATING_POINTER_ALIGNMENT);
    low_memory(start, end.saturating_sub(start))
        .chunks_exact(FLOATING_POINTER_ALIGNMENT)
        .filter(|candidate| candidate.starts_with(FLOATING_POINTER_SIGNATURE))
        .find_map(|candidate| {
            // The length field counts 16-byte paragraphs; version 1.4 structures have one.
            let length = (usize::from(candidate[8]) * 16).max(16);
            let whole = low_memory(candidate.as_ptr() as usize, length);
            checksum_is_valid(whole).then_some(whole)
        })
}

/// Searches the three places the specification names, in its order.
fn find_floating_pointer() -> Option<&'static [u8]> {
    let ebda = usize::from(read_u16(low_memory(EBDA_SEGMENT_ADDRESS, 2), 0)) << 4;
    let base_memory_kib = usize::from(read_u16(low_memory(BASE_MEMORY_KIB_ADDRESS, 2), 0));
    let base_memory_end = match base_memory_kib * 1024 {
        end if (0x80000..=DEFAULT_BASE_MEMORY_END).contains(&end) => end,
        _ => DEFAULT_BASE_MEMORY_END,
    };
    let ebda_search = (ebda != 0 && ebda < BIOS_ROM.0)
        .then(|| search_floating_pointer(ebda, ebda + 1024))
        .flatten();
    ebda_search
        .or_else(|| search_floating_pointer(base_memory_end - 1024, base_memory_end))
        .or_else(|| search_floating_pointer(BIOS_ROM.0, BIOS_ROM.1))
}

/// Finds, checks and reads the MP table.
pub fn find() -> Result<MpTable, MpTableError> {
    let floating_pointer = find_floating_pointer().ok_or(MpTableError::NotFound)?;
    let default_configuration = floating_pointer[11];
    if default_configuration != 0 {
        return Err(MpTableError::DefaultConfiguration(default_configuration));
    }
    let configuration_address = read_u32(floating_pointer, 4);
    if configuration_address == 0 || u64::from(configuration_address) + 0x1_0000 > 1 << 32 {
        return Err(MpTableError::BadConfigurationAddress(configuration_address));
    }
    let header = low_memory(configuration_address as usize, CONFIGURATION_HEADER_SIZE);
    if &header[0..4] != CONFIGURATION_SIGNATURE {
        return Err(MpTableError::BadConfigurationSignature(
            configuration_address,
        ));
    }
    let base_table_length = usize::from(read_u16(header, 4));
    if base_table_length < CONFIGURATION_HEADER_SIZE {
        return Err(MpTableError::BadConfigurationChecksum(
            configuration_address,
        ));
    }
    let table = low_memory(configuration_address as usize, base_table_length);
    if !checksum_is_valid(table) {
        return Err(MpTableError::BadConfigurationChecksum(
            configuration_address,
        ));
    }
    let entry_count = read_u16(header, 34);

    let mut result = MpTable {
        processors: [Processor::default(); MAX_PROCESSORS],
        processor_count: 0,
    };
    let mut offset = CONFIGURATION_HEADER_SIZE;
    for _ in 0..entry_count {
        let Some(&entry_type) = table.get(offset) else {
            break;
        };
        let entry_size = match entry_type {
            ENTRY_PROCESSOR => PROCESSOR_ENTRY_SIZE,
            1..=4 => OTHER_ENTRY_SIZE,
            _ => return Err(MpTableError::UnknownEntryType { entry_type, offset }),
        };
        let Some(entry) = table.get(offset..offset + entry_size) else {
            break;
        };
        if entry_type == ENTRY_PROCESSOR {
            let slot = result
                .processors
                .get_mut(result.processor_count)
                .ok_or(MpTableError::TooManyProcessors)?;
            *slot = Processor {
                apic_id: entry[1],
                enabled: entry[3] & PROCESSOR_ENABLED != 0,
                bootstrap: entry[3] & PROCESSOR_BOOTSTRAP != 0,
            };
            result.processor_count += 1;
        }
        offset += entry_size;
    }
    Ok(result)
}
