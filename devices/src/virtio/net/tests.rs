//! virtio-net driven through its MMIO registers and split queues in guest memory, over a real
//! tap in a network namespace of the test's own: the host kernel answers ARP, receives UDP with
//! offloaded checksums and sends UDP whose checksums the guest finishes; frames span mergeable
//! buffers or are dropped when no chain holds them; a frame waits for buffers while the tap is
//! left alone; interrupts once per batch; bad transmit chains fail alone; reset mid-flight;
//! wrap-around. Every test that builds a card needs root (a namespace and a tap); opening taps
//! by name is tested in `tap.rs`.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_USED_F_NO_NOTIFY};

use super::test_network::*;
use super::*;
use crate::bus::{lock, BusDevice};
use crate::virtio::test_driver::{
    offset, Buffer, RawDescriptor, TestDriver, DATA_START, MEMORY_SIZE,
};
use crate::virtio::{VirtioDevice, COMMON_FEATURES};

/// Every feature the device offers, and the common ones.
const ALL_FEATURES: u64 = COMMON_FEATURES | FEATURES;
const MERGEABLE: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
const GUEST_OFFLOADS: u64 = (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN);
const EVENT_INDEX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
const NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;

/// Receive buffers live in 64 slots of 4 KiB from `DATA_START`; transmitted frames above.
const RX_AREA: u64 = DATA_START;
const RX_SLOT: u64 = 0x1000;
const RX_SLOTS: u64 = 64;
const TX_AREA: u64 = 0x8_0000;

fn guest_mac() -> MacAddress {
    MacAddress::try_from(GUEST_MAC).unwrap()
}

fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: the pointer is to `poll`, one live pollfd, as the count says.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) };
    assert!(ready >= 0, "poll: {}", std::io::Error::last_os_error());
    ready > 0
}

/// A running card: the test driver on one side, the namespace's end of the tap on the other.
struct Card {
    driver: TestDriver,
    net: Arc<Mutex<Net>>,
    host: HostSide,
    /// The buffers of each receive chain the driver gave, by head.
    rx_chains: HashMap<u16, Vec<Buffer>>,
    next_rx_slot: u64,
}

fn card(features: u64, queue_size: u16) -> Card {
    let (tap, host) = tap_in_new_namespace();
    let net = Arc::new(Mutex::new(Net::new(tap, guest_mac()).unwrap()));
    let mut driver = TestDriver::new(net.clone());
    driver.initialise(features, queue_size);
    Card {
        driver,
        net,
        host,
        rx_chains: HashMap::new(),
        next_rx_slot: 0,
    }
}

impl Card {
    fn backend_fd(&self) -> RawFd {
        lock(&self.net).backend_fd().unwrap()
    }

    fn backend_ready(&self, timeout: Duration) -> bool {
        readable(self.backend_fd(), timeout)
    }

    /// Plays the event loop: waits for the backend descriptor, then lets the device serve it.
    fn serve_backend(&mut self) {
        assert!(
            self.backend_ready(TIMEOUT),
            "no frame from the tap within {TIMEOUT:?}"
        );
        lock(&self.net).process_backend().unwrap();
    }

    fn counters(&self) -> NetCounters {
        lock(&self.net).counters()
    }

    /// A free receive slot address with room for `len` bytes.
    fn rx_address(&mut self, len: u32) -> u64 {
        let slots = u64::from(len).div_ceil(RX_SLOT).max(1);
        if self.next_rx_slot + slots > RX_SLOTS {
            self.next_rx_slot = 0;
        }
        let address = RX_AREA + self.next_rx_slot * RX_SLOT;
        self.next_rx_slot += slots;
        address
    }

    /// Makes a receive chain of writable buffers of `sizes` available, without notifying.
    fn add_rx_chain(&mut self, sizes: &[u32]) -> u16 {
        let buffers: Vec<Buffer> = sizes
            .iter()
            .map(|&len| {
                let address = self.rx_address(len);
                self.driver.write_bytes(address, &vec![0u8; len as usize]);
                Buffer::writable(address, len)
            })
            .collect();
        self.add_raw_rx_chain(buffers)
    }

