//! What a client hands coved, and the files coved reads back from processes it does not
//! trust (dnsmasq's leases, /proc and cgroup counters): request bodies of the instance,
//! snapshot, network and storage endpoints go through the same parsing and validation the
//! routes use, and none of it may panic. The first byte picks the kind of input.
#![no_main]

use std::collections::BTreeMap;

use cove_supervisor::api::types::{
    Device, InstancePut, InstanceSnapshotPut, InstanceSnapshotsPost, InstancesPost,
};
use cove_supervisor::instances::config;
use cove_supervisor::{metrics, networks, snapshots, storage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match kind % 8 {
        0 => {
            if let Ok(request) = serde_json::from_slice::<InstancesPost>(rest) {
                let _ = config::validate_name(&request.name);
                let _ = config::validate_keys(&request.config);
                let _ = config::validate_expanded_devices(&request.devices);
                let _ = storage::placement::root_pool(&request.devices);
            }
        }
        1 => {
            if let Ok(request) = serde_json::from_slice::<InstanceSnapshotsPost>(rest) {
                let _ = snapshots::validate_snapshot_name(&request.name);
                let _ = snapshots::parse_time(&request.expires_at);
            }
            let _ = serde_json::from_slice::<InstanceSnapshotPut>(rest);
        }
        2 => {
            if let Ok(keys) = serde_json::from_slice::<BTreeMap<String, String>>(rest) {
                if let Ok(network) = networks::config::parse(&keys) {
                    let _ = format!("{network:?}");
                }
            }
        }
        3 => {
            let _ = networks::dnsmasq::parse_leases(&text);
            let _ = networks::config::parse_cidr(&text);
        }
        4 => {
            let _ = metrics::parse_net_dev(&text);
            let _ = metrics::parse_io_stat(&text);
            let (bytes, operations) = text.split_once('\0').unwrap_or((&text, ""));
            let _ = metrics::parse_blkio(bytes, operations);
        }
        5 => {
            let _ = snapshots::parse_time(&text);
        }
        6 => {
            let _ = storage::pools::parse_size(&text);
            let _ = storage::validate_name("storage pool", &text);
        }
        _ => {
            if let Ok(request) = serde_json::from_slice::<InstancePut>(rest) {
                if let Some(config) = &request.config {
                    let _ = config::validate_keys(config);
                }
                let devices: BTreeMap<String, Device> = request.devices.unwrap_or_default();
                let _ = config::validate_expanded_devices(&devices);
            }
        }
    }
});
