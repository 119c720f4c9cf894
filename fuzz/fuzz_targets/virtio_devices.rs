//! Any sequence of driver actions on a virtio device (block over a temporary raw image, rng, net
//! over a real tap, vsock over real Unix sockets), with host traffic in between.
//!
//! The first byte picks the device, the next five its queue size and the features the driver
//! refuses; the device starts initialised (features negotiated, queues laid out in 64 KiB of
//! guest memory, DRIVER_OK), so inputs reach deep paths at once. Then each operation is one of:
//! a register or configuration-space access of any offset and width (the status machine and queue
//! setup too), a write of any bytes to guest memory (descriptor tables, rings, indirect tables,
//! buffers), a descriptor, a chain or a batch of receive buffers made available, a well-formed
//! request of the device's kind, a queue notification (`process_queue`, as the VMM's event loop
//! does on the ioeventfd), `process_backend`, a reset and re-initialisation, and host traffic
//! (frames and datagrams into the tap; vsock clients sending `CONNECT <port>\n` and bytes, and
//! listeners at `<socket>_<port>` accepting the guest's connections).
//!
//! Beyond "no panic", `driver.rs` checks the used rings, the guest memory the device wrote and
//! the counters after every call; `host.rs` checks what vsock clients read before their stream
//! is connected; and at the end the device's backend fd must go quiet after a few calls.
#![no_main]

#[path = "virtio_devices/chains.rs"]
mod chains;
#[path = "virtio_devices/driver.rs"]
mod driver;
#[path = "virtio_devices/host.rs"]
mod host;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cove_devices::bus::lock;
use cove_devices::virtio::block::{Block, BlockConfig};
use cove_devices::virtio::rng::Rng;
use cove_devices::virtio::vsock::{Timeouts, Vsock, VsockConfig};
use cove_devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use driver::{register, Device, Driver, DATA_LEN, DATA_START, MEMORY_SIZE};
use host::{VsockPeers, LISTENING_PORTS};

/// Reads the input front to back; past its end every byte is 0.
struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn byte(&mut self) -> u8 {
        let (&first, rest) = self.bytes.split_first().unwrap_or((&0, &[]));
        self.bytes = rest;
        first
    }

    fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (taken, rest) = self.bytes.split_at(len.min(self.bytes.len()));
        self.bytes = rest;
        taken
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut array = [0u8; N];
        let taken = self.bytes(N);
        array[..taken.len()].copy_from_slice(taken);
        array
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// An address in the driver's data area.
    fn data_address(&mut self) -> u64 {
        DATA_START + u64::from(self.u16()) % DATA_LEN
    }
}

const GUEST_CID: u64 = 3;
const IMAGE_SIZE: u64 = 64 * 1024;
/// Waiting for the vsock timer costs real time: a few waits per input at most.
const MAX_WAITS: usize = 2;

fuzz_target!(|data: &[u8]| run(data));

fn run(data: &[u8]) {
    let environment = host::environment();
    let mut input = Input { bytes: data };
    let choice = input.byte();
    let size = queue_size(input.byte());
    let refused = input.u32();

    let memory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).expect("guest memory");
    let mut peers = None;
    let device = match choice % 4 {
        0 => {
            let path = environment.directory.join("disk.img");
            let image = std::fs::File::create(&path).expect("create the image");
            let partial = if choice & 0x10 != 0 { 300 } else { 0 };
            image.set_len(IMAGE_SIZE + partial).expect("size the image");
            let config = BlockConfig {
                path,
                read_only: choice & 4 != 0,
                id: "fuzz".into(),
                direct: choice & 8 != 0,
            };
            let block = Block::new(&config)
                .or_else(|_| {
                    Block::new(&BlockConfig {
                        direct: false,
                        ..config
                    })
                })
                .expect("open the image");
            Device::Block(Arc::new(Mutex::new(block)))
        }
        1 => Device::Rng(Arc::new(Mutex::new(Rng::new()))),
        2 => {
            let Some(network) = &environment.network else {
                return;
            };
            // What the previous input left: an activated device and frames on the tap.
            lock(&network.device).reset();
            network.drain();
            Device::Net(network.device.clone())
        }
        _ => {
            let socket = environment.directory.join("vsock");
            let _ = std::fs::remove_file(&socket);
            let vsock = Vsock::new(&VsockConfig {
                guest_cid: GUEST_CID,
                socket: socket.clone(),
            })
            .expect("vsock");
            peers = Some(VsockPeers::new(&socket));
            Device::Vsock(Arc::new(Mutex::new(vsock)))
        }
    };
    let mut driver = Driver::new(device, memory);
    driver.initialise(refused, size);
    let mut waits = 0;
    while !input.is_empty() {
        operation(
            &mut driver,
            &mut input,
            environment,
            peers.as_mut(),
            &mut waits,
        );
        driver.check_quiet();
    }
    driver.drain_backend();
    if let Some(peers) = &mut peers {
        peers.finish();
    }
    // The net device outlives the input: leave it reset, holding none of this input's memory.
    driver.mmio_write32(register::STATUS, 0);
}

