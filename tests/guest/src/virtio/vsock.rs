//! The virtio-vsock driver (device id 19): receive queue 0, transmit queue 1, event queue 2,
//! every packet a 44-byte little-endian header and its payload; the configuration space holds
//! the guest's CID. One stream connection, to an echo server on the host.
//!
//! With `vsock-port=<port>`, the guest connects (REQUEST) from port 49152 to CID 2 at that
//! port and waits for RESPONSE, then sends `vsock-bytes=` bytes (1 MiB by default) of its
//! pattern while it reads the echo back, checking every byte. It honours the host's credit
//! (`buf_alloc` minus what it sent beyond the host's `fwd_cnt`), asks for credit when it has
//! none for a while, and sends CREDIT_UPDATE whenever it has consumed a quarter of its own
//! buffer since the host last heard its `fwd_cnt`. Then it sends SHUTDOWN (both directions)
//! and waits for the host's RST. Output (after `virtio-vsock: device=<slot> `):
//!
//! ```text
//! guest-cid=<CID from the configuration space>
//! connected to cid=2 port=<port> from port=49152
//! sent=<bytes> received=<bytes> verified=<yes|no> credit-updates=<n> credit-requests=<n>
//! shutdown answered by rst
//! echo ok
//! ```
//!
//! The pattern: stream byte `i` is byte `i % 8` (little-endian) of
//! `(i / 8 + 1) * 0x9e3779b97f4a7c15 mod 2^64`. Receive buffers are single descriptors holding
//! the header and 4 KiB of payload (Linux's layout); sent packets put the header and the
//! payload in two descriptors.

use super::memory::DmaBuffer;
use super::queue::{Queue, Segment, MAX_QUEUE_SIZE};
use super::{Device, DriverError};
use crate::cpu;

const HEADER_SIZE: usize = 44;
const SOURCE_CID: usize = 0;
const DESTINATION_CID: usize = 8;
const SOURCE_PORT: usize = 16;
const DESTINATION_PORT: usize = 20;
const LENGTH: usize = 24;
const TYPE: usize = 28;
const OPERATION: usize = 30;
const FLAGS: usize = 32;
const BUFFER_ALLOCATION: usize = 36;
const FORWARD_COUNT: usize = 40;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;
const EVENT_TRANSPORT_RESET: u32 = 0;

const HOST_CID: u64 = 2;
const LOCAL_PORT: u32 = 49152;

const PAYLOAD_SIZE: usize = 4096;
const RX_BUFFER_SIZE: usize = HEADER_SIZE + PAYLOAD_SIZE;
/// Receive buffers lie this far apart, for alignment.
const RX_BUFFER_STRIDE: usize = 4160;
const RX_BUFFERS: usize = 32;
const TX_SLOTS: usize = 32;
const TX_HEADER_STRIDE: usize = 64;
const EVENT_BUFFERS: usize = 4;
const EVENT_SIZE: usize = 8;

/// The receive buffer the guest advertises. It consumes (checks) every byte as it arrives,
/// so this is only the credit it gives the host.
const BUFFER_ALLOCATION_BYTES: u32 = 64 * 1024;
const CREDIT_UPDATE_THRESHOLD: u32 = BUFFER_ALLOCATION_BYTES / 4;

/// Giving up: the connection or the shutdown unanswered this long, or the transfer without
/// progress this long.
const ANSWER_MICROSECONDS: u64 = 10_000_000;
const STALL_MICROSECONDS: u64 = 10_000_000;
/// How long one wait lasts before the driver looks at its state again.
const WAIT_MICROSECONDS: u64 = 500_000;

const PATTERN_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// What the driver does with a packet it has read.
enum Incoming {
    Response,
    Data { length: u32 },
    Reset,
    Shutdown,
    CreditUpdate,
    CreditRequest,
    Foreign,
}

struct VsockDriver<'a> {
    device: &'a mut Device,
    rx: Queue,
    tx: Queue,
    event: Queue,
    rx_memory: DmaBuffer,
    /// The packet headers, then the payloads, of the transmit slots.
    tx_memory: DmaBuffer,
    event_memory: DmaBuffer,
    rx_buffer_of_head: [u8; MAX_QUEUE_SIZE as usize],
    tx_slot_of_head: [u8; MAX_QUEUE_SIZE as usize],
    event_buffer_of_head: [u8; MAX_QUEUE_SIZE as usize],
    tx_free: [u8; TX_SLOTS],
    tx_free_count: usize,
    guest_cid: u64,
    port: u32,
    connected: bool,
    reset: bool,
    credit_requested: bool,
    peer_buffer_allocation: u32,
    peer_forward_count: u32,
    /// Payload bytes sent and consumed, modulo 2^32 as the protocol counts them.
    transmitted: u32,
    forward_count: u32,
    reported_forward_count: u32,
    total: u64,
    sent: u64,
    received: u64,
    /// The stream offset of the first byte that differed from the pattern.
    mismatch: Option<u64>,
    credit_updates: u64,
    credit_requests: u64,
}

