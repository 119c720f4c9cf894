//! Instance configuration as LXD spells it: which keys exist, what values they take, how
//! profiles expand into an instance, and which keys go on to the container core. Checked once
//! at the API's edge; an unknown key is refused by name.

use std::collections::BTreeMap;
use std::path::Path;

use cove_shim::{BridgedNic, ContainerConfig};

use crate::api::types::Device;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unknown configuration key \"{0}\"; see docs/api.md for the keys cove knows")]
    UnknownKey(String),
    #[error("invalid value for {key}: \"{value}\": {expected}")]
    Value {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Container(String),
    #[error("device \"{device}\": {problem}")]
    Device { device: String, problem: String },
    #[error(
        "invalid instance name \"{0}\": use 1 to 63 letters, digits and dashes, starting with a \
         letter and not ending with a dash"
    )]
    Name(String),
}

/// Keys handed to the container core (validated there too).
const CONTAINER_KEYS: &[&str] = &[
    "limits.cpu",
    "limits.cpu.allowance",
    "limits.memory",
    "limits.processes",
    "security.privileged",
    "security.nesting",
    "security.idmap.base",
    "security.idmap.size",
    "security.idmap.shift",
    "security.syscalls.deny_default",
    "security.syscalls.deny_compat",
    "user.hostname",
];

/// Booleans coved itself reads.
const BOOLEAN_KEYS: &[&str] = &[
    "boot.autostart",
    "security.nesting",
    "security.privileged",
    crate::instances::vm_launch::ALLOW_EMULATED_KVM,
];

/// Integers coved itself reads.
const INTEGER_KEYS: &[&str] = &[
    "boot.autostart.delay",
    "boot.autostart.priority",
    "boot.host_shutdown_timeout",
    "boot.stop.priority",
];

/// Free-form namespaces: any key under them is accepted as it is.
const FREE_PREFIXES: &[&str] = &["environment.", "user.", "image.", "volatile."];

/// LXD's instance names: a hostname label.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(ConfigError::Name(name.to_string()))
    }
}

fn is_boolean(value: &str) -> bool {
    matches!(
        value.to_ascii_lowercase().as_str(),
        "true" | "false" | "1" | "0" | "yes" | "no" | "on" | "off"
    )
}

pub fn truthy(value: Option<&String>) -> bool {
    matches!(
        value.map(|value| value.to_ascii_lowercase()).as_deref(),
        Some("true" | "1" | "yes" | "on")
    )
}

/// Checks every key's name and the form of the values coved reads itself.
pub fn validate_keys(config: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (key, value) in config {
        let value_error = |expected| ConfigError::Value {
            key: key.clone(),
            value: value.clone(),
            expected,
        };
        if FREE_PREFIXES.iter().any(|prefix| key.starts_with(prefix)) {
            if key.starts_with("environment.") && key.len() == "environment.".len() {
                return Err(ConfigError::UnknownKey(key.clone()));
            }
            continue;
        }
        if BOOLEAN_KEYS.contains(&key.as_str()) {
            if !is_boolean(value) {
                return Err(value_error("expected true or false"));
            }
        } else if INTEGER_KEYS.contains(&key.as_str()) {
            if value.trim().parse::<i64>().is_err() {
                return Err(value_error("expected a whole number"));
            }
        } else if !CONTAINER_KEYS.contains(&key.as_str()) {
            return Err(ConfigError::UnknownKey(key.clone()));
        }
    }
    Ok(())
}

/// Checks devices: a root disk (`path: /`), `none` to mask a profile's device. Other kinds
/// are refused by name until the container core can wire them.
pub fn validate_devices(devices: &BTreeMap<String, Device>) -> Result<(), ConfigError> {
    for (name, device) in devices {
        let problem = |problem: String| ConfigError::Device {
            device: name.clone(),
            problem,
        };
        match device.get("type").map(String::as_str) {
            Some("disk") => validate_disk(device).map_err(problem)?,
            Some("none") => {}
            Some("nic") => {
                BridgedNic::from_device(&nic_keys(name, device))
                    .map_err(|error| problem(error.to_string()))?;
            }
            Some(other) => {
                return Err(problem(format!(
                    "device type \"{other}\" is not supported; cove knows \"disk\" (root), \
                     \"nic\" (bridged) and \"none\""
                )))
            }
            None => return Err(problem("it has no \"type\"".into())),
        }
    }
    Ok(())
}

