//! `cove network list|show|create|delete|set|unset|get|list-leases`, in `lxc network`'s
//! shape: `cove network create lab0 ipv4.address=10.9.8.1/24 ipv4.nat=true`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::client::{encode, Client};
use super::flags::{exactly, key_value, read_flags, usage, valued, Flag, Parsed};
use super::format::{self, Format};
use super::{print, yaml, CliError};
use crate::api::types::Network;

/// A `cove network` command, read from the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkCommand {
    List(Format),
    Show(String),
    Create {
        name: String,
        config: Vec<(String, String)>,
    },
    Delete(String),
    Set {
        name: String,
        pairs: Vec<(String, String)>,
    },
    Unset {
        name: String,
        key: String,
    },
    Get {
        name: String,
        key: String,
    },
    Leases {
        name: String,
        format: Format,
    },
}

const FORMAT: Flag = valued(&["--format", "-f"]);

fn format_flag(parsed: &Parsed) -> Result<Format, CliError> {
    match parsed.last("--format") {
        Some(text) => Format::parse(&text),
        None => Ok(Format::Table),
    }
}

/// Reads `cove network ARGUMENTS`.
pub fn parse(arguments: &[String]) -> Result<NetworkCommand, CliError> {
    let commands = "list, show, create, delete, set, unset, get or list-leases";
    let (action, arguments) = arguments
        .split_first()
        .ok_or_else(|| usage(format!("expected network {commands}")))?;
    let parsed = read_flags(arguments, &[FORMAT], None)?;
    let one = |parsed: &Parsed| exactly(parsed, 1, "NAME").map(|mut names| names.remove(0));
    let two = |parsed: &Parsed| exactly(parsed, 2, "NAME KEY");
    match action.as_str() {
        "list" => {
            exactly(&parsed, 0, "no arguments")?;
            Ok(NetworkCommand::List(format_flag(&parsed)?))
        }
        "show" => Ok(NetworkCommand::Show(one(&parsed)?)),
        "delete" => Ok(NetworkCommand::Delete(one(&parsed)?)),
        "list-leases" => Ok(NetworkCommand::Leases {
            name: one(&parsed)?,
            format: format_flag(&parsed)?,
        }),
        "create" => {
            let (name, rest) = parsed
                .positionals
                .split_first()
                .ok_or_else(|| usage("expected NAME [KEY=VALUE]..."))?;
            let config = rest
                .iter()
                .map(|pair| key_value(pair, "setting"))
                .collect::<Result<_, _>>()?;
            Ok(NetworkCommand::Create {
                name: name.clone(),
                config,
            })
        }
        "set" => {
            let (name, rest) = parsed
                .positionals
                .split_first()
                .ok_or_else(|| usage("expected NAME KEY VALUE"))?;
            let pairs = match rest {
                [key, value] if !key.contains('=') => vec![(key.clone(), value.clone())],
                [] => return Err(usage("expected NAME KEY VALUE")),
                _ => rest
                    .iter()
                    .map(|pair| key_value(pair, "setting"))
                    .collect::<Result<_, _>>()?,
            };
            Ok(NetworkCommand::Set {
                name: name.clone(),
                pairs,
            })
        }
        "unset" => {
            let [name, key] =
                <[String; 2]>::try_from(two(&parsed)?).map_err(|_| usage("expected NAME KEY"))?;
            Ok(NetworkCommand::Unset { name, key })
        }
        "get" => {
            let [name, key] =
                <[String; 2]>::try_from(two(&parsed)?).map_err(|_| usage("expected NAME KEY"))?;
            Ok(NetworkCommand::Get { name, key })
        }
        other => Err(usage(format!(
            "unknown network command \"{other}\": use {commands}"
        ))),
    }
}

fn url(name: &str) -> String {
    format!("/1.0/networks/{}", encode(name))
}

