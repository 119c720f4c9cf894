//! The raw disk image behind a virtio-blk device: a host file read and written at sector
//! offsets, straight between the file and guest memory (no bounce buffer).
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

/// An open raw image.
pub struct DiskImage {
    file: File,
    capacity_sectors: u64,
    read_only: bool,
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
