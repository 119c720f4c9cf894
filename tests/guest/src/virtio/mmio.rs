//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): identifying a device,
//! the status handshake, feature negotiation, queue setup, notifications and the
//! interrupt-status registers. Knows nothing of what the devices do.

use super::queue::Queue;
use core::fmt;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION_MODERN: u32 = 2;

const REGISTER_MAGIC_VALUE: usize = 0x000;
const REGISTER_VERSION: usize = 0x004;
const REGISTER_DEVICE_ID: usize = 0x008;
const REGISTER_DEVICE_FEATURES: usize = 0x010;
const REGISTER_DEVICE_FEATURES_SELECT: usize = 0x014;
const REGISTER_DRIVER_FEATURES: usize = 0x020;
const REGISTER_DRIVER_FEATURES_SELECT: usize = 0x024;
const REGISTER_QUEUE_SELECT: usize = 0x030;
const REGISTER_QUEUE_SIZE_MAX: usize = 0x034;
const REGISTER_QUEUE_SIZE: usize = 0x038;
const REGISTER_QUEUE_READY: usize = 0x044;
const REGISTER_QUEUE_NOTIFY: usize = 0x050;
const REGISTER_INTERRUPT_STATUS: usize = 0x060;
const REGISTER_INTERRUPT_ACK: usize = 0x064;
const REGISTER_STATUS: usize = 0x070;
const REGISTER_QUEUE_DESCRIPTORS_LOW: usize = 0x080;
const REGISTER_QUEUE_DESCRIPTORS_HIGH: usize = 0x084;
const REGISTER_QUEUE_AVAILABLE_LOW: usize = 0x090;
const REGISTER_QUEUE_AVAILABLE_HIGH: usize = 0x094;
const REGISTER_QUEUE_USED_LOW: usize = 0x0a0;
const REGISTER_QUEUE_USED_HIGH: usize = 0x0a4;
const CONFIG_SPACE: usize = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 64;

/// The feature every modern device offers and a modern driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The virtio-mmio windows lie in the 3..4 GiB gigabyte, which the boot page tables map
/// uncached; a base elsewhere is refused before any access.
const MMIO_WINDOW_START: u64 = 0xc000_0000;
const MMIO_WINDOW_END: u64 = 0x1_0000_0000;
/// The registers and a little configuration space.
const MINIMUM_WINDOW_SIZE: u64 = 0x200;

/// What went wrong between the driver and the transport.
pub enum TransportError {
    OutsideMmioHole { base: u64, size: u64 },
    BadMagic(u32),
    BadVersion(u32),
    NoVersion1 { offered: u64 },
    FeaturesRefused { accepted: u64 },
    QueueInUse(u16),
    QueueUnavailable(u16),
    NeedsReset { status: u32 },
}

impl fmt::Display for TransportError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::OutsideMmioHole { base, size } => write!(
                formatter,
                "the window {base:#x}+{size:#x} is not inside the MMIO hole at 3..4 GiB"
            ),
            TransportError::BadMagic(magic) => {
                write!(formatter, "magic value {magic:#x} is not \"virt\"")
            }
            TransportError::BadVersion(version) => write!(
                formatter,
                "version {version}, but the guest drives only version 2 (modern) devices"
            ),
            TransportError::NoVersion1 { offered } => write!(
                formatter,
                "the device offers features {offered:#x} without VIRTIO_F_VERSION_1"
            ),
            TransportError::FeaturesRefused { accepted } => write!(
                formatter,
                "FEATURES_OK did not stick after accepting features {accepted:#x}"
            ),
            TransportError::QueueInUse(index) => {
                write!(formatter, "queue {index} is ready before setup")
            }
            TransportError::QueueUnavailable(index) => {
                write!(formatter, "queue {index} does not exist (maximum size 0)")
            }
            TransportError::NeedsReset { status } => write!(
                formatter,
                "the device set NEEDS_RESET (status {status:#x}) after DRIVER_OK"
            ),
        }
    }
}

/// One device's register window.
#[derive(Clone, Copy)]
pub struct Transport {
    base: usize,
}

impl Transport {
    /// Checks that `base` holds a modern virtio-mmio window and returns it with the device
    /// id (0: a placeholder window without a device).
    pub fn probe(base: u64, size: u64) -> Result<(Self, u32), TransportError> {
        let end = base.checked_add(size.max(MINIMUM_WINDOW_SIZE));
        if base < MMIO_WINDOW_START || end.is_none_or(|end| end > MMIO_WINDOW_END) {
            return Err(TransportError::OutsideMmioHole { base, size });
        }
        let transport = Transport {
            base: base as usize,
        };
        let magic = transport.read(REGISTER_MAGIC_VALUE);
        if magic != MAGIC_VALUE {
            return Err(TransportError::BadMagic(magic));
        }
        let version = transport.read(REGISTER_VERSION);
        if version != VERSION_MODERN {
            return Err(TransportError::BadVersion(version));
        }
        Ok((transport, transport.read(REGISTER_DEVICE_ID)))
    }