fn operation(
    driver: &mut Driver,
    input: &mut Input,
    environment: &host::Environment,
    peers: Option<&mut VsockPeers>,
    waits: &mut usize,
) {
    let queues = driver.queue_count();
    // The likeliest bytes (small ones) do the most: a request, host traffic, serving the host.
    match input.byte() % 16 {
        0 => request(driver, input),
        1 => host_traffic(input, environment, peers),
        2 => driver.drain_backend(),
        3 => {
            let queue = usize::from(input.byte()) % queues;
            let control = input.byte();
            let mut buffers = Vec::new();
            for _ in 0..=control & 3 {
                let writable = input.byte() & 1 != 0;
                let address = input.data_address();
                let len = u32::from(input.u16());
                if !writable {
                    let content = usize::from(input.byte()).min(len as usize);
                    driver.write_memory(address, input.bytes(content));
                }
                buffers.push((address, len, writable));
            }
            let head = driver.push_chain(queue, &buffers, control & 4 != 0);
            driver.publish(queue, head);
            if control & 8 == 0 {
                notify(driver, queue);
            }
        }
        4 => {
            let queue = usize::from(input.byte()) % queues;
            let count = 1 + input.byte() % 16;
            let len = match input.u16() {
                0 => 0x800,
                len => u64::from(len),
            };
            let start = input.data_address();
            for position in 0..u64::from(count) {
                let address = DATA_START + (start - DATA_START + position * len) % DATA_LEN;
                let head = driver.push_chain(queue, &[(address, len as u32, true)], false);
                driver.publish(queue, head);
            }
            notify(driver, queue);
        }
        5 => {
            let offset = mmio_offset(input);
            let width = mmio_width(input);
            let mut data = input.bytes(width).to_vec();
            data.resize(width, 0);
            driver.mmio_write(offset, &data);
        }
        6 => {
            let offset = mmio_offset(input);
            let mut data = vec![0u8; mmio_width(input)];
            driver.mmio_read(offset, &mut data);
        }
        7 => {
            let address = u64::from(input.u16());
            let len = usize::from(input.byte());
            driver.write_memory(address, input.bytes(len));
        }
        8 => {
            let queue = usize::from(input.byte()) % queues;
            let slot = u16::from(input.byte());
            let control = input.byte();
            let address = if control & 0x80 != 0 {
                input.u64()
            } else {
                input.data_address()
            };
            let len = if control & 0x40 != 0 {
                input.u32()
            } else {
                u32::from(input.u16())
            };
            let flags = u16::from(control & 7);
            let next = u16::from(input.byte());
            let mut descriptor = [0u8; 16];
            descriptor[0..8].copy_from_slice(&address.to_le_bytes());
            descriptor[8..12].copy_from_slice(&len.to_le_bytes());
            descriptor[12..14].copy_from_slice(&flags.to_le_bytes());
            descriptor[14..16].copy_from_slice(&next.to_le_bytes());
            driver.write_descriptor(queue, slot, descriptor);
        }
        9 => {
            let queue = usize::from(input.byte()) % queues;
            let head = u16::from(input.byte());
            driver.publish(queue, head);
        }
        10 => {
            let queue = input.byte() as u32 % (queues as u32 + 1);
            driver.mmio_write32(register::QUEUE_NOTIFY, queue);
        }
        11 => driver.process_backend(),
        12 => {
            let refused = input.u32();
            let size = queue_size(input.byte());
            driver.initialise(refused, size);
        }
        13 => {
            let mut status = [0u8; 4];
            driver.mmio_read(register::INTERRUPT_STATUS, &mut status);
            driver.mmio_write(register::INTERRUPT_ACK, &status);
        }
        14 => {
            if *waits < MAX_WAITS {
                *waits += 1;
                if let Some(fd) = driver.backend_fd() {
                    driver::readable(fd, 2);
                }
                driver.drain_backend();
            }
        }
        _ => {
            if let Device::Vsock(vsock) = driver.device() {
                let control = input.byte();
                let timeouts = Timeouts {
                    connect_line: Duration::from_millis(u64::from(control & 1)),
                    response: Duration::from_millis(u64::from(control >> 1 & 1)),
                };
                lock(vsock).set_timeouts(timeouts);
            }
        }
    }
}

