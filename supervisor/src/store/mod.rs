//! coved's durable state: one SQLite database (`$COVE_DIR/cove.db`, WAL mode, synchronous
//! FULL) holding instances, images and their aliases, profiles, storage pools and
//! managed networks.
//!
//! Every change is one transaction: a `kill -9` of coved at any moment leaves each row either
//! committed whole or absent. The schema is versioned by `PRAGMA user_version`; each migration
//! runs in its own transaction and bumps the version, so a daemon meeting an older database
//! upgrades it step by step and one meeting a newer one refuses to start.
//!
//! What must not live here: anything about a running guest. Whether an instance runs is asked
//! of its monitor; the store only keeps what the user asked for (`power`, the last requested
//! power state, so that a restarted coved can finish what it acknowledged).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::api::types::Device;

mod images;
mod profiles;
mod snapshots;

pub use snapshots::SnapshotRecord;

mod pools;
pub use pools::StorageVolumeRecord;
mod networks;

pub use networks::NetworkRecord;

/// The schema, one entry per version: entry N upgrades version N to N + 1.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE instances (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        architecture TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        config TEXT NOT NULL,
        devices TEXT NOT NULL,
        profiles TEXT NOT NULL,
        ephemeral INTEGER NOT NULL,
        image TEXT NOT NULL,
        created_at TEXT NOT NULL,
        last_used_at TEXT NOT NULL,
        power TEXT NOT NULL
    );
    CREATE TABLE images (
        fingerprint TEXT PRIMARY KEY,
        filename TEXT NOT NULL,
        size INTEGER NOT NULL,
        architecture TEXT NOT NULL,
        kind TEXT NOT NULL,
        properties TEXT NOT NULL,
        public INTEGER NOT NULL,
        auto_update INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        uploaded_at TEXT NOT NULL,
        last_used_at TEXT NOT NULL
    );
    CREATE TABLE image_aliases (
        name TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL REFERENCES images(fingerprint) ON DELETE CASCADE,
        description TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE profiles (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        config TEXT NOT NULL,
        devices TEXT NOT NULL
    );
    CREATE TABLE storage_pools (
        name TEXT PRIMARY KEY,
        driver TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        config TEXT NOT NULL
    );",
    // 2: instance snapshots; they go with their instance and follow its renames.
    "CREATE TABLE instance_snapshots (
        instance TEXT NOT NULL REFERENCES instances(name) ON DELETE CASCADE ON UPDATE CASCADE,
        name TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        architecture TEXT NOT NULL,
        config TEXT NOT NULL,
        devices TEXT NOT NULL,
        profiles TEXT NOT NULL,
        ephemeral INTEGER NOT NULL,
        stateful INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        PRIMARY KEY (instance, name)
    );",
    // 3: custom storage volumes.
    "CREATE TABLE storage_volumes (
        pool TEXT NOT NULL REFERENCES storage_pools(name) ON DELETE RESTRICT,
        name TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        config TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (pool, name)
    );",
    // 4: managed networks, and the mark that the default network is still to be made.
    "CREATE TABLE networks (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        config TEXT NOT NULL
    );
    CREATE TABLE network_defaults_pending (name TEXT PRIMARY KEY);
    INSERT INTO network_defaults_pending (name) VALUES ('default');",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the database is at schema version {found}, newer than this coved knows ({known}): run \
         a newer coved"
    )]
    TooNew { found: i64, known: i64 },
    #[error("cannot migrate the database to schema version {version}: {source}")]
    Migrate {
        version: usize,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{kind} \"{name}\" not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} \"{name}\" already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database holds a malformed {what} for \"{name}\": {source}")]
    Malformed {
        what: &'static str,
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The power state last asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Running,
    Stopped,
}