    /// A transport at `base` that has been probed before (for the interrupt handler).
    pub fn at(base: usize) -> Self {
        Transport { base }
    }

    fn read(&self, register: usize) -> u32 {
        // SAFETY: `probe` checked that the window lies in the MMIO hole, which the boot page
        // tables map uncached and which holds no guest memory; registers are 32-bit aligned.
        unsafe { core::ptr::read_volatile((self.base + register) as *const u32) }
    }

    fn write(&self, register: usize, value: u32) {
        // SAFETY: as for `read`.
        unsafe { core::ptr::write_volatile((self.base + register) as *mut u32, value) }
    }

    /// Resets the device, acknowledges it, and negotiates `wanted` (to which VERSION_1 is
    /// added) against what it offers. Returns the device's offer; the negotiated set is the
    /// offer and `wanted` together.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, TransportError> {
        self.reset();
        self.write(REGISTER_STATUS, STATUS_ACKNOWLEDGE);
        self.write(REGISTER_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0;
        for half in 0..2 {
            self.write(REGISTER_DEVICE_FEATURES_SELECT, half);
            offered |= u64::from(self.read(REGISTER_DEVICE_FEATURES)) << (32 * half);
        }
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(TransportError::NoVersion1 { offered });
        }
        let accepted = offered & (wanted | VIRTIO_F_VERSION_1);
        for half in 0..2 {
            self.write(REGISTER_DRIVER_FEATURES_SELECT, half);
            self.write(REGISTER_DRIVER_FEATURES, (accepted >> (32 * half)) as u32);
        }
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(REGISTER_STATUS, status);
        if self.read(REGISTER_STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(TransportError::FeaturesRefused { accepted });
        }
        Ok(offered)
    }

    /// The largest queue size the device allows for queue `index` (0: no such queue).
    pub fn queue_size_max(&self, index: u16) -> Result<u16, TransportError> {
        self.write(REGISTER_QUEUE_SELECT, u32::from(index));
        if self.read(REGISTER_QUEUE_READY) != 0 {
            return Err(TransportError::QueueInUse(index));
        }
        match self.read(REGISTER_QUEUE_SIZE_MAX) {
            0 => Err(TransportError::QueueUnavailable(index)),
            maximum => Ok(maximum.min(u32::from(u16::MAX)) as u16),
        }
    }

    /// Hands `queue`'s rings to the device and marks it ready.
    pub fn set_up_queue(&self, queue: &Queue) {
        let split = |address: u64| (address as u32, (address >> 32) as u32);
        self.write(REGISTER_QUEUE_SELECT, u32::from(queue.index()));
        self.write(REGISTER_QUEUE_SIZE, u32::from(queue.size()));
        let (low, high) = split(queue.descriptor_table_address());
        self.write(REGISTER_QUEUE_DESCRIPTORS_LOW, low);
        self.write(REGISTER_QUEUE_DESCRIPTORS_HIGH, high);
        let (low, high) = split(queue.available_ring_address());
        self.write(REGISTER_QUEUE_AVAILABLE_LOW, low);
        self.write(REGISTER_QUEUE_AVAILABLE_HIGH, high);
        let (low, high) = split(queue.used_ring_address());
        self.write(REGISTER_QUEUE_USED_LOW, low);
        self.write(REGISTER_QUEUE_USED_HIGH, high);
        self.write(REGISTER_QUEUE_READY, 1);
    }

    /// Sets DRIVER_OK, which activates the device.
    pub fn set_driver_ok(&self) -> Result<(), TransportError> {
        self.write(
            REGISTER_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        let status = self.read(REGISTER_STATUS);
        if status & STATUS_NEEDS_RESET != 0 || status & STATUS_DRIVER_OK == 0 {
            return Err(TransportError::NeedsReset { status });
        }
        Ok(())
    }

    /// Writes 0 to the status: the device forgets its queues and stops using guest memory.
    pub fn reset(&self) {
        self.write(REGISTER_STATUS, 0);
    }

    /// Tells the device that queue `index` has new available buffers.
    pub fn notify(&self, index: u16) {
        self.write(REGISTER_QUEUE_NOTIFY, u32::from(index));
    }

    /// Reads and acknowledges InterruptStatus; returns what it held (bit 0: used buffers,
    /// bit 1: configuration change).
    pub fn acknowledge_interrupt(&self) -> u32 {
        let status = self.read(REGISTER_INTERRUPT_STATUS);
        if status != 0 {
            self.write(REGISTER_INTERRUPT_ACK, status);
        }
        status
    }

    pub fn config_u8(&self, offset: usize) -> u8 {
        // SAFETY: as for `read`; configuration space takes byte accesses.
        unsafe { core::ptr::read_volatile((self.base + CONFIG_SPACE + offset) as *const u8) }
    }

    pub fn config_u32(&self, offset: usize) -> u32 {
        self.read(CONFIG_SPACE + offset)
    }

    /// A 64-bit configuration field as two 32-bit reads, low half first.
    pub fn config_u64(&self, offset: usize) -> u64 {
        u64::from(self.config_u32(offset)) | u64::from(self.config_u32(offset + 4)) << 32
    }
}
