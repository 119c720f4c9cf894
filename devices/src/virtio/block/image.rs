//! The raw disk image behind a virtio-blk device: a host file read and written at sector
//! offsets, straight between the file and guest memory (no bounce buffer). A disk opened with
//! O_DIRECT (`direct=on`) goes through an aligned bounce buffer instead, since guest buffers
//! need not meet O_DIRECT's alignment rules.
//!
//! Callers have already checked that every range fits the disk and every buffer lies in guest
//! memory (see `request.rs`); this module only moves bytes and reports host failures.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestMemory};

use super::request::{copy_to_segments, Request, RequestError, Segment, ZeroRange, SECTOR_SIZE};

/// Zeroes written where the file system cannot punch holes or zero ranges itself.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// The alignment O_DIRECT transfers get in host memory: a page, enough for any block device.
const DIRECT_ALIGNMENT: usize = 4096;
/// How much of a request one O_DIRECT transfer moves at most.
const DIRECT_CHUNK: usize = 256 * 1024;

/// An open raw image.
pub struct DiskImage {
    file: File,
    capacity_sectors: u64,
    read_only: bool,
    /// For O_DIRECT images: `DIRECT_CHUNK` bytes, plus room to start at an aligned address.
    bounce: Option<Vec<u8>>,
}

fn io_error(error: std::io::Error) -> RequestError {
    RequestError::Io { kind: error.kind() }
}

impl DiskImage {
    /// Wraps `file` of `len` bytes; a trailing partial sector is not part of the disk.
    pub fn new(file: File, len: u64, read_only: bool) -> Self {
        Self {
            file,
            capacity_sectors: len / SECTOR_SIZE,
            read_only,
            bounce: None,
        }
    }