/// 256 entries for a zero byte, down to 1.
fn queue_size(byte: u8) -> u16 {
    256 >> (byte & 0xf).min(8)
}

/// Register offsets mostly, aligned; configuration space often; anything now and then.
fn mmio_offset(input: &mut Input) -> u64 {
    match input.byte() {
        selector @ 0..=0x3f => u64::from(selector) * 4,
        selector @ 0x40..=0x7f => 0x100 + u64::from(selector - 0x40),
        _ => u64::from(input.u16()) % 0x1000,
    }
}

fn mmio_width(input: &mut Input) -> usize {
    [4, 4, 4, 1, 2, 8, 3, 0][usize::from(input.byte() & 7)]
}

/// QueueNotify, which the event loop turns into `process_queue`.
fn notify(driver: &mut Driver, queue: usize) {
    driver.mmio_write32(register::QUEUE_NOTIFY, queue as u32);
}

fn host_traffic(
    input: &mut Input,
    environment: &host::Environment,
    peers: Option<&mut VsockPeers>,
) {
    let control = input.byte();
    if let Some(peers) = peers {
        let which = input.byte();
        match control % 9 {
            0 => {
                let mut line = format!("CONNECT {}\n", input.byte()).into_bytes();
                let len = usize::from(input.byte());
                line.extend_from_slice(input.bytes(len));
                peers.connect(&line);
            }
            1 => {
                let len = usize::from(input.byte());
                peers.connect(input.bytes(len));
            }
            2 => {
                let len = usize::from(input.byte());
                peers.client_write(which, input.bytes(len));
            }
            3 => peers.client_read(which),
            4 => peers.client_close(which, input.byte()),
            5 => peers.accept(),
            6 => {
                let len = usize::from(input.byte());
                peers.accepted_write(which, input.bytes(len));
            }
            7 => peers.accepted_read(which),
            _ => peers.accepted_close(which, input.byte()),
        }
    } else if let Some(network) = &environment.network {
        let len = usize::from(input.byte());
        if control & 1 == 0 {
            // At least an Ethernet header, or the kernel refuses the frame.
            let mut frame = input.bytes(len).to_vec();
            frame.resize(len.max(14), 0);
            network.inject(&frame);
        } else {
            let port = input.u16();
            network.send_udp(port, input.bytes(len));
        }
    }
}

/// A request of the device's own kind, well formed but for what the input says, made available
/// and notified.
fn request(driver: &mut Driver, input: &mut Input) {
    match driver.device() {
        Device::Block(_) => block_request(driver, input),
        Device::Net(_) => transmit_frame(driver, input),
        Device::Vsock(_) => vsock_packet(driver, input),
        Device::Rng(_) => {}
    }
}