/// Runs a `cove network` command.
pub fn run(client: &Client, command: NetworkCommand) -> Result<(), CliError> {
    match command {
        NetworkCommand::List(format) => list(client, format),
        NetworkCommand::Show(name) => {
            let network: Value = client.get(&url(&name))?;
            print(&yaml::emit(&network));
            Ok(())
        }
        NetworkCommand::Create { name, config } => {
            let config: BTreeMap<String, String> = config.into_iter().collect();
            client.request(
                "POST",
                "/1.0/networks",
                Some(&json!({"name": name, "type": "bridge", "config": config})),
            )?;
            print(&format!("Network {name} created\n"));
            Ok(())
        }
        NetworkCommand::Delete(name) => {
            client.request("DELETE", &url(&name), None)?;
            print(&format!("Network {name} deleted\n"));
            Ok(())
        }
        NetworkCommand::Set { name, pairs } => {
            let config: BTreeMap<String, String> = pairs.into_iter().collect();
            client.request("PATCH", &url(&name), Some(&json!({"config": config})))?;
            Ok(())
        }
        NetworkCommand::Unset { name, key } => {
            let network: Network = client.get(&url(&name))?;
            if !network.config.contains_key(&key) {
                return Err(usage(format!(
                    "cannot unset \"{key}\": it is not set on network \"{name}\""
                )));
            }
            let mut config = network.config;
            config.remove(&key);
            let body = json!({"description": network.description, "config": config});
            client.request("PUT", &url(&name), Some(&body))?;
            Ok(())
        }
        NetworkCommand::Get { name, key } => {
            let network: Network = client.get(&url(&name))?;
            print(&format!(
                "{}\n",
                network.config.get(&key).cloned().unwrap_or_default()
            ));
            Ok(())
        }
        NetworkCommand::Leases { name, format } => leases(client, &name, format),
    }
}

/// One row of `lxc network list`: NAME, TYPE, MANAGED, IPV4, IPV6, DESCRIPTION, USED BY,
/// STATE.
fn row(network: &Network) -> Vec<String> {
    let config = |key: &str| network.config.get(key).cloned().unwrap_or_default();
    vec![
        network.name.clone(),
        network.kind.clone(),
        if network.managed { "YES" } else { "NO" }.to_string(),
        config("ipv4.address"),
        config("ipv6.address"),
        network.description.clone(),
        network.used_by.len().to_string(),
        network.status.to_ascii_uppercase(),
    ]
}

fn list(client: &Client, format: Format) -> Result<(), CliError> {
    let raw: Vec<Value> = client.get("/1.0/networks?recursion=1")?;
    let networks: Vec<Network> = serde_json::from_value(Value::Array(raw.clone()))
        .map_err(|error| CliError::Protocol(format!("a network: {error}")))?;
    let rows: Vec<Vec<String>> = networks.iter().map(row).collect();
    match format {
        Format::Json => print(&format!("{}\n", Value::Array(raw))),
        Format::Yaml => print(&yaml::emit(&Value::Array(raw))),
        Format::Csv => print(&format::csv(&rows)),
        Format::Table => print(&format::table(
            &[
                "NAME",
                "TYPE",
                "MANAGED",
                "IPV4",
                "IPV6",
                "DESCRIPTION",
                "USED BY",
                "STATE",
            ],
            &rows,
        )),
    }
    Ok(())
}

fn leases(client: &Client, name: &str, format: Format) -> Result<(), CliError> {
    let raw: Vec<Value> = client.get(&format!("{}/leases", url(name)))?;
    let text = |lease: &Value, key: &str| lease[key].as_str().unwrap_or_default().to_string();
    let rows: Vec<Vec<String>> = raw
        .iter()
        .map(|lease| {
            vec![
                text(lease, "hostname"),
                text(lease, "hwaddr"),
                text(lease, "address"),
                text(lease, "type").to_ascii_uppercase(),
            ]
        })
        .collect();
    match format {
        Format::Json => print(&format!("{}\n", Value::Array(raw))),
        Format::Yaml => print(&yaml::emit(&Value::Array(raw))),
        Format::Csv => print(&format::csv(&rows)),
        Format::Table => print(&format::table(
            &["HOSTNAME", "MAC ADDRESS", "IP ADDRESS", "TYPE"],
            &rows,
        )),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(line: &str) -> Result<NetworkCommand, CliError> {
        let arguments: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse(&arguments)
    }

    #[test]
    fn network_commands_read_like_lxc() {
        assert_eq!(
            command("create lab0 ipv4.address=10.9.8.1/24 ipv4.nat=false").unwrap(),
            NetworkCommand::Create {
                name: "lab0".into(),
                config: vec![
                    ("ipv4.address".into(), "10.9.8.1/24".into()),
                    ("ipv4.nat".into(), "false".into()),
                ],
            }
        );
        assert_eq!(
            command("set lab0 dns.domain lab").unwrap(),
            NetworkCommand::Set {
                name: "lab0".into(),
                pairs: vec![("dns.domain".into(), "lab".into())],
            }
        );
        assert_eq!(
            command("list -f csv").unwrap(),
            NetworkCommand::List(Format::Csv)
        );
        assert!(command("create lab0 ipv4.address").is_err());
        assert!(command("rename lab0 lab1").is_err());
        assert!(command("").is_err());
        assert!(command("get lab0").is_err());
    }
}
