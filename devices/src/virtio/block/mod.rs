//! virtio-blk (virtio 1.2, section 5.2) over a raw image file.
//!
//! Requests: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES; capacity in 512-byte sectors.
//! A read-only disk offers VIRTIO_BLK_F_RO, answers OUT with IOERR and does not offer DISCARD or
//! WRITE_ZEROES (those answer UNSUPP). One queue; requests are served one after another by
//! [`VirtioDevice::process_queue`], which the VMM's event loop calls on notification, never on
//! a vCPU thread.
//!
//! A bad request fails alone: IOERR (or UNSUPP) in its status byte when the chain has a writable
//! status byte inside guest memory, otherwise the chain goes back with a used length of 0. Only
//! a used ring the device cannot write stops the device (until the driver resets it).

mod image;
pub mod request;

use std::fs::OpenOptions;
use std::mem::offset_of;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config as Layout, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use self::image::DiskImage;
use self::request::{
    locate_status, parse_request, RequestLimits, Segment, MAX_ZERO_RANGES, MAX_ZERO_SECTORS,
    SECTOR_SIZE,
};
use super::{check_queues, serve_queue, Activation, InterruptLine, VirtioDevice, VirtioError};

/// The size of the device's single queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// The configuration space up to `write_zeroes_may_unmap` and its padding (secure erase and
/// zoned fields are not offered).
const CONFIG_SIZE: usize = offset_of!(Layout, max_secure_erase_sectors);
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// How a block device is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// A raw image file; its size, rounded down to 512 bytes, is the disk's capacity.
    pub path: PathBuf,
    pub read_only: bool,
    /// What GET_ID returns (Linux shows it as the disk's serial); at most 20 bytes.
    pub id: String,
    /// Open the image with O_DIRECT, bypassing the host's page cache.
    pub direct: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path} (read-only: {read_only}, direct: {direct}); check that it exists and is accessible, and that its file system supports direct I/O if direct=on")]
    Open {
        path: PathBuf,
        read_only: bool,
        direct: bool,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk id {id:?} is {len} bytes long; a virtio-blk id holds at most {ID_BYTES} bytes")]
    IdTooLong { id: String, len: usize },
}

struct Active {
    memory: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn InterruptLine>,
    limits: RequestLimits,
}

/// Counters of what the device has served, for the VMM's API.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockCounters {
    pub requests: u64,
    /// Requests answered with IOERR or UNSUPP, or returned without a status.
    pub failed_requests: u64,
}

/// A virtio block device.
pub struct Block {
    image: DiskImage,
    id: [u8; ID_BYTES],
    features: u64,
    config: [u8; CONFIG_SIZE],
    active: Option<Active>,
    /// The chain being served and its data buffers; kept to avoid allocating per request.
    chain: Vec<Segment>,
    data: Vec<Segment>,
    counters: BlockCounters,
}

impl Block {
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        if config.id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong {
                id: config.id.clone(),
                len: config.id.len(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .custom_flags(if config.direct { libc::O_DIRECT } else { 0 })
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                read_only: config.read_only,
                direct: config.direct,
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| BlockError::Size {
                path: config.path.clone(),
                source,
            })?
            .len();
        let image = if config.direct {
            DiskImage::new_direct(file, len, config.read_only)
        } else {
            DiskImage::new(file, len, config.read_only)
        };
        let mut id = [0u8; ID_BYTES];
        id[..config.id.len()].copy_from_slice(config.id.as_bytes());

        let mut features =
            (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH);
        if config.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        Ok(Self {
            config: config_space(image.capacity_sectors()),
            image,
            id,
            features,
            active: None,
            chain: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            data: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            counters: BlockCounters::default(),
        })
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.image.capacity_sectors()
    }

