//! The virtio-net driver (device id 1): receive queue 0, transmit queue 1, each frame preceded
//! by the 12-byte `virtio_net_hdr_v1`, no offloads (so the host hands over frames with their
//! checksums complete). Just enough IPv4 to prove frames go both ways through the host's
//! kernel: ARP and ICMP echo.
//!
//! With `net-ip=` and `net-peer=`, the guest asks for the peer's MAC with an ARP request,
//! then pings it, repeating each request up to [`ATTEMPTS`] times, a second apart; it answers
//! ARP requests for its own address meanwhile (the host may ask before it replies). Output
//! (after `virtio-net: device=<slot> `):
//!
//! ```text
//! mac=<guest MAC> ip=<net-ip> peer=<net-peer>      (without both options: `mac=<MAC>` only)
//! arp reply from <peer> mac=<the host's MAC>
//! ping reply from <peer> seq=<n> bytes=<ICMP payload bytes>
//! frames sent=<n> received=<n> ignored=<frames that were neither>
//! ```
//!
//! The guest's MAC is the device's (feature MAC) or else 52:54:00:12:34:56. The echo reply's
//! checksums and payload are checked; a bad one is an `error:` line.

use super::memory::DmaBuffer;
use super::queue::{Queue, Segment, MAX_QUEUE_SIZE};
use super::{Device, DriverError};
use crate::cpu;
use crate::serial::Console;

const FEATURE_MAC: u64 = 1 << 5;
const NET_HEADER_SIZE: usize = 12;
/// Without mergeable or large receive buffers, each must hold a whole frame and its header:
/// at least 1526 bytes.
const RX_BUFFER_SIZE: usize = 2048;
const RX_BUFFERS: usize = 16;
const TX_BUFFER_SIZE: usize = 2048;
const TX_BUFFERS: usize = 8;
const FALLBACK_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Requests sent before giving up, and how long each waits for its answer.
const ATTEMPTS: u16 = 5;
const ATTEMPT_MICROSECONDS: u64 = 1_000_000;

const ETHERNET_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const BROADCAST: [u8; 6] = [0xff; 6];
/// The shortest Ethernet frame without its check sequence.
const MINIMUM_FRAME: usize = 60;
const ARP_LENGTH: usize = 28;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const IPV4_HEADER: usize = 20;
const IP_PROTOCOL_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_HEADER: usize = 8;
const PING_PAYLOAD: usize = 56;
/// "co": the echo identifier of the guest's pings.
const PING_IDENTIFIER: u16 = 0x636f;

/// What a received frame was, as far as the driver cares.
enum Incoming {
    ArpReply {
        mac: [u8; 6],
        address: [u8; 4],
    },
    ArpRequest {
        mac: [u8; 6],
        address: [u8; 4],
    },
    EchoReply {
        from: [u8; 4],
        sequence: u16,
        payload: usize,
    },
    BadEchoReply {
        why: &'static str,
    },
    Other,
}

struct NetDriver<'a> {
    device: &'a mut Device,
    rx: Queue,
    tx: Queue,
    rx_memory: DmaBuffer,
    tx_memory: DmaBuffer,
    /// Which buffer each descriptor head carries.
    rx_buffer_of_head: [u8; MAX_QUEUE_SIZE as usize],
    tx_buffer_of_head: [u8; MAX_QUEUE_SIZE as usize],
    tx_free: [u8; TX_BUFFERS],
    tx_free_count: usize,
    mac: [u8; 6],
    address: [u8; 4],
    peer: [u8; 4],
    peer_mac: Option<[u8; 6]>,
    echo_reply: Option<(u16, usize)>,
    sent: u64,
    received: u64,
    ignored: u64,
}

