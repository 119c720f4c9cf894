//! virtio-blk requests: turning a descriptor chain the guest wrote into a checked [`Request`].
//!
//! Everything in a chain is guest-controlled, so [`parse_request`] trusts none of it: every
//! buffer must lie inside guest memory, device-readable buffers must come before device-writable
//! ones, the header may be split across buffers however the driver likes, sector ranges must fit
//! the disk, and the status byte is the last byte of the last buffer. It works on plain
//! [`Segment`]s and any `GuestMemory`, so a fuzz target can feed it arbitrary chains.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// The unit of every virtio-blk sector number and count.
pub const SECTOR_SIZE: u64 = 512;
/// `struct virtio_blk_outhdr`: type, reserved, sector.
pub const HEADER_SIZE: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
pub const ZERO_RANGE_SIZE: usize = 16;
/// The most sectors one discard or write-zeroes range may cover (2 GiB).
pub const MAX_ZERO_SECTORS: u32 = 1 << 22;
/// The most ranges in one discard or write-zeroes request.
pub const MAX_ZERO_RANGES: u32 = 1;

/// One buffer of a descriptor chain, as the guest described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub address: GuestAddress,
    pub len: u32,
    pub device_writable: bool,
}

/// What the disk and the negotiated features allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// VIRTIO_BLK_F_DISCARD was negotiated.
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES was negotiated.
    pub write_zeroes: bool,
}

/// A range to discard or zero, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroRange {
    pub sector: u64,
    pub sectors: u32,
    /// The driver allows the range to be deallocated rather than written.
    pub unmap: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `data` bytes from `sector` into the chain's writable buffers.
    Read {
        sector: u64,
        len: u64,
    },
    /// Write the chain's readable data after the header to `sector`.
    Write {
        sector: u64,
        len: u64,
    },
    Flush,
    /// Write up to `len` bytes of the disk id into the writable buffers.
    GetId {
        len: u64,
    },
    Discard(ZeroRange),
    WriteZeroes(ZeroRange),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the chain's last buffer is missing, empty or not device-writable: there is nowhere to put the status byte")]
    NoStatus,
    #[error("buffer {address:#x}+{len:#x} lies outside guest memory")]
    OutsideMemory { address: u64, len: u32 },
    #[error("a device-readable buffer follows a device-writable one")]
    ReadableAfterWritable,
    #[error(
        "the chain carries {len} readable bytes, fewer than the {HEADER_SIZE}-byte request header"
    )]
    ShortHeader { len: u64 },
    #[error("{len} data bytes are not a whole number of {SECTOR_SIZE}-byte sectors")]
    PartialSector { len: u64 },
    #[error("sectors {sector}..+{count} run past the end of the disk ({capacity} sectors)")]
    BeyondCapacity {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("request type {0} is not supported or was not negotiated")]
    Unsupported(u32),
    #[error("a discard or write-zeroes request carries {len} bytes of ranges; expected {ZERO_RANGE_SIZE} per range, at most {MAX_ZERO_RANGES} ranges")]
    ZeroRanges { len: u64 },
    #[error(
        "a discard or write-zeroes range covers {sectors} sectors, more than {MAX_ZERO_SECTORS}"
    )]
    ZeroRangeTooLong { sectors: u32 },
    #[error("flags {flags:#x} are not valid for this discard or write-zeroes range")]
    ZeroRangeFlags { flags: u32 },
    #[error("cannot access guest memory at {address:#x}")]
    GuestMemory { address: u64 },
    #[error("I/O on the disk image failed: {kind}")]
    Io { kind: std::io::ErrorKind },
}

impl RequestError {
    /// The status byte the driver receives for this failure.
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) | Self::ZeroRangeFlags { .. } => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// The address of the status byte: the last byte of the chain's last buffer, which must be
/// device-writable and inside guest memory. Without it a request cannot even fail properly.
pub fn locate_status<M: GuestMemory>(memory: &M, chain: &[Segment]) -> Option<GuestAddress> {
    let last = chain
        .last()
        .filter(|last| last.device_writable && last.len > 0)?;
    let address = last.address.checked_add(u64::from(last.len) - 1)?;
    memory
        .check_range(address, 1, Permissions::Write)
        .then_some(address)
}

