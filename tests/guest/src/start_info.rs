//! Reading the PVH `struct hvm_start_info` that the VMM passes in `ebx`.
//!
//! Layouts follow Xen's `public/arch-x86/hvm/start_info.h`. All addresses in it are guest
//! physical addresses, which the boot page tables map one to one, so they are read in place.
//! Every address and count from the VMM is checked against [`MAPPED_LIMIT`] and a sanity cap
//! before it is turned into a pointer.

use core::fmt;
use core::marker::PhantomData;

const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Version 1 added `memmap_paddr` and `memmap_entries`.
const FIRST_VERSION_WITH_MEMORY_MAP: u32 = 1;
/// The boot structures must lie in the first 4 GiB, which the boot page tables always map.
const MAPPED_LIMIT: u64 = 1 << 32;
/// Caps on counts taken from the VMM, far above anything real, so a corrupt count cannot
/// make the guest walk gigabytes of memory.
const MAX_MEMORY_MAP_ENTRIES: u32 = 1024;
const MAX_MODULES: u32 = 64;
const MAX_COMMAND_LINE_LENGTH: usize = 64 * 1024;

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
pub struct MemoryMapEntry {
    pub address: u64,
    pub size: u64,
    /// E820 type: 1 is RAM, 2 reserved, 3 ACPI reclaimable, ...
    pub entry_type: u32,
    reserved: u32,
}

/// E820 type of usable RAM.
pub const MEMORY_TYPE_RAM: u32 = 1;

/// `struct hvm_modlist_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Module {
    pub address: u64,
    pub size: u64,
    pub command_line_address: u64,
    reserved: u64,
}

/// What is wrong with the start_info the VMM passed.
pub enum StartInfoError {
    OutOfRange { what: &'static str, address: u64 },
    BadMagic(u32),
}

impl fmt::Display for StartInfoError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartInfoError::OutOfRange { what, address } => {
                write!(
                    formatter,
                    "{what} at {address:#x} is not in the first 4 GiB"
                )
            }
            StartInfoError::BadMagic(magic) => write!(
                formatter,
                "start_info magic is {magic:#x}, expected {START_INFO_MAGIC:#x}"
            ),
        }
    }
}

/// A validated start_info.
pub struct StartInfo {
    raw: RawStartInfo,
}

/// A table of `T` in guest memory, read entry by entry. The VMM owes no alignment, so each
/// entry is read unaligned.
pub struct Table<T> {
    address: u64,
    count: u64,
    next: u64,
    _entry: PhantomData<T>,
}

impl<T: Copy> Table<T> {
    /// Checks that `count` (capped at `cap`) entries at `address` lie in mapped memory.
    fn new(what: &'static str, address: u64, count: u32, cap: u32) -> Result<Self, StartInfoError> {
        let count = u64::from(count.min(cap));
        let size = count * core::mem::size_of::<T>() as u64;
        if count != 0 && (address == 0 || address.saturating_add(size) > MAPPED_LIMIT) {
            return Err(StartInfoError::OutOfRange { what, address });
        }
        Ok(Table {
            address,
            count,
            next: 0,
            _entry: PhantomData,
        })
    }
}

impl<T: Copy> Iterator for Table<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        if self.next == self.count {
            return None;
        }
        let address = self.address + self.next * core::mem::size_of::<T>() as u64;
        self.next += 1;
        // SAFETY: `new` checked that the whole table is non-null and inside the
        // identity-mapped first 4 GiB; T is made of integers, so any content is a valid value,
        // and the read tolerates any alignment.
        Some(unsafe { core::ptr::read_unaligned(address as *const T) })
    }
}

impl StartInfo {
    /// Reads and checks the start_info at `address`.
    pub fn read(address: u64) -> Result<Self, StartInfoError> {
        let size = core::mem::size_of::<RawStartInfo>() as u64;
        if address == 0 || address.saturating_add(size) > MAPPED_LIMIT {
            return Err(StartInfoError::OutOfRange {
                what: "start_info",
                address,
            });
        }
        // SAFETY: the structure lies in the identity-mapped first 4 GiB (checked above) and is
        // made of integers, so any content is a valid value; the read is unaligned-tolerant.
        // A version 0 structure is 8 bytes shorter; those bytes are read but never used.
        let raw = unsafe { core::ptr::read_unaligned(address as *const RawStartInfo) };
        if raw.magic != START_INFO_MAGIC {
            return Err(StartInfoError::BadMagic(raw.magic));
        }
        Ok(StartInfo { raw })
    }

    pub fn version(&self) -> u32 {
        self.raw.version
    }

    /// The command line, without its terminating NUL; empty when there is none.
    pub fn command_line(&self) -> Result<&'static [u8], StartInfoError> {
        let address = self.raw.command_line_address;
        if address == 0 {
            return Ok(&[]);
        }
        if address >= MAPPED_LIMIT {
            return Err(StartInfoError::OutOfRange {
                what: "the command line",
                address,
            });
        }
        let readable = (MAPPED_LIMIT - address).min(MAX_COMMAND_LINE_LENGTH as u64) as usize;
        // SAFETY: the range starts at a non-null address and ends inside the identity-mapped
        // first 4 GiB; bytes are valid with any content and nothing in the guest writes there.
        let bytes = unsafe { core::slice::from_raw_parts(address as *const u8, readable) };
        let length = bytes.iter().position(|&byte| byte == 0).unwrap_or(readable);
        Ok(&bytes[..length])
    }

    /// The memory map; empty for a version 0 start_info, which has none.
    pub fn memory_map(&self) -> Result<Table<MemoryMapEntry>, StartInfoError> {
        let count = if self.raw.version < FIRST_VERSION_WITH_MEMORY_MAP {
            0
        } else {
            self.raw.memory_map_entry_count
        };
        Table::new(
            "the memory map",
            self.raw.memory_map_address,
            count,
            MAX_MEMORY_MAP_ENTRIES,
        )
    }

    /// The boot modules (an initramfs, for instance).
    pub fn modules(&self) -> Result<Table<Module>, StartInfoError> {
        Table::new(
            "the module list",
            self.raw.module_list_address,
            self.raw.module_count,
            MAX_MODULES,
        )
    }
}
