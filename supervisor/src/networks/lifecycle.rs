//! The daemon's rules for managed networks: create (nothing left behind when it fails),
//! change, delete (refused while in use), realise at coved's start, the default network of
//! the first start, static addresses on nics, and dnsmasq's hosts file, kept from the
//! instances (and the hosts registered for virtual machines).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::config::{self, NetworkConfig};
use super::dnsmasq::{self, HostEntry};
use super::host::{self, InUse};
use super::{validate_name, NetworkError, Networks, Watch};
use crate::api::types::Device;
use crate::daemon::{Daemon, DaemonError};
use crate::events::Events;
use crate::instances::config as instance_config;
use crate::store::{NetworkRecord, StoreError};

/// An instance's nic on a managed network.
struct NetworkNic {
    instance: String,
    /// The device's name.
    device: String,
    /// The MAC address the nic gets (the one coved makes when the device has none).
    hwaddr: String,
    /// Its `ipv4.address`, a static address.
    address: Option<Ipv4Addr>,
}

/// The longest wait between two restarts of a dnsmasq that keeps dying.
const MOST_RESTART_DELAY: Duration = Duration::from_secs(30);

fn is_nic(device: &Device) -> bool {
    device.get("type").map(String::as_str) == Some("nic")
}

/// The network (or bridge) a device's nic joins: `network`, or a bridged nic's `parent` (what
/// clients send for a network when the server does not announce `instance_nic_network`).
fn nic_network(device: &Device) -> Option<&str> {
    if !is_nic(device) {
        return None;
    }
    device
        .get("network")
        .or(device.get("parent"))
        .map(String::as_str)
}

/// Keeps the watched dnsmasq running: waits for it to exit, then starts it again (waiting a
/// little longer each time it dies young).
async fn watch(
    name: String,
    files: dnsmasq::Files,
    arguments: Vec<String>,
    pid: Arc<AtomicU32>,
    events: Events,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        dnsmasq::wait_exit(pid.load(Ordering::SeqCst)).await;
        pid.store(0, Ordering::SeqCst);
        events.warn("dnsmasq exited: restarting it", &[("network", &name)]);
        if started.elapsed() > Duration::from_secs(60) {
            delay = Duration::from_millis(200);
        }
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MOST_RESTART_DELAY);
            match dnsmasq::spawn(&files, &arguments) {
                Ok(new_pid) => {
                    pid.store(new_pid, Ordering::SeqCst);
                    events.info("dnsmasq restarted", &[("network", &name)]);
                    break;
                }
                Err(error) => events.warn(
                    "cannot restart dnsmasq",
                    &[("network", &name), ("error", &error.to_string())],
                ),
            }
        }
    }
}

impl Networks {
    /// Starts watching the network's dnsmasq: the one already running with the same command
    /// line (left by an earlier coved), else a new one.
    fn watch(
        &self,
        name: &str,
        config: &NetworkConfig,
        events: &Events,
    ) -> Result<(), NetworkError> {
        self.unwatch(name);
        let files = self.files(name);
        let arguments = dnsmasq::arguments(name, config, &files);
        let pid = match dnsmasq::running(name, &files, &arguments) {
            Some((pid, true)) => pid,
            Some((pid, false)) => {
                dnsmasq::stop(&files, pid);
                dnsmasq::spawn(&files, &arguments)?
            }
            None => dnsmasq::spawn(&files, &arguments)?,
        };
        let cell = Arc::new(AtomicU32::new(pid));
        let task = tokio::spawn(watch(
            name.to_string(),
            files,
            arguments,
            cell.clone(),
            events.clone(),
        ));
        self.watches()
            .insert(name.to_string(), Watch { task, pid: cell });
        Ok(())
    }

    /// Stops watching (the dnsmasq keeps running).
    fn unwatch(&self, name: &str) {
        if let Some(watch) = self.watches().remove(name) {
            watch.task.abort();
        }
    }

    /// Stops the network's dnsmasq and removes its bridge, NAT table and files.
    fn tear_down(&self, name: &str) -> Result<(), NetworkError> {
        self.unwatch(name);
        let files = self.files(name);
        if let Some((pid, _)) = dnsmasq::running(name, &files, &[]) {
            dnsmasq::stop(&files, pid);
        }
        // Every step is tried, whatever failed before it: a NAT table that cannot be removed
        // (nft missing) must not leave the bridge behind.
        let nat = host::remove_nat(name);
        let bridge = host::remove_bridge(name);
        let _ = std::fs::remove_dir_all(&files.directory);
        nat.and(bridge)
    }
}

