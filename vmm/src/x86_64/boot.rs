//! The structures a kernel reads at entry: the command line, and either the Linux zero page
//! (`boot_params`, with an e820 map and the initramfs location) or the PVH `hvm_start_info`
//! (with its memory map and module list).

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{e820_map, CMDLINE_START, PVH_INFO_START, ZERO_PAGE_START};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot write the {what} into guest memory")]
    Memory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the initramfs was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initramfs {
    pub address: u64,
    pub size: u64,
}

fn memory_error(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::Memory { what, source }
}

/// Writes the NUL-terminated command line at `CMDLINE_START`.
pub fn write_cmdline(memory: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(memory_error("command line"))
}

/// Fills and writes the zero page for the Linux 64-bit boot protocol. `header` is the bzImage's
/// own setup header, or `None` for an ELF vmlinux.
pub fn write_zero_page(
    memory: &GuestMemoryMmap,
    memory_size: u64,
    header: Option<setup_header>,
    cmdline_length: usize,
    initramfs: Option<Initramfs>,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    if let Some(header) = header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_length as u32 + 1;
    if let Some(initramfs) = initramfs {
        params.hdr.ramdisk_image = initramfs.address as u32;
        params.hdr.ramdisk_size = initramfs.size as u32;
    }
    let map = e820_map(memory_size);
    for (slot, (address, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = *address;
        slot.size = *size;
        slot.r#type = *kind;
    }
    params.e820_entries = map.len() as u8;
    memory
        .write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(memory_error("zero page"))
}

/// Fills and writes `hvm_start_info`, its memory map and, with an initramfs, one module.
pub fn write_pvh_start_info(
    memory: &GuestMemoryMmap,
    memory_size: u64,
    initramfs: Option<Initramfs>,
    rsdp: u64,
) -> Result<(), BootError> {
    let map = e820_map(memory_size);
    let memmap_start = PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    let modlist_start = memmap_start + map.len() as u64 * entry_size;

    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap_start,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    for (index, (address, size, kind)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *address,
            size: *size,
            type_: *kind,
            reserved: 0,
        };
        memory
            .write_obj(
                entry,
                GuestAddress(memmap_start + index as u64 * entry_size),
            )
            .map_err(memory_error("PVH memory map"))?;
    }
    if let Some(initramfs) = initramfs {
        let module = hvm_modlist_entry {
            paddr: initramfs.address,
            size: initramfs.size,
            ..Default::default()
        };
        memory
            .write_obj(module, GuestAddress(modlist_start))
            .map_err(memory_error("PVH module list"))?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modlist_start;
    }
    memory
        .write_obj(start_info, GuestAddress(PVH_INFO_START))
        .map_err(memory_error("PVH start info"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::layout::{HIGH_MEMORY_START, MMIO_HOLE_END};

    fn guest_memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn zero_page_carries_the_memory_map_and_initramfs() {
        let memory = guest_memory(64 << 20);
        let initramfs = Initramfs {
            address: 0x300_0000,
            size: 0x1000,
        };
        write_zero_page(&memory, 4 << 30, None, 12, Some(initramfs), 0xe0000).unwrap();
        assert_eq!(
            {
                memory
                    .read_obj::<boot_params>(GuestAddress(ZERO_PAGE_START))
                    .unwrap()
                    .acpi_rsdp_addr
            },
            0xe0000
        );
        let params: boot_params = memory.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(params.e820_entries, 4);
        let reserved = params.e820_table[1];
        assert_eq!(({ reserved.addr }, { reserved.r#type }), (0xe0000, 2));
        let high = params.e820_table[3];
        assert_eq!(({ high.addr }, { high.r#type }), (MMIO_HOLE_END, 1));
        assert_eq!({ params.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
    }

    #[test]
    fn pvh_start_info_points_at_its_tables() {
        let memory = guest_memory(64 << 20);
        write_cmdline(&memory, "console=ttyS0").unwrap();
        let initramfs = Initramfs {
            address: 0x200_0000,
            size: 0x2000,
        };
        write_pvh_start_info(&memory, 64 << 20, Some(initramfs), 0xe0000).unwrap();
        let info: hvm_start_info = memory.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(
            (
                info.magic,
                info.version,
                info.memmap_entries,
                info.nr_modules
            ),
            (XEN_HVM_START_MAGIC, 1, 3, 1)
        );
        assert_eq!({ info.rsdp_paddr }, 0xe0000);
        let third: hvm_memmap_table_entry = memory
            .read_obj(GuestAddress(info.memmap_paddr + 48))
            .unwrap();
        assert_eq!(
            (third.addr, third.size, third.type_),
            (HIGH_MEMORY_START, (64 << 20) - HIGH_MEMORY_START, 1)
        );
        let module: hvm_modlist_entry = memory.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x200_0000, 0x2000));
        let mut cmdline = [0u8; 14];
        memory
            .read_slice(&mut cmdline, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0\0");
    }
}
