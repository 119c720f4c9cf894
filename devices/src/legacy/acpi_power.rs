//! The sleep control register of a hardware-reduced ACPI machine, as far as a guest needs it to
//! power off: writing the soft-off sleep type (the one the DSDT's `_S5_` names) together with
//! SLP_EN fires the power-off event. Other sleep states are not offered and are ignored.

use vm_superio::Trigger;

use crate::bus::BusDevice;

/// The sleep type `_S5_` announces.
pub const SOFT_OFF_SLEEP_TYPE: u8 = 5;
/// SLP_EN: "enter the sleep state in SLP_TYP now".
const SLEEP_ENABLE: u8 = 1 << 5;

/// One byte: sleep control on write, sleep status (always 0) on read.
pub struct AcpiPowerControl<T: Trigger> {
    power_off: T,
}

impl<T: Trigger> AcpiPowerControl<T> {
    pub fn new(power_off: T) -> Self {
        Self { power_off }
    }
}

impl<T: Trigger + Send> BusDevice for AcpiPowerControl<T> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        let sleep_type = (value >> 2) & 0x7;
        if offset == 0 && value & SLEEP_ENABLE != 0 && sleep_type == SOFT_OFF_SLEEP_TYPE {
            // A trigger that fails has nowhere to report to but the guest, which cannot act on it.
            let _ = self.power_off.trigger();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::EventFdTrigger;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn only_soft_off_with_sleep_enable_powers_off() {
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut control = AcpiPowerControl::new(EventFdTrigger::new(event.try_clone().unwrap()));
        control.write(0, &[SOFT_OFF_SLEEP_TYPE << 2]); // no SLP_EN
        control.write(0, &[(3 << 2) | SLEEP_ENABLE]); // S3
        control.write(0, &[(SOFT_OFF_SLEEP_TYPE << 2) | SLEEP_ENABLE, 0]); // too wide
        assert!(event.read().is_err(), "nothing may power off yet");
        control.write(0, &[(SOFT_OFF_SLEEP_TYPE << 2) | SLEEP_ENABLE]);
        assert_eq!(event.read().unwrap(), 1);
    }
}
