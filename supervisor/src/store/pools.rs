//! Storage pools' and custom volumes' rows.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Row};

use super::{changed, json, parse, unique, StoragePoolRecord, Store, StoreError};

/// A custom volume on a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageVolumeRecord {
    pub pool: String,
    pub name: String,
    pub description: String,
    pub config: BTreeMap<String, String>,
    pub created_at: String,
}

const VOLUME_COLUMNS: &str = "pool, name, description, config, created_at";

fn raw_volume(row: &Row<'_>) -> rusqlite::Result<(StorageVolumeRecord, String)> {
    Ok((
        StorageVolumeRecord {
            pool: row.get(0)?,
            name: row.get(1)?,
            description: row.get(2)?,
            config: BTreeMap::new(),
            created_at: row.get(4)?,
        },
        row.get(3)?,
    ))
}

fn decode(
    (mut record, config): (StorageVolumeRecord, String),
) -> Result<StorageVolumeRecord, StoreError> {
    record.config = parse(&config, "volume config", &record.name)?;
    Ok(record)
}

impl Store {
    /// Removes a pool's row; refused (as a constraint error) while volumes are recorded on it.
    pub fn delete_storage_pool(&self, name: &str) -> Result<(), StoreError> {
        let rows = self
            .lock()
            .execute("DELETE FROM storage_pools WHERE name = ?1", [name])?;
        changed(rows, "storage pool", name)
    }

    pub fn create_storage_volume(&self, volume: &StorageVolumeRecord) -> Result<(), StoreError> {
        self.lock()
            .execute(
                &format!(
                    "INSERT INTO storage_volumes ({VOLUME_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"
                ),
                params![
                    volume.pool,
                    volume.name,
                    volume.description,
                    json(&volume.config),
                    volume.created_at
                ],
            )
            .map_err(unique("storage volume", &volume.name))?;
        Ok(())
    }

    pub fn storage_volume(
        &self,
        pool: &str,
        name: &str,
    ) -> Result<StorageVolumeRecord, StoreError> {
        let raw = self
            .lock()
            .query_row(
                &format!(
                    "SELECT {VOLUME_COLUMNS} FROM storage_volumes WHERE pool = ?1 AND name = ?2"
                ),
                params![pool, name],
                raw_volume,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "storage volume",
                name: format!("{pool}/{name}"),
            })?;
        decode(raw)
    }

    /// The custom volumes on `pool`, by name.
    pub fn storage_volumes(&self, pool: &str) -> Result<Vec<StorageVolumeRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {VOLUME_COLUMNS} FROM storage_volumes WHERE pool = ?1 ORDER BY name"
        ))?;
        let rows = statement
            .query_map([pool], raw_volume)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(decode).collect()
    }

    pub fn update_storage_volume(&self, volume: &StorageVolumeRecord) -> Result<(), StoreError> {
        let rows = self.lock().execute(
            "UPDATE storage_volumes SET description = ?3, config = ?4 WHERE pool = ?1 AND name = ?2",
            params![volume.pool, volume.name, volume.description, json(&volume.config)],
        )?;
        changed(rows, "storage volume", &volume.name)
    }

    pub fn delete_storage_volume(&self, pool: &str, name: &str) -> Result<(), StoreError> {
        let rows = self.lock().execute(
            "DELETE FROM storage_volumes WHERE pool = ?1 AND name = ?2",
            params![pool, name],
        )?;
        changed(rows, "storage volume", name)
    }
}

struct RawPool {
    name: String,
    driver: String,
    description: String,
    config: String,
}

fn raw_pool(row: &Row<'_>) -> rusqlite::Result<RawPool> {
    Ok(RawPool {
        name: row.get(0)?,
        driver: row.get(1)?,
        description: row.get(2)?,
        config: row.get(3)?,
    })
}

impl RawPool {
    fn decode(self) -> Result<StoragePoolRecord, StoreError> {
        Ok(StoragePoolRecord {
            config: parse(&self.config, "config", &self.name)?,
            name: self.name,
            driver: self.driver,
            description: self.description,
        })
    }
}

impl Store {
    pub fn create_storage_pool(&self, pool: &StoragePoolRecord) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO storage_pools (name, driver, description, config) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![pool.name, pool.driver, pool.description, json(&pool.config)],
            )
            .map_err(unique("storage pool", &pool.name))?;
        Ok(())
    }

    pub fn storage_pool(&self, name: &str) -> Result<StoragePoolRecord, StoreError> {
        self.lock()
            .query_row(
                "SELECT name, driver, description, config FROM storage_pools WHERE name = ?1",
                [name],
                raw_pool,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "storage pool",
                name: name.to_string(),
            })?
            .decode()
    }

    pub fn storage_pools(&self) -> Result<Vec<StoragePoolRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT name, driver, description, config FROM storage_pools ORDER BY name",
        )?;
        let rows = statement
            .query_map([], raw_pool)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(RawPool::decode).collect()
    }

    pub fn update_storage_pool(&self, pool: &StoragePoolRecord) -> Result<(), StoreError> {
        let rows = self.lock().execute(
            "UPDATE storage_pools SET description = ?2, config = ?3 WHERE name = ?1",
            params![pool.name, pool.description, json(&pool.config)],
        )?;
        changed(rows, "storage pool", &pool.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoragePoolRecord;

    #[test]
    fn volumes_belong_to_their_pool() {
        let store = Store::in_memory().unwrap();
        store
            .create_storage_pool(&StoragePoolRecord {
                name: "fast".into(),
                driver: "btrfs".into(),
                description: String::new(),
                config: BTreeMap::new(),
            })
            .unwrap();
        let volume = StorageVolumeRecord {
            pool: "fast".into(),
            name: "data".into(),
            description: String::new(),
            config: BTreeMap::from([("size".to_string(), "1GiB".to_string())]),
            created_at: "2026-01-01T00:00:00Z".into(),
        };
        store.create_storage_volume(&volume).unwrap();
        assert!(matches!(
            store.create_storage_volume(&volume),
            Err(StoreError::AlreadyExists { .. })
        ));
        assert_eq!(store.storage_volume("fast", "data").unwrap(), volume);
        assert_eq!(store.storage_volumes("fast").unwrap().len(), 1);
        assert!(store.delete_storage_pool("fast").is_err());
        store.delete_storage_volume("fast", "data").unwrap();
        store.delete_storage_pool("fast").unwrap();
        assert!(matches!(
            store.storage_pool("fast"),
            Err(StoreError::NotFound { .. })
        ));
    }
}
