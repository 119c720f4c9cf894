//! virtio-blk (virtio 1.2, section 5.2) over a raw image file.
//!
//! Requests: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES; capacity in 512-byte sectors.
//! A read-only disk offers VIRTIO_BLK_F_RO, answers OUT with IOERR and does not offer DISCARD or
//! WRITE_ZEROES (those answer UNSUPP). One queue. [`VirtioDevice::process_queue`] (the VMM's
//! event loop, on notification) checks each chain and hands it to the worker threads of
//! [`Block::start_workers`], up to `QUEUE_SIZE` in flight; they post completions to an eventfd,
//! the device's `backend_fd`, and [`VirtioDevice::process_backend`] puts them on the used ring.
//! A device without workers serves each request inside `process_queue`, one after another.
//!
//! A bad request fails alone: IOERR (or UNSUPP) in its status byte when the chain has a writable
//! status byte inside guest memory, otherwise the chain goes back with a used length of 0. Only
//! a used ring the device cannot write stops the device (until the driver resets it).

mod image;
pub mod request;
mod worker;

use std::fs::OpenOptions;
use std::mem::offset_of;
use std::num::Wrapping;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config as Layout, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use self::image::{DiskImage, Scratch};
use self::request::{
    locate_status, parse_request, Request, RequestError, RequestLimits, Segment, MAX_ZERO_RANGES,
    MAX_ZERO_SECTORS, SECTOR_SIZE,
};
pub use self::worker::ThreadStartHook;
use self::worker::{Completion, Job, Shared, Workers, WORKER_COUNT};
use super::{check_queues, Activation, InterruptCause, InterruptLine, VirtioDevice, VirtioError};

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
    #[error("cannot create the block device's completion event")]
    CompletionEvent(#[source] std::io::Error),
    #[error("cannot start a block I/O worker thread")]
    SpawnWorker(#[source] std::io::Error),
    #[error("a block I/O worker thread could not prepare itself")]
    StartWorker(#[source] Box<dyn std::error::Error + Send + Sync>),
}

struct Active {
    memory: Arc<GuestMemoryMmap>,
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
    /// O_DIRECT requests whose guest buffers were not aligned, moved through a bounce buffer.
    pub bounced_requests: u64,
}

/// A virtio block device.
pub struct Block {
    image: Arc<DiskImage>,
    id: [u8; ID_BYTES],
    features: u64,
    config: [u8; CONFIG_SIZE],
    active: Option<Active>,
    /// The chain being parsed; kept to avoid allocating per request.
    chain: Vec<Segment>,
    /// Data-buffer lists of finished requests, to be used again.
    spare: Vec<Vec<Segment>>,
    /// What the workers and the device share: jobs, completions and the completion eventfd.
    shared: Arc<Shared>,
    /// None until [`Block::start_workers`]: requests then run inside `process_queue`.
    workers: Option<Workers>,
    /// Requests handed to the workers and not yet on the used ring.
    in_flight: usize,
    /// `process_queue` stopped taking chains because `QUEUE_SIZE` requests were in flight.
    throttled: bool,
    completions: Vec<Completion>,
    /// For requests the device runs itself (without workers, and GET_ID).
    scratch: Scratch,
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
            image: Arc::new(image),
            id,
            features,
            active: None,
            chain: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            spare: Vec::new(),
            shared: Arc::new(Shared::new().map_err(BlockError::CompletionEvent)?),
            workers: None,
            in_flight: 0,
            throttled: false,
            completions: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            scratch: Scratch::default(),
            counters: BlockCounters::default(),
        })
    }

    /// Starts the worker threads that serve this device's reads, writes, flushes, discards and
    /// write-zeroes from now on, many at a time; each runs `on_thread_start` first. Call once,
    /// before the driver activates the device. Without workers, requests run one after another
    /// inside `process_queue`.
    pub fn start_workers(&mut self, on_thread_start: ThreadStartHook) -> Result<(), BlockError> {
        if self.workers.is_none() {
            self.workers = Some(Workers::start(
                WORKER_COUNT,
                self.shared.clone(),
                self.image.clone(),
                on_thread_start,
            )?);
        }
        Ok(())
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.image.capacity_sectors()
    }

    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    fn count(&mut self, outcome: Outcome, bounced: bool) -> u32 {
        if bounced {
            self.counters.bounced_requests += 1;
        }
        match outcome {
            Outcome::Completed { used_len } => used_len,
            Outcome::Failed => {
                self.counters.failed_requests += 1;
                1
            }
            Outcome::Unanswerable => {
                self.counters.failed_requests += 1;
                0
            }
        }
    }

    /// Takes what the driver made available, up to `QUEUE_SIZE` requests in flight: requests
    /// that fail their checks (and GET_ID) are answered at once, the rest go to the workers (or
    /// run here when there are none). Notifications are suppressed while it works; the
    /// interrupt is raised once at the end if the driver wants it.
    fn take_available(&mut self) -> Result<(), VirtioError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        // A queue the driver did not enable has no rings: touching "address 0" would write
        // guest memory the driver never gave us.
        if !active.queue.ready() {
            return Ok(());
        }
        let memory = active.memory.clone();
        let ring_error = |source| VirtioError::UsedRing {
            queue_index: 0,
            source,
        };
        let mut used_any = false;
        self.throttled = false;
        loop {
            let queue = &mut self.active.as_mut().expect("checked above").queue;
            queue.disable_notification(&*memory).map_err(ring_error)?;
            // virtio-queue refuses an available index more than a queue ahead of the device,
            // and then yields nothing: catch that here, or the loop below would spin on it.
            let available = queue
                .avail_idx(&*memory, Ordering::Acquire)
                .map_err(ring_error)?;
            let pending = (available - Wrapping(queue.next_avail())).0;
            if pending > queue.size() {
                return Err(VirtioError::AvailableIndex {
                    queue_index: 0,
                    pending,
                    size: queue.size(),
                });
            }
            loop {
                if self.in_flight >= usize::from(QUEUE_SIZE) {
                    // Taken up again once completions come back; until then the driver need
                    // not notify.
                    self.throttled = true;
                    break;
                }
                let active = self.active.as_mut().expect("checked above");
                let Some(descriptors) = active.queue.pop_descriptor_chain(&*memory) else {
                    break;
                };
                let head = descriptors.head_index();
                self.chain.clear();
                let mut cut_short = false;
                for descriptor in descriptors {
                    // virtio-queue ends a chain early on a bad link, a loop or an unreadable
                    // descriptor; the last descriptor then still says "next".
                    cut_short = descriptor.has_next();
                    self.chain.push(Segment {
                        address: descriptor.addr(),
                        len: descriptor.len(),
                        device_writable: descriptor.is_write_only(),
                    });
                }
                self.counters.requests += 1;
                let outcome = if cut_short {
                    Some(Outcome::Unanswerable)
                } else {
                    self.start(head, &memory)
                };
                if let Some(outcome) = outcome {
                    let bounced = std::mem::take(&mut self.scratch.bounced);
                    let used_len = self.count(outcome, bounced);
                    let queue = &mut self.active.as_mut().expect("checked above").queue;
                    match queue.add_used(&*memory, head, used_len) {
                        Ok(()) => used_any = true,
                        // A head index beyond the queue names no buffer the driver could get
                        // back.
                        Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
                        Err(source) => return Err(ring_error(source)),
                    }
                }
            }
            if self.throttled {
                break;
            }
            let queue = &mut self.active.as_mut().expect("checked above").queue;
            if !queue.enable_notification(&*memory).map_err(ring_error)? {
                break;
            }
        }
        if used_any {
            self.notify(&memory)?;
        }
        Ok(())
    }

    /// Checks the chain in `self.chain` and starts it: returns its outcome when it is finished
    /// already, None when a worker has it.
    fn start(&mut self, head: u16, memory: &Arc<GuestMemoryMmap>) -> Option<Outcome> {
        let Some(status_address) = locate_status(memory.as_ref(), &self.chain) else {
            return Some(Outcome::Unanswerable);
        };
        let limits = self.active.as_ref()?.limits;
        let mut data = self.spare.pop().unwrap_or_default();
        let request = match parse_request(memory.as_ref(), &self.chain, &limits, &mut data) {
            Ok(request) => request,
            Err(error) => {
                self.spare.push(data);
                return Some(finish(memory.as_ref(), status_address, Err(error)));
            }
        };
        if self.workers.is_some() && !matches!(request, Request::GetId { .. }) {
            self.in_flight += 1;
            self.shared.submit(Job {
                head,
                request,
                data,
                status_address,
                memory: memory.clone(),
            });
            return None;
        }
        let result = self.image.execute(
            memory.as_ref(),
            &request,
            &data,
            &self.id,
            &mut self.scratch,
        );
        self.spare.push(data);
        Some(finish(memory.as_ref(), status_address, result))
    }

    /// Raises the interrupt after used buffers were added, if the driver wants it.
    fn notify(&mut self, memory: &GuestMemoryMmap) -> Result<(), VirtioError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let wanted =
            active
                .queue
                .needs_notification(memory)
                .map_err(|source| VirtioError::UsedRing {
                    queue_index: 0,
                    source,
                })?;
        if wanted {
            active
                .interrupt
                .trigger(InterruptCause::UsedBuffer { queue_index: 0 })
                .map_err(VirtioError::Interrupt)?;
        }
        Ok(())
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Status OK; the used length counts the bytes written plus the status byte.
    Completed { used_len: u32 },
    /// Status IOERR or UNSUPP written.
    Failed,
    /// No status byte could be written: the chain goes back with a used length of 0.
    Unanswerable,
}

