//! `GET /1.0/resources`: what the host has (CPUs by socket and core, memory, block devices),
//! in LXD's shape, for `lxc info --resources` and the clients that check the `resources`
//! extension before they ask for a storage pool's usage. Read from /proc and /sys at each
//! request; GPUs, network cards, USB and PCI devices are listed empty (coved passes none of
//! them to instances).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use super::{sync, ApiResult};
use crate::daemon::{blocking, Daemon};

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new().route("/1.0/resources", get(resources))
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
}

fn number(path: &Path) -> Option<u64> {
    read(path)?.parse().ok()
}

/// `/proc/cpuinfo`'s `model name` and `vendor_id` of the first processor.
fn cpu_names() -> (String, String) {
    let text = read(Path::new("/proc/cpuinfo")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_once(':'))
            .map(|(_, value)| value.trim().to_string())
            .unwrap_or_default()
    };
    (field("model name"), field("vendor_id"))
}

fn cpu() -> Value {
    let (model, vendor) = cpu_names();
    // socket -> core -> threads (logical CPU ids)
    let mut sockets: BTreeMap<u64, BTreeMap<u64, Vec<u64>>> = BTreeMap::new();
    let mut total = 0u64;
    if let Ok(entries) = std::fs::read_dir("/sys/devices/system/cpu") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_prefix("cpu")
                .and_then(|id| id.parse::<u64>().ok())
            else {
                continue;
            };
            let topology = entry.path().join("topology");
            let socket = number(&topology.join("physical_package_id")).unwrap_or(0);
            let core = number(&topology.join("core_id")).unwrap_or(id);
            sockets
                .entry(socket)
                .or_default()
                .entry(core)
                .or_default()
                .push(id);
            total += 1;
        }
    }
    let sockets: Vec<Value> = sockets
        .into_iter()
        .map(|(socket, cores)| {
            let cores: Vec<Value> = cores
                .into_iter()
                .map(|(core, mut threads)| {
                    threads.sort_unstable();
                    let threads: Vec<Value> = threads
                        .iter()
                        .enumerate()
                        .map(|(thread, id)| {
                            let online = read(Path::new(&format!(
                                "/sys/devices/system/cpu/cpu{id}/online"
                            )))
                            .is_none_or(|state| state == "1");
                            json!({"id": id, "numa_node": 0, "thread": thread,
                                   "online": online, "isolated": false})
                        })
                        .collect();
                    json!({"core": core, "die": 0, "threads": threads, "frequency": 0})
                })
                .collect();
            json!({"name": model, "vendor": vendor, "socket": socket, "cache": [],
                   "cores": cores, "frequency": 0, "frequency_minimum": 0,
                   "frequency_turbo": 0})
        })
        .collect();
    json!({"architecture": std::env::consts::ARCH, "sockets": sockets, "total": total})
}

fn memory() -> Value {
    let text = read(Path::new("/proc/meminfo")).unwrap_or_default();
    let kibibytes = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let total = kibibytes("MemTotal:") * 1024;
    let available = kibibytes("MemAvailable:") * 1024;
    let huge_total = kibibytes("HugePages_Total:");
    let huge_free = kibibytes("HugePages_Free:");
    let huge_size = kibibytes("Hugepagesize:") * 1024;
    json!({"nodes": [], "hugepages_total": huge_total * huge_size,
           "hugepages_used": (huge_total - huge_free.min(huge_total)) * huge_size,
           "hugepages_size": huge_size, "used": total.saturating_sub(available),
           "total": total})
}

fn storage() -> Value {
    let mut disks = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        let mut names: Vec<String> = entries
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| {
                !["loop", "ram", "zram", "nbd"]
                    .iter()
                    .any(|p| name.starts_with(p))
            })
            .collect();
        names.sort();
        for name in names {
            let base = Path::new("/sys/block").join(&name);
            let size = number(&base.join("size")).unwrap_or(0) * 512;
            let rotational = number(&base.join("queue/rotational")).unwrap_or(0) == 1;
            disks.push(json!({
                "id": name,
                "device": read(&base.join("dev")).unwrap_or_default(),
                "model": read(&base.join("device/model")).unwrap_or_default(),
                "type": if name.starts_with("vd") { "virtio" } else { "" },
                "read_only": number(&base.join("ro")).unwrap_or(0) == 1,
                "size": size,
                "removable": number(&base.join("removable")).unwrap_or(0) == 1,
                "rpm": if rotational { 1 } else { 0 },
                "block_size": number(&base.join("queue/logical_block_size")).unwrap_or(512),
                "numa_node": 0,
                "partitions": [],
            }));
        }
    }
    let total = disks.len();
    json!({"disks": disks, "total": total})
}

fn empty(kind: &str) -> Value {
    json!({kind: [], "total": 0})
}

async fn resources() -> ApiResult {
    let document = blocking(|| {
        json!({
            "cpu": cpu(),
            "memory": memory(),
            "gpu": empty("cards"),
            "network": empty("cards"),
            "storage": storage(),
            "usb": empty("devices"),
            "pci": empty("devices"),
            "system": {"uuid": "", "vendor": "", "product": "", "family": "", "version": "",
                       "sku": "", "serial": "", "type": "physical"},
        })
    })
    .await?;
    sync(document)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_has_cpus_and_memory() {
        let cpu = cpu();
        assert!(cpu["total"].as_u64().unwrap() >= 1);
        assert!(!cpu["sockets"].as_array().unwrap().is_empty());
        let memory = memory();
        assert!(memory["total"].as_u64().unwrap() > memory["used"].as_u64().unwrap());
    }
}
