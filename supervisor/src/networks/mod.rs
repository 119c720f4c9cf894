//! Managed networks, LXD's `bridge` networks: a Linux bridge with the gateway address, NAT
//! through nftables, and one dnsmasq per network for DHCP and DNS, all in coved's own network
//! namespace. The default network `covebr0` is made on coved's first start.
//!
//! What lives here: the network config (`config`), the host side (`host`: bridge, nftables,
//! what the namespace uses), dnsmasq (`dnsmasq`: its command line and files, the watch that
//! restarts it), and the daemon's rules (`lifecycle`: create, change, delete, realise at start,
//! static addresses of nics, the hosts file). The HTTP side is `crate::server::networks`.
//!
//! For virtual machines, [`crate::daemon::Daemon::network_bridge`] names the bridge a nic
//! joins and [`crate::daemon::Daemon::register_network_host`] gives a MAC address a name and
//! perhaps a fixed address in the network's DHCP and DNS.

pub mod config;
pub mod dnsmasq;
pub mod host;
mod lifecycle;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::daemon::DaemonError;
use crate::store::StoreError;

pub use dnsmasq::HostEntry;

/// The network coved makes on its first start.
pub const DEFAULT_NETWORK: &str = "covebr0";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "invalid network name \"{0}\": use 1 to 15 letters, digits, dashes, dots or \
         underscores, starting with a letter (it is the bridge's interface name)"
    )]
    Name(String),
    #[error("unknown network configuration key \"{0}\"; see docs/api.md, \"Networks\"")]
    UnknownKey(String),
    #[error("invalid value for {key}: \"{value}\": {expected}")]
    Value {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("network type \"{0}\" is not supported: cove makes \"bridge\" networks")]
    Kind(String),
    #[error("network \"{0}\" not found")]
    NotFound(String),
    #[error("network \"{0}\" is not managed by coved: it is a host interface")]
    NotManaged(String),
    #[error("an interface named \"{0}\" already exists in coved's network namespace")]
    InterfaceExists(String),
    #[error(
        "the subnet {subnet} overlaps {what}: choose another ipv4.address, or auto to let \
         coved pick a free one"
    )]
    Overlap { subnet: String, what: String },
    #[error("no free /24 left in 10.0.0.0/8 for ipv4.address=auto: give an address")]
    NoFreeSubnet,
    #[error("network \"{name}\" is in use by {users}: remove it from them first")]
    InUse { name: String, users: String },
    #[error("renaming networks is not supported: create a new one and move the nics to it")]
    Rename,
    #[error("device \"{device}\": {problem}")]
    Nic { device: String, problem: String },
    #[error("{command} failed: {message}")]
    Host { command: String, message: String },
    #[error("cannot write {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<NetworkError> for DaemonError {
    fn from(error: NetworkError) -> Self {
        match error {
            NetworkError::Store(error) => DaemonError::Store(error),
            NetworkError::NotFound(_) => DaemonError::NotFound(error.to_string()),
            NetworkError::InterfaceExists(_) => DaemonError::Conflict(error.to_string()),
            NetworkError::Host { .. } | NetworkError::File { .. } => {
                DaemonError::Internal(error.to_string())
            }
            _ => DaemonError::BadRequest(error.to_string()),
        }
    }
}

/// LXD's network names are interface names (the bridge is named after the network).
pub fn validate_name(name: &str) -> Result<(), NetworkError> {
    let valid = !name.is_empty()
        && name.len() <= 15
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if valid {
        Ok(())
    } else {
        Err(NetworkError::Name(name.to_string()))
    }
}

/// The watch over one network's dnsmasq.
#[derive(Debug)]
struct Watch {
    task: tokio::task::JoinHandle<()>,
    /// The pid of the dnsmasq being watched (0 while none runs).
    pid: Arc<std::sync::atomic::AtomicU32>,
}

/// What coved holds for its networks while it runs: the watches over the dnsmasq processes,
/// and host entries registered by others than the instances' nics (virtual machines).
#[derive(Debug)]
pub struct Networks {
    directory: PathBuf,
    watches: Mutex<HashMap<String, Watch>>,
    registered: Mutex<HashMap<String, Vec<HostEntry>>>,
    /// Held by each create, change and delete, so that two never pick the same subnet.
    changes: Mutex<()>,
}

impl Networks {
    /// Networks whose files live under `directory` (`$COVE_DIR/networks`).
    pub fn new(directory: &Path) -> Self {
        Self {
            directory: directory.to_path_buf(),
            watches: Mutex::new(HashMap::new()),
            registered: Mutex::new(HashMap::new()),
            changes: Mutex::new(()),
        }
    }

    pub fn files(&self, name: &str) -> dnsmasq::Files {
        dnsmasq::Files::new(&self.directory, name)
    }

    fn watches(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watch>> {
        self.watches
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The pid of the network's dnsmasq, when one is watched and runs.
    pub fn dnsmasq_pid(&self, name: &str) -> Option<u32> {
        let pid = self
            .watches()
            .get(name)?
            .pid
            .load(std::sync::atomic::Ordering::SeqCst);
        (pid != 0).then_some(pid)
    }

    fn changes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn registered(&self, name: &str) -> Vec<HostEntry> {
        self.registered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default()
    }
}