/// Checks `chain` and reads its header; on success `data` holds the data buffers the request
/// reads or fills (for reads and GET_ID without the status byte).
pub fn parse_request<M: GuestMemory>(
    memory: &M,
    chain: &[Segment],
    limits: &RequestLimits,
    data: &mut Vec<Segment>,
) -> Result<Request, RequestError> {
    data.clear();
    locate_status(memory, chain).ok_or(RequestError::NoStatus)?;
    let mut seen_writable = false;
    let mut readable_len = 0u64;
    for segment in chain {
        let access = if segment.device_writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !memory.check_range(segment.address, segment.len as usize, access) {
            return Err(RequestError::OutsideMemory {
                address: segment.address.0,
                len: segment.len,
            });
        }
        if segment.device_writable {
            seen_writable = true;
        } else if seen_writable {
            return Err(RequestError::ReadableAfterWritable);
        } else {
            readable_len += u64::from(segment.len);
        }
    }
    let readable = &chain[..chain.iter().take_while(|s| !s.device_writable).count()];
    let writable = &chain[readable.len()..];

    let mut header = [0u8; HEADER_SIZE];
    if readable_len < HEADER_SIZE as u64 {
        return Err(RequestError::ShortHeader { len: readable_len });
    }
    copy_from_segments(memory, readable, 0, &mut header)?;
    let request_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());

    match request_type {
        VIRTIO_BLK_T_IN => {
            let len = collect_writable_data(writable, data);
            check_sectors(sector, len, limits)?;
            Ok(Request::Read { sector, len })
        }
        VIRTIO_BLK_T_OUT => {
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = collect_readable_data(readable, HEADER_SIZE as u64, data);
            check_sectors(sector, len, limits)?;
            Ok(Request::Write { sector, len })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
        VIRTIO_BLK_T_GET_ID => Ok(Request::GetId {
            len: collect_writable_data(writable, data),
        }),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let is_discard = request_type == VIRTIO_BLK_T_DISCARD;
            let negotiated = if is_discard {
                limits.discard
            } else {
                limits.write_zeroes
            };
            if !negotiated || limits.read_only {
                return Err(RequestError::Unsupported(request_type));
            }
            let range = parse_zero_range(memory, readable, readable_len, is_discard, limits)?;
            Ok(if is_discard {
                Request::Discard(range)
            } else {
                Request::WriteZeroes(range)
            })
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn check_sectors(sector: u64, len: u64, limits: &RequestLimits) -> Result<(), RequestError> {
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::PartialSector { len });
    }
    let count = len / SECTOR_SIZE;
    match sector.checked_add(count) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(RequestError::BeyondCapacity {
            sector,
            count,
            capacity: limits.capacity_sectors,
        }),
    }
}

fn parse_zero_range<M: GuestMemory>(
    memory: &M,
    readable: &[Segment],
    readable_len: u64,
    is_discard: bool,
    limits: &RequestLimits,
) -> Result<ZeroRange, RequestError> {
    let len = readable_len - HEADER_SIZE as u64;
    let ranges = len / ZERO_RANGE_SIZE as u64;
    if len % ZERO_RANGE_SIZE as u64 != 0 || ranges == 0 || ranges > u64::from(MAX_ZERO_RANGES) {
        return Err(RequestError::ZeroRanges { len });
    }
    let mut bytes = [0u8; ZERO_RANGE_SIZE];
    copy_from_segments(memory, readable, HEADER_SIZE as u64, &mut bytes)?;
    let sector = u64::from_le_bytes(bytes[0..8].try_into().unwrap_or_default());
    let sectors = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    let flags = u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default());
    // Discard takes no flags at all; write-zeroes only "unmap" (virtio 1.2, 5.2.6.2).
    let allowed = if is_discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    if flags & !allowed != 0 {
        return Err(RequestError::ZeroRangeFlags { flags });
    }
    if sectors > MAX_ZERO_SECTORS {
        return Err(RequestError::ZeroRangeTooLong { sectors });
    }
    check_sectors(sector, u64::from(sectors) * SECTOR_SIZE, limits)?;
    Ok(ZeroRange {
        sector,
        sectors,
        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
    })
}

/// The writable buffers without the final status byte; returns their length.
fn collect_writable_data(writable: &[Segment], data: &mut Vec<Segment>) -> u64 {
    let mut len = 0;
    for (position, segment) in writable.iter().enumerate() {
        let mut segment = *segment;
        if position + 1 == writable.len() {
            segment.len -= 1;
        }
        if segment.len > 0 {
            len += u64::from(segment.len);
            data.push(segment);
        }
    }
    len
}

