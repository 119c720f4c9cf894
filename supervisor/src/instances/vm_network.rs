//! A VM's nic: a persistent tap device on the host, attached to the nic's bridge, which
//! cove-vmm opens by name (`--net tap=NAME,mac=MAC`). The tap is made before cove-vmm starts
//! and removed when the VM stops.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("the nic names no bridge: give \"parent\" (nictype bridged) or \"network\"")]
    NoBridge,
    #[error("bridge \"{0}\" does not exist on this host: create it first")]
    MissingBridge(String),
    #[error("cannot {what}: {output}")]
    Command { what: String, output: String },
}

/// The host bridge a nic is attached to. The one place that answers this, so managed
/// networks only have to extend it.
pub fn bridge_for_nic(nic: &BTreeMap<String, String>) -> Option<String> {
    nic.get("parent")
        .or_else(|| nic.get("network"))
        .filter(|bridge| !bridge.is_empty())
        .cloned()
}

/// The tap's name: a hash of the instance's name, since names are up to 63 characters and
/// interface names 15.
pub fn tap_name(instance: &str) -> String {
    let hash = instance
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("covevm{:08x}", hash as u32)
}

fn ip(arguments: &[&str], what: &str) -> Result<(), NetworkError> {
    let output = Command::new("ip")
        .args(arguments)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| NetworkError::Command {
            what: what.to_string(),
            output: error.to_string(),
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(NetworkError::Command {
        what: what.to_string(),
        output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// Asks the kernel (not sysfs, which shows the network namespace it was mounted in) whether a
/// bridge of that name exists in coved's network namespace.
fn is_bridge(name: &str) -> bool {
    Command::new("ip")
        .args(["-o", "-d", "link", "show", "dev", name])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|output| {
            output.status.success() && String::from_utf8_lossy(&output.stdout).contains(" bridge ")
        })
}

/// Makes the VM's tap on its nic's bridge; returns the tap's name and the nic's MAC.
pub fn create_tap(
    instance: &str,
    nic: &BTreeMap<String, String>,
) -> Result<(String, String), NetworkError> {
    let bridge = bridge_for_nic(nic).ok_or(NetworkError::NoBridge)?;
    if !is_bridge(&bridge) {
        return Err(NetworkError::MissingBridge(bridge));
    }
    let tap = tap_name(instance);
    remove_tap(instance);
    ip(
        &["tuntap", "add", "dev", &tap, "mode", "tap"],
        &format!("create the tap {tap}"),
    )?;
    let attached = ip(
        &["link", "set", "dev", &tap, "master", &bridge, "up"],
        &format!("attach the tap {tap} to {bridge}"),
    );
    if let Err(error) = attached {
        remove_tap(instance);
        return Err(error);
    }
    let mac = nic.get("hwaddr").cloned().unwrap_or_default();
    Ok((tap, mac))
}

/// Removes the VM's tap, if there is one.
pub fn remove_tap(instance: &str) {
    let tap = tap_name(instance);
    let exists = Command::new("ip")
        .args(["-o", "link", "show", "dev", &tap])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if exists {
        let _ = ip(&["link", "delete", "dev", &tap], "remove the tap");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_an_interface_name() {
        let name = tap_name(&"a".repeat(63));
        assert!(name.len() <= 15, "{name}");
        assert_ne!(tap_name("web"), tap_name("db"));
    }

    #[test]
    fn the_bridge_is_the_parent_or_the_network() {
        let nic = BTreeMap::from([("parent".to_string(), "br0".to_string())]);
        assert_eq!(bridge_for_nic(&nic).as_deref(), Some("br0"));
        let nic = BTreeMap::from([("network".to_string(), "lxdbr0".to_string())]);
        assert_eq!(bridge_for_nic(&nic).as_deref(), Some("lxdbr0"));
        assert_eq!(bridge_for_nic(&BTreeMap::new()), None);
    }
}
