//! Instance snapshots: what an instance's configuration was when its files were captured.
//! The files themselves live beside the instance's (`crate::snapshots`); a row exists only
//! once they are complete, so a crash during a snapshot leaves no row without files.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Row};

use super::{changed, json, parse, unique, Store, StoreError};
use crate::api::types::Device;

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    /// The instance the snapshot belongs to.
    pub instance: String,
    /// The snapshot's own name (without `instance/`).
    pub name: String,
    pub description: String,
    pub architecture: String,
    pub config: BTreeMap<String, String>,
    pub devices: BTreeMap<String, Device>,
    pub profiles: Vec<String>,
    pub ephemeral: bool,
    pub stateful: bool,
    pub created_at: String,
    /// RFC 3339, or LXD's zero time when it never expires.
    pub expires_at: String,
}

impl SnapshotRecord {
    /// `instance/name`, as LXD names a snapshot in messages and lists.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.instance, self.name)
    }
}

const SNAPSHOT_COLUMNS: &str = "instance, name, description, architecture, config, devices, \
                                profiles, ephemeral, stateful, created_at, expires_at";

struct RawSnapshot {
    record: SnapshotRecord,
    config: String,
    devices: String,
    profiles: String,
}

fn raw_snapshot(row: &Row<'_>) -> rusqlite::Result<RawSnapshot> {
    Ok(RawSnapshot {
        record: SnapshotRecord {
            instance: row.get(0)?,
            name: row.get(1)?,
            description: row.get(2)?,
            architecture: row.get(3)?,
            config: BTreeMap::new(),
            devices: BTreeMap::new(),
            profiles: Vec::new(),
            ephemeral: row.get(7)?,
            stateful: row.get(8)?,
            created_at: row.get(9)?,
            expires_at: row.get(10)?,
        },
        config: row.get(4)?,
        devices: row.get(5)?,
        profiles: row.get(6)?,
    })
}

impl RawSnapshot {
    fn decode(mut self) -> Result<SnapshotRecord, StoreError> {
        let name = self.record.full_name();
        self.record.config = parse(&self.config, "snapshot config", &name)?;
        self.record.devices = parse(&self.devices, "snapshot device list", &name)?;
        self.record.profiles = parse(&self.profiles, "snapshot profile list", &name)?;
        Ok(self.record)
    }
}

impl Store {
    pub fn create_snapshot(&self, record: &SnapshotRecord) -> Result<(), StoreError> {
        // The statement's result is taken first so that the connection is free again before
        // a failure is told apart (which reads the instances table).
        let inserted = self.lock().execute(
            &format!(
                "INSERT INTO instance_snapshots ({SNAPSHOT_COLUMNS}) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ),
            params![
                record.instance,
                record.name,
                record.description,
                record.architecture,
                json(&record.config),
                json(&record.devices),
                json(&record.profiles),
                record.ephemeral,
                record.stateful,
                record.created_at,
                record.expires_at,
            ],
        );
        match inserted {
            Ok(_) => Ok(()),
            // The instance is gone (foreign key) or the name is taken (primary key).
            Err(error)
                if error.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)
                    && self.instance(&record.instance).is_err() =>
            {
                Err(StoreError::NotFound {
                    kind: "instance",
                    name: record.instance.clone(),
                })
            }
            Err(error) => Err(unique("snapshot", &record.full_name())(error)),
        }
    }

    pub fn snapshot(&self, instance: &str, name: &str) -> Result<SnapshotRecord, StoreError> {
        self.lock()
            .query_row(
                &format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM instance_snapshots \
                     WHERE instance = ?1 AND name = ?2"
                ),
                [instance, name],
                raw_snapshot,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "snapshot",
                name: format!("{instance}/{name}"),
            })?
            .decode()
    }

    /// An instance's snapshots, oldest first.
    pub fn snapshots(&self, instance: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM instance_snapshots WHERE instance = ?1 \
             ORDER BY created_at, name"
        ))?;
        let rows = statement
            .query_map([instance], raw_snapshot)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(RawSnapshot::decode).collect()
    }

    pub fn update_snapshot(&self, record: &SnapshotRecord) -> Result<(), StoreError> {
        let rows = self.lock().execute(
            "UPDATE instance_snapshots SET description = ?3, expires_at = ?4 \
             WHERE instance = ?1 AND name = ?2",
            params![
                record.instance,
                record.name,
                record.description,
                record.expires_at
            ],
        )?;
        changed(rows, "snapshot", &record.full_name())
    }

    pub fn rename_snapshot(
        &self,
        instance: &str,
        name: &str,
        new_name: &str,
    ) -> Result<(), StoreError> {
        let rows = self
            .lock()
            .execute(
                "UPDATE instance_snapshots SET name = ?3 WHERE instance = ?1 AND name = ?2",
                params![instance, name, new_name],
            )
            .map_err(unique("snapshot", &format!("{instance}/{new_name}")))?;
        changed(rows, "snapshot", &format!("{instance}/{name}"))
    }

    pub fn delete_snapshot(&self, instance: &str, name: &str) -> Result<(), StoreError> {
        let rows = self.lock().execute(
            "DELETE FROM instance_snapshots WHERE instance = ?1 AND name = ?2",
            [instance, name],
        )?;
        changed(rows, "snapshot", &format!("{instance}/{name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{InstanceRecord, Power};

    fn instance(name: &str) -> InstanceRecord {
        InstanceRecord {
            name: name.into(),
            kind: "container".into(),
            architecture: "x86_64".into(),
            description: String::new(),
            config: BTreeMap::new(),
            devices: BTreeMap::new(),
            profiles: vec!["default".into()],
            ephemeral: false,
            image: "f".repeat(64),
            created_at: "2026-01-01T00:00:00Z".into(),
            last_used_at: "2026-01-01T00:00:00Z".into(),
            power: Power::Stopped,
        }
    }

    fn snapshot(instance: &str, name: &str) -> SnapshotRecord {
        SnapshotRecord {
            instance: instance.into(),
            name: name.into(),
            description: String::new(),
            architecture: "x86_64".into(),
            config: BTreeMap::from([("limits.memory".into(), "64MiB".into())]),
            devices: BTreeMap::new(),
            profiles: vec!["default".into()],
            ephemeral: false,
            stateful: false,
            created_at: "2026-01-01T00:00:01Z".into(),
            expires_at: "0001-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn snapshots_follow_their_instance() {
        let store = Store::in_memory().unwrap();
        store.create_instance(&instance("web")).unwrap();
        store.create_snapshot(&snapshot("web", "snap0")).unwrap();
        assert!(matches!(
            store.create_snapshot(&snapshot("web", "snap0")),
            Err(StoreError::AlreadyExists { .. })
        ));
        assert!(matches!(
            store.create_snapshot(&snapshot("absent", "snap0")),
            Err(StoreError::NotFound {
                kind: "instance",
                ..
            })
        ));
        assert_eq!(
            store.snapshot("web", "snap0").unwrap().config["limits.memory"],
            "64MiB"
        );

        store.rename_instance("web", "site").unwrap();
        assert_eq!(store.snapshots("site").unwrap().len(), 1);
        store.rename_snapshot("site", "snap0", "before").unwrap();
        assert_eq!(store.snapshot("site", "before").unwrap().name, "before");

        store.delete_instance("site").unwrap();
        assert!(store.snapshots("site").unwrap().is_empty());
    }
}
