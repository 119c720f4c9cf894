//! virtio-net (virtio 1.2, section 5.1) over a tap device.
//!
//! Two queues: receive (0) and transmit (1), 256 entries each. Every frame in a queue starts
//! with the 12-byte `struct virtio_net_hdr_v1`, and the tap ([`tap`]) carries the same header,
//! so checksum and segmentation offloads pass between guest and host kernel untouched: the
//! device copies frames and reads nothing of them but the header's offload fields. The tap's
//! receive offloads follow what the driver accepted (TUNSETOFFLOAD at activation); a frame
//! carrying an offload the driver did not accept is dropped.
//!
//! Transmit runs when the driver notifies queue 1: each chain is one frame, gathered into a
//! bounce buffer and written to the tap in one `write(2)`; a bad chain fails alone and is
//! counted as dropped. Receive runs when the tap has frames ([`VirtioDevice::process_backend`])
//! and when the driver adds receive buffers (a notification on queue 0). The tap is watched
//! through an epoll set of the device's own ([`VirtioDevice::backend_fd`]) that holds the tap
//! only while the device can take a frame: activated, queue 0 ready and no frame waiting for
//! buffers. So the event loop, watching level-triggered, never spins on a tap it cannot drain.
//!
//! What must not live here: the command line (`--net`), KVM, the event loop itself.

mod mac;
mod receive;
pub mod tap;
mod transmit;

use std::io;
use std::mem::offset_of;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    virtio_net_config as Layout, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub use self::mac::{MacAddress, MacAddressError};
use self::receive::{Placement, Receiver};
pub use self::tap::{Tap, TapError, VNET_HEADER_SIZE};
use self::transmit::gather;
use super::{
    check_queues, serve_queue, Activation, InterruptCause, InterruptLine, VirtioDevice, VirtioError,
};

/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// The size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The largest frame, without its header, that the device moves in either direction: a 64 KiB
/// segmentation-offload frame and its Ethernet header.
pub const MAX_FRAME_SIZE: usize = 65550;

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
/// The most frames one call moves from the tap before it returns to the event loop.
const FRAMES_PER_BATCH: usize = 256;
const MAX_BUFFER_SIZE: usize = VNET_HEADER_SIZE + MAX_FRAME_SIZE;
/// The configuration space up to `max_virtqueue_pairs` (MTU, speed and RSS are not offered).
const CONFIG_SIZE: usize = offset_of!(Layout, mtu);

/// The device-specific features offered.
pub const FEATURES: u64 = (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_STATUS)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN)
    | (1 << VIRTIO_NET_F_MRG_RXBUF);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot create the epoll set that watches tap {name:?}")]
    Epoll {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot clear the offloads of tap {name:?}")]
    Offload {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// What the device has moved, for the VMM's API. Bytes count frames without their header.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from the tap the guest never got: no chain could hold them, a chain was unusable,
    /// they carried offloads the driver did not accept, or a reset forgot them.
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Chains the device could not send: malformed, or refused by the tap.
    pub tx_dropped: u64,
}

/// The offloads the driver accepted on frames it receives.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ReceiveOffloads {
    checksum: bool,
    tso4: bool,
    tso6: bool,
    ecn: bool,
}

impl ReceiveOffloads {
    fn from_features(acked_features: u64) -> Self {
        let acked = |bit: u32| acked_features & (1 << bit) != 0;
        // The kernel refuses segmentation offloads without checksum offload, as the spec does.
        let checksum = acked(VIRTIO_NET_F_GUEST_CSUM);
        let tso4 = checksum && acked(VIRTIO_NET_F_GUEST_TSO4);
        let tso6 = checksum && acked(VIRTIO_NET_F_GUEST_TSO6);
        Self {
            checksum,
            tso4,
            tso6,
            ecn: (tso4 || tso6) && acked(VIRTIO_NET_F_GUEST_ECN),
        }
    }

    /// The TUN_F_* flags for TUNSETOFFLOAD.
    fn tap_flags(self) -> libc::c_uint {
        let mut flags = 0;
        for (enabled, flag) in [
            (self.checksum, libc::TUN_F_CSUM),
            (self.tso4, libc::TUN_F_TSO4),
            (self.tso6, libc::TUN_F_TSO6),
            (self.ecn, libc::TUN_F_TSO_ECN),
        ] {
            if enabled {
                flags |= flag;
            }
        }
        flags
    }
}

struct Active {
    memory: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<dyn InterruptLine>,
    mergeable: bool,
    offloads: ReceiveOffloads,
}

/// A virtio network card whose host end is a tap.
pub struct Net {
    tap: Tap,
    mac: MacAddress,
    config: [u8; CONFIG_SIZE],
    /// Holds the tap while the device can take frames from it; see [`Net::update_watch`].
    epoll: Epoll,
    tap_watched: bool,
    active: Option<Active>,
    receiver: Receiver,
    /// Where a transmitted frame is gathered before its single write to the tap.
    transmit_buffer: Box<[u8]>,
    counters: NetCounters,
}

