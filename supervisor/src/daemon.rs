//! The daemon's shared state and its instance logic: settings and paths under `$COVE_DIR`,
//! the store, the runtime, operations and events, and what happens at coved's start (finding
//! running instances again, finishing acknowledged starts, autostart).
//!
//! Request handlers (`crate::server`) parse and answer; the rules about instances (what may
//! change while running, the order of store and runtime steps that keeps a crash harmless)
//! live here.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::types::{self, Device, StatusCode};
use crate::clock;
use crate::events::Events;
use crate::instances::config::{self, ConfigError};
use crate::instances::runtime::{LaunchSpec, Runtime, RuntimeError, RuntimeState, RuntimeStatus};
use crate::operations::Operations;
use crate::store::{InstanceRecord, Power, ProfileRecord, StoragePoolRecord, Store, StoreError};

/// The API extensions coved implements (those `lxc` and pylxd check for).
pub const API_EXTENSIONS: &[&str] = &[
    "storage",
    "etag",
    "patch",
    "network",
    "profile_usedby",
    "container_stop_priority",
    "container_exec_recording",
    "container_exec_user_group_cwd",
    "container_full",
    "container_syscall_filtering",
    "file_delete",
    "file_append",
    "directory_manipulation",
    "container_push",
    "id_map",
    "image_create_aliases",
    "instances",
    "instance_create_start",
    "exec_control_request",
    "console_log",
    "operation_wait",
    "storage_api_local_volume_handling",
    "network_state",
    "resources",
    "resources_v2",
    "network_leases",
    "instance_nic_network",
    "api_filtering",
    "console",
    "container_backup",
    "instance_all_projects",
];

/// How coved was asked to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `$COVE_DIR`.
    pub directory: PathBuf,
    /// The group the socket is given (mode 0660), if any.
    pub socket_group: Option<String>,
    /// The cgroup parent of every container.
    pub cgroup_parent: String,
    /// The largest image upload accepted, in bytes.
    pub max_image_size: u64,
}

impl Settings {
    pub fn socket(&self) -> PathBuf {
        self.directory.join("unix.socket")
    }
    pub fn database(&self) -> PathBuf {
        self.directory.join("cove.db")
    }
    pub fn images(&self) -> PathBuf {
        self.directory.join("images")
    }
    /// Where uploads and unpacking are staged (same file system as `images/`).
    pub fn staging(&self) -> PathBuf {
        self.directory.join("images").join(".staging")
    }
    /// The `default` dir pool: containers' directories (snapshots, console logs).
    pub fn containers(&self) -> PathBuf {
        self.directory
            .join("storage-pools")
            .join("default")
            .join("containers")
    }
    /// Monitors' run directories.
    pub fn run(&self) -> PathBuf {
        self.directory.join("run")
    }
    /// Per-instance logs (recorded exec output).
    pub fn logs(&self) -> PathBuf {
        self.directory.join("logs")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

impl DaemonError {
    /// The HTTP status LXD would answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Store(StoreError::NotFound { .. }) | Self::NotFound(_) => 404,
            Self::Store(StoreError::AlreadyExists { .. }) | Self::Conflict(_) => 409,
            Self::Config(_) | Self::BadRequest(_) => 400,
            Self::Runtime(RuntimeError::NotRunning(_) | RuntimeError::AlreadyRunning(_)) => 400,
            _ => 500,
        }
    }
}

/// Everything the request handlers share.
pub struct Daemon {
    pub settings: Settings,
    pub store: Store,
    pub runtime: Arc<dyn Runtime>,
    pub operations: Arc<Operations>,
    pub events: Events,
    /// The managed networks' dnsmasq watches.
    pub networks: crate::networks::Networks,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Daemon")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

pub fn instance_url(name: &str) -> String {
    format!("/1.0/instances/{name}")
}

/// Runs blocking work (runtime calls, file system walks) off the async threads.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DaemonError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| DaemonError::Internal(format!("a background task failed: {error}")))
}

