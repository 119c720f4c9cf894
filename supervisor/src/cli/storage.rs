//! `cove storage create|list|info|delete|set` and `cove storage volume create|list|delete`, as
//! `lxc storage` spells them: `cove storage create fast btrfs size=10GiB`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::client::{encode, Client};
use super::flags::{exactly, key_value, read_flags, usage, valued, Flag, Parsed};
use super::format::{self, Format};
use super::{print, yaml, CliError};
use crate::api::storage::{StoragePoolResources, StorageVolume};
use crate::api::types::StoragePool;

/// What `cove storage ...` asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum StorageCommand {
    Create {
        name: String,
        driver: String,
        config: Vec<(String, String)>,
    },
    List(Format),
    Info(String),
    Delete(String),
    Set {
        name: String,
        config: Vec<(String, String)>,
    },
    VolumeCreate {
        pool: String,
        name: String,
        config: Vec<(String, String)>,
    },
    VolumeList {
        pool: String,
        format: Format,
    },
    VolumeDelete {
        pool: String,
        name: String,
    },
}

const FORMAT: Flag = valued(&["--format", "-f"]);

fn format_flag(parsed: &Parsed) -> Result<Format, CliError> {
    parsed
        .last("--format")
        .map_or(Ok(Format::Table), |text| Format::parse(&text))
}

fn pairs(arguments: &[String]) -> Result<Vec<(String, String)>, CliError> {
    arguments
        .iter()
        .map(|pair| key_value(pair, "KEY=VALUE"))
        .collect()
}

/// Reads the arguments after `storage`.
pub fn parse(arguments: &[String]) -> Result<StorageCommand, CliError> {
    let (action, arguments) = arguments
        .split_first()
        .ok_or_else(|| usage("expected storage create, list, info, delete, set or volume"))?;
    if action == "volume" {
        return parse_volume(arguments);
    }
    let parsed = read_flags(arguments, &[FORMAT], None)?;
    let positionals = &parsed.positionals;
    match action.as_str() {
        "create" => match positionals.as_slice() {
            [name, driver, rest @ ..] => Ok(StorageCommand::Create {
                name: name.clone(),
                driver: driver.clone(),
                config: pairs(rest)?,
            }),
            _ => Err(usage("expected storage create NAME DRIVER [KEY=VALUE]...")),
        },
        "list" => {
            exactly(&parsed, 0, "no arguments")?;
            Ok(StorageCommand::List(format_flag(&parsed)?))
        }
        "info" => Ok(StorageCommand::Info(exactly(&parsed, 1, "NAME")?.remove(0))),
        "delete" => Ok(StorageCommand::Delete(
            exactly(&parsed, 1, "NAME")?.remove(0),
        )),
        "set" => match positionals.as_slice() {
            [name, key, value] if !key.contains('=') => Ok(StorageCommand::Set {
                name: name.clone(),
                config: vec![(key.clone(), value.clone())],
            }),
            [name, rest @ ..] if !rest.is_empty() => Ok(StorageCommand::Set {
                name: name.clone(),
                config: pairs(rest)?,
            }),
            _ => Err(usage(
                "expected storage set NAME KEY VALUE or NAME KEY=VALUE...",
            )),
        },
        other => Err(usage(format!(
            "unknown storage command \"{other}\": use create, list, info, delete, set or volume"
        ))),
    }
}

fn parse_volume(arguments: &[String]) -> Result<StorageCommand, CliError> {
    let (action, arguments) = arguments
        .split_first()
        .ok_or_else(|| usage("expected storage volume create, list or delete"))?;
    let parsed = read_flags(arguments, &[FORMAT], None)?;
    match (action.as_str(), parsed.positionals.as_slice()) {
        ("create", [pool, name, rest @ ..]) => Ok(StorageCommand::VolumeCreate {
            pool: pool.clone(),
            name: name.clone(),
            config: pairs(rest)?,
        }),
        ("list", [pool]) => Ok(StorageCommand::VolumeList {
            pool: pool.clone(),
            format: format_flag(&parsed)?,
        }),
        ("delete", [pool, name]) => Ok(StorageCommand::VolumeDelete {
            pool: pool.clone(),
            name: name.clone(),
        }),
        ("create", _) => Err(usage(
            "expected storage volume create POOL NAME [KEY=VALUE]...",
        )),
        ("list", _) => Err(usage("expected storage volume list POOL")),
        ("delete", _) => Err(usage("expected storage volume delete POOL NAME")),
        (other, _) => Err(usage(format!(
            "unknown storage volume command \"{other}\": use create, list or delete"
        ))),
    }
}

fn pool_url(name: &str) -> String {
    format!("/1.0/storage-pools/{}", encode(name))
}

fn config_map(pairs: &[(String, String)]) -> BTreeMap<&str, &str> {
    pairs
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect()
}

