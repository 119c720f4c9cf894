//! Any sequence of port accesses a guest makes to the serial port and the i8042, with host input
//! arriving in between: no access panics, and only the reset command fires the reset line.
#![no_main]

use std::sync::{Arc, Mutex};

use cove_devices::legacy::{EventFdTrigger, ResetController, SerialPort};
use cove_devices::Bus;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

fuzz_target!(|data: &[u8]| {
    let interrupt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let reset = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let serial = Arc::new(Mutex::new(SerialPort::new(
        EventFdTrigger::new(interrupt.try_clone().expect("clone")),
        Box::new(std::io::sink()),
    )));
    let mut bus = Bus::new();
    bus.insert(0x3f8, 8, serial.clone()).expect("serial range");
    let controller = ResetController::new(EventFdTrigger::new(reset.try_clone().expect("clone")));
    bus.insert(0x60, 5, Arc::new(Mutex::new(controller))).expect("i8042 range");

    let mut reset_commands = 0;
    for access in data.chunks(4) {
        let [kind, port, value, width] = [0, 1, 2, 3].map(|i| access.get(i).copied().unwrap_or(0));
        let port = if port & 0x80 == 0 { 0x3f8 + u64::from(port & 0xf) } else { 0x60 + u64::from(port & 7) };
        let width = 1 + usize::from(width & 3);
        let mut buffer = [value; 4];
        match kind % 3 {
            0 => {
                bus.write(port, &buffer[..width]);
                reset_commands += usize::from(port == 0x64 && width == 1 && value == 0xfe);
            }
            1 => {
                bus.read(port, &mut buffer[..width]);
            }
            _ => {
                let _ = serial.lock().expect("lock").enqueue_input(&access[1..]);
            }
        }
    }
    let fired = reset.read().map(|count| count as usize).unwrap_or(0);
    assert_eq!(fired, reset_commands);
});

