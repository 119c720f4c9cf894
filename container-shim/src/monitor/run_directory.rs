//! The run directory: where each container's monitor publishes itself.
//!
//! ```text
//! <run dir>/                  default /run/cove
//!   <name>/                   mode 0700, made by `cove-shim start`, removed by `delete`
//!     state.json              a StateRecord, replaced atomically (write + rename) at each change
//!     control.sock            the control socket while the monitor runs
//!     monitor.log             the monitor's own stdout and stderr
//! ```
//!
//! Also here: naming a process by pid *and* start time, so that a pid recorded in
//! `state.json` is never mistaken for a later process that got the same pid.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::control::StateRecord;

use super::MonitorError;

/// Where monitors publish themselves unless told otherwise.
pub const DEFAULT_RUN_DIRECTORY: &str = "/run/cove";
pub const STATE_FILE: &str = "state.json";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const MONITOR_LOG: &str = "monitor.log";

/// One run directory, holding an entry per container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDirectory {
    root: PathBuf,
}

impl RunDirectory {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<run dir>/<name>`.
    pub fn entry(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn state_file(&self, name: &str) -> PathBuf {
        self.entry(name).join(STATE_FILE)
    }

    pub fn control_socket(&self, name: &str) -> PathBuf {
        self.entry(name).join(CONTROL_SOCKET)
    }

    pub fn monitor_log(&self, name: &str) -> PathBuf {
        self.entry(name).join(MONITOR_LOG)
    }

    /// Makes the entry of a new container; an existing one is a name clash.
    pub(super) fn create_entry(&self, name: &str) -> Result<PathBuf, MonitorError> {
        let entry = self.entry(name);
        let error = |source| MonitorError::RunDirectory {
            path: entry.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)
            .map_err(error)?;
        match std::fs::DirBuilder::new().mode(0o700).create(&entry) {
            Err(source) if source.kind() == io::ErrorKind::AlreadyExists => {
                Err(MonitorError::NameTaken {
                    name: name.to_string(),
                    run_directory: self.root.clone(),
                })
            }
            result => result.map(|()| entry.clone()).map_err(error),
        }
    }

    /// Removes a container's entry and everything in it.
    pub(super) fn remove_entry(&self, name: &str) -> Result<(), MonitorError> {
        let entry = self.entry(name);
        match std::fs::remove_dir_all(&entry) {
            Err(source) if source.kind() != io::ErrorKind::NotFound => Err(MonitorError::Remove {
                path: entry,
                source,
            }),
            _ => Ok(()),
        }
    }

    /// The container's recorded state.
    pub fn read_state(&self, name: &str) -> Result<StateRecord, MonitorError> {
        let path = self.state_file(name);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(source) if source.kind() == io::ErrorKind::NotFound => {
                return Err(MonitorError::NotFound {
                    name: name.to_string(),
                    run_directory: self.root.clone(),
                })
            }
            Err(source) => return Err(MonitorError::ReadState { path, source }),
        };
        serde_json::from_slice(&text).map_err(|error| MonitorError::MalformedState {
            path,
            reason: error.to_string(),
        })
    }

    /// Replaces `state.json` atomically: readers see the old record or the new one, never a
    /// part of either. (No fsync: the run directory is a tmpfs whose content a reboot ends.)
    pub fn write_state(&self, record: &StateRecord) -> Result<(), MonitorError> {
        let path = self.state_file(&record.name);
        let staging = path.with_extension("json.new");
        let mut text = serde_json::to_vec_pretty(record).unwrap_or_default();
        text.push(b'\n');
        std::fs::write(&staging, text)
            .and_then(|()| std::fs::rename(&staging, &path))
            .map_err(|source| MonitorError::WriteState { path, source })
    }
}

/// A process's start time in clock ticks after boot (`/proc/<pid>/stat`, field 22), or `None`
/// when there is no such process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    start_time_from_stat(&stat)
}

/// Field 22 of a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so count from the last `)`.
fn start_time_from_stat(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    // After the name: field 3 (state) onwards; field 22 is the 20th of those.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// True while the process `pid` that started at `start_time` still exists (a zombie counts
/// as gone).
pub fn is_same_process(pid: u32, start_time: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let zombie = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z" || state == "X");
    !zombie && start_time_from_stat(&stat) == Some(start_time)
}

/// `time` as RFC 3339 in UTC with milliseconds, such as `2026-01-02T03:04:05.678Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm); coved's
/// timestamps use it too.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        let at = |seconds: u64, millis: u64| {
            rfc3339(UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_millis(millis))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn the_start_time_is_field_22_even_with_odd_command_names() {
        let stat = "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000000 100 18446744073709551615";
        assert_eq!(start_time_from_stat(stat), Some(987_654));
        assert_eq!(start_time_from_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_itself_and_not_another() {
        let pid = std::process::id();
        let start = process_start_time(pid).expect("our own stat");
        assert!(is_same_process(pid, start));
        assert!(!is_same_process(pid, start + 1));
        assert!(!is_same_process(u32::MAX, start));
    }

    #[test]
    fn the_state_file_is_replaced_whole() {
        let root = std::env::temp_dir().join(format!("cove-run-dir-test-{}", std::process::id()));
        let runs = RunDirectory::new(&root);
        runs.create_entry("web").expect("a new entry");
        assert!(matches!(
            runs.create_entry("web"),
            Err(MonitorError::NameTaken { .. })
        ));
        assert!(matches!(
            runs.read_state("web"),
            Err(MonitorError::NotFound { .. })
        ));
        let record = StateRecord {
            version: crate::control::FORMAT_VERSION,
            name: "web".into(),
            status: crate::control::RecordedStatus::Starting,
            monitor_pid: std::process::id(),
            monitor_start_time: 1,
            init_pid: None,
            init_start_time: None,
            halt_signal: crate::control::HaltSignal::Classic,
            started_at: None,
            stopped_at: None,
            exit_code: None,
            container_directory: root.join("containers/web"),
            console_log: root.join("containers/web/console.log"),
            cgroup_parent: "cove".into(),
            usage: None,
            addresses: None,
            orphaned: false,
        };
        runs.write_state(&record).expect("write");
        assert_eq!(runs.read_state("web").expect("read"), record);
        let names: Vec<_> = std::fs::read_dir(runs.entry("web"))
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["state.json"], "a staging file was left");
        std::fs::write(runs.state_file("web"), "{").expect("corrupt it");
        assert!(matches!(
            runs.read_state("web"),
            Err(MonitorError::MalformedState { .. })
        ));
        runs.remove_entry("web").expect("remove");
        assert!(!runs.entry("web").exists());
        let _ = std::fs::remove_dir_all(&root);
    }
}
