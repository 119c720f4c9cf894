//! Timestamps as LXD writes them (RFC 3339 in UTC with nanoseconds) and random identifiers
//! (operation ids, websocket secrets), without a date or random-number crate.

use std::time::{SystemTime, UNIX_EPOCH};

use cove_shim::monitor::run_directory::civil_from_days;

/// Now, as `2026-11-29T09:04:30.123456789Z`.
pub fn now() -> String {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format_timestamp(since_epoch.as_secs() as i64, since_epoch.subsec_nanos())
}

/// Formats seconds since the Unix epoch (and nanoseconds) as RFC 3339 in UTC.
pub fn format_timestamp(seconds: i64, nanoseconds: u32) -> String {
    let days = seconds.div_euclid(86_400);
    let in_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanoseconds:09}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    )
}

/// 16 random bytes from the kernel.
fn random_bytes() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `bytes`, which lives
        // for the whole call.
        let read = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if read > 0 {
            filled += read as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // getrandom(2) cannot fail on Linux ≥ 3.17 once the pool is ready; fall back to
            // the clock and pid rather than panicking.
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            bytes = (nanos ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
            break;
        }
    }
    bytes
}

/// A random UUID (version 4), as LXD's operation ids.
pub fn uuid() -> String {
    let mut bytes = random_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A random secret for an operation's websockets (64 hex digits).
pub fn secret() -> String {
    let mut text = String::with_capacity(64);
    for _ in 0..2 {
        for byte in random_bytes() {
            text.push_str(&format!("{byte:02x}"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(format_timestamp(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            format_timestamp(1_795_945_470, 5),
            "2026-11-29T09:44:30.000000005Z"
        );
        assert_eq!(
            format_timestamp(951_782_400, 0),
            "2000-02-29T00:00:00.000000000Z"
        );
    }

    #[test]
    fn uuids_are_version_4_and_differ() {
        let first = uuid();
        assert_eq!(first.len(), 36);
        assert_eq!(&first[14..15], "4");
        assert_ne!(first, uuid());
        assert_eq!(secret().len(), 64);
    }
}