impl Daemon {
    /// Opens the store (creating the default profile and storage pool on first start) and
    /// prepares `$COVE_DIR`.
    pub fn open(settings: Settings, runtime: Arc<dyn Runtime>) -> Result<Self, DaemonError> {
        for directory in [
            settings.directory.clone(),
            settings.images(),
            settings.containers(),
            settings.run(),
            settings.logs(),
        ] {
            std::fs::create_dir_all(&directory).map_err(|error| {
                DaemonError::Internal(format!("cannot create {}: {error}", directory.display()))
            })?;
        }
        // Uploads and unpacking cut short by a crash.
        let _ = std::fs::remove_dir_all(settings.staging());
        let store = Store::open(&settings.database())?;
        let events = Events::new();
        let daemon = Self {
            networks: crate::networks::Networks::new(&settings.directory.join("networks")),
            operations: Arc::new(Operations::new(events.clone())),
            events,
            store,
            runtime,
            settings,
            locks: Mutex::new(HashMap::new()),
        };
        daemon.ensure_defaults()?;
        daemon.prepare_pools();
        daemon.remove_unrecorded_images();
        daemon.check_reachable();
        Ok(daemon)
    }

    fn ensure_defaults(&self) -> Result<(), DaemonError> {
        match self.store.storage_pool("default") {
            Err(StoreError::NotFound { .. }) => {
                let source = self
                    .settings
                    .directory
                    .join("storage-pools")
                    .join("default");
                let pool = StoragePoolRecord {
                    name: "default".into(),
                    driver: "dir".into(),
                    description: "The default storage pool".into(),
                    config: BTreeMap::from([(
                        "source".to_string(),
                        source.to_string_lossy().into_owned(),
                    )]),
                };
                match self.store.create_storage_pool(&pool) {
                    Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
                    Err(error) => return Err(error.into()),
                }
            }
            result => {
                result?;
            }
        }
        match self.store.profile("default") {
            Err(StoreError::NotFound { .. }) => {
                let root: Device = BTreeMap::from([
                    ("type".to_string(), "disk".to_string()),
                    ("path".to_string(), "/".to_string()),
                    ("pool".to_string(), "default".to_string()),
                ]);
                let profile = ProfileRecord {
                    name: "default".into(),
                    description: "Default cove profile".into(),
                    config: BTreeMap::new(),
                    devices: BTreeMap::from([("root".to_string(), root)]),
                };
                match self.store.create_profile(&profile) {
                    Ok(()) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
                    Err(error) => Err(error.into()),
                }
            }
            result => result.map(drop).map_err(Into::into),
        }
    }

    /// An unprivileged container's root (a mapped uid, not host root) must be able to reach its
    /// snapshot: every directory above it must let others through (mode o+x).
    fn check_reachable(&self) {
        use std::os::unix::fs::PermissionsExt;
        for directory in self.settings.containers().ancestors() {
            if let Ok(metadata) = std::fs::metadata(directory) {
                if metadata.permissions().mode() & 0o001 == 0 {
                    let path = directory.display().to_string();
                    self.events.warn(
                        "unprivileged containers cannot reach their root through this directory \
                         (no o+x): chmod o+x it, or start them privileged",
                        &[("directory", &path)],
                    );
                }
            }
        }
    }

