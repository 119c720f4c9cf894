//! The i8042 keyboard controller, modelled only as far as a guest needs it to reset the machine:
//! the "pulse reset line" command (0xFE on the command port) fires the reset event.

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;

/// The i8042 at ports 0x60..0x65 (data port at offset 0, command/status port at offset 4).
/// `reset` fires on the vCPU thread that wrote the command, so the VMM can stop that vCPU before
/// it runs another guest instruction.
pub struct ResetController<T: Trigger> {
    device: I8042Device<T>,
}

impl<T: Trigger> ResetController<T> {
    pub fn new(reset: T) -> Self {
        Self {
            device: I8042Device::new(reset),
        }
    }
}

impl<T: Trigger + Send> BusDevice for ResetController<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.device.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // A trigger that fails has nowhere to report to but the guest, which cannot act on it.
            let _ = self.device.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::EventFdTrigger;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn reset_command_fires_the_event_and_nothing_else_does() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut controller = ResetController::new(EventFdTrigger::new(reset.try_clone().unwrap()));
        controller.write(0, &[0xfe]);
        controller.write(4, &[0xaa]);
        assert!(reset.read().is_err(), "no reset expected yet");
        controller.write(4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