pub fn exercise(device: &mut Device, port: Option<u32>, total: u64) -> Result<(), DriverError> {
    device.transport.negotiate(0)?;
    let guest_cid = device.transport.config_u64(0);
    device
        .line()
        .text("guest-cid=")
        .decimal(guest_cid)
        .end_line();
    let Some(port) = port else {
        return Ok(());
    };
    let [rx, tx, event] = device.start::<3>()?;
    let mut driver = VsockDriver {
        device,
        rx,
        tx,
        event,
        rx_memory: DmaBuffer::allocate_pages(RX_BUFFERS * RX_BUFFER_STRIDE)?,
        tx_memory: DmaBuffer::allocate_pages(TX_SLOTS * (TX_HEADER_STRIDE + PAYLOAD_SIZE))?,
        event_memory: DmaBuffer::allocate(EVENT_BUFFERS * EVENT_SIZE, 8)?,
        rx_buffer_of_head: [0; MAX_QUEUE_SIZE as usize],
        tx_slot_of_head: [0; MAX_QUEUE_SIZE as usize],
        event_buffer_of_head: [0; MAX_QUEUE_SIZE as usize],
        tx_free: core::array::from_fn(|slot| slot as u8),
        tx_free_count: TX_SLOTS,
        guest_cid,
        port,
        connected: false,
        reset: false,
        credit_requested: false,
        peer_buffer_allocation: 0,
        peer_forward_count: 0,
        transmitted: 0,
        forward_count: 0,
        reported_forward_count: 0,
        total,
        sent: 0,
        received: 0,
        mismatch: None,
        credit_updates: 0,
        credit_requests: 0,
    };
    driver.run()
}

