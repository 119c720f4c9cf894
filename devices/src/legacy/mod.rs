//! The legacy PC devices a microVM still needs: the 16550 serial port, the i8042 controller
//! (only for its reset line), the ACPI sleep control register (only for soft-off), and cove's
//! boot timer.

mod acpi_power;
mod boot_timer;
mod i8042;
mod serial;

pub use acpi_power::{AcpiPowerControl, SOFT_OFF_SLEEP_TYPE};
pub use boot_timer::{BootTime, BootTimer, BOOT_TIMER_MAGIC};
pub use i8042::ResetController;
pub use serial::SerialPort;

use vmm_sys_util::eventfd::EventFd;

/// Wraps an `EventFd` so that vm-superio devices can raise interrupts or events through it.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(event: EventFd) -> Self {
        Self(event)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
