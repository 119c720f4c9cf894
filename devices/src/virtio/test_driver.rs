//! A virtio driver for tests: it programs an `MmioTransport` through its registers and lays out
//! split virtqueues in real guest memory, as the Linux driver would, so device tests exercise the
//! same paths a guest does. Not for use outside `#[cfg(test)]`.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::MmioTransport;
use super::VirtioDevice;
use crate::bus::{lock, BusDevice};

/// Guest memory size of every test: 1 MiB at guest address 0.
pub const MEMORY_SIZE: u64 = 0x10_0000;
/// Where tests may put their data buffers; the rings live below.
pub const DATA_START: u64 = 0x4_0000;

pub mod offset {
    pub const MAGIC_VALUE: u32 = 0x000;
    pub const VERSION: u32 = 0x004;
    pub const DEVICE_ID: u32 = 0x008;
    pub const DEVICE_FEATURES: u32 = 0x010;
    pub const DEVICE_FEATURES_SELECT: u32 = 0x014;
    pub const DRIVER_FEATURES: u32 = 0x020;
    pub const DRIVER_FEATURES_SELECT: u32 = 0x024;
    pub const QUEUE_SELECT: u32 = 0x030;
    pub const QUEUE_SIZE_MAX: u32 = 0x034;
    pub const QUEUE_SIZE: u32 = 0x038;
    pub const QUEUE_READY: u32 = 0x044;
    pub const QUEUE_NOTIFY: u32 = 0x050;
    pub const INTERRUPT_STATUS: u32 = 0x060;
    pub const INTERRUPT_ACK: u32 = 0x064;
    pub const STATUS: u32 = 0x070;
    pub const QUEUE_DESCRIPTORS_LOW: u32 = 0x080;
    pub const QUEUE_AVAILABLE_LOW: u32 = 0x090;
    pub const QUEUE_USED_LOW: u32 = 0x0a0;
    pub const QUEUE_USED_HIGH: u32 = 0x0a4;
    pub const CONFIG_GENERATION: u32 = 0x0fc;
    pub const CONFIG: u32 = 0x100;
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    pub address: u64,
    pub len: u32,
    pub device_writable: bool,
}

impl Buffer {
    pub fn readable(address: u64, len: u32) -> Self {
        Self {
            address,
            len,
            device_writable: false,
        }
    }

    pub fn writable(address: u64, len: u32) -> Self {
        Self {
            address,
            len,
            device_writable: true,
        }
    }
}

/// A raw descriptor, for chains no honest driver would write.
#[derive(Debug, Clone, Copy)]
pub struct RawDescriptor {
    pub address: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

struct DriverQueue {
    size: u16,
    descriptors: u64,
    available: u64,
    used: u64,
    next_descriptor: u16,
    available_index: u16,
    used_seen: u16,
}

pub struct TestDriver {
    pub memory: GuestMemoryMmap,
    pub transport: MmioTransport,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    queues: Vec<DriverQueue>,
}

impl TestDriver {
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap();
        let transport = MmioTransport::new(device.clone(), memory.clone()).unwrap();
        Self {
            memory,
            transport,
            device,
            queues: Vec::new(),
        }
    }

