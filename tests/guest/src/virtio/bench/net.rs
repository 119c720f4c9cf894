//! The network benchmarks, on a virtio-net device with no offloads (receive queue 0, transmit
//! queue 1, every frame after the 12-byte `virtio_net_hdr_v1`).
//!
//! `net-tx` sends one UDP datagram over and over, in frames of `bench-size` bytes (60 to 1514,
//! default 1514), from `net-ip` to `net-peer` at the MAC `bench-peer-mac`, port
//! [`BENCH_UDP_PORT`] to the same port, with a valid IPv4 header checksum and no UDP checksum.
//! Every chain is one read-only descriptor over the same frame: the device only reads it. As
//! many frames are in flight as the transmit queue holds.
//!
//! `net-rx` posts as many receive buffers of 2048 bytes as the receive queue holds (one
//! descriptor each) and counts the frames the host sends, giving each buffer back at once.
//! Its end line adds `other-frames=<n>`: frames since `bench: ready` whose length was not
//! `bench-size` (none when the host sends only its flood).

use super::{describe, pump, ram_area, Start, Timing, Workload, MAX_SEGMENTS};
use crate::boot_information::MemoryMapEntry;
use crate::command_line::{BenchCase, BenchOptions, VirtioOptions, BENCH_UDP_PORT};
use crate::serial::Console;
use crate::virtio::memory::DmaBuffer;
use crate::virtio::net::checksum;
use crate::virtio::queue::{Segment, LARGEST_QUEUE_SIZE};
use crate::virtio::{Device, DriverError};

const FEATURE_MAC: u64 = 1 << 5;
const NET_HEADER_SIZE: usize = 12;
const RX_BUFFER_SIZE: usize = 2048;

const ETHERNET_HEADER: usize = 14;
const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const ETHERTYPE_IPV4: u16 = 0x0800;
const IP_PROTOCOL_UDP: u8 = 17;
/// The shortest and longest Ethernet frames without their check sequence.
const MINIMUM_FRAME: u64 = 60;
const MAXIMUM_FRAME: u64 = 1514;
const DEFAULT_FRAME: u64 = MAXIMUM_FRAME;
/// Used when the device offers no MAC (both VMMs the host runs are given one).
const FALLBACK_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// `net-tx`: every request is the one frame.
struct Transmit {
    frame: DmaBuffer,
    frame_size: usize,
}

/// `net-rx`: each slot is a receive buffer.
struct Receive {
    buffers: DmaBuffer,
    expected_size: u64,
    other_frames: u64,
}

pub fn run(
    device: &mut Device,
    bench: &BenchOptions,
    options: &VirtioOptions,
    memory_map: impl Iterator<Item = MemoryMapEntry>,
    timing: &Timing,
) -> Result<(), DriverError> {
    let frame_size = bench.size.unwrap_or(DEFAULT_FRAME);
    if !(MINIMUM_FRAME..=MAXIMUM_FRAME).contains(&frame_size) {
        return Err(DriverError::Unexpected {
            what: "bench-size must be an Ethernet frame of 60 to 1514 bytes, not",
            value: frame_size,
        });
    }
    let offered = device.transport.negotiate(FEATURE_MAC)?;
    let mut mac = FALLBACK_MAC;
    if offered & FEATURE_MAC != 0 {
        for (offset, byte) in mac.iter_mut().enumerate() {
            *byte = device.transport.config_u8(offset);
        }
    }
    let [mut rx, mut tx] = device.start_with_limit::<2>(LARGEST_QUEUE_SIZE)?;
    let depth = |size: u16| {
        let slots = usize::from(size);
        bench
            .depth
            .map_or(slots, |depth| slots.min(depth.max(1) as usize))
    };

    if bench.case == BenchCase::NetTransmit {
        let (Some(address), Some(peer), Some(peer_mac)) =
            (options.net_address, options.net_peer, bench.peer_mac)
        else {
            return Err(DriverError::Options(
                "net-tx needs net-ip=, net-peer= and bench-peer-mac=",
            ));
        };
        let frame_size = frame_size as usize;
        let mut frame = DmaBuffer::allocate(NET_HEADER_SIZE + frame_size, 64)?;
        build_datagram(
            &mut frame.bytes_mut()[NET_HEADER_SIZE..],
            mac,
            peer_mac,
            address,
            peer,
        );
        let slots = depth(tx.size());
        describe(&tx, slots, frame_size as u64);
        let mut workload = Transmit { frame, frame_size };
        pump(
            device,
            &mut tx,
            &mut workload,
            slots,
            Start::Immediately,
            timing,
        )
    } else {
        let slots = depth(rx.size());
        let length = slots * RX_BUFFER_SIZE;
        describe(&rx, slots, frame_size);
        let mut workload = Receive {
            buffers: ram_area(memory_map, length)?.allocate_pages(length)?,
            expected_size: frame_size,
            other_frames: 0,
        };
        pump(
            device,
            &mut rx,
            &mut workload,
            slots,
            Start::AtFirstCompletion,
            timing,
        )
    }
}

