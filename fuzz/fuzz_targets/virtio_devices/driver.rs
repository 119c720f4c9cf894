//! The fuzzed driver's side of one device: the `MmioTransport` it programs, the guest memory it
//! writes, a mirror of the queue registers the transport accepted, and the checks that run after
//! every call into the device.
//!
//! The checks after each `process_queue` or `process_backend` (a "step"):
//! - every used-ring entry the device added names a head below the queue size that was on the
//!   available ring, and a length no larger than that chain's device-writable bytes;
//! - a step returns at most a queue's worth of buffers;
//! - guest memory changed only inside the device-writable buffers of chains on the available
//!   rings and inside the used rings (nothing at all while the device is not activated);
//! - the device's counters never go down; rng's byte counter grows by the used lengths.
//!
//! Chains are parsed the way `virtio-queue` parses them, from the memory as it was before the
//! step. A step whose writes changed the descriptor tables or available rings themselves (a
//! writable buffer laid over them) is ambiguous: the device may have read a state in between. Such
//! a step is not checked, and the used rings are no longer tracked until the next activation.

use std::sync::{Arc, Mutex};

use cove_devices::bus::lock;
use cove_devices::virtio::block::Block;
use cove_devices::virtio::net::Net;
use cove_devices::virtio::rng::Rng;
use cove_devices::virtio::vsock::Vsock;
use cove_devices::virtio::{MmioTransport, VirtioDevice, VirtioError};
use cove_devices::BusDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::chains::{
    changed_runs, covers, gather, intersects, merge, overlaps, read_u16, read_u32, Range, Rings,
    Walk, DESCRIPTOR_INDIRECT, DESCRIPTOR_NEXT, DESCRIPTOR_WRITE,
};

/// The guest's memory: small, so that arbitrary 16-bit addresses land inside it.
pub const MEMORY_SIZE: usize = 0x1_0000;
/// Each queue's rings in the driver's own layout: queue `q` at `q * QUEUE_REGION`.
const QUEUE_REGION: u64 = 0x2000;
const AVAILABLE_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x1400;
/// Indirect tables of the driver's chains, 8 slots of 4 descriptors after the used ring.
const INDIRECT_OFFSET: u64 = 0x1c40;
const INDIRECT_SLOT: u64 = 0x40;
/// Where the driver's buffers go: above the rings of up to three queues of 256.
pub const DATA_START: u64 = 3 * QUEUE_REGION;
pub const DATA_LEN: u64 = MEMORY_SIZE as u64 - DATA_START;
/// The receive buffers posted at initialisation, inside the data area.
const RECEIVE_START: u64 = 0xa000;
const RECEIVE_LEN: u64 = 0x800;
const RECEIVE_BUFFERS: u16 = 8;

pub mod register {
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SELECT: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SELECT: u64 = 0x024;
    pub const QUEUE_SELECT: u64 = 0x030;
    pub const QUEUE_SIZE: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESCRIPTORS_LOW: u64 = 0x080;
    pub const QUEUE_DESCRIPTORS_HIGH: u64 = 0x084;
    pub const QUEUE_AVAILABLE_LOW: u64 = 0x090;
    pub const QUEUE_AVAILABLE_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
}

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const VERSION_1: u64 = 1 << 32;

/// The device under test, typed, for its counters.
pub enum Device {
    Block(Arc<Mutex<Block>>),
    Rng(Arc<Mutex<Rng>>),
    Net(Arc<Mutex<Net>>),
    Vsock(Arc<Mutex<Vsock>>),
}