pub fn exercise(
    device: &mut Device,
    address: Option<[u8; 4]>,
    peer: Option<[u8; 4]>,
) -> Result<(), DriverError> {
    let offered = device.transport.negotiate(FEATURE_MAC)?;
    let mut mac = FALLBACK_MAC;
    if offered & FEATURE_MAC != 0 {
        for (offset, byte) in mac.iter_mut().enumerate() {
            *byte = device.transport.config_u8(offset);
        }
    }
    let line = mac_text(device.line().text("mac="), &mac);
    let (Some(address), Some(peer)) = (address, peer) else {
        line.end_line();
        return Ok(());
    };
    ipv4_text(ipv4_text(line.text(" ip="), &address).text(" peer="), &peer).end_line();

    let [rx, tx] = device.start::<2>()?;
    let mut driver = NetDriver {
        device,
        rx,
        tx,
        rx_memory: DmaBuffer::allocate_pages(RX_BUFFERS * RX_BUFFER_SIZE)?,
        tx_memory: DmaBuffer::allocate_pages(TX_BUFFERS * TX_BUFFER_SIZE)?,
        rx_buffer_of_head: [0; MAX_QUEUE_SIZE as usize],
        tx_buffer_of_head: [0; MAX_QUEUE_SIZE as usize],
        tx_free: core::array::from_fn(|buffer| buffer as u8),
        tx_free_count: TX_BUFFERS,
        mac,
        address,
        peer,
        peer_mac: None,
        echo_reply: None,
        sent: 0,
        received: 0,
        ignored: 0,
    };
    let outcome = driver.talk_to_peer();
    driver
        .device
        .line()
        .text("frames sent=")
        .decimal(driver.sent)
        .text(" received=")
        .decimal(driver.received)
        .text(" ignored=")
        .decimal(driver.ignored)
        .end_line();
    outcome
}

