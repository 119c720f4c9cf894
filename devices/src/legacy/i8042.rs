//! The i8042 keyboard controller, modelled only as far as a guest needs it to reset the machine:
//! the "pulse reset line" command (0xFE on the command port) fires the reset event.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// The i8042 at ports 0x60..0x65 (data port at offset 0, command/status port at offset 4).
pub struct ResetController {
    device: I8042Device<EventFdTrigger>,
}

impl ResetController {
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            device: I8042Device::new(reset),
        }
    }
}

impl BusDevice for ResetController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.device.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // Writing the eventfd can only fail if its counter is saturated, which means a reset
            // is already pending.
            let _ = self.device.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