/// A disk device's form: the root disk (`path: /`, on a `pool`), a custom volume (`pool` and
/// `source` naming the volume) or a host path (`source` absolute) at an absolute `path`.
/// Whether the pool, volume or host path exists is the storage layer's to check.
fn validate_disk(device: &Device) -> Result<(), String> {
    for key in device.keys() {
        if !matches!(
            key.as_str(),
            "type" | "path" | "pool" | "source" | "readonly" | "size"
        ) {
            return Err(format!(
                "unknown disk device key \"{key}\": cove knows path, pool, source, readonly \
                 and size"
            ));
        }
    }
    let path = device
        .get("path")
        .ok_or_else(|| "a disk device needs a path".to_string())?;
    let plain = |text: &str| {
        let path = Path::new(text);
        path.is_absolute()
            && !text.contains(',')
            && path.components().all(|component| {
                matches!(
                    component,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )
            })
    };
    if !plain(path) {
        return Err(format!(
            "disk path \"{path}\" must be an absolute path without \"..\" or commas"
        ));
    }
    if let Some(read_only) = device.get("readonly") {
        if !is_boolean(read_only) {
            return Err(format!("readonly \"{read_only}\": expected true or false"));
        }
    }
    if path == "/" {
        if device.contains_key("source") {
            return Err("the root disk takes a pool, not a source".into());
        }
        return Ok(());
    }
    let source = device
        .get("source")
        .ok_or_else(|| "a disk device other than the root needs a source".to_string())?;
    if device.contains_key("pool") {
        crate::storage::validate_name("storage volume", source)
            .map_err(|error| error.to_string())?;
    } else if !plain(source) {
        return Err(format!(
            "disk source \"{source}\" must be an absolute host path without \"..\" or commas, \
             or a volume name with a pool"
        ));
    }
    Ok(())
}

/// Checks that an expanded device set has at most one nic (what the container core wires).
pub fn validate_expanded_devices(devices: &BTreeMap<String, Device>) -> Result<(), ConfigError> {
    validate_devices(devices)?;
    let nics: Vec<&String> = devices
        .iter()
        .filter(|(_, device)| device.get("type").map(String::as_str) == Some("nic"))
        .map(|(name, _)| name)
        .collect();
    if let [_, second, ..] = nics.as_slice() {
        return Err(ConfigError::Device {
            device: (*second).clone(),
            problem: "only one nic per instance is supported".into(),
        });
    }
    Ok(())
}

/// An LXD nic device as the container core takes it: `network: BRIDGE` (a host bridge, LXD's
/// unmanaged "bridged" network) becomes `nictype: bridged` + `parent: BRIDGE`, and the
/// interface inside is named after the device unless `name` says otherwise.
fn nic_keys(device_name: &str, device: &Device) -> BTreeMap<String, String> {
    let mut keys = device.clone();
    // A static address is coved's to hand out through the network's DHCP server
    // (`crate::networks`), not the container core's.
    keys.remove("ipv4.address");
    if let Some(network) = keys.remove("network") {
        keys.entry("nictype".to_string())
            .or_insert_with(|| "bridged".to_string());
        keys.entry("parent".to_string()).or_insert(network);
    }
    keys.entry("name".to_string())
        .or_insert_with(|| device_name.to_string());
    keys
}

/// The instance's nic for the container core, from its expanded devices: the device's keys
/// with a MAC address made from the instance's and device's names when none is given, so
/// that it stays the same across starts (LXD keeps it in `volatile.<nic>.hwaddr`).
pub fn nic_device(
    instance: &str,
    devices: &BTreeMap<String, Device>,
) -> Option<BTreeMap<String, String>> {
    let (name, device) = devices
        .iter()
        .find(|(_, device)| device.get("type").map(String::as_str) == Some("nic"))?;
    let mut keys = nic_keys(name, device);
    keys.entry("hwaddr".to_string()).or_insert_with(|| {
        // FNV-1a: stable across builds, unlike std's hasher.
        let hash = format!("{instance}/{name}")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
        let [a, b, c, ..] = hash.to_le_bytes();
        format!("00:16:3e:{a:02x}:{b:02x}:{c:02x}")
    });
    Some(keys)
}

/// A config and its devices: a profile's, or an instance's expanded ones.
pub type Layer = (BTreeMap<String, String>, BTreeMap<String, Device>);