impl Device {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Block(_) => "block",
            Self::Rng(_) => "rng",
            Self::Net(_) => "net",
            Self::Vsock(_) => "vsock",
        }
    }

    fn virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Self::Block(device) => device.clone(),
            Self::Rng(device) => device.clone(),
            Self::Net(device) => device.clone(),
            Self::Vsock(device) => device.clone(),
        }
    }

    /// The counters that may only grow (vsock's open connections is a level, left out).
    fn counters(&self) -> Vec<u64> {
        match self {
            Self::Block(device) => {
                let counters = lock(device).counters();
                vec![counters.requests, counters.failed_requests]
            }
            Self::Rng(device) => vec![lock(device).bytes_served()],
            Self::Net(device) => {
                let counters = lock(device).counters();
                vec![
                    counters.rx_frames,
                    counters.rx_bytes,
                    counters.rx_dropped,
                    counters.tx_frames,
                    counters.tx_bytes,
                    counters.tx_dropped,
                ]
            }
            Self::Vsock(device) => {
                let counters = lock(device).counters();
                vec![
                    counters.tx_packets,
                    counters.rx_packets,
                    counters.dropped_packets,
                    counters.dropped_resets,
                    counters.bad_rx_chains,
                    counters.refused_host_connections,
                ]
            }
        }
    }
}

/// A queue's registers as the transport accepted them.
#[derive(Debug, Clone, Copy)]
struct QueueRegisters {
    size: u16,
    ready: bool,
    descriptors: u64,
    available: u64,
    used: u64,
}

impl QueueRegisters {
    fn reset(max_size: u16) -> Self {
        Self {
            size: max_size,
            ready: false,
            descriptors: 0,
            available: 0,
            used: 0,
        }
    }

    fn rings(&self) -> Rings {
        Rings {
            size: self.size,
            descriptors: self.descriptors,
            available: self.available,
        }
    }

    /// The used ring with `avail_event` after it: everything the device may write of the queue.
    fn used_area(&self) -> Range {
        (self.used, self.used + 6 + 8 * u64::from(self.size))
    }
}

/// A queue the device was activated with, and the used index the device has reached on it, as
/// far as the driver can tell.
struct ActiveQueue {
    registers: QueueRegisters,
    used_seen: Option<u16>,
}

pub struct Driver {
    device: Device,
    virtio: Arc<Mutex<dyn VirtioDevice>>,
    memory: GuestMemoryMmap,
    pub transport: MmioTransport,
    /// Guest memory as the driver last saw it.
    expected: Vec<u8>,
    current: Vec<u8>,
    max_sizes: Vec<u16>,
    registers: Vec<QueueRegisters>,
    queue_select: u32,
    active: Option<Vec<ActiveQueue>>,
    /// The device failed; as the VMM does, it is served again once the driver reset it.
    stopped: bool,
    counters: Vec<u64>,
    ignored_accesses: u64,
    trapped_notifications: u64,
    /// The driver's own queue size, and the next free slot of each descriptor table.
    pub size: u16,
    next_slot: Vec<u16>,
    next_indirect: u64,
    /// The first bytes of the last buffer the device filled on queue 0 (vsock: a packet header).
    pub last_received: Vec<u8>,
}