impl Power {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Stopped => "STOPPED",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    pub name: String,
    pub kind: String,
    pub architecture: String,
    pub description: String,
    pub config: BTreeMap<String, String>,
    pub devices: BTreeMap<String, Device>,
    pub profiles: Vec<String>,
    pub ephemeral: bool,
    /// The fingerprint of the image the instance was made from.
    pub image: String,
    pub created_at: String,
    pub last_used_at: String,
    pub power: Power,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageRecord {
    pub fingerprint: String,
    pub filename: String,
    pub size: u64,
    pub architecture: String,
    pub kind: String,
    pub properties: BTreeMap<String, String>,
    pub public: bool,
    pub auto_update: bool,
    pub created_at: String,
    pub uploaded_at: String,
    pub last_used_at: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AliasRecord {
    pub name: String,
    pub fingerprint: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProfileRecord {
    pub name: String,
    pub description: String,
    pub config: BTreeMap<String, String>,
    pub devices: BTreeMap<String, Device>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoragePoolRecord {
    pub name: String,
    pub driver: String,
    pub description: String,
    pub config: BTreeMap<String, String>,
}

/// The database, shared by all request handlers. Each call holds the connection for one short
/// transaction.
#[derive(Debug)]
pub struct Store {
    connection: Mutex<Connection>,
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_string())
}

fn parse<T: serde::de::DeserializeOwned>(
    text: &str,
    what: &'static str,
    name: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Malformed {
        what,
        name: name.to_string(),
        source,
    })
}

/// Maps a UNIQUE or PRIMARY KEY violation to `AlreadyExists`.
fn unique(kind: &'static str, name: &str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let name = name.to_string();
    move |error| match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => StoreError::AlreadyExists { kind, name },
        _ => StoreError::Sqlite(error),
    }
}

fn changed(rows: usize, kind: &'static str, name: &str) -> Result<(), StoreError> {
    if rows == 0 {
        Err(StoreError::NotFound {
            kind,
            name: name.to_string(),
        })
    } else {
        Ok(())
    }
}

const INSTANCE_COLUMNS: &str = "name, kind, architecture, description, config, devices, profiles, \
                                ephemeral, image, created_at, last_used_at, power";
impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut connection = Connection::open(path).map_err(open_error)?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(open_error)?;
        connection
            .pragma_update(None, "synchronous", "FULL")
            .map_err(open_error)?;
        connection
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(open_error)?;
        connection
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(open_error)?;
        migrate(&mut connection)?;
        Ok(Self {
            connection: Mutex::new(connection),
        })
    }

    /// An in-memory database, for unit tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        let mut connection = Connection::open_in_memory()?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut connection)?;
        Ok(Self {
            connection: Mutex::new(connection),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done transaction behind (SQLite
        // rolls it back when the statement is dropped), so a poisoned lock is still usable.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .lock()
            .query_row("PRAGMA user_version", [], |row| row.get(0))?)
    }

    // Instances.

    pub fn create_instance(&self, record: &InstanceRecord) -> Result<(), StoreError> {
        self.lock()
            .execute(
                &format!(
                    "INSERT INTO instances ({INSTANCE_COLUMNS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
                params![
                    record.name,
                    record.kind,
                    record.architecture,
                    record.description,
                    json(&record.config),
                    json(&record.devices),
                    json(&record.profiles),
                    record.ephemeral,
                    record.image,
                    record.created_at,
                    record.last_used_at,
                    record.power.as_str(),
                ],
            )
            .map_err(unique("instance", &record.name))?;
        Ok(())
    }

    pub fn instance(&self, name: &str) -> Result<InstanceRecord, StoreError> {
        self.lock()
            .query_row(
                &format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE name = ?1"),
                [name],
                raw_instance,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "instance",
                name: name.to_string(),
            })?
            .decode()
    }

    pub fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY name"
        ))?;
        let rows = statement
            .query_map([], raw_instance)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(RawInstance::decode).collect()
    }

    pub fn instance_names(&self) -> Result<Vec<String>, StoreError> {
        let connection = self.lock();
        let mut statement =
            connection.prepare_cached("SELECT name FROM instances ORDER BY name")?;
        let names = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(names)
    }

    /// Replaces the user-settable fields of an instance.
    pub fn update_instance(&self, record: &InstanceRecord) -> Result<(), StoreError> {
        let rows = self.lock().execute(
            "UPDATE instances SET architecture = ?2, description = ?3, config = ?4, devices = ?5, \
             profiles = ?6, ephemeral = ?7, last_used_at = ?8 WHERE name = ?1",
            params![
                record.name,
                record.architecture,
                record.description,
                json(&record.config),
                json(&record.devices),
                json(&record.profiles),
                record.ephemeral,
                record.last_used_at,
            ],
        )?;
        changed(rows, "instance", &record.name)
    }

    pub fn set_power(&self, name: &str, power: Power, now: &str) -> Result<(), StoreError> {
        let rows = self.lock().execute(
            "UPDATE instances SET power = ?2, last_used_at = CASE WHEN ?2 = 'RUNNING' THEN ?3 \
             ELSE last_used_at END WHERE name = ?1",
            params![name, power.as_str(), now],
        )?;
        changed(rows, "instance", name)
    }

    pub fn rename_instance(&self, name: &str, new_name: &str) -> Result<(), StoreError> {
        let rows = self
            .lock()
            .execute(
                "UPDATE instances SET name = ?2 WHERE name = ?1",
                params![name, new_name],
            )
            .map_err(unique("instance", new_name))?;
        changed(rows, "instance", name)
    }

    pub fn delete_instance(&self, name: &str) -> Result<(), StoreError> {
        let rows = self
            .lock()
            .execute("DELETE FROM instances WHERE name = ?1", [name])?;
        changed(rows, "instance", name)
    }
}

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let migrate_error = |source| StoreError::Migrate {
            version: version + 1,
            source,
        };
        let transaction = connection.transaction().map_err(migrate_error)?;
        transaction.execute_batch(sql).map_err(migrate_error)?;
        transaction
            .pragma_update(None, "user_version", (version + 1) as i64)
            .map_err(migrate_error)?;
        transaction.commit().map_err(migrate_error)?;
    }
    Ok(())
}

