//! The memory the virtio drivers share with the devices: one static, page-aligned area in the
//! image (section `.virtio_memory`, not loaded and not cleared at boot), handed out by a bump
//! allocator and never given back. Guest-physical addresses equal virtual ones, so an
//! address in this area is what goes into a descriptor.
//!
//! The benchmarks need megabytes of data buffers, more than the image should carry; they take
//! them from a [`RamArea`]: RAM from the memory map above the image, with a bump allocator of
//! its own.

use crate::boot_information::{MemoryMapEntry, MEMORY_TYPE_RAM};
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Enough for every device the tests attach at once (about 350 KiB) twice over, while the
/// image still fits the smallest VM cove-vmm makes (4 MiB).
const AREA_SIZE: usize = 1 << 20;
const PAGE_SIZE: usize = 4096;

core::arch::global_asm!(
    ".pushsection .virtio_memory, \"aw\", @nobits",
    ".balign {page_size}",
    ".global virtio_memory_area",
    "virtio_memory_area: .skip {area_size}",
    ".popsection",
    page_size = const PAGE_SIZE,
    area_size = const AREA_SIZE,
);

extern "C" {
    static virtio_memory_area: u8;
    /// The end of everything the image occupies (see `linker.ld`).
    static guest_image_end: u8;
}

/// Bytes of the area handed out so far.
static USED: AtomicUsize = AtomicUsize::new(0);

/// The area is used up.
pub struct OutOfMemory {
    wanted: usize,
    area_size: usize,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "the {}-byte virtio memory area cannot hold {} more bytes",
            self.area_size, self.wanted
        )
    }
}

/// A piece of the area (or of the [`RamArea`]), owned by one driver for good: only that driver
/// and the device it hands the address to ever touch it.
pub struct DmaBuffer {
    address: usize,
    length: usize,
}

impl DmaBuffer {
    /// Hands out `length` bytes, `alignment`-aligned (a power of two at most a page), zeroed.
    pub fn allocate(length: usize, alignment: usize) -> Result<Self, OutOfMemory> {
        // Taking the address of a label in this image reads nothing.
        let area = &raw const virtio_memory_area as usize;
        let out_of_memory = OutOfMemory {
            wanted: length,
            area_size: AREA_SIZE,
        };
        let used = USED.load(Ordering::Relaxed);
        let start = (area + used).next_multiple_of(alignment) - area;
        let end = start.checked_add(length).ok_or(out_of_memory)?;
        if end > AREA_SIZE {
            return Err(OutOfMemory {
                wanted: length,
                area_size: AREA_SIZE,
            });
        }
        // Only the bootstrap processor runs drivers, so a plain store is enough.
        USED.store(end, Ordering::Relaxed);
        let mut buffer = DmaBuffer {
            address: area + start,
            length,
        };
        buffer.bytes_mut().fill(0);
        Ok(buffer)
    }

    /// Hands out whole zeroed pages.
    pub fn allocate_pages(length: usize) -> Result<Self, OutOfMemory> {
        Self::allocate(length.next_multiple_of(PAGE_SIZE), PAGE_SIZE)
    }

    /// The length in bytes.
    pub fn length(&self) -> usize {
        self.length
    }

    /// The guest-physical address, for descriptors and queue registers.
    pub fn address(&self) -> u64 {
        self.address as u64
    }

    /// The address `offset` bytes in; panics beyond the end.
    pub fn address_at(&self, offset: usize) -> u64 {
        assert!(
            offset <= self.length,
            "offset {offset} beyond a {}-byte buffer",
            self.length
        );
        (self.address + offset) as u64
    }

    pub fn pointer(&self) -> *mut u8 {
        self.address as *mut u8
    }

    /// The contents. Only meaningful while the device is not writing them: before the buffer
    /// is made available, or after the device has returned it.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the range lies inside the static area or the one RAM area (RAM the memory
        // map gives, above the image, identity-mapped), was handed out to this buffer alone
        // (neither allocator hands a byte out twice), and stays valid as long as the guest
        // runs.
        unsafe { core::slice::from_raw_parts(self.address as *const u8, self.length) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`; `&mut self` makes this the only reference the driver has.
        unsafe { core::slice::from_raw_parts_mut(self.address as *mut u8, self.length) }
    }
}

/// RAM from the memory map for the benchmarks' buffers. It lies above the image and below the
/// 3 GiB MMIO hole, inside the boot page tables' identity mapping (cached, like the image).
pub struct RamArea {
    start: usize,
    next: usize,
    end: usize,
}

/// Set once a [`RamArea`] exists: two would hand out the same bytes.
static RAM_AREA_TAKEN: AtomicBool = AtomicBool::new(false);

/// Where the RAM area may lie: above 16 MiB (well clear of the image, its stacks and the boot
/// structures low in memory) and below the MMIO hole.
const RAM_AREA_LOWEST: u64 = 16 << 20;
const RAM_AREA_LIMIT: u64 = 0xc000_0000;

impl RamArea {
    /// Takes `length` bytes of RAM from the first memory map entry that has them above the
    /// image and 16 MiB; `None` when none has, or when the area was taken before.
    pub fn find(entries: impl Iterator<Item = MemoryMapEntry>, length: usize) -> Option<Self> {
        // Taking the address of a label in this image reads nothing.
        let image_end = &raw const guest_image_end as u64;
        let lowest = image_end
            .max(RAM_AREA_LOWEST)
            .next_multiple_of(PAGE_SIZE as u64);
        let length = (length as u64).next_multiple_of(PAGE_SIZE as u64);
        let found = entries
            .filter(|entry| entry.entry_type == MEMORY_TYPE_RAM)
            .find_map(|entry| {
                let start = entry.address.max(lowest).next_multiple_of(PAGE_SIZE as u64);
                let end = start.checked_add(length)?;
                let entry_end = entry.address.checked_add(entry.size)?;
                (end <= entry_end && end <= RAM_AREA_LIMIT).then_some((start, end))
            })?;
        if RAM_AREA_TAKEN.swap(true, Ordering::Relaxed) {
            return None;
        }
        Some(RamArea {
            start: found.0 as usize,
            next: found.0 as usize,
            end: found.1 as usize,
        })
    }

    /// Hands out whole pages, as they are: not cleared, since clearing megabytes at CPL 0
    /// takes seconds where the hypervisor emulates the guest, and the benchmarks do not care
    /// what their buffers hold.
    pub fn allocate_pages(&mut self, length: usize) -> Result<DmaBuffer, OutOfMemory> {
        let length = length.next_multiple_of(PAGE_SIZE);
        let out_of_memory = OutOfMemory {
            wanted: length,
            area_size: self.end - self.start,
        };
        let end = self.next.checked_add(length).ok_or(out_of_memory)?;
        if end > self.end {
            return Err(OutOfMemory {
                wanted: length,
                area_size: self.end - self.start,
            });
        }
        let buffer = DmaBuffer {
            address: self.next,
            length,
        };
        self.next = end;
        Ok(buffer)
    }
}