/// The readable buffers after the first `skip` bytes; returns their length.
fn collect_readable_data(readable: &[Segment], skip: u64, data: &mut Vec<Segment>) -> u64 {
    let mut to_skip = skip;
    let mut len = 0;
    for segment in readable {
        let skipped = to_skip.min(u64::from(segment.len));
        to_skip -= skipped;
        let rest = segment.len - skipped as u32;
        if rest > 0 {
            len += u64::from(rest);
            data.push(Segment {
                address: GuestAddress(segment.address.0 + skipped),
                len: rest,
                device_writable: false,
            });
        }
    }
    len
}

/// Copies `out.len()` bytes that start `skip` bytes into the concatenation of `segments`.
pub fn copy_from_segments<M: GuestMemory>(
    memory: &M,
    segments: &[Segment],
    skip: u64,
    out: &mut [u8],
) -> Result<(), RequestError> {
    let mut to_skip = skip;
    let mut copied = 0;
    for segment in segments {
        if copied == out.len() {
            break;
        }
        let skipped = to_skip.min(u64::from(segment.len));
        to_skip -= skipped;
        let available = (u64::from(segment.len) - skipped) as usize;
        let count = available.min(out.len() - copied);
        if count == 0 {
            continue;
        }
        let address = GuestAddress(segment.address.0 + skipped);
        memory
            .read_slice(&mut out[copied..copied + count], address)
            .map_err(|_| RequestError::GuestMemory { address: address.0 })?;
        copied += count;
    }
    if copied < out.len() {
        return Err(RequestError::ShortHeader { len: copied as u64 });
    }
    Ok(())
}

