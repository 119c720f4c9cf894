//! A managed network on the host, in coved's own network namespace: the Linux bridge with the
//! gateway address, the nftables table that masquerades the subnet (`table ip cove-<name>`,
//! replaced whole in one `nft -f -` transaction, so applying it twice is harmless), IPv4
//! forwarding, and what the namespace already uses (routes and addresses), read through
//! iproute2's JSON output (`ip -j`) so that it always describes the namespace coved runs in.
//!
//! Every step is idempotent: realising a network that is already there changes nothing.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::config::{NetworkConfig, Subnet};
use super::NetworkError;

/// Runs a host command; its stdout, or an error with its stderr.
fn run(program: &str, arguments: &[&str], input: Option<&str>) -> Result<String, NetworkError> {
    let command_line = format!("{program} {}", arguments.join(" "));
    let failed = |message: String| NetworkError::Host {
        command: command_line.clone(),
        message,
    };
    let mut child = Command::new(program)
        .args(arguments)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| failed(format!("cannot run {program}: {error}; is it installed?")))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|error| failed(error.to_string()))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|error| failed(error.to_string()))?;
    if !output.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ip_json(arguments: &[&str]) -> Result<Vec<Value>, NetworkError> {
    let mut all = vec!["-j"];
    all.extend_from_slice(arguments);
    let text = run("ip", &all, None)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text).map_err(|error| NetworkError::Host {
        command: format!("ip {}", all.join(" ")),
        message: format!("unexpected output: {error}"),
    })
}

/// A subnet in use in the namespace and where (`route 10.1.0.0/16 dev eth0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InUse {
    pub subnet: Subnet,
    pub what: String,
}

/// Every IPv4 route (all tables, the default route aside) and address in the namespace,
/// except those on `except_interface` (the network's own bridge, when it is realised).
pub fn subnets_in_use(except_interface: &str) -> Result<Vec<InUse>, NetworkError> {
    let mut used = Vec::new();
    for route in ip_json(&["-4", "route", "show", "table", "all"])? {
        let device = route["dev"].as_str().unwrap_or_default();
        let destination = route["dst"].as_str().unwrap_or_default();
        if device == except_interface || destination == "default" {
            continue;
        }
        let (address, prefix) = match destination.split_once('/') {
            Some((address, prefix)) => (address, prefix.parse().unwrap_or(32)),
            None => (destination, 32),
        };
        let Ok(address) = address.parse::<Ipv4Addr>() else {
            continue;
        };
        if prefix == 0 {
            continue;
        }
        used.push(InUse {
            subnet: Subnet::of(address, prefix),
            what: format!("route {destination} dev {device}"),
        });
    }
    for link in ip_json(&["-4", "address", "show"])? {
        let device = link["ifname"].as_str().unwrap_or_default();
        if device == except_interface {
            continue;
        }
        for address in link["addr_info"].as_array().into_iter().flatten() {
            let (Some(local), Some(prefix)) = (
                address["local"]
                    .as_str()
                    .and_then(|text| text.parse::<Ipv4Addr>().ok()),
                address["prefixlen"].as_u64(),
            ) else {
                continue;
            };
            used.push(InUse {
                subnet: Subnet::of(local, prefix.min(32) as u8),
                what: format!("address {local}/{prefix} on {device}"),
            });
        }
    }
    Ok(used)
}

/// The names of the namespace's interfaces (`/proc/net/dev` is the reader's namespace's).
pub fn interfaces() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
    let mut names: Vec<String> = text
        .lines()
        .skip(2)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .collect();
    names.sort();
    names
}

pub fn interface_exists(name: &str) -> bool {
    interfaces().iter().any(|known| known == name)
}