    /// Image directories whose row never committed (a crash between unpacking and the
    /// insert).
    fn remove_unrecorded_images(&self) {
        let Ok(entries) = std::fs::read_dir(self.settings.images()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if let Err(StoreError::NotFound { .. }) = self.store.image(&name) {
                self.events.warn(
                    "removing an image that was never recorded",
                    &[("fingerprint", &name)],
                );
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// The lock that serializes changes to one instance.
    pub fn instance_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// The image's unpacked rootfs.
    pub fn image_rootfs(&self, fingerprint: &str) -> PathBuf {
        crate::images::image_directory(&self.settings.images(), fingerprint).join("rootfs")
    }

    /// The instance's expanded config and devices (profiles, then its own).
    pub fn expand(
        &self,
        profiles: &[String],
        config: &BTreeMap<String, String>,
        devices: &BTreeMap<String, Device>,
    ) -> Result<config::Layer, DaemonError> {
        let mut layers = Vec::new();
        for name in profiles {
            let profile = self.store.profile(name).map_err(|error| match error {
                StoreError::NotFound { .. } => {
                    DaemonError::BadRequest(format!("profile \"{name}\" does not exist"))
                }
                other => other.into(),
            })?;
            layers.push((profile.config, profile.devices));
        }
        Ok(config::expand(&layers, config, devices))
    }

    /// Checks a would-be instance definition: keys, devices, and the container core's view of
    /// the expanded config with its image.
    pub fn validate_definition(
        &self,
        name: &str,
        image: &str,
        profiles: &[String],
        config_keys: &BTreeMap<String, String>,
        devices: &BTreeMap<String, Device>,
    ) -> Result<(), DaemonError> {
        config::validate_keys(config_keys)?;
        config::validate_devices(devices)?;
        let (expanded, expanded_devices) = self.expand(profiles, config_keys, devices)?;
        config::validate_keys(&expanded)?;
        config::validate_expanded_devices(&expanded_devices)?;
        self.validate_storage_devices(&expanded_devices)?;
        self.validate_network_nics(name, &expanded_devices)?;
        let rootfs = self.image_rootfs(image);
        // A VM image has a disk, not a rootfs: only VMs are made from it.
        if !crate::images::machine::is_machine_image(rootfs.parent().unwrap_or(&rootfs)) {
            config::validate_for_container(name, &rootfs, &expanded)?;
        }
        Ok(())
    }

    /// The host ids the instance's uid 0 and gid 0 map to (0 when privileged).
    pub fn id_base(&self, expanded: &BTreeMap<String, String>) -> Result<(u32, u32), DaemonError> {
        if config::truthy(expanded.get("security.privileged")) {
            return Ok((0, 0));
        }
        if let Some(base) = expanded
            .get("security.idmap.base")
            .and_then(|value| value.trim().parse().ok())
        {
            return Ok((base, base));
        }
        let map = cove_shim::IdMap::for_host()
            .map_err(|error| DaemonError::Internal(format!("cannot read the id map: {error}")))?;
        Ok((map.uid.host_base, map.gid.host_base))
    }

    pub fn status_of(&self, name: &str) -> RuntimeStatus {
        self.runtime.status(name)
    }

    /// The API view of an instance.
    pub fn instance_view(
        &self,
        record: &InstanceRecord,
        status: RuntimeStatus,
    ) -> Result<types::Instance, DaemonError> {
        let expanded = self.expand(&record.profiles, &record.config, &record.devices)?;
        Ok(view(record, status, expanded))
    }

    /// Every profile's layer, read once for the views of many instances.
    pub fn profile_layers(&self) -> Result<HashMap<String, config::Layer>, DaemonError> {
        Ok(self
            .store
            .profiles()?
            .into_iter()
            .map(|profile| (profile.name, (profile.config, profile.devices)))
            .collect())
    }

    /// As [`Daemon::instance_view`], with the profiles already read.
    pub fn instance_view_with(
        &self,
        record: &InstanceRecord,
        status: RuntimeStatus,
        profiles: &HashMap<String, config::Layer>,
    ) -> types::Instance {
        let layers: Vec<config::Layer> = record
            .profiles
            .iter()
            .filter_map(|name| profiles.get(name).cloned())
            .collect();
        view(
            record,
            status,
            config::expand(&layers, &record.config, &record.devices),
        )
    }

    /// Starts an instance whose lock the caller holds.
    pub async fn start_locked(self: &Arc<Self>, name: &str) -> Result<(), DaemonError> {
        let record = self.store.instance(name)?;
        let (expanded, devices) = self.expand(&record.profiles, &record.config, &record.devices)?;
        let pool = crate::storage::placement::root_pool(&devices);
        let directory = self.instance_directory_on(&pool, &record.kind, name);
        let daemon = self.clone();
        let image = record.image.clone();
        let rootfs = blocking(move || daemon.image_on_pool(&pool, &image)).await??;
        let spec = LaunchSpec {
            name: name.to_string(),
            directory,
            rootfs,
            keys: if record.kind == "virtual-machine" {
                crate::instances::vm_launch::launch_keys(&expanded)
            } else {
                config::container_keys(&expanded)
            },
            nic: config::nic_device(name, &devices),
            disks: self.disk_mounts(&devices)?,
        };
        self.store.set_power(name, Power::Running, &clock::now())?;
        self.refresh_network_hosts();
        let runtime = self.runtime.clone();
        match blocking(move || match runtime.status(&spec.name) {
            RuntimeStatus::Stopped => runtime.start(&spec),
            _ => Ok(()),
        })
        .await?
        {
            Ok(()) => {
                self.events
                    .lifecycle("instance-started", &instance_url(name), BTreeMap::new());
                Ok(())
            }
            Err(error) => {
                // A start that a killed coved left running may have won the race.
                if self.runtime.status(name) != RuntimeStatus::Stopped {
                    return Ok(());
                }
                // What failed to start is not running: do not try again at the next boot.
                let _ = self.store.set_power(name, Power::Stopped, &clock::now());
                Err(error.into())
            }
        }
    }

    /// Stops an instance whose lock the caller holds; deletes it if ephemeral.
    pub async fn stop_locked(
        self: &Arc<Self>,
        name: &str,
        timeout: Duration,
    ) -> Result<(), DaemonError> {
        let record = self.store.instance(name)?;
        self.store.set_power(name, Power::Stopped, &clock::now())?;
        let runtime = self.runtime.clone();
        let owned = name.to_string();
        blocking(move || match runtime.status(&owned) {
            RuntimeStatus::Stopped => Ok(()),
            _ => runtime.stop(&owned, timeout),
        })
        .await??;
        self.events
            .lifecycle("instance-stopped", &instance_url(name), BTreeMap::new());
        if record.ephemeral {
            self.delete_locked(name).await?;
        }
        Ok(())
    }

    /// Deletes a stopped instance whose lock the caller holds: the runtime's files first, then
    /// the row, so that a crash in between leaves a stopped instance, not an orphan.
    pub async fn delete_locked(self: &Arc<Self>, name: &str) -> Result<(), DaemonError> {
        let directory = self.instance_directory(&self.store.instance(name)?)?;
        let runtime = self.runtime.clone();
        let owned = name.to_string();
        blocking(move || {
            if runtime.status(&owned) != RuntimeStatus::Stopped {
                return Err(RuntimeError::Failed(format!(
                    "instance \"{owned}\" is running: stop it before deleting it"
                )));
            }
            // Snapshots first: a btrfs one is a read-only subvolume that only a subvolume
            // delete removes.
            crate::instances::layers::remove_all_snapshots(&directory)
                .map_err(|error| RuntimeError::Failed(error.to_string()))?;
            runtime.delete(&owned, &directory)
        })
        .await??;
        self.store.delete_instance(name)?;
        self.refresh_network_hosts();
        let _ = std::fs::remove_dir_all(self.settings.logs().join(name));
        self.events
            .lifecycle("instance-deleted", &instance_url(name), BTreeMap::new());
        Ok(())
    }

    pub async fn full_state(&self, name: &str) -> Result<RuntimeState, DaemonError> {
        let runtime = self.runtime.clone();
        let owned = name.to_string();
        blocking(move || runtime.state(&owned)).await
    }

    /// At coved's start: re-attach to what runs, finish acknowledged starts, autostart, clean
    /// up. Runs in the background; each instance under its lock.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), DaemonError> {
        let daemon = self.clone();
        blocking(move || daemon.remove_unrecorded_snapshots()).await?;
        let daemon = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(60));
            loop {
                ticks.tick().await;
                daemon.prune_expired_snapshots().await;
            }
        });
        let records = self.store.instances()?;
        let runtime = self.runtime.clone();
        let running = blocking(move || runtime.running()).await?;
        for name in &running {
            if !records.iter().any(|record| &record.name == name) {
                self.events.warn(
                    "stopping a container that no instance owns",
                    &[("instance", name)],
                );
                let runtime = self.runtime.clone();
                let owned = name.clone();
                // No record says which pool it was on: the first pool holding its directory.
                let directory = self
                    .store
                    .storage_pools()?
                    .iter()
                    .map(|pool| self.instance_directory_on(&pool.name, "container", name))
                    .find(|directory| directory.exists())
                    .unwrap_or_else(|| self.instance_directory_on("default", "container", name));
                let _ = blocking(move || {
                    let _ = runtime.stop(&owned, Duration::ZERO);
                    runtime.delete(&owned, &directory)
                })
                .await;
            }
        }
        let mut starts = Vec::new();
        for record in records {
            let status = self.status_of(&record.name);
            let (expanded, _) = self
                .expand(&record.profiles, &record.config, &record.devices)
                .unwrap_or_default();
            let wanted = match expanded.get("boot.autostart") {
                Some(_) => config::truthy(expanded.get("boot.autostart")),
                None => record.power == Power::Running,
            };
            if status != RuntimeStatus::Stopped {
                self.events
                    .info("found running instance", &[("instance", &record.name)]);
                continue;
            }
            if record.ephemeral && !wanted {
                let lock = self.instance_lock(&record.name);
                let _guard = lock.lock().await;
                let _ = self.delete_locked(&record.name).await;
                continue;
            }
            if wanted {
                starts.push(record.name.clone());
            }
        }
        for name in starts {
            let daemon = self.clone();
            tokio::spawn(async move {
                let lock = daemon.instance_lock(&name);
                let _guard = lock.lock().await;
                match daemon.start_locked(&name).await {
                    Ok(()) => daemon
                        .events
                        .info("started instance at boot", &[("instance", &name)]),
                    Err(error) => daemon.events.warn(
                        "cannot start instance at boot",
                        &[("instance", &name), ("error", &error.to_string())],
                    ),
                }
            });
        }
        Ok(())
    }
}

