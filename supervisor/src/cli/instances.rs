//! Instance commands: `launch`/`init`, `start`/`stop`/`restart`/`pause`, `delete`, `rename`,
//! `list`, `info`, `config` and `console --show-log`. Each is one or two API requests,
//! waiting on the operation coved answers with.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::arguments::Create;
use super::client::{encode, envelope, Body, Client};
use super::format::{self, Column, Format};
use super::{print, yaml, CliError};
use crate::api::types::{Instance, InstanceFull, InstanceState, StatusCode};

fn url(name: &str) -> String {
    format!("/1.0/instances/{}", encode(name))
}

/// The image as the API names it: an alias when one exists, else a fingerprint (prefix).
pub fn image_source(client: &Client, image: &str) -> Result<Value, CliError> {
    let image = image.strip_prefix("local:").unwrap_or(image);
    if image.contains(':') {
        return Err(CliError::Unsupported(format!(
            "remote image servers are not supported (\"{image}\"): import the image with cove \
             image import FILE --alias NAME, then use NAME"
        )));
    }
    let alias = format!("/1.0/images/aliases/{}", encode(image));
    match client.request("GET", &alias, None) {
        Ok(_) => Ok(json!({"type": "image", "alias": image})),
        Err(CliError::Api { code: 404, .. }) => Ok(json!({"type": "image", "fingerprint": image})),
        Err(error) => Err(error),
    }
}

pub fn create(client: &Client, create: &Create) -> Result<(), CliError> {
    let source = image_source(client, &create.image)?;
    let config: BTreeMap<&str, &str> = create
        .config
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    let mut body = json!({
        "name": create.name,
        // Without --vm the image's type decides, as with lxc.
        "type": if create.virtual_machine { "virtual-machine" } else { "" },
        "source": source,
        "config": config,
        "ephemeral": create.ephemeral,
    });
    if let Some(profiles) = &create.profiles {
        body["profiles"] = json!(profiles);
    }
    print(&format!("Creating {}\n", create.name));
    client.run("POST", "/1.0/instances", Some(&body))?;
    if create.start {
        print(&format!("Starting {}\n", create.name));
        client.run(
            "PUT",
            &format!("{}/state", url(&create.name)),
            Some(&json!({"action": "start"})),
        )?;
    }
    Ok(())
}

/// `start`, `stop`, `restart`, `freeze` on each name in turn; stops at the first failure.
pub fn change_state(
    client: &Client,
    names: &[String],
    action: &str,
    force: bool,
    timeout: Option<i64>,
) -> Result<(), CliError> {
    for name in names {
        let body = json!({"action": action, "force": force, "timeout": timeout.unwrap_or(-1)});
        client.run("PUT", &format!("{}/state", url(name)), Some(&body))?;
    }
    Ok(())
}

pub fn delete(client: &Client, names: &[String], force: bool) -> Result<(), CliError> {
    for name in names {
        if let Some((instance, snapshot)) = super::snapshots::split(name) {
            super::snapshots::delete(client, instance, snapshot)?;
            continue;
        }
        let instance: Instance = client.get(&url(name))?;
        if instance.status_code != StatusCode::Stopped.code() {
            if !force {
                return Err(CliError::Api {
                    code: 400,
                    message: format!(
                        "instance \"{name}\" is {}: stop it first, or delete it with --force",
                        instance.status.to_ascii_lowercase()
                    ),
                });
            }
            let body = json!({"action": "stop", "force": true, "timeout": 0});
            client.run("PUT", &format!("{}/state", url(name)), Some(&body))?;
        }
        client.run("DELETE", &url(name), None)?;
    }
    Ok(())
}

pub fn rename(client: &Client, name: &str, new_name: &str) -> Result<(), CliError> {
    if let Some((instance, snapshot)) = super::snapshots::split(name) {
        return super::snapshots::rename(client, instance, snapshot, new_name);
    }
    client.run("POST", &url(name), Some(&json!({"name": new_name})))?;
    Ok(())
}

