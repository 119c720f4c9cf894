//! The virtio-blk driver (device id 2, one request queue): one request at a time, each a
//! chain of the 16-byte header, the data and the status byte.
//!
//! The guest asks the disk for its id (GET_ID), reads sector 0 and, with `blk-write=<n>`,
//! writes its pattern to sector `n`, reads it back (when the write succeeded) and flushes.
//! Output lines (after the `virtio-blk: device=<slot> ` prefix):
//!
//! ```text
//! capacity=<sectors> read-only=<yes|no> serial=<GET_ID text>
//! sector0=<text>                 sector 0 up to its first NUL or newline, at most 64 bytes
//! write sector=<n> status=<ok|ioerr|unsupp|<decimal>>
//! read-back sector=<n> matches=<yes|no>                 only after a write that said ok
//! flush status=<ok|ioerr|unsupp|<decimal>>
//! ```
//!
//! Non-printable bytes in the texts show as `.`. The pattern is
//! `cove-test-guest wrote sector <n>\n` followed, up to the end of the 512-byte sector, by
//! the byte `offset & 0xff` at each offset. A write that fails on a writable disk, or succeeds
//! on a read-only one (feature RO), is also an `error:` line; IOERR from a read-only disk is
//! what the tests expect.

use super::memory::DmaBuffer;
use super::queue::{Queue, Segment};
use super::{Device, DriverError};
use crate::serial::Console;

const FEATURE_READ_ONLY: u64 = 1 << 5;
const FEATURE_FLUSH: u64 = 1 << 9;

const REQUEST_IN: u32 = 0;
const REQUEST_OUT: u32 = 1;
const REQUEST_FLUSH: u32 = 4;
const REQUEST_GET_ID: u32 = 8;

const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;
const STATUS_UNSUPPORTED: u8 = 2;
/// Written into the status byte before each request, so an unwritten status shows.
const STATUS_UNWRITTEN: u8 = 0xff;

const SECTOR_SIZE: usize = 512;
const ID_LENGTH: usize = 20;
const SECTOR0_TEXT_LIMIT: usize = 64;
const REQUEST_TIMEOUT_MICROSECONDS: u64 = 10_000_000;

/// Where the parts of a request lie in the driver's page.
const HEADER_OFFSET: usize = 0;
const STATUS_OFFSET: usize = 16;
const ID_OFFSET: usize = 32;
const DATA_OFFSET: usize = 512;

const PATTERN_MARKER: &str = "cove-test-guest wrote sector ";

/// The data part of a request: an offset in the driver's page and a length.
struct Data {
    offset: usize,
    length: usize,
    device_writes: bool,
}

struct BlockDriver<'a> {
    device: &'a mut Device,
    queue: Queue,
    memory: DmaBuffer,
}

pub fn exercise(device: &mut Device, write_sector: Option<u64>) -> Result<(), DriverError> {
    let offered = device
        .transport
        .negotiate(FEATURE_READ_ONLY | FEATURE_FLUSH)?;
    let read_only = offered & FEATURE_READ_ONLY != 0;
    let capacity = device.transport.config_u64(0);
    let [queue] = device.start::<1>()?;
    let mut driver = BlockDriver {
        device,
        queue,
        memory: DmaBuffer::allocate_pages(4096)?,
    };

    let id = Data {
        offset: ID_OFFSET,
        length: ID_LENGTH,
        device_writes: true,
    };
    let status = driver.request(REQUEST_GET_ID, 0, Some(id), "the GET_ID request")?;
    if status != STATUS_OK {
        return Err(DriverError::Unexpected {
            what: "GET_ID failed with status",
            value: u64::from(status),
        });
    }
    let serial = &driver.memory.bytes()[ID_OFFSET..ID_OFFSET + ID_LENGTH];
    printable(
        driver
            .device
            .line()
            .text("capacity=")
            .decimal(capacity)
            .text(" read-only=")
            .text(if read_only { "yes" } else { "no" })
            .text(" serial="),
        serial,
        ID_LENGTH,
    )
    .end_line();

    let status = driver.transfer(REQUEST_IN, 0, "reading sector 0")?;
    if status != STATUS_OK {
        return Err(DriverError::Unexpected {
            what: "reading sector 0 failed with status",
            value: u64::from(status),
        });
    }
    let sector0 = &driver.memory.bytes()[DATA_OFFSET..DATA_OFFSET + SECTOR_SIZE];
    printable(
        driver.device.line().text("sector0="),
        sector0,
        SECTOR0_TEXT_LIMIT,
    )
    .end_line();

    if let Some(sector) = write_sector {
        driver.write_and_check(sector, read_only, offered & FEATURE_FLUSH != 0)?;
    }
    Ok(())
}