/// The API view of an instance record with its expanded config and devices.
fn view(
    record: &InstanceRecord,
    status: RuntimeStatus,
    expanded: config::Layer,
) -> types::Instance {
    let code = status_code(status);
    types::Instance {
        name: record.name.clone(),
        description: record.description.clone(),
        architecture: record.architecture.clone(),
        config: record.config.clone(),
        devices: record.devices.clone(),
        ephemeral: record.ephemeral,
        profiles: record.profiles.clone(),
        stateful: false,
        created_at: record.created_at.clone(),
        expanded_config: expanded.0,
        expanded_devices: expanded.1,
        status: code.text().to_string(),
        status_code: code.code(),
        last_used_at: record.last_used_at.clone(),
        location: "none".to_string(),
        kind: record.kind.clone(),
        project: "default".to_string(),
    }
}

/// LXD's status code for an instance's runtime status.
pub fn status_code(status: RuntimeStatus) -> StatusCode {
    match status {
        RuntimeStatus::Stopped => StatusCode::Stopped,
        RuntimeStatus::Starting => StatusCode::Starting,
        RuntimeStatus::Running => StatusCode::Running,
        RuntimeStatus::Frozen => StatusCode::Frozen,
    }
}

/// The API view of a runtime state.
pub fn state_view(state: &RuntimeState) -> types::InstanceState {
    let code = status_code(state.status);
    types::InstanceState {
        status: code.text().to_string(),
        status_code: code.code(),
        disk: BTreeMap::new(),
        memory: types::InstanceStateMemory {
            usage: state.memory_bytes.unwrap_or(0) as i64,
            ..Default::default()
        },
        network: network_view(&state.addresses),
        pid: state.init_pid.map_or(-1, i64::from),
        processes: state.processes.map_or(-1, |count| count as i64),
        cpu: types::InstanceStateCpu {
            usage: state.cpu_time_ns.unwrap_or(0) as i64,
        },
    }
}