/// Global addresses of `family` (`inet`, `inet6`), one `ADDRESS (INTERFACE)` a line, as
/// `lxc list` shows them.
fn addresses(state: Option<&InstanceState>, family: &str) -> String {
    let Some(state) = state else {
        return String::new();
    };
    let mut lines = Vec::new();
    for (interface, network) in &state.network {
        if interface == "lo" {
            continue;
        }
        let Some(list) = network["addresses"].as_array() else {
            continue;
        };
        for address in list {
            if address["family"] == family && address["scope"] != "link" {
                if let Some(text) = address["address"].as_str() {
                    lines.push(format!("{text} ({interface})"));
                }
            }
        }
    }
    lines.join("\n")
}

fn running(instance: &InstanceFull) -> bool {
    instance.instance.status_code == StatusCode::Running.code()
}

fn cell(instance: &InstanceFull, column: Column) -> String {
    let state = instance.state.as_ref();
    let live = |value: i64| {
        if running(instance) && value > 0 {
            value.to_string()
        } else {
            String::new()
        }
    };
    match column {
        Column::Name => instance.instance.name.clone(),
        Column::State => instance.instance.status.to_ascii_uppercase(),
        Column::Ipv4 => addresses(state, "inet"),
        Column::Ipv6 => addresses(state, "inet6"),
        Column::Type => {
            let kind = instance.instance.kind.to_ascii_uppercase();
            if instance.instance.ephemeral {
                format!("{kind} (EPHEMERAL)")
            } else {
                kind
            }
        }
        Column::Snapshots => instance.snapshots.len().to_string(),
        Column::Pid => live(state.map_or(0, |state| state.pid)),
        Column::Profiles => instance.instance.profiles.join("\n"),
        Column::Created => format::date(&instance.instance.created_at),
        Column::LastUsed => format::date(&instance.instance.last_used_at),
        Column::Processes => live(state.map_or(0, |state| state.processes)),
        Column::Memory => match state {
            Some(state) if running(instance) && state.memory.usage > 0 => {
                format::size(state.memory.usage as u64)
            }
            _ => String::new(),
        },
        Column::Architecture => instance.instance.architecture.clone(),
        Column::Description => instance.instance.description.clone(),
    }
}

/// The rows of `cove list` for `instances` (sorted by name), one cell per column.
pub fn list_rows(instances: &[InstanceFull], columns: &[Column]) -> Vec<Vec<String>> {
    let mut sorted: Vec<&InstanceFull> = instances.iter().collect();
    sorted.sort_by(|a, b| a.instance.name.cmp(&b.instance.name));
    sorted
        .into_iter()
        .map(|instance| {
            columns
                .iter()
                .map(|column| cell(instance, *column))
                .collect()
        })
        .collect()
}

pub fn list(
    client: &Client,
    prefix: Option<&str>,
    format: Format,
    columns: &[Column],
) -> Result<(), CliError> {
    let raw: Vec<Value> = client.get("/1.0/instances?recursion=2")?;
    let raw: Vec<Value> = raw
        .into_iter()
        .filter(|instance| {
            prefix.is_none_or(|prefix| {
                instance["name"]
                    .as_str()
                    .is_some_and(|name| name.starts_with(prefix))
            })
        })
        .collect();
    match format {
        Format::Json => print(&format!("{}\n", Value::Array(raw))),
        Format::Yaml => print(&yaml::emit(&Value::Array(raw))),
        Format::Table | Format::Csv => {
            let instances: Vec<InstanceFull> = raw
                .into_iter()
                .map(serde_json::from_value)
                .collect::<Result<_, _>>()
                .map_err(|error| CliError::Protocol(format!("an instance: {error}")))?;
            let rows = list_rows(&instances, columns);
            if format == Format::Csv {
                print(&format::csv(&rows));
            } else {
                let headers: Vec<&str> = columns.iter().map(|column| column.header()).collect();
                print(&format::table(&headers, &rows));
            }
        }
    }
    Ok(())
}

