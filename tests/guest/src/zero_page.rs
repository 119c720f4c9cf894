//! Reading the Linux zero page (`struct boot_params`) that the VMM passes in `rsi` to a kernel
//! entered through Linux's 64-bit boot protocol: the `linux64` build's source of boot
//! information (see `boot_information.rs`).
//!
//! Offsets follow Linux's `arch/x86/include/uapi/asm/bootparam.h`; the setup header starts at
//! 0x1f1, so its fields are unaligned. Only the fields the guest reports are read, each in
//! place: copying the whole page would cost thousands of emulated instructions.

use crate::boot_information::{
    self, check_range, BootInformationError, MemoryMapEntry, Module, Table,
};

const ZERO_PAGE_SIZE: u64 = 4096;

/// `acpi_rsdp_addr`: where the loader found (or put) the ACPI RSDP, 0 for "search for it".
const ACPI_RSDP_ADDR_OFFSET: u64 = 0x070;
/// `ext_ramdisk_image`, `ext_ramdisk_size` and `ext_cmd_line_ptr`: the upper 32 bits of the
/// setup header's addresses, for a loader that places things above 4 GiB.
const EXT_RAMDISK_IMAGE_OFFSET: u64 = 0x0c0;
const EXT_RAMDISK_SIZE_OFFSET: u64 = 0x0c4;
const EXT_CMD_LINE_PTR_OFFSET: u64 = 0x0c8;
const E820_ENTRIES_OFFSET: u64 = 0x1e8;
/// `hdr.header`, which a loader sets to "HdrS" as the mark of a filled-in setup header.
const HEADER_MAGIC_OFFSET: u64 = 0x202;
const HEADER_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
const RAMDISK_IMAGE_OFFSET: u64 = 0x218;
const RAMDISK_SIZE_OFFSET: u64 = 0x21c;
const CMD_LINE_PTR_OFFSET: u64 = 0x228;
/// `hdr.cmdline_size`: the command line's length including its NUL, as the loader wrote it.
const CMDLINE_SIZE_OFFSET: u64 = 0x238;
const E820_TABLE_OFFSET: u64 = 0x2d0;
/// `E820_MAX_ENTRIES_ZEROPAGE`: the table's capacity, however large `e820_entries` claims to be.
const E820_TABLE_CAPACITY: u32 = 128;

/// `struct boot_e820_entry`: packed, 20 bytes.
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct RawE820Entry {
    address: u64,
    size: u64,
    entry_type: u32,
}

/// A zero page whose setup header has been checked.
pub struct ZeroPage {
    address: u64,
}

impl ZeroPage {
    /// Checks the zero page at `address`.
    pub fn read(address: u64) -> Result<Self, BootInformationError> {
        check_range("the zero page", address, ZERO_PAGE_SIZE)?;
        let zero_page = ZeroPage { address };
        let magic = zero_page.field::<u32>(HEADER_MAGIC_OFFSET);
        if magic != HEADER_MAGIC {
            return Err(BootInformationError::BadMagic {
                what: "the zero page's setup header",
                found: magic,
                expected: HEADER_MAGIC,
            });
        }
        Ok(zero_page)
    }

    /// Reads the integer field at `offset` of the zero page.
    fn field<T: Copy>(&self, offset: u64) -> T {
        assert!(offset + core::mem::size_of::<T>() as u64 <= ZERO_PAGE_SIZE);
        // SAFETY: `read` checked that the whole page lies in the identity-mapped first 4 GiB,
        // and the field lies inside the page (asserted). Callers read only integers, valid with
        // any content, and the read tolerates the setup header's odd alignment.
        unsafe { core::ptr::read_unaligned((self.address + offset) as *const T) }
    }

    /// A 64-bit address made of a setup header field and its `ext_` upper half.
    fn address_field(&self, offset: u64, upper_half_offset: u64) -> u64 {
        u64::from(self.field::<u32>(offset)) | u64::from(self.field::<u32>(upper_half_offset)) << 32
    }

    /// The command line, without its terminating NUL and at most `cmdline_size` bytes; empty
    /// when there is none.
    pub fn command_line(&self) -> Result<&'static [u8], BootInformationError> {
        boot_information::command_line(
            self.address_field(CMD_LINE_PTR_OFFSET, EXT_CMD_LINE_PTR_OFFSET),
            u64::from(self.field::<u32>(CMDLINE_SIZE_OFFSET)),
        )
    }

    /// The ACPI RSDP's address; 0 when the loader gives none.
    pub fn rsdp_address(&self) -> u64 {
        self.field::<u64>(ACPI_RSDP_ADDR_OFFSET)
    }

    /// The e820 memory map.
    pub fn memory_map(&self) -> Result<impl Iterator<Item = MemoryMapEntry>, BootInformationError> {
        let table = Table::<RawE820Entry>::new(
            "the e820 table",
            self.address + E820_TABLE_OFFSET,
            u32::from(self.field::<u8>(E820_ENTRIES_OFFSET)),
            E820_TABLE_CAPACITY,
        )?;
        Ok(table.map(|entry| MemoryMapEntry {
            address: entry.address,
            size: entry.size,
            entry_type: entry.entry_type,
        }))
    }

    /// The initramfs as the one module, when the loader gave one.
    pub fn modules(&self) -> Result<impl Iterator<Item = Module>, BootInformationError> {
        let size = self.address_field(RAMDISK_SIZE_OFFSET, EXT_RAMDISK_SIZE_OFFSET);
        let ramdisk = (size != 0).then(|| Module {
            address: self.address_field(RAMDISK_IMAGE_OFFSET, EXT_RAMDISK_IMAGE_OFFSET),
            size,
        });
        Ok(ramdisk.into_iter())
    }
}
