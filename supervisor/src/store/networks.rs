//! Managed networks in the store: one row per network (name, description, config as JSON),
//! and the one-time mark that the default network is still to be made (set by the migration
//! that added networks, so that both a new database and an upgraded one get it once).

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension};

use super::{changed, json, parse, unique, Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct NetworkRecord {
    pub name: String,
    pub description: String,
    pub config: BTreeMap<String, String>,
}

fn decode(name: String, description: String, config: String) -> Result<NetworkRecord, StoreError> {
    Ok(NetworkRecord {
        config: parse(&config, "config", &name)?,
        name,
        description,
    })
}

impl Store {
    pub fn create_network(&self, network: &NetworkRecord) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO networks (name, description, config) VALUES (?1, ?2, ?3)",
                params![network.name, network.description, json(&network.config)],
            )
            .map_err(unique("network", &network.name))?;
        Ok(())
    }

    pub fn network(&self, name: &str) -> Result<NetworkRecord, StoreError> {
        let (name, description, config) = self
            .lock()
            .query_row(
                "SELECT name, description, config FROM networks WHERE name = ?1",
                [name],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "network",
                name: name.to_string(),
            })?;
        decode(name, description, config)
    }

    pub fn networks(&self) -> Result<Vec<NetworkRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached("SELECT name, description, config FROM networks ORDER BY name")?;
        let rows: Vec<(String, String, String)> = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|(name, description, config)| decode(name, description, config))
            .collect()
    }

    pub fn update_network(&self, network: &NetworkRecord) -> Result<(), StoreError> {
        let rows = self.lock().execute(
            "UPDATE networks SET description = ?2, config = ?3 WHERE name = ?1",
            params![network.name, network.description, json(&network.config)],
        )?;
        changed(rows, "network", &network.name)
    }

    pub fn delete_network(&self, name: &str) -> Result<(), StoreError> {
        let rows = self
            .lock()
            .execute("DELETE FROM networks WHERE name = ?1", [name])?;
        changed(rows, "network", name)
    }

    /// Whether the default network is still to be made.
    pub fn default_network_pending(&self) -> Result<bool, StoreError> {
        let count: i64 =
            self.lock()
                .query_row("SELECT COUNT(*) FROM network_defaults_pending", [], |row| {
                    row.get(0)
                })?;
        Ok(count > 0)
    }

    /// The default network is made (or was not wanted): never again.
    pub fn clear_default_network_mark(&self) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM network_defaults_pending", [])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_round_trip_and_the_default_mark_is_cleared_once() {
        let store = Store::in_memory().unwrap();
        let network = NetworkRecord {
            name: "covebr0".into(),
            description: String::new(),
            config: BTreeMap::from([("ipv4.address".to_string(), "10.1.2.1/24".to_string())]),
        };
        store.create_network(&network).unwrap();
        assert!(matches!(
            store.create_network(&network),
            Err(StoreError::AlreadyExists { .. })
        ));
        assert_eq!(store.network("covebr0").unwrap(), network);
        let mut changed = network.clone();
        changed.description = "lab".into();
        store.update_network(&changed).unwrap();
        assert_eq!(store.networks().unwrap(), [changed]);
        store.delete_network("covebr0").unwrap();
        assert!(matches!(
            store.network("covebr0"),
            Err(StoreError::NotFound { .. })
        ));
        assert!(store.default_network_pending().unwrap());
        store.clear_default_network_mark().unwrap();
        assert!(!store.default_network_pending().unwrap());
    }
}