    /// Wraps `file`, opened with O_DIRECT: transfers go through an aligned bounce buffer.
    pub fn new_direct(file: File, len: u64, read_only: bool) -> Self {
        Self {
            bounce: Some(vec![0; DIRECT_CHUNK + DIRECT_ALIGNMENT]),
            ..Self::new(file, len, read_only)
        }
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Carries out a parsed request over its data buffers; returns how many bytes it wrote into
    /// guest memory (not counting the status byte).
    pub fn execute<M: GuestMemory>(
        &mut self,
        memory: &M,
        request: &Request,
        data: &[Segment],
        id: &[u8],
    ) -> Result<u64, RequestError> {
        match *request {
            Request::Read { sector, len } => {
                self.transfer(memory, sector, data, true)?;
                Ok(len)
            }
            Request::Write { sector, .. } => {
                self.transfer(memory, sector, data, false)?;
                Ok(0)
            }
            Request::Flush => {
                self.file.sync_data().map_err(io_error)?;
                Ok(0)
            }
            Request::GetId { .. } => Ok(copy_to_segments(memory, data, id)? as u64),
            Request::Discard(range) => {
                self.zero(ZeroRange {
                    unmap: true,
                    ..range
                })?;
                Ok(0)
            }
            Request::WriteZeroes(range) => {
                self.zero(range)?;
                Ok(0)
            }
        }
    }

    /// Moves the data buffers' bytes between guest memory and the file from `sector` on.
    fn transfer<M: GuestMemory>(
        &mut self,
        memory: &M,
        sector: u64,
        data: &[Segment],
        into_guest: bool,
    ) -> Result<(), RequestError> {
        if self.bounce.is_some() {
            return self.transfer_direct(memory, sector, data, into_guest);
        }
        // The buffers are consecutive on disk: one seek, then each transfer moves the position on.
        self.file
            .seek(SeekFrom::Start(sector * SECTOR_SIZE))
            .map_err(io_error)?;
        for segment in data {
            let len = segment.len as usize;
            let result = if into_guest {
                memory.read_exact_volatile_from(segment.address, &mut self.file, len)
            } else {
                memory.write_all_volatile_to(segment.address, &mut self.file, len)
            };
            result.map_err(|error| match error {
                vm_memory::GuestMemoryError::IOError(error) => io_error(error),
                _ => RequestError::GuestMemory {
                    address: segment.address.0,
                },
            })?;
        }
        Ok(())
    }

    /// `transfer` for an O_DIRECT file: whole chunks between the file and the aligned bounce
    /// buffer, and plain copies between the bounce buffer and the guest's buffers. Offsets and
    /// lengths are whole sectors already.
    fn transfer_direct<M: GuestMemory>(
        &mut self,
        memory: &M,
        sector: u64,
        data: &[Segment],
        into_guest: bool,
    ) -> Result<(), RequestError> {
        let Some(bounce) = self.bounce.as_mut() else {
            return Ok(());
        };
        let skip = bounce.as_ptr().align_offset(DIRECT_ALIGNMENT);
        let bounce = &mut bounce[skip..skip + DIRECT_CHUNK];
        let total: u64 = data.iter().map(|segment| u64::from(segment.len)).sum();
        let mut offset = sector * SECTOR_SIZE;
        // Where in the request the chunk starts, and where in the segment list that is.
        let mut done = 0u64;
        let mut position = SegmentCursor::default();
        while done < total {
            let len = (total - done).min(DIRECT_CHUNK as u64) as usize;
            let chunk = &mut bounce[..len];
            if into_guest {
                self.file.read_exact_at(chunk, offset).map_err(io_error)?;
                position.copy(data, chunk.len(), |address, range| {
                    memory.write_slice(&chunk[range], address)
                })?;
            } else {
                position.copy(data, chunk.len(), |address, range| {
                    memory.read_slice(&mut chunk[range], address)
                })?;
                self.file.write_all_at(chunk, offset).map_err(io_error)?;
            }
            done += len as u64;
            offset += len as u64;
        }
        Ok(())
    }

    /// Zeroes a range: a hole when the driver allows unmapping, an allocated zero range
    /// otherwise, and plain writes of zeroes where the file system supports neither.
    fn zero(&mut self, range: ZeroRange) -> Result<(), RequestError> {
        let offset = range.sector * SECTOR_SIZE;
        let len = u64::from(range.sectors) * SECTOR_SIZE;
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_KEEP_SIZE
            | if range.unmap {
                libc::FALLOC_FL_PUNCH_HOLE
            } else {
                libc::FALLOC_FL_ZERO_RANGE
            };
        let (Ok(start), Ok(length)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io_error(std::io::ErrorKind::InvalidInput.into()));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor belongs to
        // `self.file`, which is open for the duration of the call.
        let result = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, start, length) };
        if result == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(io_error(error));
        }
        let mut written = 0;
        while written < len {
            let count = (len - written).min(ZEROES.len() as u64) as usize;
            self.file
                .write_all_at(&ZEROES[..count], offset + written)
                .map_err(io_error)?;
            written += count as u64;
        }
        Ok(())
    }
}

/// A position in a list of guest buffers, moved on chunk by chunk.
#[derive(Default)]
struct SegmentCursor {
    segment: usize,
    within: u64,
}

impl SegmentCursor {
    /// Hands `copy` each guest address and the range of the chunk that belongs there, until
    /// `len` bytes of the chunk are placed.
    fn copy<F>(&mut self, data: &[Segment], len: usize, mut copy: F) -> Result<(), RequestError>
    where
        F: FnMut(
            vm_memory::GuestAddress,
            std::ops::Range<usize>,
        ) -> Result<(), vm_memory::GuestMemoryError>,
    {
        let mut placed = 0usize;
        while placed < len {
            let Some(segment) = data.get(self.segment) else {
                return Ok(());
            };
            let left = u64::from(segment.len) - self.within;
            let count = left.min((len - placed) as u64) as usize;
            let address = vm_memory::GuestAddress(segment.address.0 + self.within);
            copy(address, placed..placed + count)
                .map_err(|_| RequestError::GuestMemory { address: address.0 })?;
            placed += count;
            self.within += count as u64;
            if self.within == u64::from(segment.len) {
                self.segment += 1;
                self.within = 0;
            }
        }
        Ok(())
    }
}
