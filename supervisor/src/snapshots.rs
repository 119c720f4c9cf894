//! Instance snapshots and copies: the rules between the store's rows and the files
//! (`instances::layers`). Snapshots are stateless (files and configuration, never memory).
//!
//! Order, so that a crash leaves nothing half-made that a user can see: a snapshot's files are
//! captured before its row is written, and its row is deleted before its files; a restore
//! builds the new layer beside the old one and swaps it in; a copy's row is written first (so
//! its name is taken), its files are built in a staging directory and moved in, and a copy that
//! fails is deleted again. coved's start removes snapshot files that no row names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::api::types;
use crate::clock;
use crate::daemon::{blocking, instance_url, Daemon, DaemonError};
use crate::instances::layers::{self, LayerError};
use crate::instances::runtime::RuntimeStatus;
use crate::store::{InstanceRecord, Power, SnapshotRecord, StoreError};

/// LXD's "never expires".
pub const NEVER: &str = "0001-01-01T00:00:00Z";

impl From<LayerError> for DaemonError {
    fn from(error: LayerError) -> Self {
        DaemonError::Internal(error.to_string())
    }
}

pub fn snapshot_url(instance: &str, snapshot: &str) -> String {
    format!("/1.0/instances/{instance}/snapshots/{snapshot}")
}

/// A snapshot name: letters, digits, `-`, `_`, `.`, `+`, `@`; not starting with `.`; at most
/// 63 characters (LXD refuses `/` and names a path could misread).
pub fn validate_snapshot_name(name: &str) -> Result<(), DaemonError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '@'));
    if valid {
        Ok(())
    } else {
        Err(DaemonError::BadRequest(format!(
            "invalid snapshot name \"{name}\": use up to 63 letters, digits, '-', '_', '.', '+' \
             or '@', not starting with '.'"
        )))
    }
}

/// Seconds since the epoch of an RFC 3339 time (`2026-12-01T10:00:00Z`,
/// `2026-12-01T10:00:00.5+01:00`).
pub fn parse_time(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    // ASCII only: the slicing below is by byte.
    if !text.is_ascii()
        || bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || bytes[13] != b':'
    {
        return None;
    }
    if !matches!(bytes[10], b'T' | b't' | b' ') || bytes[16] != b':' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|byte| byte.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &fraction[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let hours: i64 = rest[1..3].parse().ok()?;
            let minutes: i64 = rest[4..6].parse().ok()?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (hours * 3600 + minutes * 60)
        }
        _ => return None,
    };
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// An expiry as given by a client: empty or LXD's zero time is never; otherwise an RFC 3339
/// time, kept as given.
fn expiry(text: &str) -> Result<String, DaemonError> {
    if text.is_empty() || text.starts_with("0001-01-01") {
        return Ok(NEVER.to_string());
    }
    parse_time(text).map(|_| text.to_string()).ok_or_else(|| {
        DaemonError::BadRequest(format!(
            "invalid expires_at \"{text}\": give an RFC 3339 time such as 2026-12-31T23:00:00Z"
        ))
    })
}

fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs() as i64)
        .unwrap_or_default()
}

/// Bytes on disk under `path` (a snapshot's own files).
fn disk_usage(path: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0i64;
    let mut pending = vec![path.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(metadata) = next.symlink_metadata() else {
            continue;
        };
        total += metadata.blocks() as i64 * 512;
        if metadata.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&next) {
                pending.extend(entries.flatten().map(|entry| entry.path()));
            }
        }
    }
    total
}

fn not_found_snapshot(instance: &str, name: &str) -> impl FnOnce(StoreError) -> DaemonError {
    let full = format!("{instance}/{name}");
    move |error| match error {
        StoreError::NotFound { .. } => {
            DaemonError::NotFound(format!("snapshot \"{full}\" not found"))
        }
        other => other.into(),
    }
}

/// Configuration keys a copy takes from its source: not the `volatile.*` ones coved sets per
/// instance, except the image it came from.
fn copied_key(key: &str) -> bool {
    !key.starts_with("volatile.") || key == "volatile.base_image"
}