impl Daemon {
    /// At coved's start, before instances start: the default network on the first start
    /// (`default_network`: its name, or none), then every network realised (idempotently; a
    /// dnsmasq left running is found again).
    pub fn start_networks(&self, default_network: Option<&str>) {
        if let Err(error) = self.make_default_network(default_network) {
            self.events.warn(
                "cannot make the default network",
                &[("error", &error.to_string())],
            );
        }
        let records = match self.store.networks() {
            Ok(records) => records,
            Err(error) => {
                self.events
                    .warn("cannot read the networks", &[("error", &error.to_string())]);
                return;
            }
        };
        for record in records {
            if let Err(error) = self.realise_network(&record) {
                self.events.warn(
                    "cannot set up network",
                    &[("network", &record.name), ("error", &error.to_string())],
                );
            }
        }
    }

    fn make_default_network(&self, name: Option<&str>) -> Result<(), DaemonError> {
        if !self.store.default_network_pending()? {
            return Ok(());
        }
        if let Some(name) = name {
            match self.store.network(name) {
                Ok(_) => {}
                Err(StoreError::NotFound { .. }) => {
                    let config = BTreeMap::from([("ipv4.address".to_string(), "auto".to_string())]);
                    self.create_network(name, "", "bridge", config)?;
                }
                Err(error) => return Err(error.into()),
            }
            let mut profile = self.store.profile("default")?;
            if !profile.devices.values().any(is_nic) && !profile.devices.contains_key("eth0") {
                profile.devices.insert(
                    "eth0".to_string(),
                    BTreeMap::from([
                        ("type".to_string(), "nic".to_string()),
                        ("network".to_string(), name.to_string()),
                        ("name".to_string(), "eth0".to_string()),
                    ]),
                );
                self.store.update_profile(&profile)?;
            }
        }
        self.store.clear_default_network_mark()?;
        Ok(())
    }

    /// Subnets the network may not overlap: the namespace's routes and addresses (but those
    /// of its own bridge) and the other managed networks.
    fn subnets_in_use(&self, name: &str) -> Result<Vec<InUse>, NetworkError> {
        let mut used = host::subnets_in_use(name)?;
        for record in self.store.networks()? {
            if record.name == name {
                continue;
            }
            if let Ok(other) = config::parse(&record.config) {
                used.push(InUse {
                    subnet: other.subnet,
                    what: format!("network \"{}\"", record.name),
                });
            }
        }
        Ok(used)
    }

    /// Resolves `ipv4.address=auto` (or no address), fills LXD's defaults, and checks the
    /// config and that its subnet is free.
    fn settle_config(
        &self,
        name: &str,
        config: &mut BTreeMap<String, String>,
    ) -> Result<NetworkConfig, NetworkError> {
        config.retain(|_, value| !value.is_empty());
        let used = self.subnets_in_use(name)?;
        if config
            .get("ipv4.address")
            .is_none_or(|value| value == "auto")
        {
            let subnets: Vec<_> = used.iter().map(|in_use| in_use.subnet).collect();
            let subnet = config::choose_subnet(&subnets, config::random_bits)
                .ok_or(NetworkError::NoFreeSubnet)?;
            let gateway = Ipv4Addr::from(u32::from(subnet.base) + 1);
            config.insert("ipv4.address".into(), format!("{gateway}/24"));
            config
                .entry("ipv4.nat".into())
                .or_insert_with(|| "true".into());
        }
        config
            .entry("ipv6.address".into())
            .or_insert_with(|| "none".into());
        let parsed = config::parse(config)?;
        if let Some(in_use) = used
            .iter()
            .find(|in_use| in_use.subnet.overlaps(&parsed.subnet))
        {
            return Err(NetworkError::Overlap {
                subnet: parsed.subnet.to_string(),
                what: in_use.what.clone(),
            });
        }
        Ok(parsed)
    }