impl Net {
    /// A card with address `mac` whose frames go through `tap`.
    pub fn new(tap: Tap, mac: MacAddress) -> Result<Self, NetError> {
        let epoll = Epoll::new().map_err(|source| NetError::Epoll {
            name: tap.name().to_owned(),
            source,
        })?;
        // A tap used before may still have the offloads its last reader asked for.
        tap.set_offload(0).map_err(|source| NetError::Offload {
            name: tap.name().to_owned(),
            source,
        })?;
        Ok(Self {
            config: config_space(mac),
            tap,
            mac,
            epoll,
            tap_watched: false,
            active: None,
            receiver: Receiver::new(MAX_BUFFER_SIZE, QUEUE_SIZE),
            transmit_buffer: vec![0u8; MAX_BUFFER_SIZE].into_boxed_slice(),
            counters: NetCounters::default(),
        })
    }

    /// The tap's interface name on the host.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn mac(&self) -> MacAddress {
        self.mac
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Puts the tap in the epoll set exactly while the device can take a frame from it.
    fn update_watch(&mut self) -> io::Result<()> {
        let wanted = self.receiver.pending.is_none()
            && self.active.as_ref().is_some_and(|active| active.rx.ready());
        self.set_watch(wanted)
    }

    fn set_watch(&mut self, wanted: bool) -> io::Result<()> {
        if wanted == self.tap_watched {
            return Ok(());
        }
        let fd = self.tap.as_raw_fd();
        let result = if wanted {
            match self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            ) {
                Err(error) if error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                other => other,
            }
        } else {
            match self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            {
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                other => other,
            }
        };
        if result.is_ok() {
            self.tap_watched = wanted;
        }
        result
    }

    /// Moves frames from the tap into the rx queue until the tap is empty or the buffers run
    /// out, then interrupts once if the driver wants it.
    fn receive(&mut self) -> Result<(), VirtioError> {
        let result = self.receive_batch();
        // A device that failed must not stay watched: the event loop would spin on the tap.
        let watch = match &result {
            Ok(()) => self.update_watch(),
            Err(_) => self.set_watch(false),
        };
        result?;
        watch.map_err(|source| VirtioError::Backend {
            what: "watch the tap for frames",
            source,
        })
    }

    fn receive_batch(&mut self) -> Result<(), VirtioError> {
        let Self {
            tap,
            active,
            receiver,
            counters,
            ..
        } = self;
        let Some(active) = active else {
            return Ok(());
        };
        let Active {
            memory,
            rx,
            interrupt,
            mergeable,
            offloads,
            ..
        } = active;
        if !rx.ready() {
            return Ok(());
        }
        let ring_error = |source| VirtioError::UsedRing {
            queue_index: RX_QUEUE,
            source,
        };
        // While the device has buffers, the tap drives it: the driver need not notify.
        rx.disable_notification(memory).map_err(ring_error)?;
        let mut used_any = false;
        let mut handled = 0;
        // A host that floods the tap must not hold the event loop: after a batch, the loop
        // serves others and comes back, the tap still being readable.
        while handled < FRAMES_PER_BATCH {
            let len = match receiver.pending {
                Some(len) => len,
                None => match read_frame(tap, &mut receiver.frame, counters)? {
                    Some(len) => {
                        receiver.pending = Some(len);
                        len
                    }
                    None => break,
                },
            };
            let frame = &mut receiver.frame[..len];
            if !receive::acceptable(frame, *offloads) {
                receiver.pending = None;
                counters.rx_dropped += 1;
                handled += 1;
                continue;
            }
            if !offloads.checksum {
                // Without GUEST_CSUM the flags must be zero (DATA_VALID included).
                frame[0] = 0;
            }
            let available = receive::available_index(rx, memory)?;
            let placement = receive::place_frame(
                rx,
                memory,
                frame,
                *mergeable,
                &mut receiver.segments,
                &mut receiver.chains,
            )?;
            match placement {
                Placement::Delivered => {
                    receiver.pending = None;
                    used_any = true;
                    counters.rx_frames += 1;
                    counters.rx_bytes += (len - VNET_HEADER_SIZE) as u64;
                    handled += 1;
                }
                Placement::Dropped => {
                    receiver.pending = None;
                    used_any = true;
                    counters.rx_dropped += 1;
                    handled += 1;
                }
                Placement::NoBuffers => {
                    if !receive::wait_for_buffers(rx, memory, available)? {
                        break;
                    }
                }
            }
        }
        if used_any && rx.needs_notification(memory).map_err(ring_error)? {
            interrupt
                .trigger(InterruptCause::UsedBuffer {
                    queue_index: RX_QUEUE as u16,
                })
                .map_err(VirtioError::Interrupt)?;
        }
        Ok(())
    }

    fn transmit(&mut self) -> Result<(), VirtioError> {
        let Self {
            tap,
            active,
            transmit_buffer,
            counters,
            ..
        } = self;
        let Some(active) = active else {
            return Ok(());
        };
        let Active {
            memory,
            tx,
            interrupt,
            ..
        } = active;
        serve_queue(tx, TX_QUEUE, memory, interrupt.as_ref(), |chain| {
            match gather(memory, chain, transmit_buffer) {
                Ok(len) => match write_frame(tap, &transmit_buffer[..len]) {
                    Ok(()) => {
                        counters.tx_frames += 1;
                        counters.tx_bytes += (len - VNET_HEADER_SIZE) as u64;
                    }
                    Err(_) => counters.tx_dropped += 1,
                },
                Err(_) => counters.tx_dropped += 1,
            }
            // The device writes nothing into a transmit chain.
            0
        })
    }
}