/// The text of `cove info`.
pub fn info_text(instance: &Instance, state: &InstanceState) -> String {
    let mut text = format!("Name: {}\n", instance.name);
    if !instance.description.is_empty() {
        text.push_str(&format!("Description: {}\n", instance.description));
    }
    text.push_str(&format!(
        "Status: {}\n",
        instance.status.to_ascii_uppercase()
    ));
    let ephemeral = if instance.ephemeral {
        " (ephemeral)"
    } else {
        ""
    };
    text.push_str(&format!("Type: {}{ephemeral}\n", instance.kind));
    text.push_str(&format!("Architecture: {}\n", instance.architecture));
    let running = instance.status_code == StatusCode::Running.code()
        || instance.status_code == StatusCode::Frozen.code();
    if running && state.pid > 0 {
        text.push_str(&format!("PID: {}\n", state.pid));
    }
    text.push_str(&format!(
        "Created: {}\n",
        format::date(&instance.created_at)
    ));
    if !instance.last_used_at.is_empty() && !instance.last_used_at.starts_with("0001-") {
        text.push_str(&format!(
            "Last Used: {}\n",
            format::date(&instance.last_used_at)
        ));
    }
    text.push_str(&format!("Profiles: {}\n", instance.profiles.join(", ")));
    if !running {
        return text;
    }
    text.push_str("\nResources:\n");
    text.push_str(&format!("  Processes: {}\n", state.processes));
    text.push_str("  Memory usage:\n");
    text.push_str(&format!(
        "    Memory (current): {}\n",
        format::size(state.memory.usage.max(0) as u64)
    ));
    if state.memory.usage_peak > 0 {
        text.push_str(&format!(
            "    Memory (peak): {}\n",
            format::size(state.memory.usage_peak as u64)
        ));
    }
    text.push_str("  CPU usage:\n");
    text.push_str(&format!(
        "    CPU usage (in seconds): {}\n",
        state.cpu.usage.max(0) / 1_000_000_000
    ));
    if !state.network.is_empty() {
        text.push_str("  Network usage:\n");
        for (interface, network) in &state.network {
            text.push_str(&format!("    {interface}:\n"));
            for (label, key) in [
                ("Type", "type"),
                ("State", "state"),
                ("MAC address", "hwaddr"),
            ] {
                if let Some(value) = network[key].as_str().filter(|value| !value.is_empty()) {
                    text.push_str(&format!("      {label}: {}\n", value.to_ascii_uppercase()));
                }
            }
            for address in network["addresses"].as_array().into_iter().flatten() {
                let family = if address["family"] == "inet6" {
                    "IPv6"
                } else {
                    "IPv4"
                };
                text.push_str(&format!(
                    "      {family}: {}/{} ({})\n",
                    address["address"].as_str().unwrap_or_default(),
                    address["netmask"].as_str().unwrap_or_default(),
                    address["scope"].as_str().unwrap_or_default()
                ));
            }
            let counters = &network["counters"];
            for (label, key) in [
                ("Bytes received", "bytes_received"),
                ("Bytes sent", "bytes_sent"),
            ] {
                if let Some(value) = counters[key].as_u64() {
                    text.push_str(&format!("      {label}: {}\n", format::size(value)));
                }
            }
        }
    }
    text
}

pub fn info(client: &Client, name: &str) -> Result<(), CliError> {
    let instance: Instance = client.get(&url(name))?;
    let state: InstanceState = client.get(&format!("{}/state", url(name)))?;
    let snapshots = super::snapshots::list(client, name)?;
    print(&format!(
        "{}{}",
        info_text(&instance, &state),
        super::snapshots::info_text(&snapshots)
    ));
    Ok(())
}

/// `config set` and `config unset` (a value of `""` removes the key, as coved's PATCH does).
pub fn config_set(client: &Client, name: &str, pairs: &[(String, String)]) -> Result<(), CliError> {
    let instance: Instance = client.get(&url(name))?;
    for (key, value) in pairs {
        if value.is_empty() && !instance.config.contains_key(key) {
            return Err(CliError::Usage(format!(
                "cannot unset \"{key}\": it is not set on instance \"{name}\""
            )));
        }
    }
    let config: BTreeMap<&str, &str> = pairs
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    client.run("PATCH", &url(name), Some(&json!({"config": config})))?;
    Ok(())
}

pub fn config_get(client: &Client, name: &str, key: &str, expanded: bool) -> Result<(), CliError> {
    let instance: Instance = client.get(&url(name))?;
    let config = if expanded {
        &instance.expanded_config
    } else {
        &instance.config
    };
    print(&format!(
        "{}\n",
        config.get(key).map(String::as_str).unwrap_or_default()
    ));
    Ok(())
}

