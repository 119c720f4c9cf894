//! `cove snapshot`, `cove restore`, `cove copy`, and the snapshot forms of `delete`, `rename`
//! and `info` (`NAME/SNAPSHOT`), as `lxc` spells them.

use serde_json::{json, Value};

use super::client::{encode, Client};
use super::flags::{exactly, read_flags, switch, usage, valued};
use super::format;
use super::CliError;
use crate::api::types::InstanceSnapshot;

/// What a snapshot command asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotCommand {
    /// `snapshot NAME [SNAPSHOT] [--expiry TIME]`
    Take {
        name: String,
        snapshot: Option<String>,
        expiry: Option<String>,
    },
    /// `restore NAME SNAPSHOT`
    Restore { name: String, snapshot: String },
    /// `copy SOURCE[/SNAPSHOT] TARGET [--instance-only] [-c KEY=VALUE]...`
    Copy {
        source: String,
        target: String,
        instance_only: bool,
        config: Vec<(String, String)>,
        ephemeral: bool,
    },
}

/// Reads `snapshot`, `restore` and `copy`'s arguments.
pub fn parse(verb: &str, arguments: &[String]) -> Result<SnapshotCommand, CliError> {
    match verb {
        "snapshot" => {
            let parsed = read_flags(arguments, &[valued(&["--expiry"])], None)?;
            if parsed.positionals.is_empty() || parsed.positionals.len() > 2 {
                return Err(usage("expected NAME [SNAPSHOT]"));
            }
            Ok(SnapshotCommand::Take {
                name: parsed.positionals[0].clone(),
                snapshot: parsed.positionals.get(1).cloned(),
                expiry: parsed.last("--expiry"),
            })
        }
        "restore" => {
            let parsed = read_flags(arguments, &[], None)?;
            let mut positionals = exactly(&parsed, 2, "NAME SNAPSHOT")?;
            let snapshot = positionals.remove(1);
            Ok(SnapshotCommand::Restore {
                name: positionals.remove(0),
                snapshot,
            })
        }
        "copy" | "cp" => {
            let parsed = read_flags(
                arguments,
                &[
                    switch(&["--instance-only"]),
                    switch(&["--ephemeral", "-e"]),
                    valued(&["--config", "-c"]),
                ],
                None,
            )?;
            let mut positionals = exactly(&parsed, 2, "SOURCE[/SNAPSHOT] TARGET")?;
            let config = parsed
                .all("--config")
                .iter()
                .map(|pair| super::flags::key_value(pair, "--config"))
                .collect::<Result<Vec<_>, _>>()?;
            let target = positionals.remove(1);
            Ok(SnapshotCommand::Copy {
                source: positionals.remove(0),
                target,
                instance_only: parsed.has("--instance-only"),
                config,
                ephemeral: parsed.has("--ephemeral"),
            })
        }
        other => Err(usage(format!("unknown command \"{other}\""))),
    }
}

fn snapshots_url(name: &str) -> String {
    format!("/1.0/instances/{}/snapshots", encode(name))
}

/// `NAME/SNAPSHOT` split, or `None` for a plain instance name.
pub fn split(text: &str) -> Option<(&str, &str)> {
    text.split_once('/')
}

pub fn run(client: &Client, command: &SnapshotCommand) -> Result<(), CliError> {
    match command {
        SnapshotCommand::Take {
            name,
            snapshot,
            expiry,
        } => {
            let mut body = json!({"stateful": false});
            if let Some(snapshot) = snapshot {
                body["name"] = json!(snapshot);
            }
            if let Some(expiry) = expiry {
                body["expires_at"] = json!(expiry);
            }
            client.run("POST", &snapshots_url(name), Some(&body))?;
        }
        SnapshotCommand::Restore { name, snapshot } => {
            let body = json!({"restore": snapshot});
            client.run(
                "PUT",
                &format!("/1.0/instances/{}", encode(name)),
                Some(&body),
            )?;
        }
        SnapshotCommand::Copy {
            source,
            target,
            instance_only,
            config,
            ephemeral,
        } => {
            let config: serde_json::Map<String, Value> = config
                .iter()
                .map(|(key, value)| (key.clone(), json!(value)))
                .collect();
            let body = json!({
                "name": target,
                "source": {"type": "copy", "source": source, "instance_only": instance_only},
                "config": config,
                "ephemeral": ephemeral,
            });
            client.run("POST", "/1.0/instances", Some(&body))?;
        }
    }
    Ok(())
}

