//! The boot timer: an MMIO byte that a guest writes, with the value 123, when it considers
//! itself booted. The time since the VMM process started is recorded for the API and printed on
//! stderr, which is how boot times are measured from the guest's own point of view.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::bus::BusDevice;

/// The byte value that marks "booted".
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// The last boot time recorded, in microseconds since the VMM started; shared with the API.
#[derive(Debug, Default)]
pub struct BootTime {
    micros: AtomicU64,
}

impl BootTime {
    /// The recorded boot time, or `None` if the guest has not written the timer yet.
    pub fn micros(&self) -> Option<u64> {
        match self.micros.load(Ordering::Acquire) {
            0 => None,
            micros => Some(micros),
        }
    }
}

/// The device behind the boot-timer MMIO page.
pub struct BootTimer {
    started: Instant,
    recorded: Arc<BootTime>,
}

impl BootTimer {
    /// A timer that measures from `started`, the moment the VMM process began.
    pub fn new(started: Instant, recorded: Arc<BootTime>) -> Self {
        Self { started, recorded }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        // A zero would read as "not booted"; a boot within the first microsecond counts as one.
        let micros = (self.started.elapsed().as_micros() as u64).max(1);
        self.recorded.micros.store(micros, Ordering::Release);
        eprintln!("guest boot time: {micros} us");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_byte_at_offset_zero_records_a_time() {
        let recorded = Arc::new(BootTime::default());
        let mut timer = BootTimer::new(Instant::now(), recorded.clone());
        timer.write(0, &[1]);
        timer.write(1, &[BOOT_TIMER_MAGIC]);
        assert_eq!(recorded.micros(), None);
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert!(recorded.micros().is_some());
    }
}
