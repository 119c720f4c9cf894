//! The virtio-vsock packet (virtio 1.2, section 5.10.6): the 44-byte little-endian header, and
//! the checks that turn a guest's transmit chain into a header and payload, or make a receive
//! chain ready to take one.
//!
//! Everything in a chain is guest-controlled. A transmit chain must be device-readable only,
//! every buffer inside guest memory, and carry exactly the header plus `len` payload bytes; a
//! receive chain must be device-writable only, inside guest memory, with room for at least the
//! header. The header may be split across buffers however the driver likes. Nothing here knows
//! about connections.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// The size of `struct virtio_vsock_hdr`.
pub const HEADER_SIZE: usize = 44;
/// The host's context id; the guest's is in the configuration space.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type the device carries.
pub const TYPE_STREAM: u16 = 1;
/// The most payload bytes one packet carries, either way (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RECEIVE: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RECEIVE | SHUTDOWN_SEND;

/// The operations of a stream packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Reset = 3,
    Shutdown = 4,
    ReadWrite = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl TryFrom<u16> for Op {
    type Error = u16;

    fn try_from(value: u16) -> Result<Self, u16> {
        Ok(match value {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Reset,
            4 => Self::Shutdown,
            5 => Self::ReadWrite,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            other => return Err(other),
        })
    }
}

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// The payload length.
    pub len: u32,
    /// The socket type (`type` in the spec).
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// How many bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(bytes: &[u8; HEADER_SIZE]) -> Self {
        let u64_at = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(field)
        };
        let u32_at = |at: usize| {
            let mut field = [0u8; 4];
            field.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(field)
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut bytes = [0u8; HEADER_SIZE];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.kind.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }
}

/// One buffer of a descriptor chain, as the guest described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub address: GuestAddress,
    pub len: u32,
    pub device_writable: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("the chain ends early: a bad link, a loop or an unreadable indirect table")]
    CutShort,
    #[error("buffer {address:#x}+{len:#x} lies outside guest memory")]
    OutsideMemory { address: u64, len: u32 },
    #[error("a transmit chain holds a device-writable buffer")]
    WritableOnTransmit,
    #[error("a receive chain holds a device-readable buffer")]
    ReadableOnReceive,
    #[error("the chain carries {len} bytes, fewer than the {HEADER_SIZE}-byte header")]
    ShortHeader { len: u64 },
    #[error("the header announces {announced} payload bytes but the chain carries {carried}")]
    LengthMismatch { announced: u32, carried: u64 },
    #[error("a payload of {len} bytes is longer than the {MAX_PAYLOAD} bytes a packet may carry")]
    PayloadTooLong { len: u32 },
    #[error("cannot access guest memory at {address:#x}")]
    GuestMemory { address: u64 },
}

fn check_inside<M: GuestMemory>(
    memory: &M,
    segment: &Segment,
    access: Permissions,
) -> Result<(), PacketError> {
    if memory.check_range(segment.address, segment.len as usize, access) {
        Ok(())
    } else {
        Err(PacketError::OutsideMemory {
            address: segment.address.0,
            len: segment.len,
        })
    }
}

