//! `cove profile list|show|create|delete|set|unset|edit`. `edit` reads the profile from stdin,
//! as YAML (the shape `profile show` prints) or JSON, and replaces its writable fields.

use std::collections::BTreeMap;
use std::io::Read;

use serde_json::{json, Value};

use super::client::{encode, Client};
use super::format::{self, Format};
use super::{print, yaml, CliError};
use crate::api::types::{Device, Profile};

fn url(name: &str) -> String {
    format!("/1.0/profiles/{}", encode(name))
}

pub fn list(client: &Client, format: Format) -> Result<(), CliError> {
    let raw: Vec<Value> = client.get("/1.0/profiles?recursion=1")?;
    let profiles: Vec<Profile> = serde_json::from_value(Value::Array(raw.clone()))
        .map_err(|error| CliError::Protocol(format!("a profile: {error}")))?;
    let mut rows: Vec<Vec<String>> = profiles
        .iter()
        .map(|profile| {
            vec![
                profile.name.clone(),
                profile.description.clone(),
                profile.used_by.len().to_string(),
            ]
        })
        .collect();
    rows.sort();
    match format {
        Format::Json => print(&format!("{}\n", Value::Array(raw))),
        Format::Yaml => print(&yaml::emit(&Value::Array(raw))),
        Format::Csv => print(&format::csv(&rows)),
        Format::Table => print(&format::table(&["NAME", "DESCRIPTION", "USED BY"], &rows)),
    }
    Ok(())
}

pub fn show(client: &Client, name: &str) -> Result<(), CliError> {
    let profile: Value = client.get(&url(name))?;
    print(&yaml::emit(&profile));
    Ok(())
}

pub fn create(client: &Client, name: &str) -> Result<(), CliError> {
    client.request("POST", "/1.0/profiles", Some(&json!({"name": name})))?;
    print(&format!("Profile {name} created\n"));
    Ok(())
}

pub fn delete(client: &Client, name: &str) -> Result<(), CliError> {
    client.request("DELETE", &url(name), None)?;
    print(&format!("Profile {name} deleted\n"));
    Ok(())
}

pub fn set(client: &Client, name: &str, pairs: &[(String, String)]) -> Result<(), CliError> {
    let config: BTreeMap<&str, &str> = pairs
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    client.run("PATCH", &url(name), Some(&json!({"config": config})))?;
    Ok(())
}

pub fn unset(client: &Client, name: &str, key: &str) -> Result<(), CliError> {
    let profile: Profile = client.get(&url(name))?;
    if !profile.config.contains_key(key) {
        return Err(CliError::Usage(format!(
            "cannot unset \"{key}\": it is not set on profile \"{name}\""
        )));
    }
    let mut config = profile.config;
    config.remove(key);
    let body = json!({
        "description": profile.description,
        "config": config,
        "devices": profile.devices,
    });
    client.run("PUT", &url(name), Some(&body))?;
    Ok(())
}

/// A scalar of a hand-written profile as the API's string (`limits.cpu: 2` is `"2"`).
fn string_of(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The writable fields of a profile document (YAML or JSON); other fields (`name`,
/// `used_by`) are ignored, as `lxc profile edit` ignores them.
pub fn profile_put(text: &str) -> Result<Value, CliError> {
    let document = if text.trim_start().starts_with('{') {
        serde_json::from_str(text)
            .map_err(|error| CliError::Usage(format!("the profile is not valid JSON: {error}")))?
    } else {
        yaml::parse(text)
            .map_err(|error| CliError::Usage(format!("the profile is not valid YAML: {error}")))?
    };
    let invalid = |what: &str| CliError::Usage(format!("invalid profile: {what}"));
    let empty = serde_json::Map::new();
    let map = match &document {
        Value::Object(map) => map,
        Value::Null => &empty,
        _ => {
            return Err(invalid(
                "expected a map with description, config and devices",
            ))
        }
    };
    let config: BTreeMap<String, String> = match map.get("config") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(config)) => config
            .iter()
            .map(|(key, value)| (key.clone(), string_of(value)))
            .collect(),
        Some(_) => return Err(invalid("config must be a map of keys to values")),
    };
    let mut devices: BTreeMap<String, Device> = BTreeMap::new();
    match map.get("devices") {
        None | Some(Value::Null) => {}
        Some(Value::Object(entries)) => {
            for (device, fields) in entries {
                let Value::Object(fields) = fields else {
                    return Err(invalid(&format!("device \"{device}\" must be a map")));
                };
                devices.insert(
                    device.clone(),
                    fields
                        .iter()
                        .map(|(key, value)| (key.clone(), string_of(value)))
                        .collect(),
                );
            }
        }
        Some(_) => return Err(invalid("devices must be a map of device names to maps")),
    }
    let description = map.get("description").map(string_of).unwrap_or_default();
    Ok(json!({"description": description, "config": config, "devices": devices}))
}

pub fn edit(client: &Client, name: &str) -> Result<(), CliError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|error| CliError::Local(format!("cannot read the profile from stdin: {error}")))?;
    let body = profile_put(&text)?;
    client.run("PUT", &url(name), Some(&body))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_takes_what_show_prints() {
        let shown = yaml::emit(&json!({
            "name": "small", "description": "small ones", "used_by": ["/1.0/instances/a"],
            "config": {"limits.memory": "64MiB", "limits.cpu": "2"},
            "devices": {"root": {"path": "/", "pool": "default", "type": "disk"}},
        }));
        assert_eq!(
            profile_put(&shown).unwrap(),
            json!({
                "description": "small ones",
                "config": {"limits.memory": "64MiB", "limits.cpu": "2"},
                "devices": {"root": {"path": "/", "pool": "default", "type": "disk"}},
            })
        );
    }

    #[test]
    fn edit_takes_json_and_plain_numbers() {
        assert_eq!(
            profile_put(r#"{"config": {"limits.cpu": 2}}"#).unwrap(),
            json!({"description": "", "config": {"limits.cpu": "2"}, "devices": {}})
        );
        assert_eq!(
            profile_put("config:\n  limits.cpu: 2\n").unwrap()["config"]["limits.cpu"],
            "2"
        );
        assert!(profile_put("config: 3").is_err());
        assert!(profile_put("- a").is_err());
    }
}
