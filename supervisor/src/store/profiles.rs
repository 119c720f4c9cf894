//! Profiles' rows; a profile's rename follows into the instances that use it.

use rusqlite::{params, OptionalExtension, Row};

use super::{changed, json, parse, unique, ProfileRecord, Store, StoreError};

struct RawProfile {
    name: String,
    description: String,
    config: String,
    devices: String,
}

fn raw_profile(row: &Row<'_>) -> rusqlite::Result<RawProfile> {
    Ok(RawProfile {
        name: row.get(0)?,
        description: row.get(1)?,
        config: row.get(2)?,
        devices: row.get(3)?,
    })
}

impl RawProfile {
    fn decode(self) -> Result<ProfileRecord, StoreError> {
        Ok(ProfileRecord {
            config: parse(&self.config, "config", &self.name)?,
            devices: parse(&self.devices, "device list", &self.name)?,
            name: self.name,
            description: self.description,
        })
    }
}

impl Store {
    pub fn create_profile(&self, profile: &ProfileRecord) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO profiles (name, description, config, devices) VALUES (?1, ?2, ?3, ?4)",
                params![
                    profile.name,
                    profile.description,
                    json(&profile.config),
                    json(&profile.devices)
                ],
            )
            .map_err(unique("profile", &profile.name))?;
        Ok(())
    }

    pub fn profile(&self, name: &str) -> Result<ProfileRecord, StoreError> {
        self.lock()
            .query_row(
                "SELECT name, description, config, devices FROM profiles WHERE name = ?1",
                [name],
                raw_profile,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "profile",
                name: name.to_string(),
            })?
            .decode()
    }

    pub fn profiles(&self) -> Result<Vec<ProfileRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT name, description, config, devices FROM profiles ORDER BY name",
        )?;
        let rows = statement
            .query_map([], raw_profile)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(RawProfile::decode).collect()
    }

    pub fn update_profile(&self, profile: &ProfileRecord) -> Result<(), StoreError> {
        let rows = self.lock().execute(
            "UPDATE profiles SET description = ?2, config = ?3, devices = ?4 WHERE name = ?1",
            params![
                profile.name,
                profile.description,
                json(&profile.config),
                json(&profile.devices)
            ],
        )?;
        changed(rows, "profile", &profile.name)
    }

    /// Renames a profile and every instance's reference to it, in one transaction.
    pub fn rename_profile(&self, name: &str, new_name: &str) -> Result<(), StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction()?;
        let rows = transaction
            .execute(
                "UPDATE profiles SET name = ?2 WHERE name = ?1",
                params![name, new_name],
            )
            .map_err(unique("profile", new_name))?;
        changed(rows, "profile", name)?;
        let instances: Vec<(String, String)> = {
            let mut statement = transaction.prepare("SELECT name, profiles FROM instances")?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            rows
        };
        for (instance, profiles) in instances {
            let mut list: Vec<String> = parse(&profiles, "profile list", &instance)?;
            if list.iter().any(|profile| profile == name) {
                for profile in &mut list {
                    if profile == name {
                        *profile = new_name.to_string();
                    }
                }
                transaction.execute(
                    "UPDATE instances SET profiles = ?2 WHERE name = ?1",
                    params![instance, json(&list)],
                )?;
            }
        }
        transaction.commit()?;
        Ok(())
    }

    pub fn delete_profile(&self, name: &str) -> Result<(), StoreError> {
        let rows = self
            .lock()
            .execute("DELETE FROM profiles WHERE name = ?1", [name])?;
        changed(rows, "profile", name)
    }
}