/// Copies `target.len()` bytes starting `offset` bytes into the chain out of its buffers.
fn gather<M: GuestMemory>(
    memory: &M,
    segments: &[Segment],
    mut offset: u64,
    target: &mut [u8],
) -> Result<(), PacketError> {
    let mut filled = 0usize;
    for segment in segments {
        if filled == target.len() {
            break;
        }
        let len = u64::from(segment.len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let take = (len - offset).min((target.len() - filled) as u64) as usize;
        let address = segment
            .address
            .checked_add(offset)
            .ok_or(PacketError::GuestMemory {
                address: segment.address.0,
            })?;
        memory
            .read_slice(&mut target[filled..filled + take], address)
            .map_err(|_| PacketError::GuestMemory { address: address.0 })?;
        filled += take;
        offset = 0;
    }
    if filled == target.len() {
        Ok(())
    } else {
        Err(PacketError::ShortHeader { len: filled as u64 })
    }
}

/// Copies `source` into the chain's buffers starting `offset` bytes in; the caller has checked
/// that the chain has room.
fn scatter<M: GuestMemory>(
    memory: &M,
    segments: &[Segment],
    mut offset: u64,
    source: &[u8],
) -> Result<(), PacketError> {
    let mut written = 0usize;
    for segment in segments {
        if written == source.len() {
            break;
        }
        let len = u64::from(segment.len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let put = (len - offset).min((source.len() - written) as u64) as usize;
        let address = segment
            .address
            .checked_add(offset)
            .ok_or(PacketError::GuestMemory {
                address: segment.address.0,
            })?;
        memory
            .write_slice(&source[written..written + put], address)
            .map_err(|_| PacketError::GuestMemory { address: address.0 })?;
        written += put;
        offset = 0;
    }
    if written == source.len() {
        Ok(())
    } else {
        Err(PacketError::GuestMemory { address: 0 })
    }
}

/// Reads the header from the start of a transmit chain. Only the buffers holding the header
/// are touched, and they must lie inside guest memory; the rest of the chain is checked by
/// [`read_payload`], so that a packet with a readable header but a bad body can still be
/// traced to its connection.
pub fn read_header<M: GuestMemory>(
    memory: &M,
    segments: &[Segment],
) -> Result<Header, PacketError> {
    let mut covered = 0u64;
    for segment in segments {
        if covered >= HEADER_SIZE as u64 {
            break;
        }
        check_inside(memory, segment, Permissions::Read)?;
        covered += u64::from(segment.len);
    }
    let mut bytes = [0u8; HEADER_SIZE];
    gather(memory, segments, 0, &mut bytes)?;
    Ok(Header::from_bytes(&bytes))
}

/// Checks a whole transmit chain against its header and copies the payload into `payload`;
/// returns the payload's length. `complete` is false when virtio-queue cut the chain short.
pub fn read_payload<M: GuestMemory>(
    memory: &M,
    segments: &[Segment],
    complete: bool,
    header: &Header,
    payload: &mut [u8],
) -> Result<usize, PacketError> {
    if !complete {
        return Err(PacketError::CutShort);
    }
    let mut carried = 0u64;
    for segment in segments {
        if segment.device_writable {
            return Err(PacketError::WritableOnTransmit);
        }
        check_inside(memory, segment, Permissions::Read)?;
        carried += u64::from(segment.len);
    }
    let len = header.len as usize;
    if len > MAX_PAYLOAD || len > payload.len() {
        return Err(PacketError::PayloadTooLong { len: header.len });
    }
    if carried != HEADER_SIZE as u64 + u64::from(header.len) {
        return Err(PacketError::LengthMismatch {
            announced: header.len,
            carried: carried.saturating_sub(HEADER_SIZE as u64),
        });
    }
    gather(memory, segments, HEADER_SIZE as u64, &mut payload[..len])?;
    Ok(len)
}

/// Checks a receive chain; returns how many payload bytes it has room for after the header.
pub fn check_receive_chain<M: GuestMemory>(
    memory: &M,
    segments: &[Segment],
    complete: bool,
) -> Result<usize, PacketError> {
    if !complete {
        return Err(PacketError::CutShort);
    }
    let mut capacity = 0u64;
    for segment in segments {
        if !segment.device_writable {
            return Err(PacketError::ReadableOnReceive);
        }
        check_inside(memory, segment, Permissions::Write)?;
        capacity += u64::from(segment.len);
    }
    if capacity < HEADER_SIZE as u64 {
        return Err(PacketError::ShortHeader { len: capacity });
    }
    Ok((capacity - HEADER_SIZE as u64).min(MAX_PAYLOAD as u64) as usize)
}

/// Writes `header` and `payload` into a receive chain that [`check_receive_chain`] accepted
/// with room for the payload; returns the used length.
pub fn write_packet<M: GuestMemory>(
    memory: &M,
    segments: &[Segment],
    header: &Header,
    payload: &[u8],
) -> Result<u32, PacketError> {
    scatter(memory, segments, 0, &header.to_bytes())?;
    scatter(memory, segments, HEADER_SIZE as u64, payload)?;
    // At most 44 + 64 KiB.
    Ok((HEADER_SIZE + payload.len()) as u32)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap()
    }

    fn readable(address: u64, len: u32) -> Segment {
        Segment {
            address: GuestAddress(address),
            len,
            device_writable: false,
        }
    }

    fn writable(address: u64, len: u32) -> Segment {
        Segment {
            device_writable: true,
            ..readable(address, len)
        }
    }

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 80,
            len: 5,
            kind: TYPE_STREAM,
            op: Op::ReadWrite as u16,
            flags: 0,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        }
    }

    #[test]
    fn the_header_round_trips_in_the_specified_layout() {
        let bytes = sample().to_bytes();
        assert_eq!(bytes[0..8], 3u64.to_le_bytes());
        assert_eq!(bytes[20..24], 80u32.to_le_bytes());
        assert_eq!(bytes[28..30], 1u16.to_le_bytes());
        assert_eq!(bytes[30..32], 5u16.to_le_bytes());
        assert_eq!(bytes[40..44], 0xdead_beefu32.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), sample());
    }

    #[test]
    fn a_header_split_across_buffers_and_its_payload_are_read() {
        let memory = memory();
        let bytes = sample().to_bytes();
        memory
            .write_slice(&bytes[..10], GuestAddress(0x100))
            .unwrap();
        memory
            .write_slice(&bytes[10..], GuestAddress(0x200))
            .unwrap();
        memory.write_slice(b"hello", GuestAddress(0x300)).unwrap();
        let chain = [readable(0x100, 10), readable(0x200, 34), readable(0x300, 5)];
        let header = read_header(&memory, &chain).unwrap();
        assert_eq!(header, sample());
        let mut payload = [0u8; 16];
        assert_eq!(
            read_payload(&memory, &chain, true, &header, &mut payload),
            Ok(5)
        );
        assert_eq!(&payload[..5], b"hello");
    }

    #[test]
    fn bad_transmit_chains_are_refused() {
        let memory = memory();
        memory
            .write_slice(&sample().to_bytes(), GuestAddress(0x100))
            .unwrap();
        let header = sample();
        let mut payload = [0u8; 16];
        let mut check = |chain: &[Segment], complete| {
            read_payload(&memory, chain, complete, &header, &mut payload)
        };
        assert_eq!(
            check(&[readable(0x100, 44), readable(0x300, 4)], true),
            Err(PacketError::LengthMismatch {
                announced: 5,
                carried: 4
            })
        );
        assert_eq!(
            check(&[readable(0x100, 44), writable(0x300, 5)], true),
            Err(PacketError::WritableOnTransmit)
        );
        assert_eq!(
            check(&[readable(0x100, 44), readable(0xfffe, 5)], true),
            Err(PacketError::OutsideMemory {
                address: 0xfffe,
                len: 5
            })
        );
        assert_eq!(
            check(&[readable(0x100, 44), readable(0x300, 5)], false),
            Err(PacketError::CutShort)
        );
        assert_eq!(
            read_header(&memory, &[readable(0x100, 20)]),
            Err(PacketError::ShortHeader { len: 20 })
        );
        assert!(read_header(&memory, &[readable(u64::MAX - 4, 44)]).is_err());
    }

    #[test]
    fn receive_chains_are_checked_and_filled_across_buffers() {
        let memory = memory();
        let chain = [writable(0x100, 30), writable(0x400, 100)];
        assert_eq!(check_receive_chain(&memory, &chain, true), Ok(86));
        let used = write_packet(&memory, &chain, &sample(), b"hello").unwrap();
        assert_eq!(used, 49);
        let mut bytes = [0u8; HEADER_SIZE];
        memory
            .read_slice(&mut bytes[..30], GuestAddress(0x100))
            .unwrap();
        memory
            .read_slice(&mut bytes[30..], GuestAddress(0x400))
            .unwrap();
        assert_eq!(Header::from_bytes(&bytes), sample());
        let mut payload = [0u8; 5];
        memory
            .read_slice(&mut payload, GuestAddress(0x40e))
            .unwrap();
        assert_eq!(&payload, b"hello");

        assert_eq!(
            check_receive_chain(&memory, &[writable(0x100, 43)], true),
            Err(PacketError::ShortHeader { len: 43 })
        );
        assert_eq!(
            check_receive_chain(&memory, &[readable(0x100, 100)], true),
            Err(PacketError::ReadableOnReceive)
        );
        assert!(check_receive_chain(&memory, &[writable(0xff00, 0x200)], true).is_err());
    }
}