/// Copies as much of `bytes` as fits into the concatenation of `segments`; returns how much.
pub fn copy_to_segments<M: GuestMemory>(
    memory: &M,
    segments: &[Segment],
    bytes: &[u8],
) -> Result<usize, RequestError> {
    let mut copied = 0;
    for segment in segments {
        let count = (segment.len as usize).min(bytes.len() - copied);
        if count == 0 {
            break;
        }
        memory
            .write_slice(&bytes[copied..copied + count], segment.address)
            .map_err(|_| RequestError::GuestMemory {
                address: segment.address.0,
            })?;
        copied += count;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const LIMITS: RequestLimits = RequestLimits {
        capacity_sectors: 8,
        read_only: false,
        discard: true,
        write_zeroes: true,
    };

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap()
    }

    fn header(memory: &GuestMemoryMmap, address: u64, request_type: u32, sector: u64) {
        let mut bytes = [0u8; HEADER_SIZE];
        bytes[0..4].copy_from_slice(&request_type.to_le_bytes());
        bytes[8..16].copy_from_slice(&sector.to_le_bytes());
        memory.write_slice(&bytes, GuestAddress(address)).unwrap();
    }

    fn segment(address: u64, len: u32, device_writable: bool) -> Segment {
        Segment {
            address: GuestAddress(address),
            len,
            device_writable,
        }
    }

    #[test]
    fn a_header_split_across_buffers_is_read_whole() {
        let memory = memory();
        header(&memory, 0x100, VIRTIO_BLK_T_IN, 3);
        let chain = [
            segment(0x100, 5, false),
            segment(0x105, 11, false),
            segment(0x1000, 512, true),
            segment(0x2000, 1, true),
        ];
        let mut data = Vec::new();
        let request = parse_request(&memory, &chain, &LIMITS, &mut data).unwrap();
        assert_eq!(
            request,
            Request::Read {
                sector: 3,
                len: 512
            }
        );
        assert_eq!(data, vec![segment(0x1000, 512, true)]);
    }

    #[test]
    fn data_and_status_may_share_the_last_buffer() {
        let memory = memory();
        header(&memory, 0x100, VIRTIO_BLK_T_IN, 0);
        let chain = [segment(0x100, 16, false), segment(0x1000, 1025, true)];
        let mut data = Vec::new();
        let request = parse_request(&memory, &chain, &LIMITS, &mut data).unwrap();
        assert_eq!(
            request,
            Request::Read {
                sector: 0,
                len: 1024
            }
        );
        assert_eq!(locate_status(&memory, &chain), Some(GuestAddress(0x1400)));
    }

    #[test]
    fn malformed_chains_are_refused() {
        let memory = memory();
        header(&memory, 0x100, VIRTIO_BLK_T_OUT, 7);
        let mut data = Vec::new();
        let parse = |chain: &[Segment], data: &mut Vec<Segment>| {
            parse_request(&memory, chain, &LIMITS, data)
        };
        assert_eq!(parse(&[], &mut data), Err(RequestError::NoStatus));
        assert_eq!(
            parse(&[segment(0x100, 16, false)], &mut data),
            Err(RequestError::NoStatus)
        );
        assert_eq!(
            parse(
                &[segment(0x100, 16, false), segment(0xffff, 2, true)],
                &mut data
            ),
            Err(RequestError::NoStatus)
        );
        assert_eq!(
            parse(
                &[segment(0x100, 8, false), segment(0x200, 1, true)],
                &mut data
            ),
            Err(RequestError::ShortHeader { len: 8 })
        );
        assert_eq!(
            parse(
                &[
                    segment(0x100, 16, false),
                    segment(0x300, 1, true),
                    segment(0x400, 512, false),
                    segment(0x200, 1, true)
                ],
                &mut data
            ),
            Err(RequestError::ReadableAfterWritable)
        );
        assert_eq!(
            parse(
                &[
                    segment(0x100, 16, false),
                    segment(0xfe00, 1024, false),
                    segment(0x200, 1, true)
                ],
                &mut data
            ),
            Err(RequestError::OutsideMemory {
                address: 0xfe00,
                len: 1024
            })
        );
        // Sector 7 plus two sectors runs past an 8-sector disk.
        assert_eq!(
            parse(
                &[
                    segment(0x100, 16, false),
                    segment(0x400, 1024, false),
                    segment(0x200, 1, true)
                ],
                &mut data
            ),
            Err(RequestError::BeyondCapacity {
                sector: 7,
                count: 2,
                capacity: 8
            })
        );
        assert_eq!(
            parse(
                &[
                    segment(0x100, 16, false),
                    segment(0x400, 100, false),
                    segment(0x200, 1, true)
                ],
                &mut data
            ),
            Err(RequestError::PartialSector { len: 100 })
        );
        header(&memory, 0x100, VIRTIO_BLK_T_IN, u64::MAX);
        assert!(matches!(
            parse(
                &[segment(0x100, 16, false), segment(0x400, 513, true)],
                &mut data
            ),
            Err(RequestError::BeyondCapacity { .. })
        ));
    }

    #[test]
    fn zero_ranges_are_checked_against_flags_features_and_capacity() {
        let memory = memory();
        let mut data = Vec::new();
        let range = |sector: u64, sectors: u32, flags: u32| {
            let mut bytes = [0u8; ZERO_RANGE_SIZE];
            bytes[0..8].copy_from_slice(&sector.to_le_bytes());
            bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
            bytes[12..16].copy_from_slice(&flags.to_le_bytes());
            memory.write_slice(&bytes, GuestAddress(0x110)).unwrap();
        };
        let chain = [segment(0x100, 32, false), segment(0x200, 1, true)];

        header(&memory, 0x100, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range(2, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(
            parse_request(&memory, &chain, &LIMITS, &mut data),
            Ok(Request::WriteZeroes(ZeroRange {
                sector: 2,
                sectors: 4,
                unmap: true
            }))
        );
        range(6, 4, 0);
        assert!(matches!(
            parse_request(&memory, &chain, &LIMITS, &mut data),
            Err(RequestError::BeyondCapacity { .. })
        ));

        header(&memory, 0x100, VIRTIO_BLK_T_DISCARD, 0);
        range(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let error = parse_request(&memory, &chain, &LIMITS, &mut data).unwrap_err();
        assert_eq!(error.status(), VIRTIO_BLK_S_UNSUPP as u8);
        let no_discard = RequestLimits {
            discard: false,
            ..LIMITS
        };
        range(0, 1, 0);
        assert_eq!(
            parse_request(&memory, &chain, &no_discard, &mut data),
            Err(RequestError::Unsupported(VIRTIO_BLK_T_DISCARD))
        );
        let two_ranges = [segment(0x100, 48, false), segment(0x200, 1, true)];
        assert_eq!(
            parse_request(&memory, &two_ranges, &LIMITS, &mut data),
            Err(RequestError::ZeroRanges { len: 32 })
        );
    }
}