    /// Creates and realises a managed network; when any step fails, whatever was made is
    /// removed again and the row with it.
    pub fn create_network(
        &self,
        name: &str,
        description: &str,
        kind: &str,
        mut config: BTreeMap<String, String>,
    ) -> Result<(), DaemonError> {
        let _changes = self.networks.changes();
        validate_name(name)?;
        if !kind.is_empty() && kind != "bridge" {
            return Err(NetworkError::Kind(kind.to_string()).into());
        }
        match self.store.network(name) {
            Ok(_) => {
                return Err(StoreError::AlreadyExists {
                    kind: "network",
                    name: name.to_string(),
                }
                .into())
            }
            Err(StoreError::NotFound { .. }) => {}
            Err(error) => return Err(error.into()),
        }
        if host::interface_exists(name) {
            return Err(NetworkError::InterfaceExists(name.to_string()).into());
        }
        self.settle_config(name, &mut config)?;
        let record = NetworkRecord {
            name: name.to_string(),
            description: description.to_string(),
            config,
        };
        self.store.create_network(&record)?;
        if let Err(error) = self.realise_network(&record) {
            let _ = self.networks.tear_down(name);
            let _ = self.store.delete_network(name);
            return Err(error.into());
        }
        self.events.lifecycle(
            "network-created",
            &format!("/1.0/networks/{name}"),
            BTreeMap::new(),
        );
        Ok(())
    }

    /// The bridge, its NAT table, the hosts file and the watched dnsmasq.
    fn realise_network(&self, record: &NetworkRecord) -> Result<(), NetworkError> {
        let config = config::parse(&record.config)?;
        host::ensure_bridge(&record.name, &config)?;
        host::apply_nat(&record.name, &config)?;
        self.write_network_hosts(&record.name)?;
        self.networks.watch(&record.name, &config, &self.events)
    }

    /// Replaces a network's description and config (`patch`: merges the config, a key set to
    /// `""` is removed), checked as at creation, and applies it.
    pub fn update_network(
        &self,
        name: &str,
        description: Option<String>,
        config: Option<BTreeMap<String, String>>,
        patch: bool,
    ) -> Result<(), DaemonError> {
        let _changes = self.networks.changes();
        let mut record = self.store.network(name)?;
        if let Some(description) = description {
            record.description = description;
        }
        match (config, patch) {
            (Some(config), true) => record.config.extend(config),
            (Some(config), false) => record.config = config,
            (None, false) => record.config.clear(),
            (None, true) => {}
        }
        let parsed = self.settle_config(name, &mut record.config)?;
        for nic in self.network_nics(name)? {
            let (instance, Some(address)) = (&nic.instance, nic.address) else {
                continue;
            };
            if !parsed.subnet.contains(address) || address == parsed.gateway {
                return Err(NetworkError::Nic {
                    device: nic.device,
                    problem: format!(
                        "instance \"{instance}\" has ipv4.address {address}, outside the new \
                         subnet {} or on its gateway: change it first",
                        parsed.subnet
                    ),
                }
                .into());
            }
        }
        self.store.update_network(&record)?;
        self.realise_network(&record)?;
        self.events.lifecycle(
            "network-updated",
            &format!("/1.0/networks/{name}"),
            BTreeMap::new(),
        );
        Ok(())
    }

    /// Deletes a network nothing uses: its dnsmasq, NAT table, bridge, files, then its row.
    pub fn delete_network(&self, name: &str) -> Result<(), DaemonError> {
        let _changes = self.networks.changes();
        self.store.network(name)?;
        let users = self.network_used_by(name)?;
        if !users.is_empty() {
            return Err(NetworkError::InUse {
                name: name.to_string(),
                users: users.join(", "),
            }
            .into());
        }
        self.networks.tear_down(name)?;
        self.store.delete_network(name)?;
        self.events.lifecycle(
            "network-deleted",
            &format!("/1.0/networks/{name}"),
            BTreeMap::new(),
        );
        Ok(())
    }

    /// LXD's `used_by`: the profiles and instances (by their expanded devices) with a nic on
    /// the network.
    pub fn network_used_by(&self, name: &str) -> Result<Vec<String>, DaemonError> {
        let mut users = Vec::new();
        let layers = self.profile_layers()?;
        let mut profiles: Vec<_> = layers.iter().collect();
        profiles.sort_by(|a, b| a.0.cmp(b.0));
        for (profile, (_, devices)) in profiles {
            if devices
                .values()
                .any(|device| nic_network(device) == Some(name))
            {
                users.push(format!("/1.0/profiles/{profile}"));
            }
        }
        for record in self.store.instances()? {
            let layers: Vec<_> = record
                .profiles
                .iter()
                .filter_map(|profile| layers.get(profile).cloned())
                .collect();
            let (_, devices) = instance_config::expand(&layers, &record.config, &record.devices);
            if devices
                .values()
                .any(|device| nic_network(device) == Some(name))
            {
                users.push(format!("/1.0/instances/{}", record.name));
            }
        }
        Ok(users)
    }