    fn add_raw_rx_chain(&mut self, buffers: Vec<Buffer>) -> u16 {
        let head = self.driver.push_chain(0, &buffers);
        self.rx_chains.insert(head, buffers);
        head
    }

    /// Gives `count` one-buffer chains of `len` bytes and notifies the receive queue.
    fn give_rx(&mut self, count: usize, len: u32) -> Vec<u16> {
        let heads = (0..count).map(|_| self.add_rx_chain(&[len])).collect();
        self.driver.kick(0);
        heads
    }

    /// What the device wrote into the chain `head`: the first `len` bytes of its buffers.
    fn rx_bytes(&self, head: u32, len: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut left = len as usize;
        for buffer in &self.rx_chains[&(head as u16)] {
            let take = left.min(buffer.len as usize);
            bytes.extend(self.driver.read_bytes(buffer.address, take));
            left -= take;
        }
        assert_eq!(left, 0, "used length beyond the chain");
        bytes
    }

    /// Serves the tap until `count` chains came back on the receive queue.
    fn receive(&mut self, count: usize) -> Vec<(u32, u32)> {
        let mut used = self.driver.take_used(0);
        while used.len() < count {
            self.serve_backend();
            used.extend(self.driver.take_used(0));
        }
        assert_eq!(used.len(), count, "more chains came back than expected");
        used
    }

    /// Receives one frame in one chain; returns the header and the frame.
    fn receive_frame(&mut self) -> ([u8; 12], Vec<u8>) {
        let used = self.receive(1);
        let bytes = self.rx_bytes(used[0].0, used[0].1);
        let header: [u8; 12] = bytes[..12].try_into().unwrap();
        (header, bytes[12..].to_vec())
    }

    /// Transmits `frame` behind `header` in one readable buffer at `slot` of the transmit area.
    fn push_tx(&mut self, slot: u64, header: [u8; 12], frame: &[u8]) -> u16 {
        let address = TX_AREA + slot * 0x1000;
        self.driver.write_bytes(address, &header);
        self.driver.write_bytes(address + 12, frame);
        self.driver
            .push_chain(1, &[Buffer::readable(address, 12 + frame.len() as u32)])
    }

    /// Transmits one frame and checks the chain came back.
    fn send(&mut self, header: [u8; 12], frame: &[u8]) {
        let head = self.push_tx(0, header, frame);
        self.driver.kick(1);
        assert_eq!(self.driver.take_used(1), vec![(u32::from(head), 0)]);
    }

    /// Forgets the receive chains, for a driver that starts over.
    fn forget_rx_chains(&mut self) {
        self.rx_chains.clear();
        self.next_rx_slot = 0;
    }
}

fn num_buffers(header: &[u8]) -> u16 {
    u16::from_le_bytes([header[10], header[11]])
}

fn interrupts(driver: &TestDriver) -> u64 {
    match driver.transport.interrupt().event().read() {
        Ok(count) => count,
        Err(error) if error.kind() == ErrorKind::WouldBlock => 0,
        Err(error) => panic!("interrupt event: {error}"),
    }
}

fn check_arp_reply(card: &Card, reply: &[u8]) {
    assert_eq!(reply.len(), 42, "an ARP reply, unpadded: {reply:02x?}");
    assert_eq!(reply[0..6], GUEST_MAC);
    assert_eq!(reply[6..12], card.host.tap_mac);
    assert_eq!(reply[12..14], ETHERTYPE_ARP.to_be_bytes());
    assert_eq!(reply[20..22], [0, 2], "opcode: reply");
    assert_eq!(reply[22..28], card.host.tap_mac);
    assert_eq!(reply[28..32], HOST_ADDRESS.octets());
    assert_eq!(reply[32..38], GUEST_MAC);
    assert_eq!(reply[38..42], GUEST_ADDRESS.octets());
}

