//! Where an instance's files live and what its disks bind: the pool its root disk names, its
//! directory there (the one place every caller asks: [`Daemon::instance_directory`]), the image
//! it runs a snapshot of (a read-only subvolume per image on a btrfs pool), and its other
//! disk devices resolved to host paths. Also what the daemon does for pools at its start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{io_error, pools, volumes, StorageError};
use crate::api::types::Device;
use crate::daemon::{Daemon, DaemonError};
use crate::instances::config;
use crate::store::{InstanceRecord, StoragePoolRecord, StoreError};

/// Serializes making image subvolumes: the first instance on a pool fills it, the others wait.
static IMAGE_FILLING: Mutex<()> = Mutex::new(());

/// The pool an expanded device set's root disk (`type: disk`, `path: /`) names; `default`
/// when none does.
pub fn root_pool(devices: &BTreeMap<String, Device>) -> String {
    devices
        .values()
        .find(|device| {
            device.get("type").map(String::as_str) == Some("disk")
                && device.get("path").map(String::as_str) == Some("/")
        })
        .and_then(|device| device.get("pool").cloned())
        .unwrap_or_else(|| "default".to_string())
}

fn moved(instance: &str, before: &str, after: &str) -> Result<(), DaemonError> {
    if before == after {
        return Ok(());
    }
    Err(DaemonError::BadRequest(format!(
        "instance \"{instance}\" lives on storage pool \"{before}\": moving it to \"{after}\" \
         is not supported; keep its root disk on \"{before}\""
    )))
}

/// Non-root disk devices, by name.
fn extra_disks(devices: &BTreeMap<String, Device>) -> impl Iterator<Item = (&String, &Device)> {
    devices.iter().filter(|(_, device)| {
        device.get("type").map(String::as_str) == Some("disk")
            && device.get("path").map(String::as_str) != Some("/")
    })
}

/// Deletes an image subvolume (read-only ones included) or a directory left half-made.
pub fn remove_image_subvolume(path: &Path) -> Result<(), StorageError> {
    if cove_shim::btrfs::is_subvolume(path) {
        cove_shim::btrfs::delete_subvolume(path).map_err(|error| StorageError::Command {
            what: format!("cannot delete the subvolume {}", path.display()),
            message: error.to_string(),
        })
    } else if path.exists() {
        std::fs::remove_dir_all(path).map_err(io_error(format!("cannot remove {}", path.display())))
    } else {
        Ok(())
    }
}

/// Makes `<pool>/images/<fingerprint>`: a subvolume filled with a copy of the image's rootfs
/// (owners, modes and extended attributes kept), then snapshotted read-only under its name.
fn make_image_subvolume(
    rootfs: &Path,
    images: &Path,
    fingerprint: &str,
) -> Result<PathBuf, StorageError> {
    let _filling = IMAGE_FILLING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let target = images.join(fingerprint);
    if cove_shim::btrfs::is_subvolume(&target) {
        return Ok(target);
    }
    std::fs::create_dir_all(images)
        .map_err(io_error(format!("cannot create {}", images.display())))?;
    let filling = images.join(format!(".{fingerprint}.filling"));
    remove_image_subvolume(&filling)?;
    let subvolume_error = |what: String| {
        move |error: cove_shim::btrfs::BtrfsError| StorageError::Command {
            what,
            message: error.to_string(),
        }
    };
    cove_shim::btrfs::create_subvolume(&filling).map_err(subvolume_error(format!(
        "cannot create {}",
        filling.display()
    )))?;
    let filled = super::run(
        "cp",
        &[
            "-a",
            &format!("{}/.", rootfs.display()),
            &format!("{}/", filling.display()),
        ],
        &format!("cannot copy the image {fingerprint} into its subvolume"),
    )
    .and_then(|_| {
        cove_shim::btrfs::snapshot(&filling, &target, true).map_err(subvolume_error(format!(
            "cannot snapshot {}",
            target.display()
        )))
    });
    let _ = remove_image_subvolume(&filling);
    filled.map(|()| target)
}

impl Daemon {
    /// Where the pool `name` is mounted.
    pub fn pool_directory(&self, name: &str) -> PathBuf {
        pools::pool_directory(&self.settings.directory, name)
    }

    /// The instance's directory on its pool: `<pool>/containers/<name>` (or
    /// `virtual-machines/<name>` for a VM). Every caller that needs an instance's files asks
    /// here.
    pub fn instance_directory(&self, record: &InstanceRecord) -> Result<PathBuf, DaemonError> {
        let (_, devices) = self.expand(&record.profiles, &record.config, &record.devices)?;
        Ok(self.instance_directory_on(&root_pool(&devices), &record.kind, &record.name))
    }

