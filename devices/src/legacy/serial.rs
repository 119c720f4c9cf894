//! The 16550 UART on COM1, built on vm-superio: guest writes go to a host writer (stdout, a
//! file, or nowhere), host input is queued for the guest, interrupts leave through an EventFd
//! that the VMM wires to the guest's IRQ line.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// A serial port on the I/O bus.
pub struct SerialPort {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    /// A port whose output goes to `out` and whose interrupt is raised through `interrupt`.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(interrupt, out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> std::io::Result<usize> {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return Ok(0);
        }
        self.uart
            .enqueue_raw_bytes(&input[..room])
            .map_err(|error| std::io::Error::other(error.to_string()))
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // The only failure is the host writer refusing the byte (a closed stdout); the guest
            // cannot do anything about it, so the byte is dropped as a disconnected line would.
            let _ = self.uart.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_the_writer_and_input_raises_an_interrupt() {
        let interrupt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let output = SharedBuffer::default();
        let mut port = SerialPort::new(
            EventFdTrigger::new(interrupt.try_clone().unwrap()),
            Box::new(output.clone()),
        );
        for byte in b"hi\n" {
            port.write(0, &[*byte]);
        }
        assert_eq!(output.0.lock().unwrap().as_slice(), b"hi\n");

        // Enable the "received data available" interrupt, then feed input.
        port.write(1, &[0x01]);
        assert_eq!(port.enqueue_input(b"ok").unwrap(), 2);
        assert_eq!(interrupt.read().unwrap(), 1);
        let mut byte = [0u8];
        port.read(0, &mut byte);
        assert_eq!(byte, [b'o']);
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let mut port = SerialPort::new(
            EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            Box::new(std::io::sink()),
        );
        let mut data = [0u8; 2];
        port.read(0, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        port.write(0, &[1, 2]);
    }
}