/// Runs a storage command.
pub fn run(client: &Client, command: StorageCommand) -> Result<(), CliError> {
    match command {
        StorageCommand::Create {
            name,
            driver,
            config,
        } => {
            let body = json!({"name": name, "driver": driver, "config": config_map(&config)});
            client.run("POST", "/1.0/storage-pools", Some(&body))?;
            print(&format!("Storage pool {name} created\n"));
        }
        StorageCommand::List(format) => list(client, format)?,
        StorageCommand::Info(name) => info(client, &name)?,
        StorageCommand::Delete(name) => {
            client.run("DELETE", &pool_url(&name), None)?;
            print(&format!("Storage pool {name} deleted\n"));
        }
        StorageCommand::Set { name, config } => {
            let body = json!({"config": config_map(&config)});
            client.run("PATCH", &pool_url(&name), Some(&body))?;
        }
        StorageCommand::VolumeCreate { pool, name, config } => {
            let body = json!({"name": name, "type": "custom", "config": config_map(&config)});
            client.run(
                "POST",
                &format!("{}/volumes/custom", pool_url(&pool)),
                Some(&body),
            )?;
            print(&format!("Storage volume {name} created\n"));
        }
        StorageCommand::VolumeList { pool, format } => volume_list(client, &pool, format)?,
        StorageCommand::VolumeDelete { pool, name } => {
            client.run(
                "DELETE",
                &format!("{}/volumes/custom/{}", pool_url(&pool), encode(&name)),
                None,
            )?;
            print(&format!("Storage volume {name} deleted\n"));
        }
    }
    Ok(())
}

fn list(client: &Client, format: Format) -> Result<(), CliError> {
    let raw: Vec<Value> = client.get("/1.0/storage-pools?recursion=1")?;
    let pools: Vec<StoragePool> = serde_json::from_value(Value::Array(raw.clone()))
        .map_err(|error| CliError::Protocol(format!("a storage pool: {error}")))?;
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|pool| {
            vec![
                pool.name.clone(),
                pool.driver.clone(),
                pool.config.get("source").cloned().unwrap_or_default(),
                pool.description.clone(),
                pool.used_by.len().to_string(),
                pool.status.to_uppercase(),
            ]
        })
        .collect();
    match format {
        Format::Json => print(&format!("{}\n", Value::Array(raw))),
        Format::Yaml => print(&yaml::emit(&Value::Array(raw))),
        Format::Csv => print(&format::csv(&rows)),
        Format::Table => print(&format::table(
            &[
                "NAME",
                "DRIVER",
                "SOURCE",
                "DESCRIPTION",
                "USED BY",
                "STATE",
            ],
            &rows,
        )),
    }
    Ok(())
}

fn info(client: &Client, name: &str) -> Result<(), CliError> {
    let pool: StoragePool = client.get(&pool_url(name))?;
    let resources: StoragePoolResources = client.get(&format!("{}/resources", pool_url(name)))?;
    let mut text = format!(
        "info:\n  description: {}\n  driver: {}\n  name: {}\n  space used: {}\n  total space: {}\n  \
         inodes used: {}\n  total inodes: {}\nused by:\n",
        pool.description,
        pool.driver,
        pool.name,
        format::size(resources.space.used),
        format::size(resources.space.total),
        resources.inodes.used,
        resources.inodes.total,
    );
    for user in &pool.used_by {
        text.push_str(&format!("  - {user}\n"));
    }
    print(&text);
    Ok(())
}

fn volume_list(client: &Client, pool: &str, format: Format) -> Result<(), CliError> {
    let raw: Vec<Value> = client.get(&format!("{}/volumes?recursion=1", pool_url(pool)))?;
    let volumes: Vec<StorageVolume> = serde_json::from_value(Value::Array(raw.clone()))
        .map_err(|error| CliError::Protocol(format!("a storage volume: {error}")))?;
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|volume| {
            vec![
                volume.kind.clone(),
                volume.name.clone(),
                volume.description.clone(),
                volume.content_type.clone(),
                volume.used_by.len().to_string(),
            ]
        })
        .collect();
    match format {
        Format::Json => print(&format!("{}\n", Value::Array(raw))),
        Format::Yaml => print(&yaml::emit(&Value::Array(raw))),
        Format::Csv => print(&format::csv(&rows)),
        Format::Table => print(&format::table(
            &["TYPE", "NAME", "DESCRIPTION", "CONTENT-TYPE", "USED BY"],
            &rows,
        )),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn storage_commands_read_as_lxc_spells_them() {
        assert_eq!(
            parse(&words("create fast btrfs size=2GiB")).unwrap(),
            StorageCommand::Create {
                name: "fast".into(),
                driver: "btrfs".into(),
                config: vec![("size".into(), "2GiB".into())],
            }
        );
        assert_eq!(
            parse(&words("volume create fast data")).unwrap(),
            StorageCommand::VolumeCreate {
                pool: "fast".into(),
                name: "data".into(),
                config: Vec::new(),
            }
        );
        assert_eq!(
            parse(&words("set fast user.note hello")).unwrap(),
            StorageCommand::Set {
                name: "fast".into(),
                config: vec![("user.note".into(), "hello".into())],
            }
        );
        assert!(parse(&words("create fast")).is_err());
        assert!(parse(&words("volume delete fast")).is_err());
        assert!(parse(&words("shrink fast")).is_err());
    }
}