#[test]
fn the_card_offers_its_features_and_shows_its_address_and_link() {
    let (tap, host) = tap_in_new_namespace();
    let net = Arc::new(Mutex::new(Net::new(tap, guest_mac()).unwrap()));
    let mut driver = TestDriver::new(net.clone());
    assert_eq!(driver.read(offset::DEVICE_ID), 1);
    assert_eq!(driver.device_features(), ALL_FEATURES);
    for queue in 0..2 {
        driver.write(offset::QUEUE_SELECT, queue);
        assert_eq!(driver.read(offset::QUEUE_SIZE_MAX), 256);
    }

    let mut mac = [0u8; 6];
    for (position, byte) in mac.iter_mut().enumerate() {
        let mut data = [0u8; 1];
        driver.read_config(position as u32, &mut data);
        *byte = data[0];
    }
    assert_eq!(mac, GUEST_MAC);
    let mut word = [0u8; 4];
    let mut half = [0u8; 2];
    driver.read_config(0, &mut word);
    driver.read_config(4, &mut half);
    assert_eq!([&word[..], &half[..]].concat(), GUEST_MAC);
    driver.read_config(6, &mut half);
    assert_eq!(u16::from_le_bytes(half), 1, "status: link up");
    driver.read_config(8, &mut half);
    assert_eq!(u16::from_le_bytes(half), 1, "max_virtqueue_pairs");
    driver.read_config(10, &mut word);
    assert_eq!(word, [0; 4], "nothing past max_virtqueue_pairs");
    // The address is read-only.
    driver
        .transport
        .write(u64::from(offset::CONFIG), &[0xff; 4]);
    driver.read_config(0, &mut word);
    assert_eq!(word, GUEST_MAC[..4]);

    {
        let net = lock(&net);
        assert_eq!(net.tap_name(), host.tap_name);
        assert!(net.tap_name().starts_with("cove"), "{}", net.tap_name());
        assert_eq!(net.mac(), guest_mac());
        assert_eq!(net.counters(), NetCounters::default());
    }

    // Until the driver sets DRIVER_OK the tap is left alone, frames or not.
    let backend = lock(&net).backend_fd().unwrap();
    host.inject(&tagged_frame(1, 60));
    assert!(!readable(backend, Duration::from_millis(200)));
    driver.initialise(ALL_FEATURES, 256);
    assert!(lock(&net).is_activated());
    assert!(readable(backend, TIMEOUT), "the waiting frame is announced");
}

#[test]
fn the_host_kernel_answers_an_arp_request_from_the_driver() {
    let mut card = card(ALL_FEATURES, 256);
    card.give_rx(4, 2048);
    assert!(
        !card.backend_ready(Duration::ZERO),
        "nothing on the tap yet"
    );

    let request = arp_request(HOST_ADDRESS);
    card.send(vnet_header(0, 0, 0), &request);
    // The host side saw the request as the driver wrote it.
    let seen = card
        .host
        .capture(|frame| frame[12..14] == ETHERTYPE_ARP.to_be_bytes() && frame[6..12] == GUEST_MAC);
    assert_eq!(seen, request);

    let (header, reply) = card.receive_frame();
    assert_eq!(header[..2], [0, 0], "no offloads on an ARP reply");
    assert_eq!(num_buffers(&header), 1);
    check_arp_reply(&card, &reply);
    assert_eq!(
        card.counters(),
        NetCounters {
            rx_frames: 1,
            rx_bytes: 42,
            tx_frames: 1,
            tx_bytes: request.len() as u64,
            ..NetCounters::default()
        }
    );
    // The tap is drained: the event loop has nothing to spin on.
    assert!(!card.backend_ready(Duration::from_millis(100)));
}