impl Daemon {
    /// The directory of the instance named `name`: its writable layer, console log and
    /// snapshots.
    fn directory_of(&self, name: &str) -> Result<PathBuf, DaemonError> {
        self.instance_directory(&self.store.instance(name)?)
    }

    fn snapshot_path(&self, instance: &str, name: &str) -> Result<PathBuf, DaemonError> {
        Ok(layers::snapshot_directory(
            &self.directory_of(instance)?,
            name,
        ))
    }

    pub fn snapshot_view(&self, record: &SnapshotRecord) -> types::InstanceSnapshot {
        let (expanded_config, expanded_devices) = self
            .expand(&record.profiles, &record.config, &record.devices)
            .unwrap_or_default();
        types::InstanceSnapshot {
            name: record.name.clone(),
            description: record.description.clone(),
            architecture: record.architecture.clone(),
            config: record.config.clone(),
            devices: record.devices.clone(),
            expanded_config,
            expanded_devices,
            profiles: record.profiles.clone(),
            ephemeral: record.ephemeral,
            stateful: record.stateful,
            created_at: record.created_at.clone(),
            expires_at: record.expires_at.clone(),
            last_used_at: NEVER.to_string(),
            size: self
                .snapshot_path(&record.instance, &record.name)
                .map(|path| disk_usage(&path))
                .unwrap_or_default(),
        }
    }

    /// The next free `snapN`.
    pub fn next_snapshot_name(&self, instance: &str) -> Result<String, DaemonError> {
        let taken: Vec<String> = self
            .store
            .snapshots(instance)?
            .into_iter()
            .map(|snapshot| snapshot.name)
            .collect();
        Ok((0..)
            .map(|number| format!("snap{number}"))
            .find(|name| !taken.contains(name))
            .unwrap_or_default())
    }

