//! A split virtqueue (virtio 1.2, section 2.7) on the driver's side: the descriptor table, the
//! available ring the driver fills and the used ring the device fills, in one zeroed page of
//! the virtio memory. No indirect descriptors and no event index: the driver asks for an
//! interrupt on every used buffer, which is what the tests want to see.
//!
//! The rings live in memory the device writes concurrently, so every access to them is
//! volatile, and the index updates are ordered with compiler fences: x86 keeps stores in
//! program order and loads in program order, so no fence instruction is needed.

use super::memory::{DmaBuffer, OutOfMemory};
use super::mmio::Transport;
use core::sync::atomic::{compiler_fence, Ordering};

/// The largest queue the driver sets up; all three parts then fit in one page.
pub const MAX_QUEUE_SIZE: u16 = 64;
const DESCRIPTOR_SIZE: usize = 16;
const AVAILABLE_RING_OFFSET: usize = 1024;
const USED_RING_OFFSET: usize = 2048;
const USED_ELEMENT_SIZE: usize = 8;

const DESCRIPTOR_F_NEXT: u16 = 1;
const DESCRIPTOR_F_WRITE: u16 = 2;

/// One buffer of a chain: where it is, how long, and which way the data goes.
#[derive(Clone, Copy)]
pub struct Segment {
    pub address: u64,
    pub length: u32,
    /// The device writes this buffer (the driver reads it afterwards).
    pub device_writes: bool,
}

impl Segment {
    pub fn readable(address: u64, length: u32) -> Self {
        Segment {
            address,
            length,
            device_writes: false,
        }
    }

    pub fn writable(address: u64, length: u32) -> Self {
        Segment {
            address,
            length,
            device_writes: true,
        }
    }
}

/// A chain the device has returned: its head descriptor and the bytes it wrote.
#[derive(Clone, Copy)]
pub struct Used {
    pub head: u16,
    pub length: u32,
}

pub struct Queue {
    index: u16,
    size: u16,
    rings: DmaBuffer,
    /// Free descriptor indices, a stack.
    free: [u16; MAX_QUEUE_SIZE as usize],
    free_count: usize,
    /// The available index the driver publishes next.
    next_available: u16,
    /// The used index up to which the driver has taken chains back.
    last_used: u16,
}

impl Queue {
    /// A queue `index` with room for at most `maximum` descriptors (the device's limit); the
    /// size is the largest power of two within both limits.
    pub fn new(index: u16, maximum: u16) -> Result<Self, OutOfMemory> {
        let limit = maximum.min(MAX_QUEUE_SIZE);
        let size = 1u16 << (15 - limit.leading_zeros());
        let mut free = [0; MAX_QUEUE_SIZE as usize];
        for (slot, descriptor) in free.iter_mut().zip(0..size) {
            // Popped from the end: descriptor 0 goes out first.
            *slot = size - 1 - descriptor;
        }
        Ok(Queue {
            index,
            size,
            rings: DmaBuffer::allocate_pages(4096)?,
            free,
            free_count: usize::from(size),
            next_available: 0,
            last_used: 0,
        })
    }