pub fn config_show(client: &Client, name: &str, expanded: bool) -> Result<(), CliError> {
    let instance: Value = client.get(&url(name))?;
    let (config, devices) = if expanded {
        ("expanded_config", "expanded_devices")
    } else {
        ("config", "devices")
    };
    let shown = json!({
        "architecture": instance["architecture"],
        "config": instance[config],
        "devices": instance[devices],
        "ephemeral": instance["ephemeral"],
        "profiles": instance["profiles"],
        "stateful": instance["stateful"],
        "description": instance["description"],
    });
    print(&yaml::emit(&shown));
    Ok(())
}

pub fn console_log(client: &Client, name: &str) -> Result<(), CliError> {
    let response = client.http("GET", &format!("{}/console", url(name)), &[], Body::Empty)?;
    if response.status >= 400 {
        envelope(&response)?;
        return Err(CliError::Api {
            code: response.status,
            message: format!("cannot read the console log of \"{name}\""),
        });
    }
    let mut stdout = std::io::stdout().lock();
    let _ = std::io::Write::write_all(&mut stdout, &response.body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(name: &str, status: &str, code: u16) -> InstanceFull {
        serde_json::from_value(json!({
            "name": name, "architecture": "x86_64", "created_at": "2024-01-31T12:00:00Z",
            "status": status, "status_code": code, "type": "container", "ephemeral": false,
            "profiles": ["default"],
            "state": {
                "status": status, "status_code": code, "pid": 42, "processes": 3,
                "memory": {"usage": 2097152, "usage_peak": 0, "swap_usage": 0, "swap_usage_peak": 0},
                "cpu": {"usage": 3_000_000_000_i64},
                "network": {
                    "lo": {"addresses": [{"family": "inet", "address": "127.0.0.1", "netmask": "8", "scope": "local"}]},
                    "eth0": {"addresses": [
                        {"family": "inet", "address": "10.0.0.2", "netmask": "24", "scope": "global"},
                        {"family": "inet6", "address": "fe80::1", "netmask": "64", "scope": "link"},
                        {"family": "inet6", "address": "fd00::2", "netmask": "64", "scope": "global"}
                    ], "type": "broadcast", "state": "up"}
                }
            },
            "snapshots": [],
        }))
        .unwrap()
    }

    #[test]
    fn list_rows_show_state_addresses_and_type() {
        let rows = list_rows(
            &[
                instance("web", "Running", 103),
                instance("db", "Stopped", 102),
            ],
            &Column::parse_letters("ns46tSpN").unwrap(),
        );
        assert_eq!(
            rows,
            [
                vec![
                    "db",
                    "STOPPED",
                    "10.0.0.2 (eth0)",
                    "fd00::2 (eth0)",
                    "CONTAINER",
                    "0",
                    "",
                    ""
                ],
                vec![
                    "web",
                    "RUNNING",
                    "10.0.0.2 (eth0)",
                    "fd00::2 (eth0)",
                    "CONTAINER",
                    "0",
                    "42",
                    "3"
                ],
            ]
        );
    }

    #[test]
    fn info_shows_resources_of_a_running_instance() {
        let full = instance("web", "Running", 103);
        let text = info_text(&full.instance, full.state.as_ref().unwrap());
        assert!(
            text.starts_with("Name: web\nStatus: RUNNING\nType: container\n"),
            "{text}"
        );
        assert!(text.contains("PID: 42\n"), "{text}");
        assert!(text.contains("  Processes: 3\n"), "{text}");
        assert!(text.contains("    Memory (current): 2.00MiB\n"), "{text}");
        assert!(text.contains("    CPU usage (in seconds): 3\n"), "{text}");
        assert!(
            text.contains("      IPv4: 10.0.0.2/24 (global)\n"),
            "{text}"
        );
        let stopped = instance("db", "Stopped", 102);
        let text = info_text(&stopped.instance, stopped.state.as_ref().unwrap());
        assert!(
            !text.contains("PID") && !text.contains("Resources"),
            "{text}"
        );
    }
}
