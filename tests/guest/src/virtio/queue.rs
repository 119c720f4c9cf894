//! A split virtqueue (virtio 1.2, section 2.7) on the driver's side: the descriptor table, the
//! available ring the driver fills and the used ring the device fills, in zeroed pages of the
//! virtio memory (one page for the exercising drivers' queues of up to 64 entries). No indirect
//! descriptors and no event index: the exercising drivers ask for an interrupt on every used
//! buffer, which is what the tests want to see; the benchmarks (`bench/`) also use the flags
//! that suppress notifications and interrupts while the other side is busy, as Linux does.
//!
//! The rings live in memory the device writes concurrently, so every access to them is
//! volatile, and the index updates are ordered with compiler fences: x86 keeps stores in
//! program order and loads in program order, so no fence instruction is needed.

use super::memory::{DmaBuffer, OutOfMemory};
use super::mmio::Transport;
use core::sync::atomic::{compiler_fence, fence, Ordering};

/// The largest queue the exercising drivers set up; all three parts then fit in one page, and
/// their per-descriptor tables are this long.
pub const MAX_QUEUE_SIZE: u16 = 64;
/// The largest queue any driver sets up: the benchmarks keep as many requests in flight as a
/// device allows, up to this.
pub const LARGEST_QUEUE_SIZE: u16 = 256;
const DESCRIPTOR_SIZE: usize = 16;
/// The available ring follows the descriptor table, and the used ring starts as far after it
/// again: for `size` entries, at `16 * size` and `32 * size` bytes (1024 and 2048 for 64).
/// Both rings are shorter than the table, so the queue needs `48 * size` bytes at most.
const RING_SPACING_PER_ENTRY: usize = DESCRIPTOR_SIZE;
const USED_ELEMENT_SIZE: usize = 8;

const DESCRIPTOR_F_NEXT: u16 = 1;
const DESCRIPTOR_F_WRITE: u16 = 2;
/// In the available ring's flags: the driver does not want interrupts for now.
const AVAILABLE_F_NO_INTERRUPT: u16 = 1;
/// In the used ring's flags: the device does not want notifications for now.
const USED_F_NO_NOTIFY: u16 = 1;

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
    /// Where the available and used rings start in `rings`.
    available_ring_offset: usize,
    used_ring_offset: usize,
    /// Free descriptor indices, a stack.
    free: [u16; LARGEST_QUEUE_SIZE as usize],
    free_count: usize,
    /// The available index the driver publishes next.
    next_available: u16,
    /// The used index up to which the driver has taken chains back.
    last_used: u16,
}

impl Queue {
    /// A queue `index` with room for at most `maximum` descriptors (the device's limit) and at
    /// most `limit` (at most [`LARGEST_QUEUE_SIZE`]); the size is the largest power of two
    /// within both.
    pub fn new(index: u16, maximum: u16, limit: u16) -> Result<Self, OutOfMemory> {
        let limit = maximum.min(limit).min(LARGEST_QUEUE_SIZE);
        let size = 1u16 << (15 - limit.leading_zeros());
        let mut free = [0; LARGEST_QUEUE_SIZE as usize];
        for (slot, descriptor) in free.iter_mut().zip(0..size) {
            // Popped from the end: descriptor 0 goes out first.
            *slot = size - 1 - descriptor;
        }
        let spacing = RING_SPACING_PER_ENTRY * usize::from(size);
        Ok(Queue {
            index,
            size,
            rings: DmaBuffer::allocate_pages(3 * spacing)?,
            available_ring_offset: spacing,
            used_ring_offset: 2 * spacing,
            free,
            free_count: usize::from(size),
            next_available: 0,
            last_used: 0,
        })
    }

    /// A queue as large as the device allows up to `limit` ([`MAX_QUEUE_SIZE`] for the
    /// exercising drivers, at most [`LARGEST_QUEUE_SIZE`]), handed to the device.
    pub fn set_up(
        transport: &Transport,
        index: u16,
        limit: u16,
    ) -> Result<Self, super::DriverError> {
        let maximum = transport.queue_size_max(index)?;
        let queue = Queue::new(index, maximum, limit)?;
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
        self.rings.address_at(self.available_ring_offset)
    }

