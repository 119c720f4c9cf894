//! The block benchmarks: reads or writes of `bench-size` bytes (64 KiB sequential, 4 KiB
//! random by default), each request a chain of its 16-byte header, one data buffer and the
//! status byte, as many in flight as the queue holds (a third of its descriptors).
//!
//! Sequential requests walk the disk from sector 0 and start over when the next would run past
//! its end; random ones pick a `bench-size`-aligned offset anywhere on the disk with a fixed
//! xorshift generator, so every run asks for the same offsets. Every status byte must come
//! back OK. Write buffers hold a fixed non-zero pattern. No FLUSH is sent: what the host does
//! with written data (its page cache or the disk) is the VMM's configuration, which the host
//! reports. The end line adds nothing of its own.

use super::{describe, pump, ram_area, Start, Timing, Workload, MAX_SEGMENTS};
use crate::boot_information::MemoryMapEntry;
use crate::command_line::{BenchCase, BenchOptions};
use crate::user_mode;
use crate::virtio::memory::DmaBuffer;
use crate::virtio::queue::{Segment, LARGEST_QUEUE_SIZE};
use crate::virtio::{Device, DriverError};

const FEATURE_READ_ONLY: u64 = 1 << 5;

const REQUEST_IN: u32 = 0;
const REQUEST_OUT: u32 = 1;
const STATUS_OK: u8 = 0;
/// Written into the status byte before each request, so an unwritten status shows.
const STATUS_UNWRITTEN: u8 = 0xff;

const SECTOR_SIZE: u64 = 512;
const SEQUENTIAL_DEFAULT_SIZE: u64 = 64 * 1024;
const RANDOM_DEFAULT_SIZE: u64 = 4096;
/// The largest request the benchmark makes: one data descriptor of up to 1 MiB.
const MAX_REQUEST_SIZE: u64 = 1 << 20;
/// Descriptors per request: header, data, status.
const DESCRIPTORS_PER_REQUEST: usize = 3;
/// Each slot's header and status byte, in the slot's own 32 bytes.
const SLOT_STRIDE: usize = 32;
const STATUS_OFFSET: usize = 16;

struct BlockWorkload {
    kind: u32,
    random: bool,
    size: u64,
    sectors_per_request: u64,
    capacity_sectors: u64,
    /// Each slot's header and status byte.
    headers: DmaBuffer,
    /// Each slot's data buffer, `size` bytes apart.
    data: DmaBuffer,
    next_sector: u64,
    random_state: u64,
}

pub fn run(
    device: &mut Device,
    bench: &BenchOptions,
    memory_map: impl Iterator<Item = MemoryMapEntry>,
    timing: &Timing,
) -> Result<(), DriverError> {
    let (writes, random) = match bench.case {
        BenchCase::BlockSequentialRead => (false, false),
        BenchCase::BlockSequentialWrite => (true, false),
        BenchCase::BlockRandomRead => (false, true),
        _ => (true, true),
    };
    let offered = device.transport.negotiate(FEATURE_READ_ONLY)?;
    if writes && offered & FEATURE_READ_ONLY != 0 {
        return Err(DriverError::Unexpected {
            what: "the disk is read-only (feature RO), and the benchmark writes, features",
            value: offered,
        });
    }
    let capacity_sectors = device.transport.config_u64(0);
    let default_size = if random {
        RANDOM_DEFAULT_SIZE
    } else {
        SEQUENTIAL_DEFAULT_SIZE
    };
    let size = bench.size.unwrap_or(default_size);
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) || size > MAX_REQUEST_SIZE {
        return Err(DriverError::Unexpected {
            what: "bench-size must be a multiple of 512 bytes up to 1 MiB, not",
            value: size,
        });
    }
    let sectors_per_request = size / SECTOR_SIZE;
    if capacity_sectors < sectors_per_request {
        return Err(DriverError::Unexpected {
            what: "the disk is smaller than one request, sectors",
            value: capacity_sectors,
        });
    }

    let [mut queue] = device.start_with_limit::<1>(LARGEST_QUEUE_SIZE)?;
    let mut slots = usize::from(queue.size()) / DESCRIPTORS_PER_REQUEST;
    if let Some(depth) = bench.depth {
        slots = slots.min(depth.max(1) as usize);
    }
    let data_length = slots * size as usize;
    let mut workload = BlockWorkload {
        kind: if writes { REQUEST_OUT } else { REQUEST_IN },
        random,
        size,
        sectors_per_request,
        capacity_sectors,
        headers: DmaBuffer::allocate(slots * SLOT_STRIDE, SLOT_STRIDE)?,
        data: ram_area(memory_map, data_length)?.allocate_pages(data_length)?,
        next_sector: 0,
        random_state: 0x9e37_79b9_7f4a_7c15,
    };
    if writes {
        // Megabytes: at CPL 3, which runs natively where CPL 0 is emulated.
        user_mode::prepare();
        user_mode::run(fill_pattern, (&raw mut workload.data).cast::<u8>());
    }
    describe(&queue, slots, size);
    pump(
        device,
        &mut queue,
        &mut workload,
        slots,
        Start::Immediately,
        timing,
    )
}

/// Fills the write buffers, the `DmaBuffer` `argument` points at, with a non-zero pattern.
extern "C" fn fill_pattern(argument: *mut u8) {
    // SAFETY: `run` passes a pointer to the workload's own data buffer, live and not otherwise
    // used until `user_mode::run` returns.
    let data = unsafe { &mut *argument.cast::<DmaBuffer>() };
    for (offset, byte) in data.bytes_mut().iter_mut().enumerate() {
        *byte = (offset as u8) | 1;
    }
}

impl BlockWorkload {
    fn next_sector(&mut self) -> u64 {
        if self.random {
            // xorshift64: integer-only, and the same sequence in every run.
            let mut state = self.random_state;
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            self.random_state = state;
            (state % (self.capacity_sectors / self.sectors_per_request)) * self.sectors_per_request
        } else {
            let sector = self.next_sector;
            self.next_sector += self.sectors_per_request;
            if self.next_sector + self.sectors_per_request > self.capacity_sectors {
                self.next_sector = 0;
            }
            sector
        }
    }
}

impl Workload for BlockWorkload {
    fn request(&mut self, slot: usize, segments: &mut [Segment; MAX_SEGMENTS]) -> usize {
        let sector = self.next_sector();
        let start = slot * SLOT_STRIDE;
        let bytes = &mut self.headers.bytes_mut()[start..start + SLOT_STRIDE];
        bytes[0..4].copy_from_slice(&self.kind.to_le_bytes());
        bytes[4..8].fill(0);
        bytes[8..16].copy_from_slice(&sector.to_le_bytes());
        bytes[STATUS_OFFSET] = STATUS_UNWRITTEN;
        segments[0] = Segment::readable(self.headers.address_at(start), 16);
        segments[1] = Segment {
            address: self.data.address_at(slot * self.size as usize),
            length: self.size as u32,
            device_writes: self.kind == REQUEST_IN,
        };
        segments[2] = Segment::writable(self.headers.address_at(start + STATUS_OFFSET), 1);
        DESCRIPTORS_PER_REQUEST
    }

    fn completed(&mut self, slot: usize, _length: u32) -> Result<u64, DriverError> {
        let status = self.headers.bytes()[slot * SLOT_STRIDE + STATUS_OFFSET];
        if status != STATUS_OK {
            return Err(DriverError::Unexpected {
                what: "a request failed with status",
                value: u64::from(status),
            });
        }
        Ok(self.size)
    }
}
