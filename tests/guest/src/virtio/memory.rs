//! The memory the virtio drivers share with the devices: one static, page-aligned area in the
//! image (section `.virtio_memory`, not loaded and not cleared at boot), handed out by a bump
//! allocator and never given back. Guest-physical addresses equal virtual ones, so an
//! address in this area is what goes into a descriptor.

use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

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
}

/// Bytes of the area handed out so far.
static USED: AtomicUsize = AtomicUsize::new(0);

/// The area is used up.
pub struct OutOfMemory {
    wanted: usize,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "the {AREA_SIZE}-byte virtio memory area cannot hold {} more bytes",
            self.wanted
        )
    }
}

/// A piece of the area, owned by one driver for good: only that driver and the device it
/// hands the address to ever touch it.
pub struct DmaBuffer {
    address: usize,
    length: usize,
}

impl DmaBuffer {
    /// Hands out `length` bytes, `alignment`-aligned (a power of two at most a page), zeroed.
    pub fn allocate(length: usize, alignment: usize) -> Result<Self, OutOfMemory> {
        // Taking the address of a label in this image reads nothing.
        let area = &raw const virtio_memory_area as usize;
        let out_of_memory = OutOfMemory { wanted: length };
        let used = USED.load(Ordering::Relaxed);
        let start = (area + used).next_multiple_of(alignment) - area;
        let end = start.checked_add(length).ok_or(out_of_memory)?;
        if end > AREA_SIZE {
            return Err(OutOfMemory { wanted: length });
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
        // SAFETY: the range lies inside the static area, was handed out to this buffer alone
        // (the allocator never hands a byte out twice), and lives as long as the image.
        unsafe { core::slice::from_raw_parts(self.address as *const u8, self.length) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`; `&mut self` makes this the only reference the driver has.
        unsafe { core::slice::from_raw_parts_mut(self.address as *mut u8, self.length) }
    }
}