#[test]
fn a_udp_datagram_with_a_partial_checksum_reaches_a_host_socket() {
    let mut card = card(ALL_FEATURES, 256);
    let socket = card.host.udp_socket(7777);
    let tap_mac = card.host.tap_mac;
    // The host kernel checks UDP checksums: a wrong one never reaches the socket...
    let wrong = udp_frame(tap_mac, 5555, 7777, b"wrong checksum", UdpChecksum::Wrong);
    card.send(vnet_header(0, 0, 0), &wrong);
    // ...while a partial one with NEEDS_CSUM does: the offload reached the host kernel.
    let partial = udp_frame(
        tap_mac,
        5555,
        7777,
        b"checksum offloaded",
        UdpChecksum::Partial,
    );
    let start = UDP_HEADER_START as u16;
    let offset = UDP_CHECKSUM_OFFSET as u16;
    card.send(vnet_header(NEEDS_CSUM, start, offset), &partial);
    let complete = udp_frame(
        tap_mac,
        5555,
        7777,
        b"checksum complete",
        UdpChecksum::Complete,
    );
    card.send(vnet_header(0, 0, 0), &complete);

    let mut buffer = [0u8; 128];
    let from = SocketAddr::from((GUEST_ADDRESS, 5555));
    let (len, sender) = socket.recv_from(&mut buffer).unwrap();
    assert_eq!((&buffer[..len], sender), (&b"checksum offloaded"[..], from));
    let (len, sender) = socket.recv_from(&mut buffer).unwrap();
    assert_eq!((&buffer[..len], sender), (&b"checksum complete"[..], from));
    socket.set_nonblocking(true).unwrap();
    assert_eq!(
        socket.recv_from(&mut buffer).unwrap_err().kind(),
        ErrorKind::WouldBlock,
        "the datagram with the wrong checksum must have been dropped"
    );
    assert_eq!(card.counters().tx_frames, 3);
    assert_eq!(card.counters().tx_dropped, 0);
}

