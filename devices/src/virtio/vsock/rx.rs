//! The receive queue as the muxer sees it: a supply of checked buffers, taken one at a time and
//! only when there is a packet to put in it.
//!
//! Unlike the transmit queue (served whole by `serve_queue`), receive buffers stay with the
//! device until a packet exists for them, so popping is driven by the host side. When the ring
//! runs dry the queue re-enables driver notifications (EVENT_IDX's `avail_event`) and reports
//! itself starved; the driver's next notification calls `process_queue(0)`.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::packet::{check_receive_chain, write_packet, Header, Segment};
use crate::virtio::{InterruptCause, InterruptLine, VirtioError};

pub const RX_QUEUE_INDEX: usize = 0;

/// A receive chain taken from the ring, checked, and not yet used.
#[derive(Debug)]
pub struct RxChain {
    head: u16,
    capacity: usize,
}

impl RxChain {
    /// How many payload bytes fit after the header.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

pub struct RxQueue<'a> {
    memory: &'a GuestMemoryMmap,
    queue: &'a mut Queue,
    /// The reserved chain's buffers; kept by the device to avoid allocating per packet.
    segments: &'a mut Vec<Segment>,
    used_any: bool,
    starved: bool,
    /// Packets written, and chains returned unused because they were malformed.
    pub delivered: u64,
    pub bad_chains: u64,
}

impl<'a> RxQueue<'a> {
    pub fn new(
        memory: &'a GuestMemoryMmap,
        queue: &'a mut Queue,
        segments: &'a mut Vec<Segment>,
    ) -> Self {
        let starved = !queue.ready();
        Self {
            memory,
            queue,
            segments,
            used_any: false,
            starved,
            delivered: 0,
            bad_chains: 0,
        }
    }

    /// Whether the ring ran dry (or was never set up).
    pub fn is_starved(&self) -> bool {
        self.starved
    }

    fn ring_error(source: virtio_queue::Error) -> VirtioError {
        VirtioError::UsedRing {
            queue_index: RX_QUEUE_INDEX,
            source,
        }
    }

    fn add_used(&mut self, head: u16, len: u32) -> Result<(), VirtioError> {
        match self.queue.add_used(self.memory, head, len) {
            Ok(()) => {
                self.used_any = true;
                Ok(())
            }
            // A head index beyond the queue names no buffer the driver could get back.
            Err(virtio_queue::Error::InvalidDescriptorIndex) => Ok(()),
            Err(source) => Err(Self::ring_error(source)),
        }
    }

    /// Takes the next well-formed chain; malformed ones go back to the driver with a used
    /// length of 0. `None` when the ring is empty.
    pub fn reserve(&mut self) -> Result<Option<RxChain>, VirtioError> {
        // After the ring ran dry, look again once with notifications re-enabled; never more,
        // so a driver cannot keep the device here.
        let mut rechecked = false;
        while !self.starved {
            let Some(chain) = self.queue.pop_descriptor_chain(self.memory) else {
                let available = self
                    .queue
                    .avail_idx(self.memory, Ordering::Acquire)
                    .map_err(Self::ring_error)?;
                let pending = (available - Wrapping(self.queue.next_avail())).0;
                if pending > self.queue.size() {
                    return Err(VirtioError::AvailableIndex {
                        queue_index: RX_QUEUE_INDEX,
                        pending,
                        size: self.queue.size(),
                    });
                }
                if rechecked
                    || !self
                        .queue
                        .enable_notification(self.memory)
                        .map_err(Self::ring_error)?
                {
                    self.starved = true;
                }
                rechecked = true;
                continue;
            };
            let head = chain.head_index();
            self.segments.clear();
            let mut complete = true;
            for descriptor in chain {
                // virtio-queue ends a chain early on a bad link, a loop or an unreadable
                // descriptor; the last descriptor then still says "next".
                complete = !descriptor.has_next();
                self.segments.push(Segment {
                    address: descriptor.addr(),
                    len: descriptor.len(),
                    device_writable: descriptor.is_write_only(),
                });
            }
            if self.segments.is_empty() {
                complete = false;
            }
            match check_receive_chain(self.memory, self.segments, complete) {
                Ok(capacity) => return Ok(Some(RxChain { head, capacity })),
                Err(_) => {
                    self.bad_chains += 1;
                    self.add_used(head, 0)?;
                }
            }
        }
        Ok(None)
    }

    /// Gives back a reserved chain unused; it is the next one [`RxQueue::reserve`] returns.
    pub fn unreserve(&mut self, chain: RxChain) {
        let _ = chain;
        self.queue.go_to_previous_position();
    }

    /// Writes a packet into a reserved chain and hands it to the driver. `payload` must fit
    /// the chain's capacity. Returns false if the chain could not be written after all (it goes
    /// back empty and the packet is lost).
    pub fn complete(
        &mut self,
        chain: RxChain,
        header: &Header,
        payload: &[u8],
    ) -> Result<bool, VirtioError> {
        let written = if payload.len() <= chain.capacity {
            write_packet(self.memory, self.segments, header, payload).ok()
        } else {
            None
        };
        self.add_used(chain.head, written.unwrap_or(0))?;
        self.delivered += u64::from(written.is_some());
        Ok(written.is_some())
    }

    /// Raises the queue's interrupt if buffers were used and the driver wants to hear of it.
    pub fn finish(self, interrupt: &dyn InterruptLine) -> Result<(), VirtioError> {
        if self.used_any
            && self
                .queue
                .needs_notification(self.memory)
                .map_err(Self::ring_error)?
        {
            interrupt
                .trigger(InterruptCause::UsedBuffer {
                    queue_index: RX_QUEUE_INDEX as u16,
                })
                .map_err(VirtioError::Interrupt)?;
        }
        Ok(())
    }
}
