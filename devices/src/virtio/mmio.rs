//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2), for modern devices only.
//!
//! One `MmioTransport` is a `BusDevice` on the MMIO bus covering [`MMIO_REGION_SIZE`] bytes:
//! the registers below 0x100 and the device's configuration space above. It negotiates features,
//! walks the device status through the spec's steps, keeps the queue configuration the driver
//! writes, and activates the device on DRIVER_OK. Anything a driver does out of turn (a register
//! access that is not 32 bits wide, a write to a read-only register, queue setup after
//! DRIVER_OK, a status bit set before its prerequisite) is ignored and counted, never a panic.
//!
//! Signals leave through `EventFd`s: one per queue, written when the driver writes QueueNotify
//! (the VMM may instead register them as KVM ioeventfds on `base + QUEUE_NOTIFY_OFFSET` with the
//! queue index as datamatch, so the write never exits), and one interrupt event (for an irqfd).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    event_index_negotiated, Activation, InterruptCause, InterruptLine, VirtioDevice, VirtioError,
    COMMON_FEATURES,
};
use crate::bus::{lock, BusDevice};

/// How many bytes of MMIO space one transport occupies.
pub const MMIO_REGION_SIZE: u64 = 0x1000;
/// Where QueueNotify sits in the region: the address for a queue's ioeventfd.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "cove" read as a little-endian u32; Linux does not look at the vendor.
const VENDOR_ID: u32 = 0x6576_6f63;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

mod register {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SELECT: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SELECT: u64 = 0x024;
    pub const QUEUE_SELECT: u64 = 0x030;
    pub const QUEUE_SIZE_MAX: u64 = 0x034;
    pub const QUEUE_SIZE: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESCRIPTORS_LOW: u64 = 0x080;
    pub const QUEUE_DESCRIPTORS_HIGH: u64 = 0x084;
    pub const QUEUE_AVAILABLE_LOW: u64 = 0x090;
    pub const QUEUE_AVAILABLE_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHARED_MEMORY_SELECT: u64 = 0x0ac;
    pub const SHARED_MEMORY_LENGTH_LOW: u64 = 0x0b0;
    pub const SHARED_MEMORY_LENGTH_HIGH: u64 = 0x0b4;
    pub const SHARED_MEMORY_BASE_LOW: u64 = 0x0b8;
    pub const SHARED_MEMORY_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot create the virtio-mmio interrupt event")]
    InterruptEvent(#[source] std::io::Error),
    #[error("cannot create the notification event of queue {queue_index}")]
    QueueEvent {
        queue_index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("the device declares an invalid maximum size {max_size} for queue {queue_index}; sizes are powers of two up to 32768")]
    QueueSize {
        queue_index: usize,
        max_size: u16,
        #[source]
        source: virtio_queue::Error,
    },
}

/// The interrupt of a virtio-mmio device: the InterruptStatus bits the driver reads and
/// acknowledges, and the event that raises the guest's interrupt line (an irqfd in the VMM).
pub struct MmioInterrupt {
    status: AtomicU32,
    event: EventFd,
}

impl MmioInterrupt {
    fn new() -> Result<Self, MmioError> {
        Ok(Self {
            status: AtomicU32::new(0),
            event: EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::InterruptEvent)?,
        })
    }

    /// The event written on every interrupt; register it as the device's irqfd.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// The InterruptStatus bits not yet acknowledged.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }
}

impl InterruptLine for MmioInterrupt {
    fn trigger(&self, cause: InterruptCause) -> std::io::Result<()> {
        let bit = match cause {
            InterruptCause::UsedBuffer { .. } => VIRTIO_MMIO_INT_VRING,
            InterruptCause::ConfigChanged => VIRTIO_MMIO_INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.event.write(1)
    }
}

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    memory: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queue_events: Vec<EventFd>,
    queues: Vec<Queue>,
    device_type: u32,
    offered_features: u64,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    ignored_accesses: u64,
    trapped_notifications: u64,
    activation_error: Option<VirtioError>,
}

