//! Address buses: one for I/O ports, one for MMIO, each a sorted map from address ranges to
//! devices.
//!
//! A vCPU thread that exits on a port or MMIO access asks the bus for the device that owns the
//! address and hands it the offset into that device's range. Accesses that hit no device are
//! counted rather than treated as errors: a guest probing for hardware it does not have is normal.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes inside its bus range.
pub trait BusDevice: Send {
    /// Fills `data` with what the device returns at `offset` into its range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes `data` written at `offset` into its range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} is empty or wraps around the address space")]
    InvalidRange { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} overlaps the device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A bus: devices registered on non-overlapping ranges, plus counters of the accesses that
/// matched none of them.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
    unclaimed_reads: AtomicU64,
    unclaimed_writes: AtomicU64,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for the addresses `base..base + len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let before = self.devices.range(..end).next_back();
        if let Some((&other, entry)) = before {
            if other + entry.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, address: u64, size: usize) -> Option<(u64, &Entry)> {
        let (&base, entry) = self.devices.range(..=address).next_back()?;
        let offset = address - base;
        let fits = offset
            .checked_add(size as u64)
            .is_some_and(|end| end <= entry.len);
        fits.then_some((offset, entry))
    }

    /// Routes a read; returns false, with `data` filled with all-ones as on real hardware, when
    /// no device owns the whole access.
    pub fn read(&self, address: u64, data: &mut [u8]) -> bool {
        match self.find(address, data.len()) {
            Some((offset, entry)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed_reads.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Routes a write; returns false, dropping the data, when no device owns the whole access.
    pub fn write(&self, address: u64, data: &[u8]) -> bool {
        match self.find(address, data.len()) {
            Some((offset, entry)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => {
                self.unclaimed_writes.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// How many reads hit no device so far.
    pub fn unclaimed_reads(&self) -> u64 {
        self.unclaimed_reads.load(Ordering::Relaxed)
    }

    /// How many writes hit no device so far.
    pub fn unclaimed_writes(&self) -> u64 {
        self.unclaimed_writes.load(Ordering::Relaxed)
    }
}

/// Locks a device; a device whose lock was poisoned by a panicking thread is still usable,
/// because every model here keeps its registers consistent between statements.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_accesses_by_offset_and_counts_the_rest() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, device.clone()).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(lock(&device).last_write, Some((0, vec![b'x'])));

        assert!(!bus.read(0x3f7, &mut data));
        assert_eq!(data, [0xff]);
        assert!(!bus.write(0x400, &[1]));
        // An access that starts inside the range but runs past its end is not the device's.
        assert!(!bus.write(0x3ff, &[1, 2]));
        assert_eq!(bus.unclaimed_reads(), 1);
        assert_eq!(bus.unclaimed_writes(), 2);
    }

    #[test]
    fn refuses_overlapping_and_empty_ranges() {
        let mut bus = Bus::new();
        let device = || Arc::new(Mutex::new(Recorder::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(0x100, 0x10, device()).unwrap();
        assert_eq!(
            bus.insert(0x108, 0x10, device()),
            Err(BusError::Overlap {
                base: 0x108,
                len: 0x10,
                other: 0x100
            })
        );
        assert_eq!(
            bus.insert(0xf8, 0x10, device()),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10,
                other: 0x100
            })
        );
        assert!(matches!(
            bus.insert(0x200, 0, device()),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, device()),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(0x110, 0x10, device()).unwrap();
        bus.insert(0xf0, 0x10, device()).unwrap();
    }
}
