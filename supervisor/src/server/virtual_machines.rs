//! The VM side of `POST /1.0/instances` with `"type": "virtual-machine"`: the checks that
//! refuse a VM before anything is made (a kvm-pvm host without the opt-in key, limits that do
//! not fit), the VM's directory made before its row (so the runtimes know it for a VM from
//! then on), and the creating operation's work: the disk, the first start, and the rollback
//! that leaves nothing of an instance whose creation failed.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::ApiError;
use crate::api::types::Device;
use crate::daemon::{blocking, instance_url, Daemon};
use crate::instances::runtime::Runtime;
use crate::instances::vm::VmRuntime;
use crate::instances::vm_launch;

/// The instance type of a VM, as LXD spells it.
pub const KIND: &str = crate::images::machine::KIND;

/// Whether a new instance of type `requested` (empty: the image's) from an image of type
/// `image_kind` is a VM. As LXD: a VM image makes only VMs. Unlike LXD, a container image
/// makes a VM too (its rootfs becomes the VM's disk).
pub fn instance_is_machine(requested: &str, image_kind: &str) -> Result<bool, ApiError> {
    let image_is_machine = image_kind == KIND;
    match requested {
        "" => Ok(image_is_machine),
        "container" if image_is_machine => Err(ApiError::bad_request(format!(
            "Requested image's type \"{KIND}\" doesn't match instance type \"container\": a VM \
             image holds a disk, not a root file system; launch it as a virtual machine \
             (\"type\": \"{KIND}\", lxc launch IMAGE NAME --vm)"
        ))),
        "container" => Ok(false),
        KIND => Ok(true),
        other => Err(ApiError::bad_request(format!(
            "unknown instance type \"{other}\": use \"container\" or \"{KIND}\""
        ))),
    }
}

fn machines(daemon: &Daemon) -> Result<&VmRuntime, ApiError> {
    daemon.runtime.virtual_machines().ok_or_else(|| {
        ApiError::bad_request("this coved runs no virtual machines: start it with the shim runtime")
    })
}

/// Refuses a VM this host cannot or may not run; reads only.
pub fn admit(
    daemon: &Daemon,
    profiles: &[String],
    config: &BTreeMap<String, String>,
    devices: &BTreeMap<String, Device>,
) -> Result<(), ApiError> {
    let machines = machines(daemon)?;
    let (expanded, expanded_devices) = daemon.expand(profiles, config, devices)?;
    if let Some((device, _)) = expanded_devices.iter().find(|(_, device)| {
        device.get("type").map(String::as_str) == Some("disk")
            && device.get("path").map(String::as_str) != Some("/")
    }) {
        return Err(ApiError::bad_request(format!(
            "disk device \"{device}\": disks other than the root are not supported on virtual \
             machines yet; remove it or use a container"
        )));
    }
    let pool = crate::storage::placement::root_pool(&expanded_devices);
    if pool != "default" {
        return Err(ApiError::bad_request(format!(
            "virtual machines live on the storage pool \"default\" only: put the root disk \
             on \"default\", not \"{pool}\""
        )));
    }
    vm_launch::admit(&expanded).map_err(|error| ApiError::bad_request(error.to_string()))?;
    machines
        .check_tools()
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    Ok(())
}

/// Before a new instance's row is committed: a VM gets its directory (from then on the
/// runtimes know `name` for a VM); a container's name is cleared of a VM directory that a
/// crash left without a row, which would otherwise make it look like a VM.
pub fn claim_name(daemon: &Daemon, name: &str, virtual_machine: bool) -> Result<(), ApiError> {
    let internal =
        |error: crate::instances::runtime::RuntimeError| ApiError::new(500, error.to_string());
    if virtual_machine {
        return machines(daemon)?.reserve(name).map_err(internal);
    }
    if daemon.runtime.is_virtual_machine(name) {
        if let Some(machines) = daemon.runtime.virtual_machines() {
            machines
                .delete(name, &machines.machine_directory(name))
                .map_err(internal)?;
        }
    }
    Ok(())
}

/// Removes a VM's files (its row is not committed, or the creation failed).
pub fn release_name(daemon: &Daemon, name: &str) {
    if let Some(machines) = daemon.runtime.virtual_machines() {
        let _ = machines.delete(name, &machines.machine_directory(name));
    }
}

/// Removes a VM's files and row (the creation failed).
pub async fn roll_back(daemon: &Arc<Daemon>, name: &str) {
    let runtime = daemon.runtime.clone();
    let owned = name.to_string();
    let _ = blocking(move || {
        let _ = runtime.stop(&owned, std::time::Duration::ZERO);
    })
    .await;
    let owned_daemon = daemon.clone();
    let owned = name.to_string();
    let _ = blocking(move || release_name(&owned_daemon, &owned)).await;
    let _ = daemon.store.delete_instance(name);
    daemon
        .events
        .lifecycle("instance-deleted", &instance_url(name), BTreeMap::new());
}

/// The creating operation's work for a VM: its disk, then the start when asked for. Any
/// failure removes the instance.
pub async fn create(
    daemon: Arc<Daemon>,
    name: String,
    image: String,
    start: bool,
) -> Result<(), String> {
    let lock = daemon.instance_lock(&name);
    let _guard = lock.lock().await;
    let rootfs = daemon.image_rootfs(&image);
    let prepared = {
        let daemon = daemon.clone();
        let name = name.clone();
        blocking(move || match daemon.runtime.virtual_machines() {
            Some(machines) => machines
                .prepare_disk(&name, &rootfs)
                .map_err(|error| error.to_string()),
            None => Err("this coved runs no virtual machines".to_string()),
        })
        .await
        .map_err(|error| error.to_string())
        .and_then(|result| result)
    };
    if let Err(error) = prepared {
        roll_back(&daemon, &name).await;
        return Err(format!("cannot make the disk of \"{name}\": {error}"));
    }
    if start {
        if let Err(error) = daemon.start_locked(&name).await {
            roll_back(&daemon, &name).await;
            return Err(error.to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instance_type_follows_the_image_unless_asked() {
        assert!(!instance_is_machine("", "container").unwrap());
        assert!(instance_is_machine("", KIND).unwrap());
        assert!(instance_is_machine(KIND, "container").unwrap());
        assert!(instance_is_machine(KIND, KIND).unwrap());
        assert!(!instance_is_machine("container", "container").unwrap());
        let refused = instance_is_machine("container", KIND).unwrap_err();
        assert_eq!(refused.status, 400);
        assert!(
            refused.message.contains("doesn't match"),
            "{}",
            refused.message
        );
        assert_eq!(
            instance_is_machine("pod", "container").unwrap_err().status,
            400
        );
    }
}