    /// A queue as large as the device allows (up to [`MAX_QUEUE_SIZE`]), handed to the device.
    pub fn set_up(transport: &Transport, index: u16) -> Result<Self, super::DriverError> {
        let maximum = transport.queue_size_max(index)?;
        let queue = Queue::new(index, maximum)?;
        transport.set_up_queue(&queue);
        Ok(queue)
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn descriptor_table_address(&self) -> u64 {
        self.rings.address()
    }

    pub fn available_ring_address(&self) -> u64 {
        self.rings.address_at(AVAILABLE_RING_OFFSET)
    }

    pub fn used_ring_address(&self) -> u64 {
        self.rings.address_at(USED_RING_OFFSET)
    }

    /// Descriptors not in any chain the device holds.
    pub fn free_descriptors(&self) -> usize {
        self.free_count
    }

    fn write_u16(&self, offset: usize, value: u16) {
        debug_assert!(offset + 2 <= 4096);
        // SAFETY: the offset lies inside this queue's page of the virtio memory (the layout
        // constants and `size` <= 64 keep every field inside it) and is 2-byte aligned.
        unsafe { core::ptr::write_volatile(self.rings.pointer().add(offset).cast::<u16>(), value) }
    }

    fn read_u16(&self, offset: usize) -> u16 {
        // SAFETY: as for `write_u16`.
        unsafe { core::ptr::read_volatile(self.rings.pointer().add(offset).cast::<u16>()) }
    }

    fn read_u32(&self, offset: usize) -> u32 {
        // SAFETY: as for `write_u16`, 4-byte aligned.
        unsafe { core::ptr::read_volatile(self.rings.pointer().add(offset).cast::<u32>()) }
    }

    fn write_descriptor(&self, descriptor: u16, segment: Segment, flags: u16, next: u16) {
        let offset = usize::from(descriptor) * DESCRIPTOR_SIZE;
        let pointer = self.rings.pointer();
        // SAFETY: descriptor < size <= 64, so the 16 bytes lie in the table at the start of
        // this queue's page; the table is 16-byte aligned.
        unsafe {
            core::ptr::write_volatile(pointer.add(offset).cast::<u64>(), segment.address);
            core::ptr::write_volatile(pointer.add(offset + 8).cast::<u32>(), segment.length);
            core::ptr::write_volatile(pointer.add(offset + 12).cast::<u16>(), flags);
            core::ptr::write_volatile(pointer.add(offset + 14).cast::<u16>(), next);
        }
    }

    fn descriptor_flags_and_next(&self, descriptor: u16) -> (u16, u16) {
        let offset = usize::from(descriptor) * DESCRIPTOR_SIZE;
        (self.read_u16(offset + 12), self.read_u16(offset + 14))
    }

    /// Makes `segments` available as one chain; returns its head, or `None` when too few
    /// descriptors are free. The device learns of it at the next [`Transport::notify`].
    pub fn push(&mut self, segments: &[Segment]) -> Option<u16> {
        if segments.is_empty() || segments.len() > self.free_count {
            return None;
        }
        let start = self.free_count - segments.len();
        // Pops in chain order: the chain's descriptors are free[free_count-1], free[-2], ...
        let descriptor_at = |position: usize| self.free[self.free_count - 1 - position];
        for (position, segment) in segments.iter().enumerate() {
            let last = position + 1 == segments.len();
            let mut flags = if segment.device_writes {
                DESCRIPTOR_F_WRITE
            } else {
                0
            };
            let next = if last {
                0
            } else {
                flags |= DESCRIPTOR_F_NEXT;
                descriptor_at(position + 1)
            };
            self.write_descriptor(descriptor_at(position), *segment, flags, next);
        }
        let head = descriptor_at(0);
        self.free_count = start;
        let slot = usize::from(self.next_available % self.size);
        self.write_u16(AVAILABLE_RING_OFFSET + 4 + 2 * slot, head);
        // The ring entry (and the descriptors) must be visible before the index that
        // publishes them.
        compiler_fence(Ordering::Release);
        self.next_available = self.next_available.wrapping_add(1);
        self.write_u16(AVAILABLE_RING_OFFSET + 2, self.next_available);
        Some(head)
    }

    /// Whether the device has returned chains the driver has not taken back.
    pub fn has_used(&self) -> bool {
        self.read_u16(USED_RING_OFFSET + 2) != self.last_used
    }

    /// Takes back the next chain the device returned, freeing its descriptors.
    pub fn pop_used(&mut self) -> Option<Used> {
        if !self.has_used() {
            return None;
        }
        // The element must be read after the index that published it.
        compiler_fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        let element = USED_RING_OFFSET + 4 + USED_ELEMENT_SIZE * slot;
        let id = self.read_u32(element);
        let length = self.read_u32(element + 4);
        self.last_used = self.last_used.wrapping_add(1);
        let head = match u16::try_from(id) {
            Ok(head) if head < self.size => head,
            _ => panic!(
                "virtqueue {}: the device returned descriptor id {id}, beyond the queue size {}",
                self.index, self.size
            ),
        };
        let mut descriptor = head;
        for _ in 0..self.size {
            assert!(
                self.free_count < usize::from(self.size),
                "virtqueue {}: the device returned descriptor {head}, which was not in use",
                self.index
            );
            self.free[self.free_count] = descriptor;
            self.free_count += 1;
            let (flags, next) = self.descriptor_flags_and_next(descriptor);
            if flags & DESCRIPTOR_F_NEXT == 0 {
                break;
            }
            descriptor = next;
        }
        Some(Used { head, length })
    }
}