/// The bridge, up, with the gateway address (and no other IPv4 address).
pub fn ensure_bridge(name: &str, config: &NetworkConfig) -> Result<(), NetworkError> {
    if !interface_exists(name) {
        run("ip", &["link", "add", "name", name, "type", "bridge"], None)?;
    }
    let wanted = format!("{}/{}", config.gateway, config.subnet.prefix);
    let mut present = Vec::new();
    for link in ip_json(&["-4", "address", "show", "dev", name])? {
        for address in link["addr_info"].as_array().into_iter().flatten() {
            present.push(format!(
                "{}/{}",
                address["local"].as_str().unwrap_or_default(),
                address["prefixlen"].as_u64().unwrap_or_default()
            ));
        }
    }
    if present != [wanted.clone()] {
        run("ip", &["-4", "address", "flush", "dev", name], None)?;
        run("ip", &["address", "add", &wanted, "dev", name], None)?;
    }
    run("ip", &["link", "set", "dev", name, "up"], None)?;
    Ok(())
}

pub fn remove_bridge(name: &str) -> Result<(), NetworkError> {
    if interface_exists(name) {
        run("ip", &["link", "delete", "dev", name], None)?;
    }
    Ok(())
}

fn table(name: &str) -> String {
    format!("cove-{name}")
}

/// The network's nftables table: masquerade what leaves the subnet through any other
/// interface, and accept forwarding from and to the bridge. Replaced whole, atomically.
pub fn apply_nat(name: &str, config: &NetworkConfig) -> Result<(), NetworkError> {
    if !config.nat {
        return remove_nat(name);
    }
    let table = table(name);
    let subnet = config.subnet;
    let script = format!(
        "table ip {table} {{}}\n\
         delete table ip {table}\n\
         table ip {table} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} oifname != \"{name}\" masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{name}\" accept\n\
         \t\toifname \"{name}\" accept\n\
         \t}}\n\
         }}\n"
    );
    run("nft", &["-f", "-"], Some(&script))?;
    enable_forwarding()
}

pub fn remove_nat(name: &str) -> Result<(), NetworkError> {
    let table = table(name);
    let script = format!("table ip {table} {{}}\ndelete table ip {table}\n");
    run("nft", &["-f", "-"], Some(&script)).map(drop)
}

/// `net.ipv4.ip_forward=1`, which belongs to the network namespace coved runs in.
fn enable_forwarding() -> Result<(), NetworkError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|error| NetworkError::Host {
        command: "sysctl net.ipv4.ip_forward=1".into(),
        message: error.to_string(),
    })
}

/// LXD's network state: addresses, counters, MAC address, MTU, up or down.
pub fn interface_state(name: &str) -> Result<Value, NetworkError> {
    let links = ip_json(&["-s", "link", "show", "dev", name])?;
    let link = links.first().cloned().unwrap_or_default();
    let mut addresses = Vec::new();
    for entry in ip_json(&["address", "show", "dev", name])? {
        for address in entry["addr_info"].as_array().into_iter().flatten() {
            addresses.push(json!({
                "family": address["family"],
                "address": address["local"],
                "netmask": address["prefixlen"].as_u64().unwrap_or_default().to_string(),
                "scope": address["scope"],
            }));
        }
    }
    let statistics = &link["stats64"];
    let kind = if name == "lo" {
        "loopback"
    } else {
        "broadcast"
    };
    let up = link["flags"]
        .as_array()
        .is_some_and(|flags| flags.iter().any(|flag| flag == "UP"));
    Ok(json!({
        "addresses": addresses,
        "counters": {
            "bytes_received": statistics["rx"]["bytes"].as_u64().unwrap_or_default(),
            "bytes_sent": statistics["tx"]["bytes"].as_u64().unwrap_or_default(),
            "packets_received": statistics["rx"]["packets"].as_u64().unwrap_or_default(),
            "packets_sent": statistics["tx"]["packets"].as_u64().unwrap_or_default(),
        },
        "hwaddr": link["address"].as_str().unwrap_or_default(),
        "mtu": link["mtu"].as_u64().unwrap_or_default(),
        "state": if up { "up" } else { "down" },
        "type": kind,
    }))
}