    pub fn used_ring_address(&self) -> u64 {
        self.rings.address_at(self.used_ring_offset)
    }

    /// Descriptors not in any chain the device holds.
    pub fn free_descriptors(&self) -> usize {
        self.free_count
    }

    fn write_u16(&self, offset: usize, value: u16) {
        assert!(offset + 2 <= self.rings.length());
        // SAFETY: the offset lies inside this queue's pages of the virtio memory (checked
        // above; the layout keeps every field of a queue of `size` entries inside the
        // `48 * size` bytes allocated) and is 2-byte aligned.
        unsafe { core::ptr::write_volatile(self.rings.pointer().add(offset).cast::<u16>(), value) }
    }

    fn read_u16(&self, offset: usize) -> u16 {
        assert!(offset + 2 <= self.rings.length());
        // SAFETY: as for `write_u16`.
        unsafe { core::ptr::read_volatile(self.rings.pointer().add(offset).cast::<u16>()) }
    }

    fn read_u32(&self, offset: usize) -> u32 {
        assert!(offset + 4 <= self.rings.length());
        // SAFETY: as for `write_u16`, 4-byte aligned.
        unsafe { core::ptr::read_volatile(self.rings.pointer().add(offset).cast::<u32>()) }
    }

    fn write_descriptor(&self, descriptor: u16, segment: Segment, flags: u16, next: u16) {
        let offset = usize::from(descriptor) * DESCRIPTOR_SIZE;
        let pointer = self.rings.pointer();
        // SAFETY: descriptor < size, so the 16 bytes lie in the table at the start of this
        // queue's pages; the table is 16-byte aligned.
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
        self.write_u16(self.available_ring_offset + 4 + 2 * slot, head);
        // The ring entry (and the descriptors) must be visible before the index that
        // publishes them.
        compiler_fence(Ordering::Release);
        self.next_available = self.next_available.wrapping_add(1);
        self.write_u16(self.available_ring_offset + 2, self.next_available);
        Some(head)
    }

    /// Whether the device has returned chains the driver has not taken back.
    pub fn has_used(&self) -> bool {
        self.read_u16(self.used_ring_offset + 2) != self.last_used
    }

    /// Whether the device asks to be notified of new available chains (the used ring's
    /// NO_NOTIFY flag is clear). A device that is busy with the queue sets the flag and checks
    /// the available index again before it clears it, so skipping the notification then loses
    /// nothing.
    pub fn device_wants_notification(&self) -> bool {
        // The available index just published must be visible before the flag is read: the
        // device writes the flag, then reads the index, and x86 may let a load pass an
        // earlier store, so this takes a full fence.
        fence(Ordering::SeqCst);
        self.read_u16(self.used_ring_offset) & USED_F_NO_NOTIFY == 0
    }

    /// Asks the device not to interrupt for used chains (`false`) or to interrupt again
    /// (`true`). After allowing interrupts, the driver must look at the used ring once more
    /// before it waits: a chain the device returned while they were suppressed raised none.
    pub fn set_interrupts_wanted(&self, wanted: bool) {
        let flags = if wanted { 0 } else { AVAILABLE_F_NO_INTERRUPT };
        self.write_u16(self.available_ring_offset, flags);
        // The device writes the used index, then reads this flag; the driver writes the flag,
        // then reads the used index: a full fence keeps either side from missing the other.
        fence(Ordering::SeqCst);
    }

    /// Takes back the next chain the device returned, freeing its descriptors.
    pub fn pop_used(&mut self) -> Option<Used> {
        if !self.has_used() {
            return None;
        }
        // The element must be read after the index that published it.
        compiler_fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        let element = self.used_ring_offset + 4 + USED_ELEMENT_SIZE * slot;
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