/// `delete NAME/SNAPSHOT`.
pub fn delete(client: &Client, name: &str, snapshot: &str) -> Result<(), CliError> {
    let url = format!("{}/{}", snapshots_url(name), encode(snapshot));
    client.run("DELETE", &url, None)?;
    Ok(())
}

/// `rename NAME/SNAPSHOT [NAME/]NEW`.
pub fn rename(client: &Client, name: &str, snapshot: &str, new_name: &str) -> Result<(), CliError> {
    let new_snapshot = match split(new_name) {
        Some((instance, new_snapshot)) if instance == name => new_snapshot,
        Some(_) => {
            return Err(usage(
                "a snapshot can only be renamed within its instance: NAME/SNAPSHOT NAME/NEW",
            ))
        }
        None => new_name,
    };
    let url = format!("{}/{}", snapshots_url(name), encode(snapshot));
    client.run("POST", &url, Some(&json!({"name": new_snapshot})))?;
    Ok(())
}

/// The `Snapshots:` table `cove info` ends with, as `lxc info` prints it.
pub fn info_text(snapshots: &[InstanceSnapshot]) -> String {
    if snapshots.is_empty() {
        return String::new();
    }
    let mut rows = Vec::new();
    for snapshot in snapshots {
        let expires = if snapshot.expires_at.is_empty() || snapshot.expires_at.starts_with("0001-")
        {
            String::new()
        } else {
            format::date(&snapshot.expires_at)
        };
        rows.push(vec![
            snapshot.name.clone(),
            format::date(&snapshot.created_at),
            expires,
            if snapshot.stateful { "YES" } else { "NO" }.to_string(),
        ]);
    }
    format!(
        "\nSnapshots:\n{}",
        format::table(&["NAME", "TAKEN AT", "EXPIRES AT", "STATEFUL"], &rows)
    )
}

/// The instance's snapshots for `cove info`.
pub fn list(client: &Client, name: &str) -> Result<Vec<InstanceSnapshot>, CliError> {
    client.get(&format!("{}?recursion=1", snapshots_url(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn commands_read_as_lxc_spells_them() {
        assert_eq!(
            parse(
                "snapshot",
                &strings("web before --expiry 2026-12-31T00:00:00Z")
            )
            .unwrap(),
            SnapshotCommand::Take {
                name: "web".into(),
                snapshot: Some("before".into()),
                expiry: Some("2026-12-31T00:00:00Z".into()),
            }
        );
        assert_eq!(
            parse("restore", &strings("web before")).unwrap(),
            SnapshotCommand::Restore {
                name: "web".into(),
                snapshot: "before".into()
            }
        );
        assert_eq!(
            parse(
                "copy",
                &strings("web/before web2 --instance-only -c limits.cpu=1")
            )
            .unwrap(),
            SnapshotCommand::Copy {
                source: "web/before".into(),
                target: "web2".into(),
                instance_only: true,
                config: vec![("limits.cpu".into(), "1".into())],
                ephemeral: false,
            }
        );
        for (verb, line) in [
            ("snapshot", ""),
            ("snapshot", "a b c"),
            ("restore", "web"),
            ("copy", "web"),
            ("copy", "web a -c novalue"),
        ] {
            assert!(parse(verb, &strings(line)).is_err(), "{verb} {line}");
        }
    }
}
