//! The virtio-rng driver (device id 4, one request queue of device-writable buffers): two
//! requests of 64 bytes, one after the other. Output (after `virtio-rng: device=<slot> `):
//!
//! ```text
//! read=<bytes of the first>,<bytes of the second> varied=<yes|no> distinct=<yes|no>
//! ```
//!
//! `varied`: neither read is 64 copies of one byte; `distinct`: the two differ. Anything but
//! `read=64,64 varied=yes distinct=yes` is also an `error:` line.

use super::memory::DmaBuffer;
use super::queue::Segment;
use super::{Device, DriverError};

const READ_SIZE: usize = 64;
const REQUEST_TIMEOUT_MICROSECONDS: u64 = 10_000_000;

pub fn exercise(device: &mut Device) -> Result<(), DriverError> {
    device.transport.negotiate(0)?;
    let [mut queue] = device.start::<1>()?;
    let memory = DmaBuffer::allocate(2 * READ_SIZE, 64)?;
    let mut lengths = [0u32; 2];
    for (read, length) in lengths.iter_mut().enumerate() {
        let segment = Segment::writable(memory.address_at(read * READ_SIZE), READ_SIZE as u32);
        queue.push(&[segment]).ok_or(DriverError::Unexpected {
            what: "no free descriptor for a read, free",
            value: queue.free_descriptors() as u64,
        })?;
        device.transport.notify(queue.index());
        let ready = &queue;
        if !device
            .completions
            .wait(REQUEST_TIMEOUT_MICROSECONDS, || ready.has_used())
        {
            return Err(DriverError::TimedOut {
                what: "random bytes",
            });
        }
        *length = queue.pop_used().expect("the used ring has an entry").length;
    }
    let (first, second) = memory.bytes().split_at(READ_SIZE);
    let varied = [first, second]
        .iter()
        .all(|bytes| bytes.iter().any(|&byte| byte != bytes[0]));
    let distinct = first != second;
    device
        .line()
        .text("read=")
        .decimal(u64::from(lengths[0]))
        .text(",")
        .decimal(u64::from(lengths[1]))
        .text(" varied=")
        .text(if varied { "yes" } else { "no" })
        .text(" distinct=")
        .text(if distinct { "yes" } else { "no" })
        .end_line();
    if let Some(&short) = lengths.iter().find(|&&length| length as usize != READ_SIZE) {
        return Err(DriverError::Unexpected {
            what: "a 64-byte read returned another length",
            value: u64::from(short),
        });
    }
    if !varied || !distinct {
        return Err(DriverError::Unexpected {
            what: "the random bytes repeat themselves, first bytes",
            value: u64::from_le_bytes(first[..8].try_into().expect("8 bytes")),
        });
    }
    Ok(())
}