/// Reads one frame into `buffer`: its length, or `None` once the tap is empty. Frames the tap
/// could not hand over whole are counted as dropped and skipped.
fn read_frame(
    tap: &Tap,
    buffer: &mut [u8],
    counters: &mut NetCounters,
) -> Result<Option<usize>, VirtioError> {
    loop {
        match tap.read_frame(buffer) {
            Ok(len) if len >= VNET_HEADER_SIZE => return Ok(Some(len)),
            // The tap never hands over nothing; should it, stop rather than spin.
            Ok(0) => return Ok(None),
            Ok(_) => counters.rx_dropped += 1,
            Err(error) => match error.kind() {
                io::ErrorKind::WouldBlock => return Ok(None),
                io::ErrorKind::Interrupted => {}
                // The tap consumed a frame it could not copy out (too large for the buffer).
                _ if matches!(
                    error.raw_os_error(),
                    Some(libc::EFAULT | libc::EINVAL | libc::EMSGSIZE)
                ) =>
                {
                    counters.rx_dropped += 1
                }
                _ => {
                    return Err(VirtioError::Backend {
                        what: "read a frame from the tap",
                        source: error,
                    })
                }
            },
        }
    }
}

/// Writes one frame; any refusal drops that frame only (a tap that is down drops them all, as
/// a card with no link would).
fn write_frame(tap: &Tap, frame: &[u8]) -> io::Result<()> {
    loop {
        match tap.write_frame(frame) {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
            Ok(_) => return Ok(()),
        }
    }
}

/// `struct virtio_net_config` up to `max_virtqueue_pairs`, little-endian.
fn config_space(mac: MacAddress) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(offset_of!(Layout, mac), &mac.bytes());
    put(
        offset_of!(Layout, status),
        &(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes(),
    );
    put(offset_of!(Layout, max_virtqueue_pairs), &1u16.to_le_bytes());
    config
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        FEATURES
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

    /// The MAC address is read-only for a VERSION_1 driver; nothing else is writable.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        check_queues(&activation.queues, &activation.memory, QUEUE_SIZES.len())?;
        let Activation {
            memory,
            queues,
            interrupt,
            acked_features,
        } = activation;
        let [rx, tx]: [Queue; 2] =
            queues
                .try_into()
                .map_err(|queues: Vec<Queue>| VirtioError::QueueCount {
                    expected: QUEUE_SIZES.len(),
                    got: queues.len(),
                })?;
        let offloads = ReceiveOffloads::from_features(acked_features);
        self.tap
            .set_offload(offloads.tap_flags())
            .map_err(|source| VirtioError::Backend {
                what: "set the tap's offloads",
                source,
            })?;
        self.active = Some(Active {
            memory,
            rx,
            tx,
            interrupt,
            mergeable: acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            offloads,
        });
        self.receiver.pending = None;
        if let Err(source) = self.update_watch() {
            self.active = None;
            return Err(VirtioError::Backend {
                what: "watch the tap for frames",
                source,
            });
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        if self.receiver.pending.take().is_some() {
            self.counters.rx_dropped += 1;
        }
        // Neither can fail on descriptors the device owns; should they, the next activation
        // sets both again.
        let _ = self.set_watch(false);
        let _ = self.tap.set_offload(0);
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, queue_index: usize) -> Result<(), VirtioError> {
        match queue_index {
            RX_QUEUE => self.receive(),
            TX_QUEUE => self.transmit(),
            _ => Err(VirtioError::NoSuchQueue { queue_index }),
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_backend(&mut self) -> Result<(), VirtioError> {
        self.receive()
    }
}

#[cfg(test)]
mod test_network;
#[cfg(test)]
mod tests;