    /// Each instance's nic on the network.
    fn network_nics(&self, name: &str) -> Result<Vec<NetworkNic>, DaemonError> {
        let layers = self.profile_layers()?;
        let mut nics = Vec::new();
        for record in self.store.instances()? {
            let profile_layers: Vec<_> = record
                .profiles
                .iter()
                .filter_map(|profile| layers.get(profile).cloned())
                .collect();
            let (_, devices) =
                instance_config::expand(&profile_layers, &record.config, &record.devices);
            let Some((device_name, device)) = devices
                .iter()
                .find(|(_, device)| nic_network(device) == Some(name))
            else {
                continue;
            };
            let hwaddr = instance_config::nic_device(&record.name, &devices)
                .and_then(|keys| keys.get("hwaddr").cloned())
                .unwrap_or_default();
            nics.push(NetworkNic {
                device: device_name.clone(),
                hwaddr,
                address: device
                    .get("ipv4.address")
                    .and_then(|text| text.trim().parse().ok()),
                instance: record.name,
            });
        }
        Ok(nics)
    }

    /// Who holds the static address `address` on the network, but `except` (an instance
    /// being checked, or a host being registered): an instance, or a registered host.
    fn static_address_holder(
        &self,
        name: &str,
        address: Ipv4Addr,
        except: &str,
    ) -> Result<Option<String>, DaemonError> {
        if let Some(nic) = self
            .network_nics(name)?
            .into_iter()
            .find(|nic| nic.instance != except && nic.address == Some(address))
        {
            return Ok(Some(format!("instance \"{}\"'s", nic.instance)));
        }
        Ok(self
            .networks
            .registered(name)
            .into_iter()
            .find(|entry| entry.name != except && entry.address == Some(address))
            .map(|entry| format!("host \"{}\"'s", entry.name)))
    }

    /// Checks the nics of a would-be instance: `ipv4.address` only on a managed network,
    /// inside its subnet, not its gateway, and no other instance's.
    pub fn validate_network_nics(
        &self,
        instance: &str,
        devices: &BTreeMap<String, Device>,
    ) -> Result<(), DaemonError> {
        for (device_name, device) in devices.iter().filter(|(_, device)| is_nic(device)) {
            let Some(text) = device.get("ipv4.address") else {
                continue;
            };
            let problem = |problem: String| NetworkError::Nic {
                device: device_name.clone(),
                problem,
            };
            let record = match nic_network(device).map(|network| self.store.network(network)) {
                Some(Ok(record)) => record,
                Some(Err(StoreError::NotFound { .. })) | None => {
                    return Err(problem(
                        "ipv4.address needs the nic on a managed network (network: NAME, \
                         such as covebr0)"
                            .into(),
                    )
                    .into())
                }
                Some(Err(error)) => return Err(error.into()),
            };
            let network = config::parse(&record.config)?;
            let address: Ipv4Addr = text.trim().parse().map_err(|_| {
                problem(format!(
                    "ipv4.address \"{text}\" is not an IPv4 address, such as 10.0.3.10"
                ))
            })?;
            if !network.subnet.contains(address)
                || address == network.subnet.base
                || address == network.subnet.last()
                || address == network.gateway
            {
                return Err(problem(format!(
                    "ipv4.address {address} is not a free host address of network \"{}\" \
                     ({}, gateway {})",
                    record.name, network.subnet, network.gateway
                ))
                .into());
            }
            if let Some(holder) = self.static_address_holder(&record.name, address, instance)? {
                return Err(problem(format!("ipv4.address {address} is already {holder}")).into());
            }
        }
        Ok(())
    }

    /// Rewrites the network's hosts file from its instances and registered hosts.
    fn write_network_hosts(&self, name: &str) -> Result<bool, NetworkError> {
        let nics = self
            .network_nics(name)
            .map_err(|error| NetworkError::Host {
                command: "reading the instances".into(),
                message: error.to_string(),
            })?;
        let mut entries: Vec<HostEntry> = nics
            .into_iter()
            .filter(|nic| !nic.hwaddr.is_empty())
            .map(|nic| HostEntry {
                hwaddr: nic.hwaddr,
                address: nic.address,
                name: nic.instance,
            })
            .collect();
        entries.extend(self.networks.registered(name));
        let files = self.networks.files(name);
        if dnsmasq::read_hosts(&files) == entries && files.hosts().exists() {
            return Ok(false);
        }
        dnsmasq::write_hosts(&files, &entries)?;
        Ok(true)
    }

