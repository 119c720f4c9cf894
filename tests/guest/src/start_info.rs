//! Reading the PVH `struct hvm_start_info` that the VMM passes in `ebx`: the default build's
//! source of boot information (see `boot_information.rs`).
//!
//! Layouts follow Xen's `public/arch-x86/hvm/start_info.h`. All addresses in it are guest
//! physical addresses, which the boot page tables map one to one, so they are read in place.

use crate::boot_information::{
    self, check_range, BootInformationError, MemoryMapEntry, Module, Table,
};

const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Version 1 added `memmap_paddr` and `memmap_entries`.
const FIRST_VERSION_WITH_MEMORY_MAP: u32 = 1;
/// Caps on counts taken from the VMM, far above anything real, so a corrupt count cannot
/// make the guest walk gigabytes of memory.
const MAX_MEMORY_MAP_ENTRIES: u32 = 1024;
const MAX_MODULES: u32 = 64;

/// `struct hvm_start_info`, version 1.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    module_count: u32,
    module_list_address: u64,
    command_line_address: u64,
    rsdp_address: u64,
    memory_map_address: u64,
    memory_map_entry_count: u32,
    reserved: u32,
}

/// `struct hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawMemoryMapEntry {
    address: u64,
    size: u64,
    entry_type: u32,
    reserved: u32,
}

/// `struct hvm_modlist_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawModule {
    address: u64,
    size: u64,
    command_line_address: u64,
    reserved: u64,
}

/// A validated start_info.
pub struct StartInfo {
    raw: RawStartInfo,
}

impl StartInfo {
    /// Reads and checks the start_info at `address`.
    pub fn read(address: u64) -> Result<Self, BootInformationError> {
        check_range(
            "start_info",
            address,
            core::mem::size_of::<RawStartInfo>() as u64,
        )?;
        // SAFETY: the structure lies in the identity-mapped first 4 GiB (checked above) and is
        // made of integers, so any content is a valid value; the read is unaligned-tolerant.
        // A version 0 structure is 8 bytes shorter; those bytes are read but never used.
        let raw = unsafe { core::ptr::read_unaligned(address as *const RawStartInfo) };
        if raw.magic != START_INFO_MAGIC {
            return Err(BootInformationError::BadMagic {
                what: "start_info",
                found: raw.magic,
                expected: START_INFO_MAGIC,
            });
        }
        Ok(StartInfo { raw })
    }

    /// The command line, without its terminating NUL; empty when there is none.
    pub fn command_line(&self) -> Result<&'static [u8], BootInformationError> {
        boot_information::command_line(self.raw.command_line_address, u64::MAX)
    }

    /// The ACPI RSDP's address; 0 when the VMM gives none.
    pub fn rsdp_address(&self) -> u64 {
        self.raw.rsdp_address
    }

    /// The memory map; a version 0 start_info has none.
    pub fn memory_map(&self) -> Result<impl Iterator<Item = MemoryMapEntry>, BootInformationError> {
        if self.raw.version < FIRST_VERSION_WITH_MEMORY_MAP {
            return Err(BootInformationError::NoMemoryMap {
                version: self.raw.version,
            });
        }
        let table = Table::<RawMemoryMapEntry>::new(
            "the memory map",
            self.raw.memory_map_address,
            self.raw.memory_map_entry_count,
            MAX_MEMORY_MAP_ENTRIES,
        )?;
        Ok(table.map(|entry| MemoryMapEntry {
            address: entry.address,
            size: entry.size,
            entry_type: entry.entry_type,
        }))
    }

    /// The boot modules.
    pub fn modules(&self) -> Result<impl Iterator<Item = Module>, BootInformationError> {
        let table = Table::<RawModule>::new(
            "the module list",
            self.raw.module_list_address,
            self.raw.module_count,
            MAX_MODULES,
        )?;
        Ok(table.map(|module| Module {
            address: module.address,
            size: module.size,
        }))
    }
}