/// LXD's `state.network`: each interface inside with its addresses (`lxc list` shows the
/// `inet` ones of every interface but `lo`).
fn network_view(addresses: &[cove_shim::InterfaceAddress]) -> BTreeMap<String, Value> {
    let mut network: BTreeMap<String, Value> = BTreeMap::new();
    for address in addresses {
        let family = match address.family {
            cove_shim::AddressFamily::Inet => "inet",
            cove_shim::AddressFamily::Inet6 => "inet6",
        };
        let scope = if address.address.is_loopback() {
            "local"
        } else {
            "global"
        };
        let entry = network.entry(address.interface.clone()).or_insert_with(|| {
            json!({
                "addresses": [],
                "counters": {},
                "hwaddr": "",
                "host_name": "",
                "mtu": 0,
                "state": "up",
                "type": if address.interface == "lo" { "loopback" } else { "broadcast" },
            })
        });
        if let Some(list) = entry["addresses"].as_array_mut() {
            list.push(json!({
                "family": family,
                "address": address.address.to_string(),
                "netmask": address.prefix.to_string(),
                "scope": scope,
            }));
        }
    }
    network
}

/// The lifecycle context LXD attaches to some events.
pub fn context(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.clone()))
        .collect()
}

/// True if `path` exists as anything, even a dangling link.
pub fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}
