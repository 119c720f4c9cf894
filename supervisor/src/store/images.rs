//! Images' and their aliases' rows.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Row};

use super::{changed, json, parse, unique, AliasRecord, ImageRecord, Store, StoreError};

const IMAGE_COLUMNS: &str = "fingerprint, filename, size, architecture, kind, properties, public, \
                             auto_update, created_at, uploaded_at, last_used_at";

struct RawImage {
    record: ImageRecord,
    properties: String,
}

fn raw_image(row: &Row<'_>) -> rusqlite::Result<RawImage> {
    let size: i64 = row.get(2)?;
    Ok(RawImage {
        record: ImageRecord {
            fingerprint: row.get(0)?,
            filename: row.get(1)?,
            size: size.max(0) as u64,
            architecture: row.get(3)?,
            kind: row.get(4)?,
            properties: BTreeMap::new(),
            public: row.get(6)?,
            auto_update: row.get(7)?,
            created_at: row.get(8)?,
            uploaded_at: row.get(9)?,
            last_used_at: row.get(10)?,
        },
        properties: row.get(5)?,
    })
}

impl RawImage {
    fn decode(mut self) -> Result<ImageRecord, StoreError> {
        self.record.properties =
            parse(&self.properties, "property list", &self.record.fingerprint)?;
        Ok(self.record)
    }
}

fn raw_alias(row: &Row<'_>) -> rusqlite::Result<AliasRecord> {
    Ok(AliasRecord {
        name: row.get(0)?,
        fingerprint: row.get(1)?,
        description: row.get(2)?,
    })
}

impl Store {
    pub fn create_image(&self, record: &ImageRecord) -> Result<(), StoreError> {
        self.lock()
            .execute(
                &format!(
                    "INSERT INTO images ({IMAGE_COLUMNS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
                ),
                params![
                    record.fingerprint,
                    record.filename,
                    record.size as i64,
                    record.architecture,
                    record.kind,
                    json(&record.properties),
                    record.public,
                    record.auto_update,
                    record.created_at,
                    record.uploaded_at,
                    record.last_used_at,
                ],
            )
            .map_err(unique("image", &record.fingerprint))?;
        Ok(())
    }

    pub fn image(&self, fingerprint: &str) -> Result<ImageRecord, StoreError> {
        let raw = self
            .lock()
            .query_row(
                &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE fingerprint = ?1"),
                [fingerprint],
                raw_image,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "image",
                name: fingerprint.to_string(),
            })?;
        raw.decode()
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {IMAGE_COLUMNS} FROM images ORDER BY fingerprint"
        ))?;
        let rows = statement
            .query_map([], raw_image)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(RawImage::decode).collect()
    }

    /// The fingerprints starting with `prefix` (LXD accepts any unique prefix).
    pub fn image_fingerprints_with_prefix(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT fingerprint FROM images WHERE substr(fingerprint, 1, length(?1)) = ?1",
        )?;
        let fingerprints = statement
            .query_map([prefix], |row| row.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(fingerprints)
    }

    pub fn update_image(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let rows = self.lock().execute(
            "UPDATE images SET properties = ?2, public = ?3, auto_update = ?4, last_used_at = ?5 \
             WHERE fingerprint = ?1",
            params![
                record.fingerprint,
                json(&record.properties),
                record.public,
                record.auto_update,
                record.last_used_at,
            ],
        )?;
        changed(rows, "image", &record.fingerprint)
    }

    /// Deletes the image and its aliases.
    pub fn delete_image(&self, fingerprint: &str) -> Result<(), StoreError> {
        let rows = self
            .lock()
            .execute("DELETE FROM images WHERE fingerprint = ?1", [fingerprint])?;
        changed(rows, "image", fingerprint)
    }

    pub fn create_alias(&self, alias: &AliasRecord) -> Result<(), StoreError> {
        let connection = self.lock();
        let exists: Option<String> = connection
            .query_row(
                "SELECT fingerprint FROM images WHERE fingerprint = ?1",
                [&alias.fingerprint],
                |row| row.get(0),
            )
            .optional()?;
        if exists.is_none() {
            return Err(StoreError::NotFound {
                kind: "image",
                name: alias.fingerprint.clone(),
            });
        }
        connection
            .execute(
                "INSERT INTO image_aliases (name, fingerprint, description) VALUES (?1, ?2, ?3)",
                params![alias.name, alias.fingerprint, alias.description],
            )
            .map_err(unique("image alias", &alias.name))?;
        Ok(())
    }

    pub fn alias(&self, name: &str) -> Result<AliasRecord, StoreError> {
        self.lock()
            .query_row(
                "SELECT name, fingerprint, description FROM image_aliases WHERE name = ?1",
                [name],
                raw_alias,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "image alias",
                name: name.to_string(),
            })
    }

    pub fn aliases(&self) -> Result<Vec<AliasRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT name, fingerprint, description FROM image_aliases ORDER BY name",
        )?;
        let aliases = statement
            .query_map([], raw_alias)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(aliases)
    }

    pub fn update_alias(&self, alias: &AliasRecord) -> Result<(), StoreError> {
        let rows = self.lock().execute(
            "UPDATE image_aliases SET fingerprint = ?2, description = ?3 WHERE name = ?1",
            params![alias.name, alias.fingerprint, alias.description],
        )?;
        changed(rows, "image alias", &alias.name)
    }

    pub fn rename_alias(&self, name: &str, new_name: &str) -> Result<(), StoreError> {
        let rows = self
            .lock()
            .execute(
                "UPDATE image_aliases SET name = ?2 WHERE name = ?1",
                params![name, new_name],
            )
            .map_err(unique("image alias", new_name))?;
        changed(rows, "image alias", name)
    }

    pub fn delete_alias(&self, name: &str) -> Result<(), StoreError> {
        let rows = self
            .lock()
            .execute("DELETE FROM image_aliases WHERE name = ?1", [name])?;
        changed(rows, "image alias", name)
    }
}