struct RawInstance {
    record: InstanceRecord,
    config: String,
    devices: String,
    profiles: String,
}

fn raw_instance(row: &Row<'_>) -> rusqlite::Result<RawInstance> {
    let power: String = row.get(11)?;
    Ok(RawInstance {
        record: InstanceRecord {
            name: row.get(0)?,
            kind: row.get(1)?,
            architecture: row.get(2)?,
            description: row.get(3)?,
            config: BTreeMap::new(),
            devices: BTreeMap::new(),
            profiles: Vec::new(),
            ephemeral: row.get(7)?,
            image: row.get(8)?,
            created_at: row.get(9)?,
            last_used_at: row.get(10)?,
            power: if power == "RUNNING" {
                Power::Running
            } else {
                Power::Stopped
            },
        },
        config: row.get(4)?,
        devices: row.get(5)?,
        profiles: row.get(6)?,
    })
}

impl RawInstance {
    fn decode(mut self) -> Result<InstanceRecord, StoreError> {
        let name = self.record.name.clone();
        self.record.config = parse(&self.config, "config", &name)?;
        self.record.devices = parse(&self.devices, "device list", &name)?;
        self.record.profiles = parse(&self.profiles, "profile list", &name)?;
        Ok(self.record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(name: &str) -> InstanceRecord {
        InstanceRecord {
            name: name.to_string(),
            kind: "container".into(),
            architecture: "x86_64".into(),
            description: String::new(),
            config: BTreeMap::from([("limits.cpu".to_string(), "1".to_string())]),
            devices: BTreeMap::new(),
            profiles: vec!["default".into()],
            ephemeral: false,
            image: "abc".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            last_used_at: "2026-01-01T00:00:00Z".into(),
            power: Power::Stopped,
        }
    }

    #[test]
    fn instances_round_trip_and_clash() {
        let store = Store::in_memory().unwrap();
        store.create_instance(&instance("web")).unwrap();
        assert_eq!(store.instance("web").unwrap(), instance("web"));
        assert!(matches!(
            store.create_instance(&instance("web")),
            Err(StoreError::AlreadyExists { .. })
        ));
        store.set_power("web", Power::Running, "now").unwrap();
        assert_eq!(store.instance("web").unwrap().power, Power::Running);
        store.rename_instance("web", "db").unwrap();
        assert!(matches!(
            store.instance("web"),
            Err(StoreError::NotFound { .. })
        ));
        store.delete_instance("db").unwrap();
        assert!(store.instances().unwrap().is_empty());
    }

    #[test]
    fn aliases_need_their_image_and_go_with_it() {
        let store = Store::in_memory().unwrap();
        let alias = AliasRecord {
            name: "busybox".into(),
            fingerprint: "f00".into(),
            description: String::new(),
        };
        assert!(matches!(
            store.create_alias(&alias),
            Err(StoreError::NotFound { .. })
        ));
        store
            .create_image(&ImageRecord {
                fingerprint: "f00".into(),
                filename: "busybox.tar.gz".into(),
                size: 1,
                architecture: "x86_64".into(),
                kind: "container".into(),
                properties: BTreeMap::new(),
                public: false,
                auto_update: false,
                created_at: String::new(),
                uploaded_at: String::new(),
                last_used_at: String::new(),
            })
            .unwrap();
        store.create_alias(&alias).unwrap();
        assert_eq!(store.image_fingerprints_with_prefix("f").unwrap(), ["f00"]);
        store.delete_image("f00").unwrap();
        assert!(store.aliases().unwrap().is_empty());
    }

    #[test]
    fn profile_rename_follows_into_instances() {
        let store = Store::in_memory().unwrap();
        store
            .create_profile(&ProfileRecord {
                name: "default".into(),
                description: String::new(),
                config: BTreeMap::new(),
                devices: BTreeMap::new(),
            })
            .unwrap();
        store.create_instance(&instance("web")).unwrap();
        store.rename_profile("default", "base").unwrap();
        assert_eq!(store.instance("web").unwrap().profiles, ["base"]);
    }

    #[test]
    fn migrations_are_versioned_and_reopen_cleanly() {
        let directory = std::env::temp_dir().join(format!("cove-store-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("cove.db");
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
            store.create_instance(&instance("kept")).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.instance("kept").unwrap().name, "kept");
        drop(store);
        let connection = Connection::open(&path).unwrap();
        connection.pragma_update(None, "user_version", 99).unwrap();
        drop(connection);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