#[test]
fn host_datagrams_arrive_with_a_partial_checksum_only_when_the_driver_accepted_it() {
    for guest_checksum in [true, false] {
        let features = if guest_checksum {
            ALL_FEATURES
        } else {
            ALL_FEATURES & !GUEST_OFFLOADS
        };
        let mut card = card(features, 256);
        card.host.add_neighbour(GUEST_ADDRESS, GUEST_MAC);
        let socket = card.host.udp_socket(7777);
        card.give_rx(4, 2048);
        socket
            .send_to(b"from the host", (GUEST_ADDRESS, 6000))
            .unwrap();

        let (header, frame) = card.receive_frame();
        assert_eq!(frame[12..14], ETHERTYPE_IPV4.to_be_bytes());
        assert_eq!(frame[23], libc::IPPROTO_UDP as u8);
        assert_eq!(&frame[UDP_HEADER_START + 8..], b"from the host");
        let udp = &frame[UDP_HEADER_START..];
        let pseudo = pseudo_header_sum(HOST_ADDRESS, GUEST_ADDRESS, udp.len());
        let checksum_at = UDP_HEADER_START + UDP_CHECKSUM_OFFSET;
        let finished = if guest_checksum {
            assert_eq!(header[0] & NEEDS_CSUM, NEEDS_CSUM, "{header:02x?}");
            assert_eq!(
                u16::from_le_bytes([header[6], header[7]]),
                UDP_HEADER_START as u16
            );
            assert_eq!(
                u16::from_le_bytes([header[8], header[9]]),
                UDP_CHECKSUM_OFFSET as u16
            );
            // Finish the checksum as the guest's stack would.
            let mut finished = frame.clone();
            let sum = !fold(ones_complement_sum(&frame[UDP_HEADER_START..], 0));
            finished[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
            finished
        } else {
            assert_eq!(header[0], 0, "flags must be zero without GUEST_CSUM");
            frame.clone()
        };
        assert_ne!(finished[checksum_at..checksum_at + 2], [0, 0]);
        assert_eq!(
            fold(ones_complement_sum(&finished[UDP_HEADER_START..], pseudo)),
            0xffff,
            "the UDP checksum must verify"
        );
    }
}

#[test]
fn without_mergeable_buffers_a_frame_needs_one_chain_that_holds_it() {
    let mut card = card(ALL_FEATURES & !MERGEABLE, 256);
    let small = card.add_rx_chain(&[512]);
    let wrong_way = card.rx_address(2048);
    let readable_chain = card.add_raw_rx_chain(vec![Buffer::readable(wrong_way, 2048)]);
    let outside = card.add_raw_rx_chain(vec![Buffer::writable(MEMORY_SIZE - 16, 2048)]);
    let split = card.add_rx_chain(&[12, 2048]);
    card.driver.kick(0);
    for tag in 1..=4 {
        card.host.inject(&tagged_frame(tag, 1000));
    }
    let used = card.receive(4);
    assert_eq!(
        used,
        vec![
            (u32::from(small), 0),
            (u32::from(readable_chain), 0),
            (u32::from(outside), 0),
            (u32::from(split), 1012)
        ]
    );
    let bytes = card.rx_bytes(u32::from(split), 1012);
    assert_eq!(num_buffers(&bytes), 1);
    assert_eq!(bytes[12..], tagged_frame(4, 1000));
    assert_eq!(card.driver.read_bytes(wrong_way, 2048), vec![0; 2048]);
    let counters = card.counters();
    assert_eq!(
        (counters.rx_frames, counters.rx_bytes, counters.rx_dropped),
        (1, 1000, 3)
    );
}

#[test]
fn mergeable_buffers_spread_a_frame_over_as_many_chains_as_it_needs() {
    let mut card = card(ALL_FEATURES, 256);
    let mut heads = card.give_rx(2, 512);
    let frame = tagged_frame(7, 1514);
    card.host.inject(&frame);
    card.serve_backend();
    // Two chains hold 1024 of the 1526 bytes: the frame waits and nothing is used yet.
    assert_eq!(card.driver.take_used(0), vec![]);
    assert_eq!(card.counters().rx_frames, 0);
    assert!(!card.backend_ready(Duration::from_millis(100)));
    assert_eq!(
        card.driver.available_event(0),
        2,
        "the device asks for a notification when the third chain comes"
    );

    heads.extend(card.give_rx(1, 512));
    let used = card.driver.take_used(0);
    let expected: Vec<(u32, u32)> = heads
        .iter()
        .zip([512, 512, 502])
        .map(|(&head, len)| (u32::from(head), len))
        .collect();
    assert_eq!(used, expected);
    let bytes: Vec<u8> = used
        .iter()
        .flat_map(|&(head, len)| card.rx_bytes(head, len))
        .collect();
    assert_eq!(num_buffers(&bytes), 3);
    assert_eq!(bytes[12..], frame);

    // Watched again: the next frame goes straight into one chain.
    card.give_rx(1, 512);
    card.host.inject(&tagged_frame(8, 60));
    let (header, received) = card.receive_frame();
    assert_eq!(num_buffers(&header), 1);
    assert_eq!(received, tagged_frame(8, 60));
    assert_eq!(card.counters().rx_frames, 2);
    assert_eq!(card.counters().rx_bytes, 1514 + 60);

    // An unusable chain in the middle of a frame: every chain taken for it comes back empty.
    let good = card.add_rx_chain(&[512]);
    let outside = card.add_raw_rx_chain(vec![Buffer::writable(MEMORY_SIZE - 16, 2048)]);
    card.driver.kick(0);
    card.host.inject(&tagged_frame(9, 1000));
    assert_eq!(
        card.receive(2),
        vec![(u32::from(good), 0), (u32::from(outside), 0)]
    );
    assert_eq!(card.counters().rx_dropped, 1);
}

#[test]
fn a_frame_waits_for_receive_buffers_while_the_tap_is_left_alone() {
    let mut card = card(ALL_FEATURES & !EVENT_INDEX, 256);
    card.host.inject(&tagged_frame(1, 100));
    card.serve_backend();
    // The frame waits; the tap is out of the epoll set, so a second frame wakes nobody.
    card.host.inject(&tagged_frame(2, 100));
    assert!(!card.backend_ready(Duration::from_millis(200)));
    assert_eq!(card.counters().rx_frames, 0);
    assert_eq!(
        card.driver.used_flags(0),
        0,
        "the device wants the next notification"
    );

    card.give_rx(4, 2048);
    let used = card.driver.take_used(0);
    assert_eq!(used.len(), 2, "the waiting frame and the one behind it");
    for (&(head, len), tag) in used.iter().zip(1..) {
        let bytes = card.rx_bytes(head, len);
        assert_eq!(bytes[12..], tagged_frame(tag, 100));
    }
    assert_eq!(card.counters().rx_frames, 2);
    assert!(!card.backend_ready(Duration::from_millis(100)));
    assert_eq!(
        card.driver.used_flags(0),
        VRING_USED_F_NO_NOTIFY as u16,
        "with buffers left, the tap drives the device and notifications are not needed"
    );
}

#[test]
fn receive_interrupts_once_per_batch_and_only_when_the_driver_asks() {
    let mut card = card(ALL_FEATURES, 256);
    for tag in 1..=4 {
        card.host.inject(&tagged_frame(tag, 80));
    }
    card.serve_backend();
    // Let the other three reach the tap while the first waits for buffers.
    std::thread::sleep(Duration::from_millis(100));
    interrupts(&card.driver);
    card.give_rx(16, 2048);
    assert_eq!(card.driver.take_used(0).len(), 4, "one batch");
    assert_eq!(interrupts(&card.driver), 1);

    // The driver wants an interrupt once the used index passes 8.
    card.driver.set_used_event(0, 8);
    for tag in 5..=8 {
        card.host.inject(&tagged_frame(tag, 80));
    }
    card.receive(4);
    assert_eq!(interrupts(&card.driver), 0);
    card.host.inject(&tagged_frame(9, 80));
    card.receive(1);
    assert_eq!(interrupts(&card.driver), 1);
}

#[test]
fn malformed_transmit_chains_fail_alone_and_the_next_frame_still_goes_out() {
    let mut card = card(ALL_FEATURES, 256);
    let header = vnet_header(0, 0, 0);
    let frame = |tag| tagged_frame(tag, 100);

    // A chain whose link leads out of the queue.
    card.driver.write_bytes(TX_AREA, &header);
    card.driver.write_bytes(TX_AREA + 12, &frame(1));
    card.driver.push_raw(
        1,
        &[RawDescriptor {
            address: TX_AREA,
            len: 112,
            flags: VRING_DESC_F_NEXT as u16,
            next: 300,
        }],
    );
    card.driver.kick(1);
    assert_eq!(card.driver.take_used(1), vec![(0, 0)]);

    // A writable buffer; a buffer past the end of guest memory; one byte too many; no header.
    card.driver.write_bytes(TX_AREA + 0x1000, &header);
    card.driver.write_bytes(TX_AREA + 0x100c, &frame(2));
    card.driver.write_bytes(TX_AREA + 0x2000, &header);
    card.driver.write_bytes(TX_AREA + 0x3000, &header);
    card.driver.write_bytes(TX_AREA + 0x300c, &frame(4));
    let bad_chains: [&[Buffer]; 4] = [
        &[
            Buffer::readable(TX_AREA + 0x1000, 112),
            Buffer::writable(TX_AREA + 0x1800, 64),
        ],
        &[
            Buffer::readable(TX_AREA + 0x2000, 12),
            Buffer::readable(MEMORY_SIZE - 16, 100),
        ],
        &[Buffer::readable(
            TX_AREA + 0x3000,
            (VNET_HEADER_SIZE + MAX_FRAME_SIZE + 1) as u32,
        )],
        &[Buffer::readable(TX_AREA + 0x1000, 8)],
    ];
    let mut heads: Vec<u16> = bad_chains
        .iter()
        .map(|buffers| card.driver.push_chain(1, buffers))
        .collect();
    // A good frame, its header split across two buffers.
    let good = frame(9);
    let good_at = TX_AREA + 0x20000;
    card.driver.write_bytes(good_at, &header[..5]);
    card.driver.write_bytes(good_at + 0x100, &header[5..]);
    card.driver.write_bytes(good_at + 0x100 + 7, &good);
    heads.push(card.driver.push_chain(
        1,
        &[
            Buffer::readable(good_at, 5),
            Buffer::readable(good_at + 0x100, 7 + good.len() as u32),
        ],
    ));
    card.driver.kick(1);
    let used = card.driver.take_used(1);
    assert_eq!(
        used,
        heads
            .iter()
            .map(|&head| (u32::from(head), 0))
            .collect::<Vec<_>>()
    );

    let seen = card.host.capture(|frame| frame_tag(frame).is_some());
    assert_eq!(seen, good, "the first frame out is the good one");
    let counters = card.counters();
    assert_eq!(
        (counters.tx_frames, counters.tx_bytes, counters.tx_dropped),
        (1, 100, 5)
    );
}

#[test]
fn a_reset_forgets_the_waiting_frame_and_the_card_starts_over() {
    let mut card = card(ALL_FEATURES, 256);
    card.host.inject(&tagged_frame(1, 100));
    card.serve_backend();
    assert_eq!(card.counters().rx_frames, 0, "the frame waits for buffers");

    card.driver.write(offset::STATUS, 0);
    assert!(!lock(&card.net).is_activated());
    assert_eq!(
        card.counters().rx_dropped,
        1,
        "the waiting frame is forgotten"
    );
    card.host.inject(&tagged_frame(2, 100));
    assert!(!card.backend_ready(Duration::from_millis(200)));
    lock(&card.net).process_backend().unwrap();
    lock(&card.net).process_queue(0).unwrap();
    lock(&card.net).process_queue(1).unwrap();

    // Again, without mergeable buffers this time: the frame that arrived meanwhile comes in.
    card.forget_rx_chains();
    card.driver.initialise(ALL_FEATURES & !MERGEABLE, 256);
    assert!(card.backend_ready(TIMEOUT));
    card.give_rx(4, 2048);
    let used = card.driver.take_used(0);
    assert_eq!(used.len(), 1);
    let bytes = card.rx_bytes(used[0].0, used[0].1);
    assert_eq!(num_buffers(&bytes), 1);
    assert_eq!(bytes[12..], tagged_frame(2, 100));

    card.send(vnet_header(0, 0, 0), &arp_request(HOST_ADDRESS));
    let (_, reply) = card.receive_frame();
    check_arp_reply(&card, &reply);
}

#[test]
fn the_queues_wrap_around_over_hundreds_of_frames() {
    let mut card = card(ALL_FEATURES, 16);
    // Receive: 8 buffers and 8 frames per round in a 16-entry queue.
    let mut next_tag = 0u32;
    for _ in 0..38 {
        let frames: Vec<Vec<u8>> = (0..8)
            .map(|_| {
                next_tag += 1;
                tagged_frame(next_tag, 60 + (next_tag as usize * 7) % 1400)
            })
            .collect();
        for frame in &frames {
            card.host.inject(frame);
        }
        card.give_rx(8, 2048);
        let used = card.receive(8);
        for (&(head, len), frame) in used.iter().zip(&frames) {
            let bytes = card.rx_bytes(head, len);
            assert_eq!(num_buffers(&bytes), 1);
            assert_eq!(&bytes[12..], &frame[..]);
        }
    }
    assert_eq!(card.counters().rx_frames, 304);

    // Transmit: 8 chains per notification.
    let mut tag = 1000u32;
    for _ in 0..38 {
        let frames: Vec<Vec<u8>> = (0..8)
            .map(|_| {
                tag += 1;
                tagged_frame(tag, 60 + (tag as usize * 11) % 1400)
            })
            .collect();
        let heads: Vec<u16> = frames
            .iter()
            .enumerate()
            .map(|(slot, frame)| card.push_tx(slot as u64, vnet_header(0, 0, 0), frame))
            .collect();
        card.driver.kick(1);
        assert_eq!(
            card.driver.take_used(1),
            heads
                .iter()
                .map(|&head| (u32::from(head), 0))
                .collect::<Vec<_>>()
        );
        for frame in &frames {
            let seen = card
                .host
                .capture(|seen| frame_tag(seen).is_some_and(|tag| tag > 1000));
            assert_eq!(&seen, frame);
        }
    }
    assert_eq!(card.counters().tx_frames, 304);
    assert_eq!(card.counters().tx_dropped + card.counters().rx_dropped, 0);
}

#[test]
fn the_tap_offloads_follow_what_the_driver_accepted() {
    let flags = |features: u64| ReceiveOffloads::from_features(features).tap_flags();
    assert_eq!(
        flags(ALL_FEATURES),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
    );
    assert_eq!(flags(ALL_FEATURES & !GUEST_OFFLOADS), 0);
    assert_eq!(flags(1 << VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
    // Segmentation without checksum offload, or ECN without segmentation, means nothing.
    assert_eq!(
        flags(1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_ECN),
        0
    );
    assert_eq!(
        flags(1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_ECN),
        libc::TUN_F_CSUM
    );
    assert_eq!(
        flags(1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );
}