impl BlockDriver<'_> {
    fn write_and_check(
        &mut self,
        sector: u64,
        read_only: bool,
        flush_offered: bool,
    ) -> Result<(), DriverError> {
        let mut expected = [0u8; SECTOR_SIZE];
        fill_pattern(&mut expected, sector);
        self.data_mut().copy_from_slice(&expected);
        let status = self.transfer(REQUEST_OUT, sector, "writing the pattern")?;
        status_name(
            self.device
                .line()
                .text("write sector=")
                .decimal(sector)
                .text(" status="),
            status,
        )
        .end_line();
        if read_only && status == STATUS_OK {
            return Err(DriverError::Unexpected {
                what: "the read-only disk accepted a write to sector",
                value: sector,
            });
        }
        if !read_only && status != STATUS_OK {
            return Err(DriverError::Unexpected {
                what: "the write failed with status",
                value: u64::from(status),
            });
        }
        if status == STATUS_OK {
            self.data_mut().fill(0);
            let status = self.transfer(REQUEST_IN, sector, "reading the pattern back")?;
            let matches = status == STATUS_OK && self.data_mut()[..] == expected[..];
            self.device
                .line()
                .text("read-back sector=")
                .decimal(sector)
                .text(" matches=")
                .text(if matches { "yes" } else { "no" })
                .end_line();
            if !matches {
                return Err(DriverError::Unexpected {
                    what: "the sector read back differs from what was written, status",
                    value: u64::from(status),
                });
            }
        }
        if !flush_offered {
            return Err(DriverError::Unexpected {
                what: "the device does not offer FLUSH, features",
                value: FEATURE_FLUSH,
            });
        }
        let status = self.request(REQUEST_FLUSH, 0, None, "the flush")?;
        status_name(self.device.line().text("flush status="), status).end_line();
        if status != STATUS_OK && !read_only {
            return Err(DriverError::Unexpected {
                what: "the flush failed with status",
                value: u64::from(status),
            });
        }
        Ok(())
    }

    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.memory.bytes_mut()[DATA_OFFSET..DATA_OFFSET + SECTOR_SIZE]
    }

    /// Reads (IN) or writes (OUT) one sector through the data area.
    fn transfer(&mut self, kind: u32, sector: u64, what: &'static str) -> Result<u8, DriverError> {
        let data = Data {
            offset: DATA_OFFSET,
            length: SECTOR_SIZE,
            device_writes: kind == REQUEST_IN,
        };
        self.request(kind, sector, Some(data), what)
    }

    /// Sends one request and waits for it; returns the status byte the device wrote.
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<Data>,
        what: &'static str,
    ) -> Result<u8, DriverError> {
        let bytes = self.memory.bytes_mut();
        bytes[HEADER_OFFSET..HEADER_OFFSET + 4].copy_from_slice(&kind.to_le_bytes());
        bytes[HEADER_OFFSET + 4..HEADER_OFFSET + 8].fill(0);
        bytes[HEADER_OFFSET + 8..HEADER_OFFSET + 16].copy_from_slice(&sector.to_le_bytes());
        bytes[STATUS_OFFSET] = STATUS_UNWRITTEN;

        let header = Segment::readable(self.memory.address_at(HEADER_OFFSET), 16);
        let status = Segment::writable(self.memory.address_at(STATUS_OFFSET), 1);
        let mut segments = [header; 3];
        let mut count = 0;
        segments[count] = header;
        count += 1;
        if let Some(data) = data {
            segments[count] = Segment {
                address: self.memory.address_at(data.offset),
                length: data.length as u32,
                device_writes: data.device_writes,
            };
            count += 1;
        }
        segments[count] = status;
        count += 1;
        let head = self
            .queue
            .push(&segments[..count])
            .ok_or(DriverError::Unexpected {
                what: "no free descriptors for a request, free",
                value: self.queue.free_descriptors() as u64,
            })?;
        self.device.transport.notify(self.queue.index());
        let queue = &self.queue;
        if !self
            .device
            .completions
            .wait(REQUEST_TIMEOUT_MICROSECONDS, || queue.has_used())
        {
            return Err(DriverError::TimedOut { what });
        }
        let used = self.queue.pop_used().expect("the used ring has an entry");
        if used.head != head {
            return Err(DriverError::Unexpected {
                what: "the device completed a request that was not sent, head",
                value: u64::from(used.head),
            });
        }
        Ok(self.memory.bytes()[STATUS_OFFSET])
    }
}

/// The guest's pattern for `sector` (see the module documentation).
fn fill_pattern(sector_bytes: &mut [u8; SECTOR_SIZE], sector: u64) {
    for (offset, byte) in sector_bytes.iter_mut().enumerate() {
        *byte = offset as u8;
    }
    let marker = PATTERN_MARKER.as_bytes();
    sector_bytes[..marker.len()].copy_from_slice(marker);
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = sector;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let end = marker.len() + digits.len() - start;
    sector_bytes[marker.len()..end].copy_from_slice(&digits[start..]);
    sector_bytes[end] = b'\n';
}

/// Writes `bytes` up to the first NUL or newline, at most `limit` of them, with `.` for
/// anything not printable ASCII.
fn printable(mut line: Console, bytes: &[u8], limit: usize) -> Console {
    for &byte in bytes
        .iter()
        .take(limit)
        .take_while(|&&byte| byte != 0 && byte != b'\n')
    {
        let shown = if (0x20..0x7f).contains(&byte) {
            byte
        } else {
            b'.'
        };
        line = line.bytes(&[shown]);
    }
    line
}

fn status_name(line: Console, status: u8) -> Console {
    match status {
        STATUS_OK => line.text("ok"),
        STATUS_IOERR => line.text("ioerr"),
        STATUS_UNSUPPORTED => line.text("unsupp"),
        other => line.decimal(u64::from(other)),
    }
}
