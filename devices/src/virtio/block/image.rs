//! The raw disk image behind a virtio-blk device: a host file read and written at sector
//! offsets, straight between the file and guest memory with one `preadv`/`pwritev` per request
//! (no bounce buffer, no `lseek`). [`DiskImage`] holds no mutable state, so the device's worker
//! threads share it; each executor brings its own [`Scratch`].
//!
//! A disk opened with O_DIRECT (`direct=on`) also moves data straight into guest memory when
//! every guest buffer starts and ends on a 512-byte boundary (what Linux sends); otherwise, or
//! when the host device wants a larger alignment (EINVAL), the request goes through an aligned
//! bounce buffer, a chunk at a time.
//!
//! Callers have already checked that every range fits the disk and every buffer lies in guest
//! memory (see `request.rs`); this module only moves bytes and reports host failures.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::request::{copy_to_segments, Request, RequestError, Segment, ZeroRange, SECTOR_SIZE};

/// Zeroes written where the file system cannot punch holes or zero ranges itself.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// The alignment O_DIRECT transfers get in host memory: a page, enough for any block device.
const DIRECT_ALIGNMENT: usize = 4096;
/// The alignment of guest buffers that O_DIRECT may use in place: the logical block size of
/// nearly every host device. A device that wants more answers EINVAL and the request is
/// bounced instead.
const DIRECT_GUEST_ALIGNMENT: usize = SECTOR_SIZE as usize;
/// How much of a request one O_DIRECT transfer through the bounce buffer moves at most.
const DIRECT_CHUNK: usize = 256 * 1024;
/// The most buffers one `preadv`/`pwritev` takes (`IOV_MAX` on Linux).
const MAX_IOVECS: usize = 1024;

/// An open raw image.
pub struct DiskImage {
    file: File,
    capacity_sectors: u64,
    read_only: bool,
    /// Opened with O_DIRECT: transfers must be aligned in host memory.
    direct: bool,
}