    pub fn read(&mut self, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write(&mut self, offset: u32, value: u32) {
        self.transport
            .write(u64::from(offset), &value.to_le_bytes());
    }

    pub fn status(&mut self) -> u32 {
        self.read(offset::STATUS)
    }

    pub fn device_features(&mut self) -> u64 {
        self.write(offset::DEVICE_FEATURES_SELECT, 0);
        let low = self.read(offset::DEVICE_FEATURES);
        self.write(offset::DEVICE_FEATURES_SELECT, 1);
        let high = self.read(offset::DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Resets, acknowledges the device, writes `features` and sets FEATURES_OK; returns whether
    /// the device kept FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.write(offset::STATUS, 0);
        self.queues.clear();
        self.write(offset::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write(
            offset::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.write(offset::DRIVER_FEATURES_SELECT, 0);
        self.write(offset::DRIVER_FEATURES, features as u32);
        self.write(offset::DRIVER_FEATURES_SELECT, 1);
        self.write(offset::DRIVER_FEATURES, (features >> 32) as u32);
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        self.write(offset::STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK);
        self.status() & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    /// Lays out queue `index` with `size` entries (rings in the first 256 KiB) and makes it ready.
    pub fn setup_queue(&mut self, index: u16, size: u16) {
        let base = 0x1000 + u64::from(index) * 0x1_0000;
        let queue = DriverQueue {
            size,
            descriptors: base,
            available: base + 0x4000,
            used: base + 0x8000,
            next_descriptor: 0,
            available_index: 0,
            used_seen: 0,
        };
        // Fresh rings: zero flags and indices, as a driver allocating zeroed pages would.
        self.memory
            .write_slice(&[0u8; 0x1_0000], GuestAddress(base))
            .unwrap();
        self.write(offset::QUEUE_SELECT, u32::from(index));
        assert!(self.read(offset::QUEUE_SIZE_MAX) >= u32::from(size));
        self.write(offset::QUEUE_SIZE, u32::from(size));
        for (low, address) in [
            (offset::QUEUE_DESCRIPTORS_LOW, queue.descriptors),
            (offset::QUEUE_AVAILABLE_LOW, queue.available),
            (offset::QUEUE_USED_LOW, queue.used),
        ] {
            self.write(low, address as u32);
            self.write(low + 4, (address >> 32) as u32);
        }
        self.write(offset::QUEUE_READY, 1);
        let index = usize::from(index);
        if self.queues.len() <= index {
            self.queues.resize_with(index + 1, || DriverQueue {
                size: 0,
                descriptors: 0,
                available: 0,
                used: 0,
                next_descriptor: 0,
                available_index: 0,
                used_seen: 0,
            });
        }
        self.queues[index] = queue;
    }

    /// The whole initialisation: negotiate `features` (which must be accepted), set up every
    /// queue with `queue_size` entries, then DRIVER_OK.
    pub fn initialise(&mut self, features: u64, queue_size: u16) {
        assert!(self.negotiate(features), "FEATURES_OK refused");
        let count = lock(&self.device).queue_max_sizes().len();
        for index in 0..count {
            self.setup_queue(index as u16, queue_size);
        }
        let status = self.status();
        self.write(offset::STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(
            self.status(),
            status | VIRTIO_CONFIG_S_DRIVER_OK,
            "activation failed: {:?}",
            self.transport.activation_error()
        );
    }

    /// Puts a chain of `buffers` on queue `queue` and makes it available; returns its head.
    pub fn push_chain(&mut self, queue: u16, buffers: &[Buffer]) -> u16 {
        let size = self.queues[usize::from(queue)].size;
        let first = self.queues[usize::from(queue)].next_descriptor;
        let descriptors: Vec<RawDescriptor> = buffers
            .iter()
            .enumerate()
            .map(|(position, buffer)| {
                let last = position + 1 == buffers.len();
                let mut flags = if last { 0 } else { VRING_DESC_F_NEXT as u16 };
                if buffer.device_writable {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                RawDescriptor {
                    address: buffer.address,
                    len: buffer.len,
                    flags,
                    next: (first + position as u16 + 1) % size,
                }
            })
            .collect();
        self.write_descriptors(queue, first, &descriptors);
        let state = &mut self.queues[usize::from(queue)];
        state.next_descriptor = (first + buffers.len() as u16) % size;
        self.make_available(queue, first);
        first
    }

    /// Writes `descriptors` into table slots 0, 1, ... (every earlier chain must have come
    /// back) and makes slot 0 available, whatever their flags and links say.
    pub fn push_raw(&mut self, queue: u16, descriptors: &[RawDescriptor]) -> u16 {
        self.write_descriptors(queue, 0, descriptors);
        let state = &mut self.queues[usize::from(queue)];
        state.next_descriptor = descriptors.len() as u16 % state.size;
        self.make_available(queue, 0);
        0
    }

    fn write_descriptors(&mut self, queue: u16, first: u16, descriptors: &[RawDescriptor]) {
        let state = &self.queues[usize::from(queue)];
        for (position, descriptor) in descriptors.iter().enumerate() {
            let slot = (first + position as u16) % state.size;
            let address = GuestAddress(state.descriptors + u64::from(slot) * 16);
            let mut bytes = [0u8; 16];
            bytes[0..8].copy_from_slice(&descriptor.address.to_le_bytes());
            bytes[8..12].copy_from_slice(&descriptor.len.to_le_bytes());
            bytes[12..14].copy_from_slice(&descriptor.flags.to_le_bytes());
            bytes[14..16].copy_from_slice(&descriptor.next.to_le_bytes());
            self.memory.write_slice(&bytes, address).unwrap();
        }
    }

    /// Puts `head` on the available ring, without writing any descriptor.
    pub fn make_available(&mut self, queue: u16, head: u16) {
        let state = &mut self.queues[usize::from(queue)];
        let slot = u64::from(state.available_index % state.size);
        self.memory
            .write_obj(head, GuestAddress(state.available + 4 + slot * 2))
            .unwrap();
        state.available_index = state.available_index.wrapping_add(1);
        self.memory
            .write_obj(state.available_index, GuestAddress(state.available + 2))
            .unwrap();
    }

    /// Notifies `queue` through QueueNotify and, playing the event loop, has the device
    /// process it once the notification event fired.
    pub fn kick(&mut self, queue: u16) {
        self.write(offset::QUEUE_NOTIFY, u32::from(queue));
        let fired = self.transport.queue_events()[usize::from(queue)].read();
        assert_eq!(fired.ok(), Some(1), "QueueNotify did not signal the event");
        lock(&self.device)
            .process_queue(usize::from(queue))
            .unwrap();
    }

    /// The used-ring entries added since the last call: (head, length written).
    pub fn take_used(&mut self, queue: u16) -> Vec<(u32, u32)> {
        let state = &mut self.queues[usize::from(queue)];
        let used_index: u16 = self.memory.read_obj(GuestAddress(state.used + 2)).unwrap();
        let mut entries = Vec::new();
        while state.used_seen != used_index {
            let slot = u64::from(state.used_seen % state.size);
            let element = GuestAddress(state.used + 4 + slot * 8);
            let id: u32 = self.memory.read_obj(element).unwrap();
            let len: u32 = self.memory.read_obj(GuestAddress(element.0 + 4)).unwrap();
            entries.push((id, len));
            state.used_seen = state.used_seen.wrapping_add(1);
        }
        entries
    }

    /// The used-ring entries of `count` requests, waiting for them as the event loop would for a
    /// device that completes requests on threads of its own: polls its `backend_fd` and calls
    /// `process_backend`. Panics if they have not all come back within 10 seconds.
    pub fn wait_used(&mut self, queue: u16, count: usize) -> Vec<(u32, u32)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut used = self.take_used(queue);
        while used.len() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {count} requests came back",
                used.len()
            );
            let fd = lock(&self.device).backend_fd();
            if let Some(fd) = fd {
                let mut poll = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the length given; poll only writes `revents`.
                unsafe { libc::poll(&mut poll, 1, 10) };
            }
            lock(&self.device).process_backend().unwrap();
            used.extend(self.take_used(queue));
        }
        used
    }

    /// Sets `used_event`: the driver wants an interrupt once the used index passes it.
    pub fn set_used_event(&mut self, queue: u16, value: u16) {
        let state = &self.queues[usize::from(queue)];
        let address = state.available + 4 + u64::from(state.size) * 2;
        self.memory.write_obj(value, GuestAddress(address)).unwrap();
    }

    /// Overwrites the available index, as a confused or hostile driver might.
    pub fn set_available_index(&mut self, queue: u16, value: u16) {
        let state = &self.queues[usize::from(queue)];
        self.memory
            .write_obj(value, GuestAddress(state.available + 2))
            .unwrap();
    }

    /// `avail_event`: the available index at which the device wants the next notification.
    pub fn available_event(&self, queue: u16) -> u16 {
        let state = &self.queues[usize::from(queue)];
        let address = state.used + 4 + u64::from(state.size) * 8;
        self.memory.read_obj(GuestAddress(address)).unwrap()
    }

    /// The used ring's flags (bit 0: the device asks not to be notified).
    pub fn used_flags(&self, queue: u16) -> u16 {
        let state = &self.queues[usize::from(queue)];
        self.memory.read_obj(GuestAddress(state.used)).unwrap()
    }

    /// Reads and acknowledges the interrupt status.
    pub fn acknowledge_interrupt(&mut self) -> u32 {
        let status = self.read(offset::INTERRUPT_STATUS);
        self.write(offset::INTERRUPT_ACK, status);
        status
    }

    pub fn read_bytes(&self, address: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.memory
            .read_slice(&mut bytes, GuestAddress(address))
            .unwrap();
        bytes
    }

    pub fn write_bytes(&self, address: u64, bytes: &[u8]) {
        self.memory
            .write_slice(bytes, GuestAddress(address))
            .unwrap();
    }

    /// Reads `data.len()` bytes of device configuration space at `offset`, one access.
    pub fn read_config(&mut self, offset: u32, data: &mut [u8]) {
        self.transport
            .read(u64::from(offset::CONFIG + offset), data);
    }
}

/// The status a driver has after a successful initialisation.
pub const STATUS_RUNNING: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK;