/// Writes the status byte for `result` and says how the chain ended.
fn finish<M: GuestMemory>(
    memory: &M,
    status_address: GuestAddress,
    result: Result<u64, RequestError>,
) -> Outcome {
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
            memory: Arc::new(memory),
            queue: queues.remove(0),
            interrupt,
            limits,
        });
        Ok(())
    }

    /// Runs on the vCPU thread that wrote the status register: waits for the requests the
    /// workers are running (a host I/O call each at most), drops those not started and every
    /// completion, so nothing touches guest memory for the old queue afterwards.
    fn reset(&mut self) {
        if self.workers.is_some() {
            self.shared.cancel_all();
        }
        self.in_flight = 0;
        self.throttled = false;
        self.active = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, queue_index: usize) -> Result<(), VirtioError> {
        if queue_index != 0 {
            return Err(VirtioError::NoSuchQueue { queue_index });
        }
        self.take_available()
    }

    /// The completion eventfd: readable when workers finished requests.
    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.shared.completed.as_raw_fd())
    }

    /// Puts what the workers finished on the used ring, raises the interrupt once for the
    /// batch, and takes more chains if `process_queue` had stopped at the in-flight limit.
    fn process_backend(&mut self) -> Result<(), VirtioError> {
        let mut completions = std::mem::take(&mut self.completions);
        self.shared.take_completions(&mut completions);
        let Some(memory) = self.active.as_ref().map(|active| active.memory.clone()) else {
            completions.clear();
            self.completions = completions;
            return Ok(());
        };
        let mut used_any = false;
        let mut result = Ok(());
        for completion in completions.drain(..) {
            self.in_flight = self.in_flight.saturating_sub(1);
            let used_len = self.count(completion.outcome, completion.bounced);
            self.spare.push(completion.data);
            let Some(active) = self.active.as_mut() else {
                continue;
            };
            if result.is_err() {
                continue;
            }
            match active.queue.add_used(&*memory, completion.head, used_len) {
                Ok(()) => used_any = true,
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
                Err(source) => {
                    result = Err(VirtioError::UsedRing {
                        queue_index: 0,
                        source,
                    })
                }
            }
        }
        self.completions = completions;
        result?;
        if used_any {
            self.notify(&memory)?;
        }
        if self.throttled {
            self.take_available()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