    /// The directory an instance of `kind` named `name` has on `pool`.
    pub fn instance_directory_on(&self, pool: &str, kind: &str, name: &str) -> PathBuf {
        let folder = if kind == "virtual-machine" {
            "virtual-machines"
        } else {
            "containers"
        };
        self.pool_directory(pool).join(folder).join(name)
    }

    fn pool_record(&self, name: &str) -> Result<StoragePoolRecord, DaemonError> {
        self.store.storage_pool(name).map_err(|error| match error {
            StoreError::NotFound { .. } => {
                DaemonError::BadRequest(format!("storage pool \"{name}\" does not exist"))
            }
            other => other.into(),
        })
    }

    /// The image directory an instance on `pool` runs a snapshot of: on a btrfs pool the
    /// pool's subvolume of the image (made at its first use), else the unpacked image.
    /// Blocks (call it from `blocking`).
    pub fn image_on_pool(&self, pool: &str, fingerprint: &str) -> Result<PathBuf, DaemonError> {
        let rootfs = self.image_rootfs(fingerprint);
        // A VM image has no rootfs to snapshot: its VMs' disks are made from its own disk.
        let machine_image =
            crate::images::machine::is_machine_image(rootfs.parent().unwrap_or(&rootfs));
        if machine_image || self.pool_record(pool)?.driver != "btrfs" {
            return Ok(rootfs);
        }
        let images = self.pool_directory(pool).join("images");
        Ok(make_image_subvolume(&rootfs, &images, fingerprint)?)
    }

    /// The instance's disk devices other than its root, as the container core takes them:
    /// a volume (`pool` + `source`) becomes its directory on the pool.
    pub fn disk_mounts(
        &self,
        devices: &BTreeMap<String, Device>,
    ) -> Result<Vec<BTreeMap<String, String>>, DaemonError> {
        let mut mounts = Vec::new();
        for (_, device) in extra_disks(devices) {
            let source = device.get("source").cloned().unwrap_or_default();
            let host_source = match device.get("pool") {
                Some(pool) => volumes::volume_directory(&self.pool_directory(pool), &source),
                None => PathBuf::from(&source),
            };
            let mut keys = BTreeMap::from([
                ("type".to_string(), "disk".to_string()),
                (
                    "source".to_string(),
                    host_source.to_string_lossy().into_owned(),
                ),
                (
                    "path".to_string(),
                    device.get("path").cloned().unwrap_or_default(),
                ),
            ]);
            if let Some(read_only) = device.get("readonly") {
                keys.insert("readonly".to_string(), read_only.clone());
            }
            mounts.push(keys);
        }
        Ok(mounts)
    }

    /// Checks that every pool and volume the expanded devices name exists, and that a host
    /// source does.
    pub fn validate_storage_devices(
        &self,
        devices: &BTreeMap<String, Device>,
    ) -> Result<(), DaemonError> {
        for (name, device) in devices {
            if device.get("type").map(String::as_str) != Some("disk") {
                continue;
            }
            let problem = |problem: String| config::ConfigError::Device {
                device: name.clone(),
                problem,
            };
            let is_root = device.get("path").map(String::as_str) == Some("/");
            if let Some(pool) = device.get("pool") {
                if let Err(StoreError::NotFound { .. }) = self.store.storage_pool(pool) {
                    return Err(problem(format!("storage pool \"{pool}\" does not exist")).into());
                }
                if !is_root {
                    let volume = device.get("source").cloned().unwrap_or_default();
                    if let Err(StoreError::NotFound { .. }) =
                        self.store.storage_volume(pool, &volume)
                    {
                        return Err(problem(format!(
                            "storage volume \"{volume}\" does not exist on pool \"{pool}\": \
                             create it with POST /1.0/storage-pools/{pool}/volumes/custom"
                        ))
                        .into());
                    }
                }
            } else if !is_root {
                let source = device.get("source").cloned().unwrap_or_default();
                if !Path::new(&source).exists() {
                    return Err(problem(format!(
                        "the host path \"{source}\" does not exist: create it first"
                    ))
                    .into());
                }
            }
        }
        Ok(())
    }

