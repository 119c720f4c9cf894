//! virtio-rng (virtio 1.2, section 5.4): one queue whose device-writable buffers the device
//! fills with bytes from the host's `getrandom(2)`.
//!
//! A chain's readable buffers are skipped; its writable buffers are filled in order, up to
//! [`MAX_BYTES_PER_REQUEST`] per chain so that one request cannot hold the event loop. A buffer
//! outside guest memory ends the fill there; the used length says how many bytes are valid.

use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::{check_queues, serve_queue, Activation, InterruptLine, VirtioDevice, VirtioError};

/// The size of the device's single queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request receives.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];

struct Active {
    memory: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn InterruptLine>,
}

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    active: Option<Active>,
    bytes_served: u64,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many random bytes the guest has received.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served
    }
}

/// Fills `len` bytes of guest memory at `address` with host randomness; returns how many were
/// written, short if the host refused or the range left guest memory.
fn fill_random(memory: &GuestMemoryMmap, address: GuestAddress, len: u32) -> u32 {
    let mut chunk = [0u8; 4096];
    let mut written = 0u32;
    while written < len {
        let size = (len - written).min(chunk.len() as u32);
        let Some(target) = address.checked_add(u64::from(written)) else {
            break;
        };
        if !memory.check_range(target, size as usize, Permissions::Write)
            || getrandom(&mut chunk[..size as usize]).is_err()
        {
            break;
        }
        if memory.write_slice(&chunk[..size as usize], target).is_err() {
            break;
        }
        written += size;
    }
    written
}

/// Fills `buffer` from the host's `getrandom(2)`, retrying when a signal interrupts it.
pub(crate) fn getrandom(buffer: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        let rest = &mut buffer[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable slice that the call
        // fills at most to its length; no other reference to it exists during the call.
        let result = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if result < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        filled += result as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        check_queues(&activation.queues, &activation.memory, QUEUE_SIZES.len())?;
        let Activation {
            memory,
            mut queues,
            interrupt,
            ..
        } = activation;
        self.active = Some(Active {
            memory,
            queue: queues.remove(0),
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, queue_index: usize) -> Result<(), VirtioError> {
        if queue_index != 0 {
            return Err(VirtioError::NoSuchQueue { queue_index });
        }
        let Some(active) = &mut self.active else {
            return Ok(());
        };
        let Active {
            memory,
            queue,
            interrupt,
        } = active;
        let bytes_served = &mut self.bytes_served;
        serve_queue(queue, queue_index, memory, interrupt.as_ref(), |chain| {
            let mut written = 0u32;
            for descriptor in chain.writable() {
                let wanted = descriptor.len().min(MAX_BYTES_PER_REQUEST - written);
                let filled = fill_random(memory, descriptor.addr(), wanted);
                written += filled;
                if filled < wanted || written == MAX_BYTES_PER_REQUEST {
                    break;
                }
            }
            *bytes_served += u64::from(written);
            written
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::virtio::test_driver::{Buffer, TestDriver, DATA_START};
    use crate::virtio::COMMON_FEATURES;

    fn running_rng() -> TestDriver {
        let mut driver = TestDriver::new(Arc::new(Mutex::new(Rng::new())));
        driver.initialise(COMMON_FEATURES, 16);
        driver
    }

    #[test]
    fn fills_writable_buffers_with_non_constant_bytes_of_the_requested_length() {
        let mut driver = running_rng();
        let head = driver.push_chain(
            0,
            &[
                Buffer::writable(DATA_START, 64),
                Buffer::writable(DATA_START + 0x1000, 200),
            ],
        );
        driver.kick(0);
        assert_eq!(driver.take_used(0), vec![(u32::from(head), 264)]);
        let first = driver.read_bytes(DATA_START, 64);
        let second = driver.read_bytes(DATA_START + 0x1000, 200);
        assert!(first.iter().any(|&byte| byte != first[0]));
        assert!(second.iter().any(|&byte| byte != 0));
        // The bytes just past the buffer stay untouched.
        assert_eq!(driver.read_bytes(DATA_START + 64, 16), vec![0; 16]);
        assert_eq!(driver.acknowledge_interrupt(), 1);

        // Two requests get different bytes.
        driver.push_chain(0, &[Buffer::writable(DATA_START + 0x2000, 64)]);
        driver.kick(0);
        assert_ne!(driver.read_bytes(DATA_START + 0x2000, 64), first);
    }

    #[test]
    fn stops_at_the_end_of_guest_memory_and_skips_readable_buffers() {
        let mut driver = running_rng();
        let end = crate::virtio::test_driver::MEMORY_SIZE;
        let head = driver.push_chain(
            0,
            &[
                Buffer::readable(DATA_START, 32),
                Buffer::writable(end - 16, 64),
            ],
        );
        driver.kick(0);
        // Nothing fits: the 64-byte buffer runs past the end, so none of it is written.
        assert_eq!(driver.take_used(0), vec![(u32::from(head), 0)]);
        assert_eq!(driver.read_bytes(DATA_START, 32), vec![0; 32]);

        let head = driver.push_chain(0, &[Buffer::writable(u64::MAX - 8, 64)]);
        driver.kick(0);
        assert_eq!(driver.take_used(0), vec![(u32::from(head), 0)]);
    }

    #[test]
    fn caps_one_request() {
        let mut driver = running_rng();
        let head = driver.push_chain(
            0,
            &[
                Buffer::writable(DATA_START, 0x8000),
                Buffer::writable(DATA_START + 0x8000, 0x8000),
                Buffer::writable(DATA_START + 0x1_0000, 0x8000),
            ],
        );
        driver.kick(0);
        assert_eq!(
            driver.take_used(0),
            vec![(u32::from(head), MAX_BYTES_PER_REQUEST)]
        );
    }
}
