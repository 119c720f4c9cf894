//! What the VMM hands the guest at boot (the command line, the memory map, the modules), read in
//! place from guest-physical memory.
//!
//! The boot protocol decides which structure carries it: PVH's `hvm_start_info`
//! (`start_info.rs`, the default build) or the zero page of Linux's 64-bit boot protocol
//! (`zero_page.rs`, the `linux64` build). Both readers offer `main.rs` the same interface under
//! the name [`BootInformation`] and report in the same types; the pieces they share live here.
//! Every address and count from the VMM is checked against [`MAPPED_LIMIT`] and a sanity cap
//! before it is turned into a pointer.

use core::fmt;
use core::marker::PhantomData;

#[cfg(not(feature = "linux64"))]
pub use crate::start_info::StartInfo as BootInformation;
#[cfg(feature = "linux64")]
pub use crate::zero_page::ZeroPage as BootInformation;

/// The boot structures must lie in the first 4 GiB, which the boot page tables always map.
pub const MAPPED_LIMIT: u64 = 1 << 32;
/// A cap on the command line, far above anything real, so that a missing terminator cannot
/// make the guest walk gigabytes of memory.
const MAX_COMMAND_LINE_LENGTH: u64 = 64 * 1024;

/// E820 type of usable RAM.
pub const MEMORY_TYPE_RAM: u32 = 1;

/// One memory map entry, whichever protocol's layout it was read from.
#[derive(Clone, Copy)]
pub struct MemoryMapEntry {
    pub address: u64,
    pub size: u64,
    /// E820 type: 1 is RAM, 2 reserved, 3 ACPI reclaimable, ...
    pub entry_type: u32,
}

/// One boot module (an initramfs, for instance).
#[derive(Clone, Copy)]
pub struct Module {
    pub address: u64,
    pub size: u64,
}

/// What is wrong with the boot information the VMM passed.
pub enum BootInformationError {
    /// A structure the VMM points at does not lie wholly in the first 4 GiB.
    OutOfRange { what: &'static str, address: u64 },
    /// The structure the boot register points at lacks its protocol's magic number.
    BadMagic {
        what: &'static str,
        found: u32,
        expected: u32,
    },
    /// A PVH start_info older than version 1, which has no memory map.
    #[cfg(not(feature = "linux64"))]
    NoMemoryMap { version: u32 },
}

impl fmt::Display for BootInformationError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootInformationError::OutOfRange { what, address } => {
                write!(
                    formatter,
                    "{what} at {address:#x} is not in the first 4 GiB"
                )
            }
            BootInformationError::BadMagic {
                what,
                found,
                expected,
            } => write!(
                formatter,
                "{what} magic is {found:#x}, expected {expected:#x}"
            ),
            #[cfg(not(feature = "linux64"))]
            BootInformationError::NoMemoryMap { version } => {
                write!(formatter, "start_info version {version} has no memory map")
            }
        }
    }
}

/// Checks that `size` bytes at the non-null `address` lie in the first 4 GiB.
pub fn check_range(
    what: &'static str,
    address: u64,
    size: u64,
) -> Result<(), BootInformationError> {
    if address == 0 || address.saturating_add(size) > MAPPED_LIMIT {
        return Err(BootInformationError::OutOfRange { what, address });
    }
    Ok(())
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
    pub fn new(
        what: &'static str,
        address: u64,
        count: u32,
        cap: u32,
    ) -> Result<Self, BootInformationError> {
        let count = u64::from(count.min(cap));
        if count != 0 {
            check_range(what, address, count * core::mem::size_of::<T>() as u64)?;
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

/// The NUL-terminated command line at `address`, without its terminator, reading at most
/// `limit` bytes; empty when `address` is 0.
pub fn command_line(address: u64, limit: u64) -> Result<&'static [u8], BootInformationError> {
    if address == 0 {
        return Ok(&[]);
    }
    if address >= MAPPED_LIMIT {
        return Err(BootInformationError::OutOfRange {
            what: "the command line",
            address,
        });
    }
    let readable = (MAPPED_LIMIT - address)
        .min(limit)
        .min(MAX_COMMAND_LINE_LENGTH) as usize;
    // SAFETY: the range starts at a non-null address and ends inside the identity-mapped
    // first 4 GiB; bytes are valid with any content and nothing in the guest writes there.
    let bytes = unsafe { core::slice::from_raw_parts(address as *const u8, readable) };
    let length = bytes.iter().position(|&byte| byte == 0).unwrap_or(readable);
    Ok(&bytes[..length])
}
