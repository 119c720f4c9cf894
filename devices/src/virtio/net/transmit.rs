//! The transmit side: each chain on the tx queue is one frame, header first, gathered from the
//! chain's buffers into a bounce buffer and written to the tap in one system call.

use vm_memory::{Bytes, GuestMemoryMmap};

use virtio_queue::DescriptorChain;

use super::tap::VNET_HEADER_SIZE;

/// Why a chain could not be sent; the chain goes back with a used length of 0 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// A device-writable buffer: a transmit chain carries data for the device only.
    WritableBuffer,
    /// A buffer that does not lie inside guest memory.
    OutsideMemory,
    /// More bytes than a header and the largest frame.
    TooLong,
    /// Fewer bytes than the header.
    TooShort,
    /// virtio-queue ended the chain early (a bad link, a loop, an unreadable indirect table).
    Broken,
}

/// Copies the readable buffers of `chain` into `buffer` (whose length is the largest header
/// plus frame accepted); returns how many bytes they hold.
pub(super) fn gather(
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buffer: &mut [u8],
) -> Result<usize, Refusal> {
    let mut len = 0usize;
    let mut last_has_next = false;
    for descriptor in chain {
        last_has_next = descriptor.has_next();
        if descriptor.is_write_only() {
            return Err(Refusal::WritableBuffer);
        }
        let end = len
            .checked_add(descriptor.len() as usize)
            .filter(|&end| end <= buffer.len())
            .ok_or(Refusal::TooLong)?;
        if end > len {
            memory
                .read_slice(&mut buffer[len..end], descriptor.addr())
                .map_err(|_| Refusal::OutsideMemory)?;
        }
        len = end;
    }
    if last_has_next {
        return Err(Refusal::Broken);
    }
    if len < VNET_HEADER_SIZE {
        return Err(Refusal::TooShort);
    }
    Ok(len)
}
