//! The receive side: frames read from the tap, header first, placed into the chains the driver
//! made available on the rx queue.
//!
//! Without VIRTIO_NET_F_MRG_RXBUF one chain must hold the whole frame; with it, a frame spans as
//! many chains as it needs and `num_buffers` in its header says how many. When the chains run
//! out mid-frame, the chains taken for it are put back (nothing is on the used ring yet) and the
//! frame waits, whole, for the driver to add more.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::tap::VNET_HEADER_SIZE;
use super::{ReceiveOffloads, RX_QUEUE};
use crate::virtio::VirtioError;

/// Where `num_buffers` sits in `struct virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
const FLAGS_OFFSET: usize = 0;
const GSO_TYPE_OFFSET: usize = 1;

/// A piece of a writable guest buffer that a frame will fill.
#[derive(Debug, Clone, Copy)]
pub(super) struct Segment {
    pub address: GuestAddress,
    pub len: usize,
}

/// A chain taken for a frame and the bytes of the frame it will hold.
#[derive(Debug, Clone, Copy)]
pub(super) struct TakenChain {
    pub head: u16,
    pub len: u32,
}

/// The receive side's state: the frame read from the tap and not yet placed, and scratch space
/// reused for every frame so that receiving does not allocate.
pub(super) struct Receiver {
    /// A header and frame as the tap handed them over; `pending` says how much of it is valid.
    pub frame: Box<[u8]>,
    /// The length of a frame read from the tap that is waiting for receive buffers.
    pub pending: Option<usize>,
    pub segments: Vec<Segment>,
    pub chains: Vec<TakenChain>,
}

impl Receiver {
    pub fn new(frame_capacity: usize, queue_size: u16) -> Self {
        Self {
            frame: vec![0u8; frame_capacity].into_boxed_slice(),
            pending: None,
            segments: Vec::with_capacity(usize::from(queue_size)),
            chains: Vec::with_capacity(usize::from(queue_size)),
        }
    }
}

/// What became of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placement {
    /// On the used ring, in as many chains as it needed.
    Delivered,
    /// Dropped: it did not fit one chain (without MRG_RXBUF), or a chain taken for it was
    /// unusable; every chain taken for it went back with a used length of 0.
    Dropped,
    /// Not enough chains are available; none was taken.
    NoBuffers,
}

/// Whether the driver agreed to receive a frame with this header: a partial checksum needs
/// GUEST_CSUM, a segmentation type needs the matching GUEST_TSO feature.
pub(super) fn acceptable(header: &[u8], offloads: ReceiveOffloads) -> bool {
    let flags = u32::from(header[FLAGS_OFFSET]);
    let gso_type = u32::from(header[GSO_TYPE_OFFSET]);
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !offloads.checksum {
        return false;
    }
    if gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 && !offloads.ecn {
        return false;
    }
    match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => offloads.tso4,
        VIRTIO_NET_HDR_GSO_TCPV6 => offloads.tso6,
        _ => false,
    }
}

/// Places `frame` (header included) into the chains available on `queue`.
pub(super) fn place_frame(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
    segments: &mut Vec<Segment>,
    chains: &mut Vec<TakenChain>,
) -> Result<Placement, VirtioError> {
    let start = queue.next_avail();
    segments.clear();
    chains.clear();
    let needed = frame.len();
    let mut room = 0usize;
    let mut usable = true;
    while room < needed && usable && (mergeable || chains.is_empty()) {
        let Some(chain) = queue.pop_descriptor_chain(memory) else {
            queue.set_next_avail(start);
            return Ok(Placement::NoBuffers);
        };
        let head = chain.head_index();
        let mut taken = 0usize;
        let mut ended_early = false;
        let mut last_has_next = false;
        for descriptor in chain {
            if room + taken == needed {
                ended_early = true;
                break;
            }
            last_has_next = descriptor.has_next();
            let len = descriptor.len() as usize;
            if !descriptor.is_write_only()
                || !memory.check_range(descriptor.addr(), len, Permissions::Write)
            {
                usable = false;
                break;
            }
            let used = len.min(needed - room - taken);
            if used > 0 {
                segments.push(Segment {
                    address: descriptor.addr(),
                    len: used,
                });
                taken += used;
            }
        }
        // A chain virtio-queue cut short, or one with no room at all, holds nothing reliably.
        if (!ended_early && last_has_next) || taken == 0 {
            usable = false;
        }
        chains.push(TakenChain {
            head,
            len: taken as u32,
        });
        room += taken;
    }

    if !usable || room < needed {
        for chain in chains.iter() {
            add_used(queue, memory, chain.head, 0)?;
        }
        return Ok(Placement::Dropped);
    }
    // At most the queue size, which is a u16.
    let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
    frame[NUM_BUFFERS_OFFSET..VNET_HEADER_SIZE].copy_from_slice(&count.to_le_bytes());
    let mut offset = 0;
    for segment in segments.iter() {
        // The range was checked above and guest memory does not shrink; should the write fail
        // anyway, the driver gets stale bytes, never a write outside its memory.
        let _ = memory.write_slice(&frame[offset..offset + segment.len], segment.address);
        offset += segment.len;
    }
    for chain in chains.iter() {
        add_used(queue, memory, chain.head, chain.len)?;
    }
    Ok(Placement::Delivered)
}