/// Profiles applied in order, then the instance's own keys and devices.
pub fn expand(
    profiles: &[Layer],
    config: &BTreeMap<String, String>,
    devices: &BTreeMap<String, Device>,
) -> Layer {
    let mut expanded_config = BTreeMap::new();
    let mut expanded_devices = BTreeMap::new();
    for (profile_config, profile_devices) in profiles {
        expanded_config.extend(profile_config.clone());
        expanded_devices.extend(profile_devices.clone());
    }
    expanded_config.extend(config.clone());
    expanded_devices.extend(devices.clone());
    expanded_devices.retain(|_, device| device.get("type").map(String::as_str) != Some("none"));
    (expanded_config, expanded_devices)
}

/// The keys the container core takes, from an expanded config.
pub fn container_keys(expanded: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    expanded
        .iter()
        .filter(|(key, _)| CONTAINER_KEYS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// Validates an expanded config against the container core (limits, id map) with the image
/// it would run.
pub fn validate_for_container(
    name: &str,
    rootfs: &Path,
    expanded: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    ContainerConfig::from_keys(name, rootfs, &container_keys(expanded))
        .map(drop)
        .map_err(|error| ConfigError::Container(error.to_string()))
}

/// `environment.NAME` keys as the command environment.
pub fn environment(expanded: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    expanded
        .iter()
        .filter_map(|(key, value)| {
            key.strip_prefix("environment.")
                .map(|name| (name.to_string(), value.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let error = validate_keys(&keys(&[("limits.memroy", "1GiB")])).unwrap_err();
        assert!(error.to_string().contains("\"limits.memroy\""));
        validate_keys(&keys(&[
            ("limits.memory", "1GiB"),
            ("boot.autostart", "true"),
            ("environment.FOO", "bar"),
            ("user.anything", "x"),
            ("security.nesting", "false"),
        ]))
        .unwrap();
        assert!(validate_keys(&keys(&[("boot.autostart", "perhaps")])).is_err());
    }

    #[test]
    fn names_are_hostname_labels() {
        validate_name("web-1").unwrap();
        for bad in ["", "1web", "web-", "we_b", "a/b", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn devices_other_than_the_root_disk_are_refused() {
        let root = BTreeMap::from([(
            "root".to_string(),
            keys(&[("type", "disk"), ("path", "/"), ("pool", "default")]),
        )]);
        validate_devices(&root).unwrap();
        let nic = BTreeMap::from([("eth0".to_string(), keys(&[("type", "nic")]))]);
        assert!(validate_devices(&nic)
            .unwrap_err()
            .to_string()
            .contains("eth0"));
        let gpu = BTreeMap::from([("gpu0".to_string(), keys(&[("type", "gpu")]))]);
        assert!(validate_devices(&gpu).is_err());
    }

    #[test]
    fn bridged_nics_are_taken_and_given_a_stable_mac() {
        let by_network = BTreeMap::from([(
            "eth0".to_string(),
            keys(&[("type", "nic"), ("network", "br0")]),
        )]);
        validate_expanded_devices(&by_network).unwrap();
        let nic = nic_device("web", &by_network).expect("a nic");
        assert_eq!(nic["nictype"], "bridged");
        assert_eq!(nic["parent"], "br0");
        assert_eq!(nic["name"], "eth0");
        assert!(nic["hwaddr"].starts_with("00:16:3e:"));
        assert_eq!(nic_device("web", &by_network), Some(nic));
        let mut two = by_network.clone();
        two.insert(
            "eth1".to_string(),
            keys(&[("type", "nic"), ("nictype", "bridged"), ("parent", "br0")]),
        );
        assert!(validate_expanded_devices(&two).is_err());
        let macvlan = BTreeMap::from([(
            "eth0".to_string(),
            keys(&[("type", "nic"), ("nictype", "macvlan"), ("parent", "br0")]),
        )]);
        assert!(validate_devices(&macvlan).is_err());
    }

    #[test]
    fn instance_keys_override_profiles_and_none_masks() {
        let profile = (
            keys(&[("limits.cpu", "1"), ("user.a", "profile")]),
            BTreeMap::from([("root".to_string(), keys(&[("type", "disk"), ("path", "/")]))]),
        );
        let (config, devices) = expand(
            &[profile],
            &keys(&[("user.a", "instance")]),
            &BTreeMap::from([("root".to_string(), keys(&[("type", "none")]))]),
        );
        assert_eq!(config["user.a"], "instance");
        assert_eq!(config["limits.cpu"], "1");
        assert!(devices.is_empty());
        assert_eq!(container_keys(&config).len(), 1);
    }
}