fn block_request(driver: &mut Driver, input: &mut Input) {
    const TYPES: [u32; 7] = [0, 1, 4, 8, 11, 13, 2];
    let control = input.byte();
    let kind = match TYPES.get(usize::from(control & 7)) {
        Some(&kind) => kind,
        None => input.u32(),
    };
    let sector = u64::from(input.byte());
    let sectors = input.byte();
    let base = DATA_START + u64::from(input.byte()) * 0x80;
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    driver.write_memory(base, &header);
    let mut buffers = vec![(base, 16, false)];
    let data = base + 0x100;
    let data_len = match kind {
        // One discard or write-zeroes range: sector, sector count, flags.
        11 | 13 => {
            let mut range = [0u8; 16];
            range[0..8].copy_from_slice(&u64::from(input.byte()).to_le_bytes());
            range[8..12].copy_from_slice(&u32::from(sectors).to_le_bytes());
            range[12..16].copy_from_slice(&u32::from(input.byte()).to_le_bytes());
            driver.write_memory(data, &range);
            16
        }
        _ if control & 0x40 != 0 => u32::from(input.u16()),
        _ => u32::from(1 + sectors % 8) * 512,
    };
    if data_len > 0 {
        let writable = matches!(kind, 0 | 8) != (control & 0x80 != 0);
        buffers.push((data, data_len, writable));
    }
    buffers.push((data + u64::from(data_len), 1, true));
    let head = driver.push_chain(0, &buffers, control & 8 != 0);
    driver.publish(0, head);
    notify(driver, 0);
}

fn transmit_frame(driver: &mut Driver, input: &mut Input) {
    // The virtio-net header (num_buffers 0), then an Ethernet frame of at least a header.
    let mut frame = input.array::<10>().to_vec();
    frame.extend_from_slice(&[0, 0]);
    let len = usize::from(input.byte()).max(14);
    frame.extend_from_slice(input.bytes(len));
    frame.resize(12 + len, 0);
    let address = input.data_address();
    driver.write_memory(address, &frame);
    let head = driver.push_chain(1, &[(address, frame.len() as u32, false)], false);
    driver.publish(1, head);
    notify(driver, 1);
}

/// A packet from the guest to the host: to a listening port or in reply to the last packet the
/// guest received, with the operation, flags, credit and payload the input says.
fn vsock_packet(driver: &mut Driver, input: &mut Input) {
    let control = input.byte();
    let (source_port, destination_port) = if control & 8 != 0 && driver.last_received.len() >= 24 {
        let received = &driver.last_received;
        let port =
            |at: usize| u32::from_le_bytes(received[at..at + 4].try_into().expect("4 bytes"));
        (port(20), port(16))
    } else {
        let source = u32::from(input.byte());
        let selector = input.byte();
        let destination = if selector < 0x80 {
            LISTENING_PORTS[usize::from(selector) % LISTENING_PORTS.len()]
        } else {
            u32::from(selector)
        };
        (source, destination)
    };
    let (source_cid, destination_cid) = if control & 16 != 0 {
        (input.u64(), input.u64())
    } else {
        (GUEST_CID, 2)
    };
    let kind: u16 = if control & 32 != 0 { input.u16() } else { 1 };
    let flags = u32::from(input.byte());
    let buffer_size = u32::from(!input.u16()) << 4;
    let forwarded = u32::from(input.u16());
    let payload_len = usize::from(input.byte());
    let payload = input.bytes(payload_len);
    let len = if control & 64 != 0 {
        input.u32()
    } else {
        payload.len() as u32
    };
    let mut packet = Vec::with_capacity(44 + payload.len());
    packet.extend_from_slice(&source_cid.to_le_bytes());
    packet.extend_from_slice(&destination_cid.to_le_bytes());
    packet.extend_from_slice(&source_port.to_le_bytes());
    packet.extend_from_slice(&destination_port.to_le_bytes());
    packet.extend_from_slice(&len.to_le_bytes());
    packet.extend_from_slice(&kind.to_le_bytes());
    // REQUEST for a zero byte.
    packet.extend_from_slice(&u16::from(control.wrapping_add(1) & 7).to_le_bytes());
    packet.extend_from_slice(&flags.to_le_bytes());
    packet.extend_from_slice(&buffer_size.to_le_bytes());
    packet.extend_from_slice(&forwarded.to_le_bytes());
    packet.extend_from_slice(payload);
    let address = input.data_address();
    driver.write_memory(address, &packet);
    // Split the packet in two buffers somewhere, header included, now and then.
    let split = if control & 128 != 0 {
        usize::from(input.byte()) % packet.len()
    } else {
        packet.len()
    };
    let mut buffers = vec![(address, split as u32, false)];
    if split < packet.len() {
        buffers.push((address + split as u64, (packet.len() - split) as u32, false));
    }
    let head = driver.push_chain(1, &buffers, false);
    driver.publish(1, head);
    notify(driver, 1);
}