    /// The API paths of what uses the pool: instances on it or with a volume of it,
    /// profiles naming it, its custom volumes.
    pub fn pool_users(&self, pool: &str) -> Result<Vec<String>, DaemonError> {
        let layers = self.profile_layers()?;
        let mut users = Vec::new();
        for record in self.store.instances()? {
            let expanded = self.instance_view_with(
                &record,
                crate::instances::runtime::RuntimeStatus::Stopped,
                &layers,
            );
            let devices = &expanded.expanded_devices;
            if root_pool(devices) == pool
                || devices
                    .values()
                    .any(|device| device.get("pool").map(String::as_str) == Some(pool))
            {
                users.push(format!("/1.0/instances/{}", record.name));
            }
        }
        for profile in self.store.profiles()? {
            if profile
                .devices
                .values()
                .any(|device| device.get("pool").map(String::as_str) == Some(pool))
            {
                users.push(format!("/1.0/profiles/{}", profile.name));
            }
        }
        for volume in self.store.storage_volumes(pool)? {
            users.push(format!(
                "/1.0/storage-pools/{pool}/volumes/custom/{}",
                volume.name
            ));
        }
        Ok(users)
    }

    /// The instances and profiles with a disk device of the volume.
    pub fn volume_users(&self, pool: &str, volume: &str) -> Result<Vec<String>, DaemonError> {
        let uses = |devices: &BTreeMap<String, Device>| {
            extra_disks(devices).any(|(_, device)| {
                device.get("pool").map(String::as_str) == Some(pool)
                    && device.get("source").map(String::as_str) == Some(volume)
            })
        };
        let mut users = Vec::new();
        for record in self.store.instances()? {
            if uses(&record.devices) {
                users.push(format!("/1.0/instances/{}", record.name));
            }
        }
        for profile in self.store.profiles()? {
            if uses(&profile.devices) {
                users.push(format!("/1.0/profiles/{}", profile.name));
            }
        }
        Ok(users)
    }

    /// Refuses a change to an instance that would move it to another pool: its files stay
    /// where its first start made them.
    pub fn check_pool_kept(
        &self,
        before: &InstanceRecord,
        after: &InstanceRecord,
    ) -> Result<(), DaemonError> {
        let (_, old) = self.expand(&before.profiles, &before.config, &before.devices)?;
        let (_, new) = self.expand(&after.profiles, &after.config, &after.devices)?;
        moved(&before.name, &root_pool(&old), &root_pool(&new))
    }

    /// As [`Daemon::check_pool_kept`], for every instance using the profile as changed.
    pub fn check_pools_kept_with_profile(
        &self,
        profile: &crate::store::ProfileRecord,
    ) -> Result<(), DaemonError> {
        let layers = self.profile_layers()?;
        let mut changed = layers.clone();
        changed.insert(
            profile.name.clone(),
            (profile.config.clone(), profile.devices.clone()),
        );
        for record in self.store.instances()? {
            if !record.profiles.contains(&profile.name) {
                continue;
            }
            let expand = |layers: &std::collections::HashMap<String, config::Layer>| {
                let chosen: Vec<config::Layer> = record
                    .profiles
                    .iter()
                    .filter_map(|name| layers.get(name).cloned())
                    .collect();
                root_pool(&config::expand(&chosen, &record.config, &record.devices).1)
            };
            moved(&record.name, &expand(&layers), &expand(&changed))?;
        }
        Ok(())
    }

    /// At coved's start: mounts every recorded pool, and removes image subvolumes whose image
    /// is no longer recorded (a crash between an image's deletion and its subvolumes').
    pub fn prepare_pools(&self) {
        let Ok(pools) = self.store.storage_pools() else {
            return;
        };
        for pool in pools {
            if let Err(error) = pools::mount(&self.settings.directory, &pool.name, &pool.config) {
                self.events.warn(
                    "cannot mount a storage pool",
                    &[("pool", &pool.name), ("error", &error.to_string())],
                );
                continue;
            }
            let Ok(entries) = std::fs::read_dir(self.pool_directory(&pool.name).join("images"))
            else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let unrecorded =
                    matches!(self.store.image(&name), Err(StoreError::NotFound { .. }));
                if unrecorded {
                    self.events.warn(
                        "removing an image subvolume whose image is not recorded",
                        &[("pool", &pool.name), ("image", &name)],
                    );
                    let _ = remove_image_subvolume(&entry.path());
                }
            }
        }
    }

    /// Removes an image's subvolumes from every pool (when the image is deleted).
    pub fn remove_image_from_pools(&self, fingerprint: &str) {
        let Ok(pools) = self.store.storage_pools() else {
            return;
        };
        for pool in pools {
            let path = self
                .pool_directory(&pool.name)
                .join("images")
                .join(fingerprint);
            if let Err(error) = remove_image_subvolume(&path) {
                self.events.warn(
                    "cannot remove an image's subvolume",
                    &[("pool", &pool.name), ("error", &error.to_string())],
                );
            }
        }
    }
}