impl VsockDriver<'_> {
    fn run(&mut self) -> Result<(), DriverError> {
        for buffer in 0..RX_BUFFERS.min(usize::from(self.rx.size())) {
            self.post_rx_buffer(buffer)?;
        }
        self.device.transport.notify(self.rx.index());
        for buffer in 0..EVENT_BUFFERS.min(usize::from(self.event.size())) {
            self.post_event_buffer(buffer)?;
        }
        self.device.transport.notify(self.event.index());

        self.send_control(OP_REQUEST, 0)?;
        if !self.wait_until(ANSWER_MICROSECONDS, |driver| {
            driver.connected || driver.reset
        })? {
            return Err(DriverError::TimedOut {
                what: "the host's RESPONSE to the connection request",
            });
        }
        if self.reset {
            return Err(DriverError::Unexpected {
                what: "the host refused the connection (RST) on port",
                value: u64::from(self.port),
            });
        }
        self.device
            .line()
            .text("connected to cid=")
            .decimal(HOST_CID)
            .text(" port=")
            .decimal(u64::from(self.port))
            .text(" from port=")
            .decimal(u64::from(LOCAL_PORT))
            .end_line();

        let transfer = self.transfer();
        self.device
            .line()
            .text("sent=")
            .decimal(self.sent)
            .text(" received=")
            .decimal(self.received)
            .text(" verified=")
            .text(if self.mismatch.is_none() && self.received == self.total {
                "yes"
            } else {
                "no"
            })
            .text(" credit-updates=")
            .decimal(self.credit_updates)
            .text(" credit-requests=")
            .decimal(self.credit_requests)
            .end_line();
        transfer?;

        self.send_control(OP_SHUTDOWN, SHUTDOWN_BOTH)?;
        if !self.wait_until(ANSWER_MICROSECONDS, |driver| driver.reset)? {
            return Err(DriverError::TimedOut {
                what: "the host's RST after SHUTDOWN",
            });
        }
        self.device
            .line()
            .text("shutdown answered by rst")
            .end_line();
        self.device.line().text("echo ok").end_line();
        Ok(())
    }

    /// Sends the pattern and reads the echo until both reach the total.
    fn transfer(&mut self) -> Result<(), DriverError> {
        let stall_limit = cpu::microseconds_to_ticks(STALL_MICROSECONDS);
        let mut last_progress = cpu::time_stamp_counter();
        let mut progress_mark = (0, 0);
        loop {
            self.process_used()?;
            if let Some(offset) = self.mismatch {
                return Err(DriverError::Unexpected {
                    what: "the echo differs from the pattern at stream offset",
                    value: offset,
                });
            }
            if self.reset {
                return Err(DriverError::Unexpected {
                    what: "the host reset the connection after bytes received",
                    value: self.received,
                });
            }
            while self.sent < self.total && self.can_send() {
                let credit = self.peer_credit();
                if credit == 0 {
                    break;
                }
                let length = (self.total - self.sent)
                    .min(PAYLOAD_SIZE as u64)
                    .min(u64::from(credit));
                self.send_data(length as usize)?;
            }
            let unreported = self.forward_count.wrapping_sub(self.reported_forward_count);
            if (unreported >= CREDIT_UPDATE_THRESHOLD
                || (unreported > 0 && self.received == self.total)
                || self.credit_requested)
                && self.can_send()
            {
                self.credit_requested = false;
                self.send_control(OP_CREDIT_UPDATE, 0)?;
                self.credit_updates += 1;
            }
            if self.sent == self.total && self.received >= self.total {
                return Ok(());
            }
            let now = cpu::time_stamp_counter();
            if (self.sent, self.received) != progress_mark {
                progress_mark = (self.sent, self.received);
                last_progress = now;
            } else if now.wrapping_sub(last_progress) > stall_limit {
                return Err(DriverError::TimedOut {
                    what: "progress in the echo transfer",
                });
            }
            let (rx, tx, event) = (&self.rx, &self.tx, &self.event);
            let woken = self.device.completions.wait(WAIT_MICROSECONDS, || {
                rx.has_used() || tx.has_used() || event.has_used()
            });
            if !woken && self.sent < self.total && self.peer_credit() == 0 && self.can_send() {
                // Out of credit with nothing arriving: ask rather than wait for an update.
                self.send_control(OP_CREDIT_REQUEST, 0)?;
                self.credit_requests += 1;
            }
        }
    }

    /// Waits for the device and handles what it returned, until `done` holds; false after
    /// `microseconds` without it. It waits before it looks: the driver has just sent a
    /// packet, whose return alone ends the wait, so the answer is always announced by an
    /// interrupt, even when the host was quicker than the guest.
    fn wait_until(
        &mut self,
        microseconds: u64,
        done: fn(&Self) -> bool,
    ) -> Result<bool, DriverError> {
        let start = cpu::time_stamp_counter();
        let limit = cpu::microseconds_to_ticks(microseconds);
        while cpu::time_stamp_counter().wrapping_sub(start) <= limit {
            let (rx, tx, event) = (&self.rx, &self.tx, &self.event);
            if self.device.completions.wait(WAIT_MICROSECONDS, || {
                rx.has_used() || tx.has_used() || event.has_used()
            }) {
                self.process_used()?;
                if done(self) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Bytes the host can take now: its buffer less what is in flight towards it.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.transmitted.wrapping_sub(self.peer_forward_count);
        self.peer_buffer_allocation.saturating_sub(in_flight)
    }

    fn can_send(&self) -> bool {
        self.tx_free_count > 0 && self.tx.free_descriptors() >= 2
    }

    fn post_rx_buffer(&mut self, buffer: usize) -> Result<(), DriverError> {
        let segment = Segment::writable(
            self.rx_memory.address_at(buffer * RX_BUFFER_STRIDE),
            RX_BUFFER_SIZE as u32,
        );
        let head = self.rx.push(&[segment]).ok_or(DriverError::Unexpected {
            what: "no free receive descriptor, free",
            value: self.rx.free_descriptors() as u64,
        })?;
        self.rx_buffer_of_head[usize::from(head)] = buffer as u8;
        Ok(())
    }

    fn post_event_buffer(&mut self, buffer: usize) -> Result<(), DriverError> {
        let segment = Segment::writable(
            self.event_memory.address_at(buffer * EVENT_SIZE),
            EVENT_SIZE as u32,
        );
        let head = self.event.push(&[segment]).ok_or(DriverError::Unexpected {
            what: "no free event descriptor, free",
            value: self.event.free_descriptors() as u64,
        })?;
        self.event_buffer_of_head[usize::from(head)] = buffer as u8;
        Ok(())
    }

    /// Frees sent packets' slots, handles received packets (returning their buffers) and
    /// events.
    fn process_used(&mut self) -> Result<(), DriverError> {
        while let Some(used) = self.tx.pop_used() {
            self.tx_free[self.tx_free_count] = self.tx_slot_of_head[usize::from(used.head)];
            self.tx_free_count += 1;
        }
        let mut reposted = false;
        while let Some(used) = self.rx.pop_used() {
            let buffer = usize::from(self.rx_buffer_of_head[usize::from(used.head)]);
            let incoming = self.read_packet(buffer, used.length as usize)?;
            self.post_rx_buffer(buffer)?;
            reposted = true;
            match incoming {
                Incoming::Response => self.connected = true,
                Incoming::Reset => self.reset = true,
                Incoming::CreditRequest => self.credit_requested = true,
                Incoming::Data { length } => {
                    self.forward_count = self.forward_count.wrapping_add(length);
                }
                Incoming::Shutdown | Incoming::CreditUpdate | Incoming::Foreign => {}
            }
        }
        if reposted {
            self.device.transport.notify(self.rx.index());
        }
        let mut events = false;
        while let Some(used) = self.event.pop_used() {
            let buffer = usize::from(self.event_buffer_of_head[usize::from(used.head)]);
            let offset = buffer * EVENT_SIZE;
            let bytes = &self.event_memory.bytes()[offset..offset + 4];
            if u32::from_le_bytes(bytes.try_into().expect("4 bytes")) == EVENT_TRANSPORT_RESET {
                self.reset = true;
            }
            self.post_event_buffer(buffer)?;
            events = true;
        }
        if events {
            self.device.transport.notify(self.event.index());
        }
        Ok(())
    }

    /// Reads the packet in receive buffer `buffer`, of `length` bytes as the device says, and
    /// checks its payload against the pattern.
    fn read_packet(&mut self, buffer: usize, length: usize) -> Result<Incoming, DriverError> {
        let start = buffer * RX_BUFFER_STRIDE;
        let bytes = &self.rx_memory.bytes()[start..start + RX_BUFFER_SIZE];
        if !(HEADER_SIZE..=RX_BUFFER_SIZE).contains(&length) {
            return Err(DriverError::Unexpected {
                what: "a received packet's used length is not a header and a payload",
                value: length as u64,
            });
        }
        let u16_at = |offset: usize| u16::from_le_bytes([bytes[offset], bytes[offset + 1]]);
        let u32_at = |offset: usize| {
            u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
        };
        let u64_at = |offset: usize| {
            u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"))
        };
        if u64_at(SOURCE_CID) != HOST_CID
            || u64_at(DESTINATION_CID) != self.guest_cid
            || u32_at(SOURCE_PORT) != self.port
            || u32_at(DESTINATION_PORT) != LOCAL_PORT
            || u16_at(TYPE) != TYPE_STREAM
        {
            return Ok(Incoming::Foreign);
        }
        self.peer_buffer_allocation = u32_at(BUFFER_ALLOCATION);
        self.peer_forward_count = u32_at(FORWARD_COUNT);
        let payload_length = u32_at(LENGTH);
        Ok(match u16_at(OPERATION) {
            OP_RESPONSE => Incoming::Response,
            OP_RST => Incoming::Reset,
            OP_SHUTDOWN => Incoming::Shutdown,
            OP_CREDIT_UPDATE => Incoming::CreditUpdate,
            OP_CREDIT_REQUEST => Incoming::CreditRequest,
            OP_RW => {
                if payload_length as usize > length - HEADER_SIZE {
                    return Err(DriverError::Unexpected {
                        what: "a data packet longer than the bytes the device wrote, length",
                        value: u64::from(payload_length),
                    });
                }
                let payload = &bytes[HEADER_SIZE..HEADER_SIZE + payload_length as usize];
                if self.mismatch.is_none() {
                    if let Some(index) = check_pattern(self.received, payload) {
                        self.mismatch = Some(self.received + index as u64);
                    }
                }
                self.received += u64::from(payload_length);
                Incoming::Data {
                    length: payload_length,
                }
            }
            operation => {
                return Err(DriverError::Unexpected {
                    what: "the host sent an unknown operation",
                    value: u64::from(operation),
                })
            }
        })
    }

    fn send_control(&mut self, operation: u16, flags: u32) -> Result<(), DriverError> {
        self.send(operation, flags, 0)
    }

    /// Sends the next `length` bytes of the pattern.
    fn send_data(&mut self, length: usize) -> Result<(), DriverError> {
        self.send(OP_RW, 0, length)
    }

    fn send(&mut self, operation: u16, flags: u32, length: usize) -> Result<(), DriverError> {
        if !self.can_send() {
            return Err(DriverError::Unexpected {
                what: "no free transmit slot, free descriptors",
                value: self.tx.free_descriptors() as u64,
            });
        }
        self.tx_free_count -= 1;
        let slot = usize::from(self.tx_free[self.tx_free_count]);
        let header_offset = slot * TX_HEADER_STRIDE;
        let payload_offset = TX_SLOTS * TX_HEADER_STRIDE + slot * PAYLOAD_SIZE;
        let (guest_cid, port, forward_count) = (self.guest_cid, self.port, self.forward_count);
        let bytes = self.tx_memory.bytes_mut();
        let header = &mut bytes[header_offset..header_offset + HEADER_SIZE];
        header[SOURCE_CID..SOURCE_CID + 8].copy_from_slice(&guest_cid.to_le_bytes());
        header[DESTINATION_CID..DESTINATION_CID + 8].copy_from_slice(&HOST_CID.to_le_bytes());
        header[SOURCE_PORT..SOURCE_PORT + 4].copy_from_slice(&LOCAL_PORT.to_le_bytes());
        header[DESTINATION_PORT..DESTINATION_PORT + 4].copy_from_slice(&port.to_le_bytes());
        header[LENGTH..LENGTH + 4].copy_from_slice(&(length as u32).to_le_bytes());
        header[TYPE..TYPE + 2].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        header[OPERATION..OPERATION + 2].copy_from_slice(&operation.to_le_bytes());
        header[FLAGS..FLAGS + 4].copy_from_slice(&flags.to_le_bytes());
        header[BUFFER_ALLOCATION..BUFFER_ALLOCATION + 4]
            .copy_from_slice(&BUFFER_ALLOCATION_BYTES.to_le_bytes());
        header[FORWARD_COUNT..FORWARD_COUNT + 4].copy_from_slice(&forward_count.to_le_bytes());
        fill_pattern(
            self.sent,
            &mut bytes[payload_offset..payload_offset + length],
        );

        let header_segment =
            Segment::readable(self.tx_memory.address_at(header_offset), HEADER_SIZE as u32);
        let payload_segment =
            Segment::readable(self.tx_memory.address_at(payload_offset), length as u32);
        let segments = [header_segment, payload_segment];
        let chain = if length == 0 {
            &segments[..1]
        } else {
            &segments[..]
        };
        let head = self
            .tx
            .push(chain)
            .expect("can_send checked the descriptors");
        self.tx_slot_of_head[usize::from(head)] = slot as u8;
        self.device.transport.notify(self.tx.index());
        self.reported_forward_count = forward_count;
        self.sent += length as u64;
        self.transmitted = self.transmitted.wrapping_add(length as u32);
        Ok(())
    }
}

fn pattern_word(index: u64) -> u64 {
    (index + 1).wrapping_mul(PATTERN_MULTIPLIER)
}

/// Writes the pattern's bytes from stream offset `offset` on into `bytes`: whole words where
/// the offset is word-aligned, byte by byte at the edges.
fn fill_pattern(offset: u64, bytes: &mut [u8]) {
    let mut position = 0;
    while position < bytes.len() && !(offset + position as u64).is_multiple_of(8) {
        bytes[position] = pattern_byte(offset + position as u64);
        position += 1;
    }
    let mut words = bytes[position..].chunks_exact_mut(8);
    let mut word_index = (offset + position as u64) / 8;
    for chunk in &mut words {
        chunk.copy_from_slice(&pattern_word(word_index).to_le_bytes());
        word_index += 1;
    }
    let tail_start = word_index * 8;
    for (index, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte = pattern_byte(tail_start + index as u64);
    }
}

/// The index of the first byte of `bytes` that differs from the pattern at stream offset
/// `offset`, if any.
fn check_pattern(offset: u64, bytes: &[u8]) -> Option<usize> {
    let mut position = 0;
    while position < bytes.len() && !(offset + position as u64).is_multiple_of(8) {
        if bytes[position] != pattern_byte(offset + position as u64) {
            return Some(position);
        }
        position += 1;
    }
    let mut word_index = (offset + position as u64) / 8;
    while position + 8 <= bytes.len() {
        let word = u64::from_le_bytes(bytes[position..position + 8].try_into().expect("8 bytes"));
        if word != pattern_word(word_index) {
            break; // the byte loop below finds which byte
        }
        position += 8;
        word_index += 1;
    }
    while position < bytes.len() {
        if bytes[position] != pattern_byte(offset + position as u64) {
            return Some(position);
        }
        position += 1;
    }
    None
}

fn pattern_byte(offset: u64) -> u8 {
    (pattern_word(offset / 8) >> (8 * (offset % 8))) as u8
}