/// Writes an Ethernet frame carrying one UDP datagram that fills `frame`.
fn build_datagram(
    frame: &mut [u8],
    mac: [u8; 6],
    peer_mac: [u8; 6],
    address: [u8; 4],
    peer: [u8; 4],
) {
    frame[0..6].copy_from_slice(&peer_mac);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let packet = &mut frame[ETHERNET_HEADER..];
    let total = packet.len() as u16;
    packet[0] = 0x45;
    packet[1] = 0;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[4..6].fill(0);
    packet[6] = 0x40; // don't fragment
    packet[7] = 0;
    packet[8] = 64; // TTL
    packet[9] = IP_PROTOCOL_UDP;
    packet[10..12].fill(0);
    packet[12..16].copy_from_slice(&address);
    packet[16..20].copy_from_slice(&peer);
    let header_checksum = checksum(&packet[..IPV4_HEADER]);
    packet[10..12].copy_from_slice(&header_checksum.to_be_bytes());
    let datagram = &mut packet[IPV4_HEADER..];
    let length = datagram.len() as u16;
    datagram[0..2].copy_from_slice(&BENCH_UDP_PORT.to_be_bytes());
    datagram[2..4].copy_from_slice(&BENCH_UDP_PORT.to_be_bytes());
    datagram[4..6].copy_from_slice(&length.to_be_bytes());
    datagram[6..8].fill(0); // no checksum, which IPv4 allows
    for (offset, byte) in datagram[UDP_HEADER..].iter_mut().enumerate() {
        *byte = offset as u8;
    }
}

impl Workload for Transmit {
    fn request(&mut self, _slot: usize, segments: &mut [Segment; MAX_SEGMENTS]) -> usize {
        segments[0] = Segment::readable(
            self.frame.address(),
            (NET_HEADER_SIZE + self.frame_size) as u32,
        );
        1
    }

    fn completed(&mut self, _slot: usize, _length: u32) -> Result<u64, DriverError> {
        Ok(self.frame_size as u64)
    }
}

impl Workload for Receive {
    fn request(&mut self, slot: usize, segments: &mut [Segment; MAX_SEGMENTS]) -> usize {
        segments[0] = Segment::writable(
            self.buffers.address_at(slot * RX_BUFFER_SIZE),
            RX_BUFFER_SIZE as u32,
        );
        1
    }

    fn completed(&mut self, _slot: usize, length: u32) -> Result<u64, DriverError> {
        let frame = u64::from(length).saturating_sub(NET_HEADER_SIZE as u64);
        if frame != self.expected_size {
            self.other_frames += 1;
        }
        Ok(frame)
    }

    fn report(&self, line: Console) -> Console {
        line.text(" other-frames=").decimal(self.other_frames)
    }
}