impl NetDriver<'_> {
    fn talk_to_peer(&mut self) -> Result<(), DriverError> {
        for buffer in 0..RX_BUFFERS.min(usize::from(self.rx.size())) {
            self.post_rx_buffer(buffer)?;
        }
        self.device.transport.notify(self.rx.index());

        let mut answered = false;
        for _ in 0..ATTEMPTS {
            let request = self.arp_frame(ARP_REQUEST, BROADCAST, [0; 6], self.peer);
            self.send(&request)?;
            if self.wait_until(|driver| driver.peer_mac.is_some())? {
                answered = true;
                break;
            }
        }
        let Some(peer_mac) = self.peer_mac.filter(|_| answered) else {
            return Err(DriverError::TimedOut {
                what: "an ARP reply from the peer",
            });
        };
        let line = self.device.line().text("arp reply from ");
        mac_text(ipv4_text(line, &self.peer).text(" mac="), &peer_mac).end_line();

        for sequence in 1..=ATTEMPTS {
            let request = self.echo_request(peer_mac, sequence);
            self.send(&request[..ETHERNET_HEADER + IPV4_HEADER + ICMP_HEADER + PING_PAYLOAD])?;
            if self.wait_until(|driver| driver.echo_reply.is_some())? {
                let (sequence, payload) = self.echo_reply.expect("the wait saw it");
                let line = self.device.line().text("ping reply from ");
                ipv4_text(line, &self.peer)
                    .text(" seq=")
                    .decimal(u64::from(sequence))
                    .text(" bytes=")
                    .decimal(payload as u64)
                    .end_line();
                return Ok(());
            }
        }
        Err(DriverError::TimedOut {
            what: "an echo reply from the peer",
        })
    }

    /// Waits for the device and handles what it returned, until `done` or
    /// [`ATTEMPT_MICROSECONDS`]; false on time-out. It waits before it looks: the driver has
    /// just sent a frame, whose return alone ends the wait, so the answer is always announced
    /// by an interrupt, even when the host was quicker than the guest (as it is where the
    /// guest's instructions are emulated).
    fn wait_until(&mut self, done: fn(&Self) -> bool) -> Result<bool, DriverError> {
        let start = cpu::time_stamp_counter();
        let limit = cpu::microseconds_to_ticks(ATTEMPT_MICROSECONDS);
        while cpu::time_stamp_counter().wrapping_sub(start) <= limit {
            let (rx, tx) = (&self.rx, &self.tx);
            if !self
                .device
                .completions
                .wait(ATTEMPT_MICROSECONDS, || rx.has_used() || tx.has_used())
            {
                break;
            }
            self.process_used()?;
            if done(self) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn post_rx_buffer(&mut self, buffer: usize) -> Result<(), DriverError> {
        let segment = Segment::writable(
            self.rx_memory.address_at(buffer * RX_BUFFER_SIZE),
            RX_BUFFER_SIZE as u32,
        );
        let head = self.rx.push(&[segment]).ok_or(DriverError::Unexpected {
            what: "no free receive descriptor, free",
            value: self.rx.free_descriptors() as u64,
        })?;
        self.rx_buffer_of_head[usize::from(head)] = buffer as u8;
        Ok(())
    }

    /// Takes back sent frames' buffers and handles received frames, returning their buffers
    /// to the device.
    fn process_used(&mut self) -> Result<(), DriverError> {
        while let Some(used) = self.tx.pop_used() {
            self.tx_free[self.tx_free_count] = self.tx_buffer_of_head[usize::from(used.head)];
            self.tx_free_count += 1;
        }
        let mut reposted = false;
        while let Some(used) = self.rx.pop_used() {
            let buffer = usize::from(self.rx_buffer_of_head[usize::from(used.head)]);
            let length = (used.length as usize).min(RX_BUFFER_SIZE);
            let start = buffer * RX_BUFFER_SIZE;
            let incoming = match self
                .rx_memory
                .bytes()
                .get(start + NET_HEADER_SIZE..start + length)
            {
                Some(frame) => self.classify(frame),
                None => Incoming::Other,
            };
            self.received += 1;
            self.post_rx_buffer(buffer)?;
            reposted = true;
            self.handle(incoming)?;
        }
        if reposted {
            self.device.transport.notify(self.rx.index());
        }
        Ok(())
    }

    fn handle(&mut self, incoming: Incoming) -> Result<(), DriverError> {
        match incoming {
            Incoming::ArpReply { mac, address } if address == self.peer => {
                self.peer_mac = Some(mac);
            }
            Incoming::ArpRequest { mac, address } => {
                let reply = self.arp_frame(ARP_REPLY, mac, mac, address);
                self.send(&reply)?;
            }
            Incoming::EchoReply {
                from,
                sequence,
                payload,
            } if from == self.peer => {
                self.echo_reply = Some((sequence, payload));
            }
            Incoming::BadEchoReply { why } => {
                return Err(DriverError::Unexpected {
                    what: why,
                    value: 0,
                });
            }
            _ => self.ignored += 1,
        }
        Ok(())
    }

    /// Reads what the driver needs from a frame addressed to this guest or broadcast.
    fn classify(&self, frame: &[u8]) -> Incoming {
        if frame.len() < ETHERNET_HEADER || (frame[..6] != self.mac && frame[..6] != BROADCAST) {
            return Incoming::Other;
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let payload = &frame[ETHERNET_HEADER..];
        match ethertype {
            ETHERTYPE_ARP if payload.len() >= ARP_LENGTH => {
                let mac: [u8; 6] = payload[8..14].try_into().expect("6 bytes");
                let address: [u8; 4] = payload[14..18].try_into().expect("4 bytes");
                let target = &payload[24..28];
                let operation = u16::from_be_bytes([payload[6], payload[7]]);
                match operation {
                    ARP_REPLY => Incoming::ArpReply { mac, address },
                    ARP_REQUEST if target == self.address => Incoming::ArpRequest { mac, address },
                    _ => Incoming::Other,
                }
            }
            ETHERTYPE_IPV4 => self.classify_ipv4(payload),
            _ => Incoming::Other,
        }
    }

    fn classify_ipv4(&self, packet: &[u8]) -> Incoming {
        if packet.len() < IPV4_HEADER
            || packet[0] != 0x45
            || packet[9] != IP_PROTOCOL_ICMP
            || packet[16..20] != self.address
        {
            return Incoming::Other;
        }
        let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        let Some(icmp) = packet.get(IPV4_HEADER..total) else {
            return Incoming::BadEchoReply {
                why: "an IPv4 packet longer than its frame",
            };
        };
        if icmp.len() < ICMP_HEADER
            || icmp[0] != ICMP_ECHO_REPLY
            || u16::from_be_bytes([icmp[4], icmp[5]]) != PING_IDENTIFIER
        {
            return Incoming::Other;
        }
        if checksum(&packet[..IPV4_HEADER]) != 0 {
            return Incoming::BadEchoReply {
                why: "an echo reply with a bad IPv4 header checksum",
            };
        }
        if checksum(icmp) != 0 {
            return Incoming::BadEchoReply {
                why: "an echo reply with a bad ICMP checksum",
            };
        }
        let payload = &icmp[ICMP_HEADER..];
        if payload.len() != PING_PAYLOAD
            || payload
                .iter()
                .enumerate()
                .any(|(offset, &byte)| byte != offset as u8)
        {
            return Incoming::BadEchoReply {
                why: "an echo reply whose payload differs from the request's",
            };
        }
        Incoming::EchoReply {
            from: packet[12..16].try_into().expect("4 bytes"),
            sequence: u16::from_be_bytes([icmp[6], icmp[7]]),
            payload: payload.len(),
        }
    }

    /// An ARP frame from this guest: a request for `target_address` (broadcast, unknown
    /// target MAC) or a reply to `target_mac`.
    fn arp_frame(
        &self,
        operation: u16,
        destination: [u8; 6],
        target_mac: [u8; 6],
        target_address: [u8; 4],
    ) -> [u8; MINIMUM_FRAME] {
        let mut frame = [0u8; MINIMUM_FRAME];
        self.ethernet_header(&mut frame, destination, ETHERTYPE_ARP);
        let arp = &mut frame[ETHERNET_HEADER..ETHERNET_HEADER + ARP_LENGTH];
        arp[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        arp[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        arp[4] = 6;
        arp[5] = 4;
        arp[6..8].copy_from_slice(&operation.to_be_bytes());
        arp[8..14].copy_from_slice(&self.mac);
        arp[14..18].copy_from_slice(&self.address);
        arp[18..24].copy_from_slice(&target_mac);
        arp[24..28].copy_from_slice(&target_address);
        frame
    }

    fn echo_request(&self, peer_mac: [u8; 6], sequence: u16) -> [u8; 128] {
        let mut frame = [0u8; 128];
        self.ethernet_header(&mut frame, peer_mac, ETHERTYPE_IPV4);
        let packet =
            &mut frame[ETHERNET_HEADER..ETHERNET_HEADER + IPV4_HEADER + ICMP_HEADER + PING_PAYLOAD];
        let total = packet.len() as u16;
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet[4..6].copy_from_slice(&sequence.to_be_bytes());
        packet[6] = 0x40; // don't fragment
        packet[8] = 64; // TTL
        packet[9] = IP_PROTOCOL_ICMP;
        packet[12..16].copy_from_slice(&self.address);
        packet[16..20].copy_from_slice(&self.peer);
        let header_checksum = checksum(&packet[..IPV4_HEADER]);
        packet[10..12].copy_from_slice(&header_checksum.to_be_bytes());
        let icmp = &mut packet[IPV4_HEADER..];
        icmp[0] = ICMP_ECHO_REQUEST;
        icmp[4..6].copy_from_slice(&PING_IDENTIFIER.to_be_bytes());
        icmp[6..8].copy_from_slice(&sequence.to_be_bytes());
        for (offset, byte) in icmp[ICMP_HEADER..].iter_mut().enumerate() {
            *byte = offset as u8;
        }
        let icmp_checksum = checksum(icmp);
        icmp[2..4].copy_from_slice(&icmp_checksum.to_be_bytes());
        frame
    }

    fn ethernet_header(&self, frame: &mut [u8], destination: [u8; 6], ethertype: u16) {
        frame[0..6].copy_from_slice(&destination);
        frame[6..12].copy_from_slice(&self.mac);
        frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
    }

    /// Queues one frame, waiting for a free transmit buffer if need be.
    fn send(&mut self, frame: &[u8]) -> Result<(), DriverError> {
        if self.tx_free_count == 0 || self.tx.free_descriptors() == 0 {
            let tx = &self.tx;
            if !self
                .device
                .completions
                .wait(ATTEMPT_MICROSECONDS, || tx.has_used())
            {
                return Err(DriverError::TimedOut {
                    what: "a transmit buffer back from the device",
                });
            }
            self.process_used()?;
        }
        self.tx_free_count -= 1;
        let buffer = usize::from(self.tx_free[self.tx_free_count]);
        let start = buffer * TX_BUFFER_SIZE;
        let length = NET_HEADER_SIZE + frame.len();
        let bytes = &mut self.tx_memory.bytes_mut()[start..start + length];
        bytes[..NET_HEADER_SIZE].fill(0);
        bytes[NET_HEADER_SIZE..].copy_from_slice(frame);
        let segment = Segment::readable(self.tx_memory.address_at(start), length as u32);
        let head = self.tx.push(&[segment]).ok_or(DriverError::Unexpected {
            what: "no free transmit descriptor, free",
            value: self.tx.free_descriptors() as u64,
        })?;
        self.tx_buffer_of_head[usize::from(head)] = buffer as u8;
        self.device.transport.notify(self.tx.index());
        self.sent += 1;
        Ok(())
    }
}

/// The Internet checksum: the one's complement of the one's complement sum of the 16-bit
/// big-endian words (0 when computed over data that includes a correct checksum).
pub(super) fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn mac_text(mut line: Console, mac: &[u8; 6]) -> Console {
    for (index, &byte) in mac.iter().enumerate() {
        if index > 0 {
            line = line.text(":");
        }
        let digits = [
            b"0123456789abcdef"[usize::from(byte >> 4)],
            b"0123456789abcdef"[usize::from(byte & 0xf)],
        ];
        line = line.bytes(&digits);
    }
    line
}

fn ipv4_text(mut line: Console, address: &[u8; 4]) -> Console {
    for (index, &octet) in address.iter().enumerate() {
        if index > 0 {
            line = line.text(".");
        }
        line = line.decimal(u64::from(octet));
    }
    line
}