    /// Brings every network's hosts file up to date with the instances, and has dnsmasq read
    /// the ones that changed (SIGHUP). Called before an instance starts and after one is
    /// deleted.
    pub fn refresh_network_hosts(&self) {
        let Ok(records) = self.store.networks() else {
            return;
        };
        for record in records {
            match self.write_network_hosts(&record.name) {
                Ok(true) => {
                    if let Some(pid) = self.networks.dnsmasq_pid(&record.name) {
                        dnsmasq::reload(pid);
                    }
                }
                Ok(false) => {}
                Err(error) => self.events.warn(
                    "cannot write the network's hosts file",
                    &[("network", &record.name), ("error", &error.to_string())],
                ),
            }
        }
    }

    /// The bridge a nic on `network` joins: a managed network's own, or a host bridge of
    /// that name.
    pub fn network_bridge(&self, network: &str) -> Result<String, DaemonError> {
        match self.store.network(network) {
            Ok(record) => Ok(record.name),
            Err(StoreError::NotFound { .. }) if host::interface_exists(network) => {
                Ok(network.to_string())
            }
            Err(StoreError::NotFound { .. }) => {
                Err(NetworkError::NotFound(network.to_string()).into())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Gives a MAC address (a virtual machine's nic) a name in the managed network's DNS and
    /// perhaps a fixed address, until coved stops; an entry for the same MAC is replaced.
    pub fn register_network_host(
        &self,
        network: &str,
        entry: HostEntry,
    ) -> Result<(), DaemonError> {
        let record = self.store.network(network).map_err(|error| match error {
            StoreError::NotFound { .. } => NetworkError::NotFound(network.to_string()).into(),
            other => DaemonError::from(other),
        })?;
        if let Some(address) = entry.address {
            let device = BTreeMap::from([(
                entry.name.clone(),
                BTreeMap::from([
                    ("type".to_string(), "nic".to_string()),
                    ("network".to_string(), record.name.clone()),
                    ("ipv4.address".to_string(), address.to_string()),
                ]),
            )]);
            self.validate_network_nics(&entry.name, &device)?;
        }
        {
            let mut registered = self
                .networks
                .registered
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let list = registered.entry(record.name.clone()).or_default();
            list.retain(|known| known.hwaddr != entry.hwaddr);
            list.push(entry);
        }
        self.refresh_network_hosts();
        Ok(())
    }

    /// LXD's leases: dnsmasq's, then the fixed addresses no lease names yet.
    pub fn network_leases(&self, name: &str) -> Result<Vec<Value>, DaemonError> {
        self.store.network(name)?;
        let files = self.networks.files(name);
        let hosts = dnsmasq::read_hosts(&files);
        let name_of = |hwaddr: &str| {
            hosts
                .iter()
                .find(|entry| entry.hwaddr.eq_ignore_ascii_case(hwaddr))
        };
        let mut leases = Vec::new();
        let mut seen = Vec::new();
        for lease in dnsmasq::leases(&files) {
            let entry = name_of(&lease.hwaddr);
            let hostname = entry
                .map(|entry| entry.name.clone())
                .unwrap_or(lease.hostname.clone());
            let fixed = entry.is_some_and(|entry| entry.address == Some(lease.address));
            seen.push(lease.hwaddr.to_ascii_lowercase());
            leases.push(json!({
                "hostname": hostname,
                "hwaddr": lease.hwaddr,
                "address": lease.address.to_string(),
                "type": if fixed { "static" } else { "dynamic" },
                "location": "none",
            }));
        }
        for entry in &hosts {
            if let (Some(address), false) = (
                entry.address,
                seen.contains(&entry.hwaddr.to_ascii_lowercase()),
            ) {
                leases.push(json!({
                    "hostname": entry.name,
                    "hwaddr": entry.hwaddr,
                    "address": address.to_string(),
                    "type": "static",
                    "location": "none",
                }));
            }
        }
        Ok(leases)
    }

    /// A network's live state (addresses, counters), managed or not.
    pub fn network_state(&self, name: &str) -> Result<Value, DaemonError> {
        if self.store.network(name).is_err() && !host::interface_exists(name) {
            return Err(NetworkError::NotFound(name.to_string()).into());
        }
        Ok(host::interface_state(name)?)
    }
}