fn add_used(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), VirtioError> {
    match queue.add_used(memory, head, len) {
        // A head index beyond the queue names no buffer the driver could get back.
        Ok(()) | Err(virtio_queue::Error::InvalidDescriptorIndex) => Ok(()),
        Err(source) => Err(VirtioError::UsedRing {
            queue_index: RX_QUEUE,
            source,
        }),
    }
}

/// The available index, refused when it runs more than a queue ahead of the device (the queue
/// would then yield nothing, and waiting for buffers would spin).
pub(super) fn available_index(
    queue: &Queue,
    memory: &GuestMemoryMmap,
) -> Result<Wrapping<u16>, VirtioError> {
    let available = queue
        .avail_idx(memory, Ordering::Acquire)
        .map_err(|source| VirtioError::UsedRing {
            queue_index: RX_QUEUE,
            source,
        })?;
    let pending = (available - Wrapping(queue.next_avail())).0;
    if pending > queue.size() {
        return Err(VirtioError::AvailableIndex {
            queue_index: RX_QUEUE,
            pending,
            size: queue.size(),
        });
    }
    Ok(available)
}

/// Asks the driver to notify the rx queue once it adds chains beyond `available` (the index
/// seen before the chains ran out); returns whether it already has. The device may have put
/// chains back below `available`, so the request names `available`, not the device's position:
/// with EVENT_IDX, `avail_event` at the position would never be passed again.
pub(super) fn wait_for_buffers(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    available: Wrapping<u16>,
) -> Result<bool, VirtioError> {
    let resume = queue.next_avail();
    queue.set_next_avail(available.0);
    let arrived = queue.enable_notification(memory);
    queue.set_next_avail(resume);
    arrived.map_err(|source| VirtioError::UsedRing {
        queue_index: RX_QUEUE,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_with_offloads_the_driver_did_not_accept_are_refused() {
        let none = ReceiveOffloads::default();
        let all = ReceiveOffloads {
            checksum: true,
            tso4: true,
            tso6: true,
            ecn: true,
        };
        let header = |flags: u32, gso_type: u32| {
            let mut header = [0u8; VNET_HEADER_SIZE];
            header[FLAGS_OFFSET] = flags as u8;
            header[GSO_TYPE_OFFSET] = gso_type as u8;
            header
        };
        let plain = header(0, VIRTIO_NET_HDR_GSO_NONE);
        let partial = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE);
        let tso4 = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
        let tso6_ecn = header(
            VIRTIO_NET_HDR_F_NEEDS_CSUM,
            VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN,
        );
        let udp = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 3);
        for frame in [plain, partial, tso4, tso6_ecn] {
            assert!(acceptable(&frame, all), "{frame:?}");
        }
        assert!(acceptable(&plain, none));
        for frame in [partial, tso4, tso6_ecn, udp] {
            assert!(!acceptable(&frame, none), "{frame:?}");
        }
        assert!(!acceptable(&udp, all), "UFO is never offered");
        let no_ecn = ReceiveOffloads { ecn: false, ..all };
        assert!(!acceptable(&tso6_ecn, no_ecn));
        assert!(acceptable(&tso4, no_ecn));
    }
}
