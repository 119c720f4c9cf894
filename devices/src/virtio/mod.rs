//! Virtio devices and the transports that present them to a guest.
//!
//! The split: a device model (`block`, `rng`) implements [`VirtioDevice`] and never learns which
//! transport carries it; a transport (`mmio` today, PCI later) owns the registers the driver
//! programs, negotiates features, tracks the device status and, when the driver sets DRIVER_OK,
//! hands the device an [`Activation`]: guest memory, the configured queues and the
//! [`InterruptLine`] to raise. From then on an event loop calls
//! [`VirtioDevice::process_queue`] whenever a queue's notification event fires.
//!
//! What must not live here: KVM calls. Notifications leave the transport as `EventFd`s that the
//! VMM may register as ioeventfds, and interrupts as an `EventFd` it may register as an irqfd.
//! Queues are rust-vmm's `virtio-queue` split queues over `vm-memory`'s `GuestMemoryMmap`.

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
mod test_driver;
pub mod vsock;

use std::num::Wrapping;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use std::sync::atomic::Ordering;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub use block::{Block, BlockConfig, BlockError};
pub use mmio::{MmioError, MmioInterrupt, MmioTransport, MMIO_REGION_SIZE};
pub use rng::Rng;

/// Feature bits every cove device offers whatever its type: modern (virtio 1.x) devices only;
/// indirect descriptors, which `virtio-queue` follows for every device alike; and event-index
/// notification suppression, which [`serve_queue`] handles for every device alike.
pub const COMMON_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// Whether the driver accepted VIRTIO_RING_F_EVENT_IDX; the transport applies it to the queues.
pub fn event_index_negotiated(acked_features: u64) -> bool {
    acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
}

/// Why a device raises its interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptCause {
    /// The device put buffers on the used ring of this queue.
    UsedBuffer { queue_index: u16 },
    /// The device changed its configuration space.
    ConfigChanged,
}

/// The line a device raises toward the driver. The transport decides what raising means (an
/// interrupt-status bit plus an irqfd for MMIO, an MSI-X vector for PCI).
pub trait InterruptLine: Send + Sync {
    fn trigger(&self, cause: InterruptCause) -> std::io::Result<()>;
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct Activation {
    pub memory: GuestMemoryMmap,
    /// One queue per entry of [`VirtioDevice::queue_max_sizes`], as the driver configured them;
    /// queues the driver did not make ready are present but not ready.
    pub queues: Vec<Queue>,
    pub interrupt: Arc<dyn InterruptLine>,
    /// The features the driver accepted (a subset of what the device offered).
    pub acked_features: u64,
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (virtio 1.2, section 5), e.g. 2 for a block device.
    fn device_type(&self) -> u32;
    /// The largest size of each of the device's queues; also how many queues it has.
    fn queue_max_sizes(&self) -> &[u16];
    /// The device-specific feature bits offered; the transport adds [`COMMON_FEATURES`].
    fn features(&self) -> u64;
    /// Fills `data` from the device configuration space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Takes a driver write into the configuration space; read-only fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Bumped by the device whenever its configuration space changes on its own.
    fn config_generation(&self) -> u32 {
        0
    }
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError>;
    /// Returns the device to the state it had before the driver first touched it: queues,
    /// memory and interrupt dropped, negotiated features forgotten.
    fn reset(&mut self);
    /// Whether the device has been activated and not reset since.
    fn is_activated(&self) -> bool;
    /// Serves what the driver made available on queue `queue_index`; called by the event loop
    /// when that queue's notification fires. A request that is bad fails alone; an error here
    /// means the device itself can go no further until the driver resets it.
    fn process_queue(&mut self, queue_index: usize) -> Result<(), VirtioError>;
    /// A descriptor that becomes readable when the device's host side has work for it (a frame
    /// waiting on a tap, a connection or bytes on a Unix socket). The VMM watches it, level
    /// triggered, from the moment the device is built, and calls [`VirtioDevice::process_backend`]
    /// when it is readable. It must not be readable while the device can make no progress (for
    /// example when the driver has given no receive buffers): a device with several host
    /// descriptors keeps its own epoll set and returns that set's descriptor here, leaving out
    /// what it cannot serve yet. It never changes over the device's life.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// Serves what the host side has ready; see [`VirtioDevice::backend_fd`]. An error means
    /// the device can go no further until the driver resets it.
    fn process_backend(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("the device has no queue {queue_index}")]
    NoSuchQueue { queue_index: usize },
    #[error(
        "queue {queue_index} lies outside guest memory or is misconfigured \
         (size {size}, descriptors {descriptors:#x}, available ring {available:#x}, \
         used ring {used:#x}); the driver must reset the device and set it up again"
    )]
    InvalidQueue {
        queue_index: usize,
        size: u16,
        descriptors: u64,
        available: u64,
        used: u64,
    },
    #[error("expected {expected} queues from the transport, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot read or write the rings of queue {queue_index} in guest memory")]
    UsedRing {
        queue_index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("the device's host side failed to {what}")]
    Backend {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot raise the device's interrupt")]
    Interrupt(#[source] std::io::Error),
    #[error(
        "the driver made {pending} buffers available on queue {queue_index}, more than its \
         {size} entries; the device stops until the driver resets it"
    )]
    AvailableIndex {
        queue_index: usize,
        pending: u16,
        size: u16,
    },
}