    /// Refuses a snapshot request before an operation is made for it.
    pub fn check_new_snapshot(
        &self,
        instance: &str,
        request: &types::InstanceSnapshotsPost,
    ) -> Result<(), DaemonError> {
        self.store.instance(instance)?;
        if request.stateful {
            return Err(DaemonError::BadRequest(
                "stateful snapshots (with the instance's memory) are not supported: take a \
                 stateless one (\"stateful\": false)"
                    .into(),
            ));
        }
        validate_snapshot_name(&request.name)?;
        expiry(&request.expires_at)?;
        match self.store.snapshot(instance, &request.name) {
            Ok(_) => Err(DaemonError::Conflict(format!(
                "snapshot \"{instance}/{}\" already exists",
                request.name
            ))),
            Err(StoreError::NotFound { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Takes a snapshot of an instance whose lock the caller holds (running or not).
    pub async fn create_snapshot_locked(
        self: &Arc<Self>,
        instance: &str,
        request: &types::InstanceSnapshotsPost,
    ) -> Result<(), DaemonError> {
        self.check_new_snapshot(instance, request)?;
        let record = self.store.instance(instance)?;
        let snapshot = SnapshotRecord {
            instance: instance.to_string(),
            name: request.name.clone(),
            description: record.description.clone(),
            architecture: record.architecture.clone(),
            config: record.config.clone(),
            devices: record.devices.clone(),
            profiles: record.profiles.clone(),
            ephemeral: record.ephemeral,
            stateful: false,
            created_at: clock::now(),
            expires_at: expiry(&request.expires_at)?,
        };
        let directory = self.directory_of(instance)?;
        let capture = self.snapshot_path(instance, &request.name)?;
        let files = capture.clone();
        blocking(move || layers::capture(&directory, &files)).await??;
        if let Err(error) = self.store.create_snapshot(&snapshot) {
            let _ = blocking(move || layers::remove(&capture)).await;
            return Err(error.into());
        }
        self.events.lifecycle(
            "instance-snapshot-created",
            &snapshot_url(instance, &request.name),
            BTreeMap::from([("instance".to_string(), json!(instance))]),
        );
        Ok(())
    }

    pub async fn delete_snapshot_locked(
        self: &Arc<Self>,
        instance: &str,
        name: &str,
    ) -> Result<(), DaemonError> {
        self.store
            .delete_snapshot(instance, name)
            .map_err(not_found_snapshot(instance, name))?;
        let capture = self.snapshot_path(instance, name)?;
        blocking(move || layers::remove(&capture)).await??;
        self.events.lifecycle(
            "instance-snapshot-deleted",
            &snapshot_url(instance, name),
            BTreeMap::from([("instance".to_string(), json!(instance))]),
        );
        Ok(())
    }

    /// Checks a snapshot rename before an operation is made for it.
    pub fn check_snapshot_rename(
        &self,
        instance: &str,
        name: &str,
        new_name: &str,
    ) -> Result<(), DaemonError> {
        self.store
            .snapshot(instance, name)
            .map_err(not_found_snapshot(instance, name))?;
        validate_snapshot_name(new_name)?;
        match self.store.snapshot(instance, new_name) {
            Ok(_) => Err(DaemonError::Conflict(format!(
                "snapshot \"{instance}/{new_name}\" already exists"
            ))),
            Err(StoreError::NotFound { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn rename_snapshot_locked(
        self: &Arc<Self>,
        instance: &str,
        name: &str,
        new_name: &str,
    ) -> Result<(), DaemonError> {
        self.check_snapshot_rename(instance, name, new_name)?;
        let from = self.snapshot_path(instance, name)?;
        let to = self.snapshot_path(instance, new_name)?;
        let (moved_from, moved_to) = (from.clone(), to.clone());
        blocking(move || layers::rename(&moved_from, &moved_to)).await??;
        if let Err(error) = self.store.rename_snapshot(instance, name, new_name) {
            let _ = blocking(move || layers::rename(&to, &from)).await;
            return Err(error.into());
        }
        self.events.lifecycle(
            "instance-snapshot-renamed",
            &snapshot_url(instance, new_name),
            BTreeMap::from([
                ("instance".to_string(), json!(instance)),
                ("old_name".to_string(), json!(name)),
            ]),
        );
        Ok(())
    }

    /// Changes a snapshot's expiry or description.
    pub fn update_snapshot(
        &self,
        instance: &str,
        name: &str,
        request: &types::InstanceSnapshotPut,
    ) -> Result<(), DaemonError> {
        let mut record = self
            .store
            .snapshot(instance, name)
            .map_err(not_found_snapshot(instance, name))?;
        if let Some(expires_at) = &request.expires_at {
            record.expires_at = expiry(expires_at)?;
        }
        if let Some(description) = &request.description {
            record.description = description.clone();
        }
        self.store.update_snapshot(&record)?;
        self.events.lifecycle(
            "instance-snapshot-updated",
            &snapshot_url(instance, name),
            BTreeMap::from([("instance".to_string(), json!(instance))]),
        );
        Ok(())
    }

    /// Restores an instance whose lock the caller holds to a snapshot: its files and its
    /// configuration. A running instance is stopped (at once, as LXD does), restored and
    /// started again.
    pub async fn restore_snapshot_locked(
        self: &Arc<Self>,
        instance: &str,
        name: &str,
    ) -> Result<(), DaemonError> {
        let snapshot = self
            .store
            .snapshot(instance, name)
            .map_err(not_found_snapshot(instance, name))?;
        let was_running = self.status_of(instance) != RuntimeStatus::Stopped;
        if was_running {
            let runtime = self.runtime.clone();
            let owned = instance.to_string();
            blocking(move || runtime.stop(&owned, Duration::ZERO)).await??;
            self.events
                .lifecycle("instance-stopped", &instance_url(instance), BTreeMap::new());
        }
        let directory = self.directory_of(instance)?;
        let capture = self.snapshot_path(instance, name)?;
        blocking(move || layers::restore(&directory, &capture)).await??;
        let mut record = self.store.instance(instance)?;
        let volatile: BTreeMap<String, String> = record
            .config
            .iter()
            .filter(|(key, _)| key.starts_with("volatile."))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        record.config = snapshot.config.clone();
        record.config.extend(volatile);
        record.devices = snapshot.devices.clone();
        record.profiles = snapshot.profiles.clone();
        record.ephemeral = snapshot.ephemeral;
        record.architecture = snapshot.architecture.clone();
        self.store.update_instance(&record)?;
        self.events.lifecycle(
            "instance-restored",
            &instance_url(instance),
            BTreeMap::from([("snapshot".to_string(), json!(name))]),
        );
        if was_running {
            self.start_locked(instance).await?;
        }
        Ok(())
    }

    /// The new instance's row for a copy of `source` (an instance, or one of its snapshots as
    /// `instance/snapshot`), refused before anything is written when the request is bad.
    pub fn plan_copy(
        &self,
        request: &types::InstancesPost,
    ) -> Result<(InstanceRecord, Option<String>), DaemonError> {
        let (source_name, snapshot_name) = match request.source.source.split_once('/') {
            Some((instance, snapshot)) => (instance, Some(snapshot.to_string())),
            None => (request.source.source.as_str(), None),
        };
        if source_name.is_empty() {
            return Err(DaemonError::BadRequest(
                "a copy needs \"source\": {\"type\": \"copy\", \"source\": \"NAME\" or \
                 \"NAME/SNAPSHOT\"}"
                    .into(),
            ));
        }
        let source = self
            .store
            .instance(source_name)
            .map_err(|error| match error {
                StoreError::NotFound { .. } => {
                    DaemonError::NotFound(format!("source instance \"{source_name}\" not found"))
                }
                other => other.into(),
            })?;
        let (config, devices, profiles, ephemeral) = match &snapshot_name {
            Some(snapshot) => {
                let snapshot = self
                    .store
                    .snapshot(source_name, snapshot)
                    .map_err(not_found_snapshot(source_name, snapshot))?;
                (
                    snapshot.config,
                    snapshot.devices,
                    snapshot.profiles,
                    snapshot.ephemeral,
                )
            }
            None => (
                source.config.clone(),
                source.devices.clone(),
                source.profiles.clone(),
                source.ephemeral,
            ),
        };
        // As LXD: the request's keys and devices win; the source's fill in the rest.
        let mut merged_config = request.config.clone();
        for (key, value) in config.into_iter().filter(|(key, _)| copied_key(key)) {
            merged_config.entry(key).or_insert(value);
        }
        let mut merged_devices = request.devices.clone();
        for (name, device) in devices {
            merged_devices.entry(name).or_insert(device);
        }
        let profiles = request.profiles.clone().unwrap_or(profiles);
        let now = clock::now();
        let record = InstanceRecord {
            name: request.name.clone(),
            kind: source.kind.clone(),
            architecture: source.architecture.clone(),
            description: if request.description.is_empty() {
                source.description.clone()
            } else {
                request.description.clone()
            },
            config: merged_config,
            devices: merged_devices,
            profiles,
            ephemeral: request.ephemeral || ephemeral,
            image: source.image.clone(),
            created_at: now.clone(),
            last_used_at: now,
            power: Power::Stopped,
        };
        let source_directory = self.instance_directory(&source)?;
        let target_directory = self.instance_directory(&record)?;
        if source_directory.parent() != target_directory.parent() {
            return Err(DaemonError::BadRequest(format!(
                "copying \"{}\" to another storage pool is not supported: keep the copy's \
                 root disk on the source's pool",
                source.name
            )));
        }
        let user_config: BTreeMap<String, String> = record
            .config
            .iter()
            .filter(|(key, _)| !key.starts_with("volatile.") && !key.starts_with("image."))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        self.validate_definition(
            &record.name,
            &record.image,
            &record.profiles,
            &user_config,
            &record.devices,
        )?;
        Ok((record, snapshot_name))
    }

    /// Fills a copy's files (its row exists, its lock is held): the source's writable layer
    /// or snapshot, and unless `instance_only` or copying a snapshot, the source's snapshots.
    /// A copy that fails is removed whole.
    pub async fn copy_files_locked(
        self: &Arc<Self>,
        source: &str,
        snapshot: Option<&str>,
        target: &str,
        instance_only: bool,
    ) -> Result<(), DaemonError> {
        let result = self
            .copy_files_inner(source, snapshot, target, instance_only)
            .await;
        if result.is_err() {
            let _ = self.delete_locked(target).await;
        }
        result
    }

    async fn copy_files_inner(
        self: &Arc<Self>,
        source: &str,
        snapshot: Option<&str>,
        target: &str,
        instance_only: bool,
    ) -> Result<(), DaemonError> {
        let from = match snapshot {
            Some(snapshot) => self.snapshot_path(source, snapshot)?,
            None => self.directory_of(source)?,
        };
        let to = self.directory_of(target)?;
        let (layer_from, layer_to) = (from.clone(), to.clone());
        blocking(move || layers::restore(&layer_to, &layer_from)).await??;
        if instance_only || snapshot.is_some() {
            return Ok(());
        }
        for mut record in self.store.snapshots(source)? {
            let from = self.snapshot_path(source, &record.name)?;
            let to = self.snapshot_path(target, &record.name)?;
            blocking(move || layers::capture(&from, &to)).await??;
            record.instance = target.to_string();
            self.store.create_snapshot(&record)?;
        }
        Ok(())
    }

    /// Deletes snapshots whose expiry has passed; run once a minute.
    pub async fn prune_expired_snapshots(self: &Arc<Self>) {
        let Ok(names) = self.store.instance_names() else {
            return;
        };
        let now = now_seconds();
        for instance in names {
            let Ok(snapshots) = self.store.snapshots(&instance) else {
                continue;
            };
            for snapshot in snapshots {
                if snapshot.expires_at == NEVER
                    || parse_time(&snapshot.expires_at).is_none_or(|when| when > now)
                {
                    continue;
                }
                let lock = self.instance_lock(&instance);
                let _guard = lock.lock().await;
                if let Err(error) = self.delete_snapshot_locked(&instance, &snapshot.name).await {
                    self.events.warn(
                        "cannot delete an expired snapshot",
                        &[
                            ("snapshot", &snapshot.full_name()),
                            ("error", &error.to_string()),
                        ],
                    );
                }
            }
        }
    }

    /// At start: removes snapshot files that no row names (a crash between the two).
    pub fn remove_unrecorded_snapshots(&self) {
        let Ok(names) = self.store.instance_names() else {
            return;
        };
        for instance in names {
            let Ok(snapshots) = self.store.snapshots(&instance) else {
                continue;
            };
            let keep: Vec<String> = snapshots.into_iter().map(|record| record.name).collect();
            let Ok(directory) = self.directory_of(&instance) else {
                continue;
            };
            for leftover in layers::unrecorded(&directory, &keep) {
                let _ = layers::remove(&leftover);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_time("2026-11-29T09:44:30.000000005Z"),
            Some(1_795_945_470)
        );
        assert_eq!(parse_time("2026-11-29T10:44:30+01:00"), Some(1_795_945_470));
        assert_eq!(parse_time("2000-02-29T00:00:00Z"), Some(951_782_400));
        for bad in [
            "",
            "2026-11-29",
            "2026-13-01T00:00:00Z",
            "2026-11-29T09:44:30",
            "tomorrow",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn snapshot_names_are_checked() {
        for good in ["snap0", "before-upgrade", "v1.2", "a_b+c@d"] {
            assert!(validate_snapshot_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "with space", &"x".repeat(64)] {
            assert!(validate_snapshot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn copies_leave_per_instance_keys_behind() {
        assert!(copied_key("limits.memory"));
        assert!(copied_key("volatile.base_image"));
        assert!(!copied_key("volatile.eth0.hwaddr"));
    }
}