impl Driver {
    pub fn new(device: Device, memory: GuestMemoryMmap) -> Self {
        let virtio = device.virtio();
        let transport = MmioTransport::new(virtio.clone(), memory.clone()).expect("transport");
        let max_sizes = lock(&virtio).queue_max_sizes().to_vec();
        let counters = device.counters();
        Self {
            registers: max_sizes
                .iter()
                .map(|&max| QueueRegisters::reset(max))
                .collect(),
            next_slot: vec![0; max_sizes.len()],
            max_sizes,
            device,
            virtio,
            memory,
            transport,
            expected: vec![0; MEMORY_SIZE],
            current: vec![0; MEMORY_SIZE],
            queue_select: 0,
            active: None,
            stopped: false,
            counters,
            ignored_accesses: 0,
            trapped_notifications: 0,
            size: 1,
            next_indirect: 0,
            last_received: Vec::new(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn queue_count(&self) -> usize {
        self.max_sizes.len()
    }

    pub fn backend_fd(&self) -> Option<i32> {
        lock(&self.virtio).backend_fd()
    }

    // ---- Registers ----

    /// One register or configuration-space write, then whatever the VMM's event loop would do
    /// about the queue events it fired.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let ignored = self.transport.ignored_accesses();
        self.transport.write(offset, data);
        let accepted = self.transport.ignored_accesses() == ignored;
        if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset & 3 == 0 && offset < 0x100) {
            let value = u32::from_le_bytes(bytes);
            // A reset is always accepted; a refused FEATURES_OK still changes the status.
            if offset == register::STATUS {
                if value == 0 {
                    self.queue_select = 0;
                    for (registers, &max) in self.registers.iter_mut().zip(&self.max_sizes) {
                        *registers = QueueRegisters::reset(max);
                    }
                }
                self.track_activation();
            } else if accepted {
                self.mirror(offset, value);
            }
        }
        self.serve_notifications();
        // Guest memory is compared after each whole operation (and each call into the device):
        // comparing it after every register access of an initialisation costs more than it tells.
        self.check_counters();
    }

    pub fn mmio_write32(&mut self, offset: u64, value: u32) {
        self.mmio_write(offset, &value.to_le_bytes());
    }

    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data);
        self.check_counters();
    }

    fn mmio_read32(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.mmio_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn mirror(&mut self, offset: u64, value: u32) {
        if offset == register::QUEUE_SELECT {
            self.queue_select = value;
            return;
        }
        let Some(queue) = self.registers.get_mut(self.queue_select as usize) else {
            return;
        };
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            register::QUEUE_SIZE => queue.size = value as u16,
            register::QUEUE_READY => queue.ready = value == 1,
            register::QUEUE_DESCRIPTORS_LOW => queue.descriptors = low(queue.descriptors),
            register::QUEUE_DESCRIPTORS_HIGH => queue.descriptors = high(queue.descriptors),
            register::QUEUE_AVAILABLE_LOW => queue.available = low(queue.available),
            register::QUEUE_AVAILABLE_HIGH => queue.available = high(queue.available),
            register::QUEUE_USED_LOW => queue.used = low(queue.used),
            register::QUEUE_USED_HIGH => queue.used = high(queue.used),
            _ => {}
        }
    }

    /// After a status write: the device holds the queues as configured from its activation on.
    fn track_activation(&mut self) {
        let activated = lock(&self.virtio).is_activated();
        match (activated, self.active.is_some()) {
            (true, false) => {
                let queues = self
                    .registers
                    .iter()
                    .map(|&registers| ActiveQueue {
                        registers,
                        used_seen: Some(0),
                    })
                    .collect();
                self.active = Some(queues);
            }
            (false, true) => self.active = None,
            _ => {}
        }
    }

    /// The VMM's event loop: each fired queue event means `process_queue`.
    fn serve_notifications(&mut self) {
        for index in 0..self.queue_count() {
            if self.transport.queue_events()[index].read().is_ok() {
                self.step(|device| device.process_queue(index));
            }
        }
    }

    /// Resets and initialises the device as a driver would: `features` less the bits in
    /// `refused`, every queue of `size` entries in the driver's layout, then DRIVER_OK.
    pub fn initialise(&mut self, refused: u32, size: u16) {
        self.mmio_write32(register::STATUS, 0);
        let rings = QUEUE_REGION as usize * self.queue_count();
        self.write_memory(0, &vec![0u8; rings]);
        self.mmio_write32(register::STATUS, ACKNOWLEDGE);
        self.mmio_write32(register::STATUS, ACKNOWLEDGE | DRIVER);
        self.mmio_write32(register::DEVICE_FEATURES_SELECT, 0);
        let low = self.mmio_read32(register::DEVICE_FEATURES);
        self.mmio_write32(register::DEVICE_FEATURES_SELECT, 1);
        let high = self.mmio_read32(register::DEVICE_FEATURES);
        let offered = (u64::from(high) << 32) | u64::from(low);
        let features = (offered & !u64::from(refused)) | VERSION_1;
        self.mmio_write32(register::DRIVER_FEATURES_SELECT, 0);
        self.mmio_write32(register::DRIVER_FEATURES, features as u32);
        self.mmio_write32(register::DRIVER_FEATURES_SELECT, 1);
        self.mmio_write32(register::DRIVER_FEATURES, (features >> 32) as u32);
        self.mmio_write32(register::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.size = size;
        for queue in 0..self.queue_count() {
            let base = queue as u64 * QUEUE_REGION;
            self.mmio_write32(register::QUEUE_SELECT, queue as u32);
            self.mmio_write32(
                register::QUEUE_SIZE,
                u32::from(size.min(self.max_sizes[queue])),
            );
            for (low, address) in [
                (register::QUEUE_DESCRIPTORS_LOW, base),
                (register::QUEUE_AVAILABLE_LOW, base + AVAILABLE_OFFSET),
                (register::QUEUE_USED_LOW, base + USED_OFFSET),
            ] {
                self.mmio_write32(low, address as u32);
                self.mmio_write32(low + 4, (address >> 32) as u32);
            }
            self.mmio_write32(register::QUEUE_READY, 1);
            self.next_slot[queue] = 0;
        }
        self.mmio_write32(
            register::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        // As Linux's drivers do when they probe: receive buffers for what the host side sends.
        if matches!(self.device, Device::Net(_) | Device::Vsock(_)) {
            for position in 0..u64::from(self.driver_size(0).min(RECEIVE_BUFFERS)) {
                let address = RECEIVE_START + position * RECEIVE_LEN;
                let head = self.push_chain(0, &[(address, RECEIVE_LEN as u32, true)], false);
                self.publish(0, head);
            }
            self.mmio_write32(register::QUEUE_NOTIFY, 0);
        }
    }

    // ---- Guest memory and the driver's rings ----

    /// Writes `bytes` at `address`, cut at the end of memory.
    pub fn write_memory(&mut self, address: u64, bytes: &[u8]) {
        let start = address.min(MEMORY_SIZE as u64) as usize;
        let end = (start + bytes.len()).min(MEMORY_SIZE);
        let bytes = &bytes[..end - start];
        self.memory
            .write_slice(bytes, GuestAddress(start as u64))
            .expect("write guest memory");
        self.expected[start..end].copy_from_slice(bytes);
        // The used index is the device's: once the driver overwrites it, the driver can no
        // longer tell which entries the device added.
        for queue in self.active.iter_mut().flatten() {
            // Only ready queues lie inside guest memory.
            let used = queue.registers.used;
            let index = (used.saturating_add(2), used.saturating_add(4));
            if queue.registers.ready && overlaps((start as u64, end as u64), index) {
                queue.used_seen = None;
            }
        }
    }

    fn driver_size(&self, queue: usize) -> u16 {
        self.size.min(self.max_sizes[queue])
    }

    /// Writes descriptor `slot` of the driver's table for `queue`.
    pub fn write_descriptor(&mut self, queue: usize, slot: u16, descriptor: [u8; 16]) {
        let slot = slot % self.driver_size(queue);
        self.write_memory(
            queue as u64 * QUEUE_REGION + u64::from(slot) * 16,
            &descriptor,
        );
    }

    /// Puts `head` on the driver's available ring of `queue` at the ring's current index.
    pub fn publish(&mut self, queue: usize, head: u16) {
        let available = queue as u64 * QUEUE_REGION + AVAILABLE_OFFSET;
        let index = read_u16(&self.expected, available + 2).unwrap_or(0);
        let slot = u64::from(index % self.driver_size(queue));
        self.write_memory(available + 4 + 2 * slot, &head.to_le_bytes());
        self.write_memory(available + 2, &index.wrapping_add(1).to_le_bytes());
    }

    /// Lays `buffers` (address, length, device-writable) out as one chain in the next free
    /// slots of `queue`'s table, or behind one indirect descriptor; returns its head.
    pub fn push_chain(
        &mut self,
        queue: usize,
        buffers: &[(u64, u32, bool)],
        indirect: bool,
    ) -> u16 {
        let size = self.driver_size(queue);
        let head = self.next_slot[queue] % size;
        let descriptor = |address: u64, len: u32, flags: u16, next: u16| {
            let mut bytes = [0u8; 16];
            bytes[0..8].copy_from_slice(&address.to_le_bytes());
            bytes[8..12].copy_from_slice(&len.to_le_bytes());
            bytes[12..14].copy_from_slice(&flags.to_le_bytes());
            bytes[14..16].copy_from_slice(&next.to_le_bytes());
            bytes
        };
        let entry = |position: usize, &(address, len, writable): &(u64, u32, bool), next: u16| {
            let mut flags = if writable { DESCRIPTOR_WRITE } else { 0 };
            if position + 1 < buffers.len() {
                flags |= DESCRIPTOR_NEXT;
            }
            descriptor(address, len, flags, next)
        };
        if indirect {
            let table =
                queue as u64 * QUEUE_REGION + INDIRECT_OFFSET + self.next_indirect * INDIRECT_SLOT;
            self.next_indirect = (self.next_indirect + 1) % 8;
            let buffers = &buffers[..buffers.len().min((INDIRECT_SLOT / 16) as usize)];
            for (position, buffer) in buffers.iter().enumerate() {
                let bytes = entry(position, buffer, position as u16 + 1);
                self.write_memory(table + position as u64 * 16, &bytes);
            }
            let len = buffers.len() as u32 * 16;
            self.write_descriptor(queue, head, descriptor(table, len, DESCRIPTOR_INDIRECT, 0));
            self.next_slot[queue] = (head + 1) % size;
        } else {
            for (position, buffer) in buffers.iter().enumerate() {
                let slot = (head + position as u16) % size;
                let bytes = entry(position, buffer, (slot + 1) % size);
                self.write_descriptor(queue, slot, bytes);
            }
            self.next_slot[queue] = (head + buffers.len() as u16) % size;
        }
        head
    }

    // ---- Calling the device ----

    /// Whether the VMM would call the device: not stopped, or reset by the driver since.
    fn servable(&mut self) -> bool {
        if self.stopped && !self.transport.needs_reset() {
            self.stopped = false;
        }
        !self.stopped
    }

    pub fn process_backend(&mut self) {
        self.step(|device| device.process_backend());
    }

    /// Calls `process_backend` while the backend fd is readable, as a level-triggered event loop
    /// would; the device promises it is readable only while it can make progress, so a handful
    /// of calls must drain it when nothing new arrives.
    pub fn drain_backend(&mut self) {
        let Some(fd) = self.backend_fd() else {
            return;
        };
        for _ in 0..32 {
            if !self.servable() || !readable(fd, 0) {
                return;
            }
            self.process_backend();
        }
        assert!(
            !self.servable() || !readable(fd, 0),
            "{}: backend fd still readable after 32 calls with nothing new on the host side: \
             the event loop would spin",
            self.device.name()
        );
    }

    /// Runs `call` on the device as the event loop does, then checks what it did.
    fn step(&mut self, call: impl FnOnce(&mut dyn VirtioDevice) -> Result<(), VirtioError>) {
        if !self.servable() {
            return;
        }
        let counters = self.device.counters();
        let result = call(&mut *lock(&self.virtio));
        if let Err(error) = result {
            self.transport.device_failed(error);
            self.stopped = true;
        }
        self.check_step(&counters);
    }

    // ---- Checks ----

    fn check_counters(&mut self) {
        let counters = self.device.counters();
        for (position, (now, before)) in counters.iter().zip(&self.counters).enumerate() {
            assert!(
                now >= before,
                "{}: counter {position} went down from {before} to {now}",
                self.device.name()
            );
        }
        self.counters = counters;
        let ignored = self.transport.ignored_accesses();
        let trapped = self.transport.trapped_notifications();
        assert!(ignored >= self.ignored_accesses && trapped >= self.trapped_notifications);
        (self.ignored_accesses, self.trapped_notifications) = (ignored, trapped);
        let status = self.transport.interrupt().status();
        assert_eq!(
            status & !3,
            0,
            "interrupt status {status:#x} has bits beyond used buffer and configuration change"
        );
    }

    /// Nothing but the driver may have changed guest memory since the last look.
    pub fn check_quiet(&mut self) {
        self.memory
            .read_slice(&mut self.current, GuestAddress(0))
            .expect("read guest memory");
        if let Some(run) = changed_runs(&self.expected, &self.current).first() {
            panic!(
                "{}: guest memory {:#x?} changed outside any call into the device",
                self.device.name(),
                run
            );
        }
        self.check_counters();
    }

    /// The checks after a step; `counters` are the device's from before it.
    fn check_step(&mut self, counters: &[u64]) {
        let name = self.device.name();
        let rng_before = counters.first().copied();
        self.memory
            .read_slice(&mut self.current, GuestAddress(0))
            .expect("read guest memory");
        let changed = changed_runs(&self.expected, &self.current);
        let Some(active) = self.active.as_mut() else {
            assert!(
                changed.is_empty(),
                "{name}: wrote guest memory {:#x?} while not activated",
                changed[0]
            );
            self.check_counters();
            return;
        };
        let ready: Vec<usize> = (0..active.len())
            .filter(|&q| active[q].registers.ready)
            .collect();
        let moved = ready.iter().any(|&q| {
            let queue = &active[q];
            queue.used_seen.is_some()
                && read_u16(&self.current, queue.registers.used + 2) != queue.used_seen
        });
        if changed.is_empty() && !moved {
            self.check_counters();
            return;
        }
        let rings: Vec<(usize, Rings)> = ready
            .iter()
            .map(|&q| (q, active[q].registers.rings()))
            .collect();
        let walk = Walk::new(&self.expected, active.len(), &rings);
        let tables_changed = changed.iter().any(|&run| intersects(&walk.read, run));
        let mut rng_used = Some(0u64);
        if tables_changed {
            for queue in active.iter_mut() {
                queue.used_seen = None;
            }
            rng_used = None;
        } else {
            let mut allowed: Vec<Range> = walk.writable.clone();
            allowed.extend(ready.iter().map(|&q| active[q].registers.used_area()));
            let allowed = merge(allowed);
            for &run in &changed {
                assert!(
                    covers(&allowed, run),
                    "{name}: wrote guest memory {run:#x?}, outside every device-writable buffer on \
                     the available rings and every used ring (allowed: {allowed:#x?})"
                );
            }
            for &q in &ready {
                let registers = active[q].registers;
                let area = registers.used_area();
                let shared = intersects(&walk.writable, area)
                    || ready.iter().any(|&other| {
                        other != q && overlaps(active[other].registers.used_area(), area)
                    });
                let Some(seen) = active[q].used_seen else {
                    rng_used = None;
                    continue;
                };
                if shared {
                    // Buffers or another queue's entries may have overwritten this queue's.
                    active[q].used_seen = None;
                    rng_used = None;
                    continue;
                }
                let index =
                    read_u16(&self.current, registers.used + 2).expect("used ring inside memory");
                let added = index.wrapping_sub(seen);
                assert!(
                    added <= registers.size,
                    "{name}: queue {q} of {} entries got {added} used entries in one call",
                    registers.size
                );
                for position in 0..added {
                    let slot = u64::from(seen.wrapping_add(position) % registers.size);
                    let entry = registers.used + 4 + 8 * slot;
                    let id = read_u32(&self.current, entry).expect("used ring inside memory");
                    let len = read_u32(&self.current, entry + 4).expect("used ring inside memory");
                    assert!(
                        id < u32::from(registers.size),
                        "{name}: queue {q} used entry names head {id}, beyond the queue's {} entries",
                        registers.size
                    );
                    let Some(chain) = walk.chain(q, id as u16) else {
                        panic!("{name}: queue {q} returned head {id}, which is not on the available ring");
                    };
                    assert!(
                        u64::from(len) <= chain.writable,
                        "{name}: queue {q} head {id} used length {len} exceeds the chain's {} writable bytes",
                        chain.writable
                    );
                    rng_used = rng_used.map(|sum| sum + u64::from(len));
                    if q == 0 && len > 0 {
                        self.last_received =
                            gather(&self.current, &chain.ranges, len.min(64) as usize);
                    }
                }
                active[q].used_seen = Some(index);
            }
        }
        self.expected.copy_from_slice(&self.current);
        if let (Device::Rng(_), Some(before), Some(used)) = (&self.device, rng_before, rng_used) {
            let served = self.device.counters()[0] - before;
            assert_eq!(
                served, used,
                "rng: counted {served} bytes served, used lengths add up to {used}"
            );
        }
        self.check_counters();
    }
}

/// Whether `fd` is readable within `timeout_ms`.
pub fn readable(fd: i32, timeout_ms: i32) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `poll` is one live pollfd for the duration of the call.
    let count = unsafe { libc::poll(&mut poll, 1, timeout_ms) };
    count > 0 && poll.revents & libc::POLLIN != 0
}