    pub fn counters(&self) -> BlockCounters {
        self.counters
    }
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap`, little-endian; the offsets come
/// from the bindings' layout of the struct.
fn config_space(capacity_sectors: u64) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(
        offset_of!(Layout, capacity),
        &capacity_sectors.to_le_bytes(),
    );
    // The queue size less the header and status descriptors.
    put(
        offset_of!(Layout, seg_max),
        &u32::from(QUEUE_SIZE - 2).to_le_bytes(),
    );
    put(
        offset_of!(Layout, blk_size),
        &(SECTOR_SIZE as u32).to_le_bytes(),
    );
    put(offset_of!(Layout, num_queues), &1u16.to_le_bytes());
    put(
        offset_of!(Layout, max_discard_sectors),
        &MAX_ZERO_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(Layout, max_discard_seg),
        &MAX_ZERO_RANGES.to_le_bytes(),
    );
    put(
        offset_of!(Layout, discard_sector_alignment),
        &1u32.to_le_bytes(),
    );
    put(
        offset_of!(Layout, max_write_zeroes_sectors),
        &MAX_ZERO_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(Layout, max_write_zeroes_seg),
        &MAX_ZERO_RANGES.to_le_bytes(),
    );
    put(offset_of!(Layout, write_zeroes_may_unmap), &[1]);
    config
}

/// How one chain ended.
enum Outcome {
    /// Status OK; the used length counts the bytes written plus the status byte.
    Completed { used_len: u32 },
    /// Status IOERR or UNSUPP written.
    Failed,
    /// No status byte could be written: the chain goes back with a used length of 0.
    Unanswerable,
}

/// Serves one chain.
fn serve(
    memory: &GuestMemoryMmap,
    image: &mut DiskImage,
    id: &[u8],
    limits: &RequestLimits,
    chain: &[Segment],
    data: &mut Vec<Segment>,
) -> Outcome {
    let Some(status_address) = locate_status(memory, chain) else {
        return Outcome::Unanswerable;
    };
    let result = parse_request(memory, chain, limits, data)
        .and_then(|request| image.execute(memory, &request, data, id));
    let status = match &result {
        Ok(_) => VIRTIO_BLK_S_OK as u8,
        Err(error) => error.status(),
    };
    if memory.write_obj(status, status_address).is_err() {
        return Outcome::Unanswerable;
    }
    match result {
        // The chain is shorter than 4 GiB (virtio-queue ends longer ones), so this fits.
        Ok(written) => Outcome::Completed {
            used_len: u32::try_from(written + 1).unwrap_or(u32::MAX),
        },
        Err(_) => Outcome::Failed,
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (position, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(position as u64)
                .and_then(|at| self.config.get(usize::try_from(at).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Every field cove offers is read-only (there is no writeback toggle without CONFIG_WCE).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        check_queues(&activation.queues, &activation.memory, QUEUE_SIZES.len())?;
        let Activation {
            memory,
            mut queues,
            interrupt,
            acked_features,
        } = activation;
        let acked = |bit: u32| acked_features & (1 << bit) != 0;
        let limits = RequestLimits {
            capacity_sectors: self.image.capacity_sectors(),
            read_only: self.image.read_only(),
            discard: acked(VIRTIO_BLK_F_DISCARD),
            write_zeroes: acked(VIRTIO_BLK_F_WRITE_ZEROES),
        };
        self.active = Some(Active {
            memory,
            queue: queues.remove(0),
            interrupt,
            limits,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, queue_index: usize) -> Result<(), VirtioError> {
        if queue_index != 0 {
            return Err(VirtioError::NoSuchQueue { queue_index });
        }
        let Self {
            image,
            id,
            active,
            chain,
            data,
            counters,
            ..
        } = self;
        let Some(active) = active else {
            return Ok(());
        };
        let Active {
            memory,
            queue,
            interrupt,
            limits,
        } = active;
        serve_queue(
            queue,
            queue_index,
            memory,
            interrupt.as_ref(),
            |descriptors| {
                chain.clear();
                let mut cut_short = false;
                for descriptor in descriptors {
                    // virtio-queue ends a chain early on a bad link, a loop or an unreadable
                    // descriptor; the last descriptor then still says "next".
                    cut_short = descriptor.has_next();
                    chain.push(Segment {
                        address: descriptor.addr(),
                        len: descriptor.len(),
                        device_writable: descriptor.is_write_only(),
                    });
                }
                counters.requests += 1;
                let outcome = if cut_short {
                    Outcome::Unanswerable
                } else {
                    serve(memory, image, id, limits, chain, data)
                };
                match outcome {
                    Outcome::Completed { used_len } => used_len,
                    Outcome::Failed => {
                        counters.failed_requests += 1;
                        1
                    }
                    Outcome::Unanswerable => {
                        counters.failed_requests += 1;
                        0
                    }
                }
            },
        )
    }
}

#[cfg(test)]
mod tests;