impl MmioTransport {
    /// A transport for `device`, whose queues will live in `memory`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: GuestMemoryMmap,
    ) -> Result<Self, MmioError> {
        let (device_type, offered_features, max_sizes) = {
            let device = lock(&device);
            (
                device.device_type(),
                device.features() | COMMON_FEATURES,
                device.queue_max_sizes().to_vec(),
            )
        };
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_events = Vec::with_capacity(max_sizes.len());
        for (queue_index, max_size) in max_sizes.into_iter().enumerate() {
            queues.push(Queue::new(max_size).map_err(|source| MmioError::QueueSize {
                queue_index,
                max_size,
                source,
            })?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
                MmioError::QueueEvent {
                    queue_index,
                    source,
                }
            })?);
        }
        Ok(Self {
            device,
            memory,
            interrupt: Arc::new(MmioInterrupt::new()?),
            queue_events,
            queues,
            device_type,
            offered_features,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            ignored_accesses: 0,
            trapped_notifications: 0,
            activation_error: None,
        })
    }

    /// One event per queue, written when the driver notifies that queue; the event loop waits
    /// on them and calls [`VirtioDevice::process_queue`] with the queue's index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device's interrupt: its event is what the VMM registers as an irqfd.
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The device status register as the driver last left it (plus NEEDS_RESET if set).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// How many accesses were ignored because the driver broke the rules.
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored_accesses
    }

    /// How many QueueNotify writes reached the transport. With the queue events registered as
    /// ioeventfds none should: KVM signals the event without leaving the guest.
    pub fn trapped_notifications(&self) -> u64 {
        self.trapped_notifications
    }

    /// Why the device refused its last activation or stopped since, if it did (status then
    /// shows NEEDS_RESET).
    pub fn activation_error(&self) -> Option<&VirtioError> {
        self.activation_error.as_ref()
    }

    /// Records that the device stopped with `error` while serving the driver: the status shows
    /// NEEDS_RESET and a configuration-change interrupt tells the driver, which must reset the
    /// device to use it again (virtio 1.2, section 2.1.2).
    pub fn device_failed(&mut self, error: VirtioError) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.activation_error = Some(error);
        // The status bit is what matters; a lost interrupt only delays the driver noticing.
        let _ = self.interrupt.trigger(InterruptCause::ConfigChanged);
    }

    /// Whether the device is stopped until the driver resets it.
    pub fn needs_reset(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }

    fn ignore(&mut self) {
        self.ignored_accesses += 1;
    }

    fn has_status(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may be written after FEATURES_OK and before DRIVER_OK, and while the
    /// driver has not given up.
    fn queue_writable(&self) -> bool {
        self.has_status(VIRTIO_CONFIG_S_FEATURES_OK)
            && self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0
    }

    fn read_register(&mut self, offset: u64) -> Option<u32> {
        let value = match offset {
            register::MAGIC_VALUE => MAGIC_VALUE,
            register::VERSION => VERSION,
            register::DEVICE_ID => self.device_type,
            register::VENDOR_ID => VENDOR_ID,
            register::DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features as u32,
                1 => (self.offered_features >> 32) as u32,
                _ => 0,
            },
            register::QUEUE_SIZE_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            register::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            register::INTERRUPT_STATUS => self.interrupt.status(),
            register::STATUS => self.status,
            // No shared memory regions: a length of all-ones says "absent".
            register::SHARED_MEMORY_LENGTH_LOW
            | register::SHARED_MEMORY_LENGTH_HIGH
            | register::SHARED_MEMORY_BASE_LOW
            | register::SHARED_MEMORY_BASE_HIGH => u32::MAX,
            register::CONFIG_GENERATION => lock(&self.device).config_generation(),
            _ => return None,
        };
        Some(value)
    }

    /// Applies a register write; returns false when the write was not allowed.
    fn write_register(&mut self, offset: u64, value: u32) -> bool {
        match offset {
            register::DEVICE_FEATURES_SELECT => self.device_features_select = value,
            register::DRIVER_FEATURES_SELECT => self.driver_features_select = value,
            register::DRIVER_FEATURES => {
                let negotiating = self.has_status(VIRTIO_CONFIG_S_DRIVER)
                    && !self.has_status(VIRTIO_CONFIG_S_FEATURES_OK);
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return false,
                };
                if !negotiating {
                    return false;
                }
                self.driver_features =
                    (self.driver_features & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
            }
            register::QUEUE_SELECT => self.queue_select = value,
            register::QUEUE_SIZE
            | register::QUEUE_READY
            | register::QUEUE_DESCRIPTORS_LOW
            | register::QUEUE_DESCRIPTORS_HIGH
            | register::QUEUE_AVAILABLE_LOW
            | register::QUEUE_AVAILABLE_HIGH
            | register::QUEUE_USED_LOW
            | register::QUEUE_USED_HIGH => return self.write_queue_register(offset, value),
            register::QUEUE_NOTIFY => {
                let Some(event) = self.queue_events.get(value as usize) else {
                    return false;
                };
                // A full eventfd counter already means "notified"; nothing is lost.
                let _ = event.write(1);
                self.trapped_notifications += 1;
            }
            register::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::AcqRel);
            }
            register::STATUS => return self.write_status(value),
            register::SHARED_MEMORY_SELECT => {}
            _ => return false,
        }
        true
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) -> bool {
        if !self.queue_writable() {
            return false;
        }
        let Some(queue) = self.selected_queue() else {
            return false;
        };
        let replace_low = |old: u64| GuestAddress((old & !0xffff_ffff) | u64::from(value));
        let replace_high = |old: u64| GuestAddress((old & 0xffff_ffff) | (u64::from(value) << 32));
        let result = match offset {
            register::QUEUE_SIZE => u16::try_from(value)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| queue.try_set_size(size)),
            register::QUEUE_READY => match value {
                0 | 1 => {
                    queue.set_ready(value == 1);
                    Ok(())
                }
                _ => Err(virtio_queue::Error::QueueNotReady),
            },
            register::QUEUE_DESCRIPTORS_LOW => {
                queue.try_set_desc_table_address(replace_low(queue.desc_table()))
            }
            register::QUEUE_DESCRIPTORS_HIGH => {
                queue.try_set_desc_table_address(replace_high(queue.desc_table()))
            }
            register::QUEUE_AVAILABLE_LOW => {
                queue.try_set_avail_ring_address(replace_low(queue.avail_ring()))
            }
            register::QUEUE_AVAILABLE_HIGH => {
                queue.try_set_avail_ring_address(replace_high(queue.avail_ring()))
            }
            register::QUEUE_USED_LOW => {
                queue.try_set_used_ring_address(replace_low(queue.used_ring()))
            }
            register::QUEUE_USED_HIGH => {
                queue.try_set_used_ring_address(replace_high(queue.used_ring()))
            }
            _ => Err(virtio_queue::Error::InvalidSize),
        };
        result.is_ok()
    }

    /// Walks the status through ACKNOWLEDGE, DRIVER, FEATURES_OK and DRIVER_OK; 0 resets.
    /// A write that clears a bit, sets a device-only bit or skips a step is refused whole.
    fn write_status(&mut self, value: u32) -> bool {
        if value == 0 {
            self.reset();
            return true;
        }
        // NEEDS_RESET is the device's to set; a driver that read it may write it back.
        let needs_reset = self.status & VIRTIO_CONFIG_S_NEEDS_RESET;
        if value & VIRTIO_CONFIG_S_NEEDS_RESET & !needs_reset != 0 {
            return false;
        }
        let value = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let old = self.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if value & old != old {
            return false;
        }
        let added = value & !old;
        let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FAILED;
        if added & !known != 0 {
            return false;
        }
        let requires = |bit: u32, prerequisite: u32| added & bit == 0 || value & prerequisite != 0;
        if !(requires(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE)
            && requires(VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER)
            && requires(VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK))
        {
            return false;
        }
        let mut accepted = value;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // The spec's way to refuse: FEATURES_OK does not stick, the driver reads it back.
            accepted &= !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        }
        self.status = accepted | needs_reset;
        if added & accepted & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
        accepted == value
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.offered_features == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        let event_index = event_index_negotiated(self.driver_features);
        let mut queues = Vec::with_capacity(self.queues.len());
        for (queue_index, configured) in self.queues.iter().enumerate() {
            // The transport's copy stays behind for the registers; the device gets its own.
            match Queue::try_from(configured.state()) {
                Ok(mut queue) => {
                    queue.set_event_idx(event_index);
                    queues.push(queue);
                }
                Err(_) => {
                    self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                    self.activation_error = Some(VirtioError::InvalidQueue {
                        queue_index,
                        size: configured.size(),
                        descriptors: configured.desc_table(),
                        available: configured.avail_ring(),
                        used: configured.used_ring(),
                    });
                    return;
                }
            }
        }
        let result = lock(&self.device).activate(Activation {
            memory: self.memory.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        });
        if let Err(error) = result {
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.activation_error = Some(error);
        }
    }

    /// Back to the state before the driver first touched the device.
    fn reset(&mut self) {
        lock(&self.device).reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt.status.store(0, Ordering::Release);
        self.activation_error = None;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                data.fill(0);
                self.ignore();
            }
            return;
        }
        let value = match data.len() {
            4 if offset % 4 == 0 => self.read_register(offset),
            _ => None,
        };
        match value {
            Some(value) => data.copy_from_slice(&value.to_le_bytes()),
            None => {
                data.fill(0);
                self.ignore();
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                self.ignore();
            }
            return;
        }
        let accepted = match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(bytes)),
            _ => false,
        };
        if !accepted {
            self.ignore();
        }
    }
}

#[cfg(test)]
mod tests;