/// What one executor of requests (a worker thread, or the device itself when it has none) keeps
/// from one request to the next.
#[derive(Default)]
pub struct Scratch {
    /// For O_DIRECT images: `DIRECT_CHUNK` bytes plus room to start aligned; allocated on the
    /// first request that needs it.
    bounce: Vec<u8>,
    /// Set when the last request went through the bounce buffer.
    pub bounced: bool,
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
            direct: false,
        }
    }

    /// Wraps `file`, opened with O_DIRECT.
    pub fn new_direct(file: File, len: u64, read_only: bool) -> Self {
        Self {
            direct: true,
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
        &self,
        memory: &M,
        request: &Request,
        data: &[Segment],
        id: &[u8],
        scratch: &mut Scratch,
    ) -> Result<u64, RequestError> {
        scratch.bounced = false;
        match *request {
            Request::Read { sector, len } => {
                self.transfer(memory, sector, data, true, scratch)?;
                Ok(len)
            }
            Request::Write { sector, .. } => {
                self.transfer(memory, sector, data, false, scratch)?;
                Ok(0)
            }
            // Every write whose completion the driver has seen returned from `pwrite` before
            // it completed, so this covers it (virtio 1.2, 5.2.6: a flush covers completed
            // writes; Linux waits for the writes a flush must cover before it sends one).
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
        &self,
        memory: &M,
        sector: u64,
        data: &[Segment],
        into_guest: bool,
        scratch: &mut Scratch,
    ) -> Result<(), RequestError> {
        let offset = sector * SECTOR_SIZE;
        let access = if into_guest {
            Permissions::Write
        } else {
            Permissions::Read
        };
        // The host slices behind every buffer (a buffer across two memory regions is two).
        let mut slices = Vec::with_capacity(data.len());
        for segment in data {
            let memory_error = |_| RequestError::GuestMemory {
                address: segment.address.0,
            };
            let pieces = memory
                .get_slices(segment.address, segment.len as usize, access)
                .map_err(memory_error)?;
            for piece in pieces {
                slices.push(piece.map_err(memory_error)?);
            }
        }
        let guards: Vec<_> = slices.iter().map(|slice| slice.ptr_guard_mut()).collect();
        let mut iovecs: Vec<libc::iovec> = guards
            .iter()
            .zip(&slices)
            .map(|(guard, slice)| libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: slice.len(),
            })
            .collect();
        let aligned = iovecs.iter().all(|iovec| {
            (iovec.iov_base as usize) % DIRECT_GUEST_ALIGNMENT == 0
                && iovec.iov_len % DIRECT_GUEST_ALIGNMENT == 0
        });
        if !self.direct || aligned {
            let result = vectored(&self.file, &mut iovecs, offset, into_guest);
            if into_guest {
                // As vm-memory's own reads do: even a failed read may have written some bytes.
                for slice in &slices {
                    slice.bitmap().mark_dirty(0, slice.len());
                }
            }
            match result {
                Ok(()) => return Ok(()),
                // The host device wants more than 512-byte alignment: bounce instead.
                Err(error) if self.direct && error.raw_os_error() == Some(libc::EINVAL) => {}
                Err(error) => return Err(io_error(error)),
            }
        }
        drop(guards);
        drop(slices);
        scratch.bounced = true;
        self.transfer_bounced(memory, offset, data, into_guest, scratch)
    }

    /// `transfer` for an O_DIRECT file and unaligned guest buffers: whole chunks between the
    /// file and the aligned bounce buffer, and plain copies between the bounce buffer and the
    /// guest's buffers. Offsets and lengths are whole sectors already.
    fn transfer_bounced<M: GuestMemory>(
        &self,
        memory: &M,
        mut offset: u64,
        data: &[Segment],
        into_guest: bool,
        scratch: &mut Scratch,
    ) -> Result<(), RequestError> {
        if scratch.bounce.is_empty() {
            scratch.bounce = vec![0; DIRECT_CHUNK + DIRECT_ALIGNMENT];
        }
        let skip = scratch.bounce.as_ptr().align_offset(DIRECT_ALIGNMENT);
        let bounce = &mut scratch.bounce[skip..skip + DIRECT_CHUNK];
        let total: u64 = data.iter().map(|segment| u64::from(segment.len)).sum();
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
    fn zero(&self, range: ZeroRange) -> Result<(), RequestError> {
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

/// `preadv` (`into_guest`) or `pwritev` of `iovecs` at `offset`, until every byte moved; a
/// short transfer moves the buffers on and goes again.
fn vectored(
    file: &File,
    iovecs: &mut [libc::iovec],
    mut offset: u64,
    into_guest: bool,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < iovecs.len() {
        let pending = &mut iovecs[first..];
        let count = pending.len().min(MAX_IOVECS) as libc::c_int;
        let at = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: each iovec points at guest memory that `transfer` holds a pointer guard for,
        // valid for `iov_len` bytes of reads and writes for the whole call (the ranges were
        // checked to lie in guest memory); the descriptor is `file`'s, open for the call.
        let moved = unsafe {
            if into_guest {
                libc::preadv(file.as_raw_fd(), pending.as_ptr(), count, at)
            } else {
                libc::pwritev(file.as_raw_fd(), pending.as_ptr(), count, at)
            }
        };
        let Ok(mut moved) = usize::try_from(moved) else {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        };
        if moved == 0 {
            // The file is shorter than the disk it was opened as (truncated since).
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        offset += moved as u64;
        for iovec in pending.iter_mut() {
            if moved < iovec.iov_len {
                // SAFETY: `moved` is less than the buffer's length, so the result stays in it.
                iovec.iov_base = unsafe { iovec.iov_base.cast::<u8>().add(moved) }.cast();
                iovec.iov_len -= moved;
                break;
            }
            moved -= iovec.iov_len;
            iovec.iov_len = 0;
            first += 1;
        }
    }
    Ok(())
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
        F: FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), GuestMemoryError>,
    {
        let mut placed = 0usize;
        while placed < len {
            let Some(segment) = data.get(self.segment) else {
                return Ok(());
            };
            let left = u64::from(segment.len) - self.within;
            let count = left.min((len - placed) as u64) as usize;
            let address = GuestAddress(segment.address.0 + self.within);
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

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use vm_memory::GuestMemoryMmap;

    use super::*;

    /// Two adjacent regions, so that a buffer across 0x1000 is two host slices.
    fn split_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    fn patterned_file(len: usize) -> File {
        let mut file = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..len).map(|offset| (offset % 251) as u8).collect();
        file.write_all(&bytes).unwrap();
        file
    }

    fn segment(address: u64, len: u32) -> Segment {
        Segment {
            address: GuestAddress(address),
            len,
            device_writable: true,
        }
    }

    #[test]
    fn vectored_transfers_span_regions_and_never_seek() {
        let mut file = patterned_file(0x3000);
        file.seek(SeekFrom::Start(7)).unwrap();
        let image = DiskImage::new(file.try_clone().unwrap(), 0x3000, false);
        let memory = split_memory();
        let mut scratch = Scratch::default();

        // 0x200 across the two regions, then 0x200 elsewhere: sectors 4..6.
        let data = [segment(0xf00, 0x200), segment(0x200, 0x200)];
        let request = Request::Read {
            sector: 4,
            len: 0x400,
        };
        assert_eq!(
            image.execute(&memory, &request, &data, &[], &mut scratch),
            Ok(0x400)
        );
        assert!(!scratch.bounced);
        let mut read = vec![0u8; 0x200];
        memory.read_slice(&mut read, GuestAddress(0xf00)).unwrap();
        let expected: Vec<u8> = (0x800..0xa00).map(|offset| (offset % 251) as u8).collect();
        assert_eq!(read, expected);
        memory.read_slice(&mut read, GuestAddress(0x200)).unwrap();
        let expected: Vec<u8> = (0xa00..0xc00).map(|offset| (offset % 251) as u8).collect();
        assert_eq!(read, expected);

        memory
            .write_slice(&[0xa5; 0x200], GuestAddress(0xf00))
            .unwrap();
        let request = Request::Write {
            sector: 0x10,
            len: 0x200,
        };
        image
            .execute(&memory, &request, &data[..1], &[], &mut scratch)
            .unwrap();
        let mut written = vec![0u8; 0x202];
        file.read_exact_at(&mut written, 0x1fff).unwrap();
        assert_eq!(written[0], (0x1fff % 251) as u8);
        assert_eq!(&written[1..0x201], &[0xa5; 0x200][..]);
        assert_eq!(written[0x201], (0x2200 % 251) as u8);
        assert_eq!(
            file.stream_position().unwrap(),
            7,
            "the file position is untouched"
        );
    }

    #[test]
    fn a_read_past_the_end_of_the_file_is_an_error_not_stale_bytes() {
        let file = patterned_file(0x100);
        // Opened as a bigger disk than the file now is (truncated since).
        let image = DiskImage::new(file, 0x400, false);
        let memory = split_memory();
        let request = Request::Read {
            sector: 0,
            len: 0x400,
        };
        let error = image
            .execute(
                &memory,
                &request,
                &[segment(0, 0x400)],
                &[],
                &mut Scratch::default(),
            )
            .unwrap_err();
        assert_eq!(
            error,
            RequestError::Io {
                kind: std::io::ErrorKind::UnexpectedEof
            }
        );
    }
}