/// Serves every chain the driver made available on `queue`: `serve` handles one chain and
/// returns the length it wrote into the chain's buffers; the chain then goes on the used ring.
/// Driver notifications are suppressed while the device works (the used ring's NO_NOTIFY flag,
/// or `avail_event` with EVENT_IDX) and re-enabled before it returns, checking once more for
/// chains that arrived in between; the interrupt is raised once at the end if the driver wants
/// it. Allocation-free.
pub fn serve_queue<F>(
    queue: &mut Queue,
    queue_index: usize,
    memory: &GuestMemoryMmap,
    interrupt: &dyn InterruptLine,
    mut serve: F,
) -> Result<(), VirtioError>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    // A queue the driver did not enable has no rings: touching "address 0" would write guest
    // memory the driver never gave us.
    if !queue.ready() {
        return Ok(());
    }
    let ring_error = |source| VirtioError::UsedRing {
        queue_index,
        source,
    };
    let mut used_any = false;
    loop {
        queue.disable_notification(memory).map_err(ring_error)?;
        // virtio-queue refuses an available index more than a queue ahead of the device, and
        // then yields nothing: catch that here, or the loop below would spin on it.
        let available = queue
            .avail_idx(memory, Ordering::Acquire)
            .map_err(ring_error)?;
        let pending = (available - Wrapping(queue.next_avail())).0;
        if pending > queue.size() {
            return Err(VirtioError::AvailableIndex {
                queue_index,
                pending,
                size: queue.size(),
            });
        }
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let used_len = serve(chain);
            match queue.add_used(memory, head, used_len) {
                Ok(()) => used_any = true,
                // A head index beyond the queue names no buffer the driver could get back.
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
                Err(source) => return Err(ring_error(source)),
            }
        }
        if !queue.enable_notification(memory).map_err(ring_error)? {
            break;
        }
    }
    if used_any && queue.needs_notification(memory).map_err(ring_error)? {
        let queue_index = u16::try_from(queue_index).unwrap_or(u16::MAX);
        interrupt
            .trigger(InterruptCause::UsedBuffer { queue_index })
            .map_err(VirtioError::Interrupt)?;
    }
    Ok(())
}

/// Checks that every ready queue lies inside guest memory; a device calls this before it keeps
/// an activation, so that ring accesses later cannot fail for want of memory.
pub fn check_queues(
    queues: &[Queue],
    memory: &GuestMemoryMmap,
    expected: usize,
) -> Result<(), VirtioError> {
    if queues.len() != expected {
        return Err(VirtioError::QueueCount {
            expected,
            got: queues.len(),
        });
    }
    for (queue_index, queue) in queues.iter().enumerate() {
        if queue.ready() && !queue.is_valid(memory) {
            return Err(VirtioError::InvalidQueue {
                queue_index,
                size: queue.size(),
                descriptors: queue.desc_table(),
                available: queue.avail_ring(),
                used: queue.used_ring(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::bus::lock;
    use crate::virtio::rng::Rng;
    use crate::virtio::test_driver::{Buffer, TestDriver, DATA_START};

    fn rng(features: u64) -> (TestDriver, Arc<Mutex<Rng>>) {
        let rng = Arc::new(Mutex::new(Rng::new()));
        let mut driver = TestDriver::new(rng.clone());
        driver.initialise(features, 16);
        (driver, rng)
    }

    fn interrupted(driver: &TestDriver) -> bool {
        driver.transport.interrupt().event().read().is_ok()
    }

    #[test]
    fn without_event_index_every_batch_interrupts_and_notifications_stay_enabled() {
        let (mut driver, _) = rng(1 << VIRTIO_F_VERSION_1);
        for _ in 0..3 {
            driver.push_chain(0, &[Buffer::writable(DATA_START, 8)]);
            driver.kick(0);
            assert!(interrupted(&driver));
            assert_eq!(driver.used_flags(0), 0, "NO_NOTIFY must be cleared again");
        }
    }

    #[test]
    fn with_event_index_the_device_interrupts_only_when_the_driver_asked() {
        let (mut driver, _) = rng(COMMON_FEATURES);
        driver.push_chain(0, &[Buffer::writable(DATA_START, 8)]);
        driver.kick(0);
        // used_event is 0: the interrupt for the used index passing 0 is due.
        assert!(interrupted(&driver));
        assert_eq!(driver.available_event(0), 1);

        driver.push_chain(0, &[Buffer::writable(DATA_START, 8)]);
        driver.kick(0);
        assert!(!interrupted(&driver), "used_event 0 was already passed");
        assert_eq!(driver.available_event(0), 2);

        driver.set_used_event(0, 2);
        driver.push_chain(0, &[Buffer::writable(DATA_START, 8)]);
        driver.kick(0);
        assert!(interrupted(&driver));
        assert_eq!(driver.take_used(0).len(), 3);
    }

    #[test]
    fn an_available_index_beyond_the_queue_stops_the_device_instead_of_spinning() {
        let (mut driver, rng) = rng(COMMON_FEATURES);
        driver.set_available_index(0, 17);
        let error = lock(&rng).process_queue(0).unwrap_err();
        assert!(matches!(
            error,
            VirtioError::AvailableIndex {
                pending: 17,
                size: 16,
                ..
            }
        ));
        assert!(matches!(
            lock(&rng).process_queue(1),
            Err(VirtioError::NoSuchQueue { queue_index: 1 })
        ));
    }
}
