//! Device models for cove-vmm.
//!
//! What lives here: the buses that route a guest's port and MMIO accesses to device models, and
//! the models themselves (the 16550 serial port, the i8042 reset line, the boot timer; the virtio
//! block and entropy devices behind the virtio-mmio transport). What must
//! not: any KVM call or knowledge of how the VMM runs vCPUs. A device sees offsets and bytes, and
//! signals the outside world through `EventFd`s it was handed.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
