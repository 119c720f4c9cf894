//! A container's configuration: one typed value, built either field by field or from LXD-style
//! keys (`limits.memory=512MiB`), and validated once before anything is created. Everything past
//! this module takes a `ContainerConfig` and never re-parses strings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::idmap::IdMap;

/// The longest container name: it becomes a host name, a cgroup and a directory name.
pub const MAX_NAME_LENGTH: usize = 63;
/// The smallest memory limit accepted: below this not even a busybox init starts.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "invalid container name \"{0}\": use 1 to 63 letters, digits and dashes, starting with a \
         letter and not ending with a dash"
    )]
    Name(String),
    #[error("invalid hostname \"{0}\": use 1 to 63 letters, digits and dashes")]
    Hostname(String),
    #[error("the rootfs {0} is not a directory: give the directory of an unpacked image")]
    RootfsMissing(PathBuf),
    #[error("the rootfs {0} has no /sbin/init: a system container needs an init to run as PID 1")]
    NoInit(PathBuf),
    #[error("unknown configuration key \"{0}\": see docs/containers.md for the keys cove knows")]
    UnknownKey(String),
    #[error("invalid {key} \"{value}\": expected a size such as 512MiB, 2GB or a number of bytes")]
    MemorySize { key: String, value: String },
    #[error("limits.memory of {0} bytes is too small: give at least 4MiB")]
    MemoryTooSmall(u64),
    #[error("invalid limits.cpu \"{0}\": expected a number of CPUs such as 2")]
    CpuCount(String),
    #[error(
        "invalid limits.cpu.allowance \"{0}\": expected a share such as 50% or a quota such as \
         25ms/100ms"
    )]
    CpuAllowance(String),
    #[error("invalid limits.processes \"{0}\": expected a whole number of at least 1")]
    Processes(String),
    #[error("invalid {key} \"{value}\": expected true or false")]
    Boolean { key: String, value: String },
    #[error("invalid {key} \"{value}\": expected a whole number")]
    Number { key: String, value: String },
    #[error(
        "invalid id map: {size} ids from host id {base} pass the largest id 4294967294; \
         lower security.idmap.base or security.idmap.size"
    )]
    IdMapOverflow { base: u32, size: u32 },
    #[error("invalid id map: an unprivileged container needs at least 65536 ids, got {0}")]
    IdMapTooSmall(u32),
    #[error("invalid security.idmap.shift \"{0}\": expected auto, idmapped or chown")]
    IdShift(String),
    #[error(
        "unknown nic device key \"{0}\": cove knows type, nictype, parent, hwaddr, name, mtu \
         and host_name"
    )]
    UnknownNicKey(String),
    #[error(
        "unsupported nic device {key}=\"{value}\": cove supports type=nic with nictype=bridged"
    )]
    NicType { key: String, value: String },
    #[error("a bridged nic needs parent=<bridge>: name the host bridge it joins")]
    NicWithoutParent,
    #[error(
        "invalid interface name {key}=\"{value}\": use 1 to 15 characters without spaces, \
         slashes or colons"
    )]
    InterfaceName { key: String, value: String },
    #[error("invalid hwaddr \"{0}\": expected a unicast MAC address such as 00:16:3e:12:34:56")]
    MacAddress(String),
    #[error("invalid mtu \"{0}\": expected a number from 68 to 65535")]
    Mtu(String),
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
}

/// Everything that describes one system container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerConfig {
    /// The container's name: its directory, cgroup and default hostname.
    pub name: String,
    /// The unpacked image. It is never written to: the container runs on a snapshot of it.
    pub rootfs: PathBuf,
    pub hostname: String,
    /// Host root inside the container (`security.privileged=true`): no user namespace.
    pub privileged: bool,
    /// Which host ids container ids 0.. map to; `None` takes /etc/subuid and /etc/subgid, or
    /// the default range. Ignored when privileged.
    pub id_map: Option<IdMap>,
    pub limits: Limits,
    pub network: Network,
    pub init: InitSystem,
    /// `security.nesting=true`: what a nested container runtime (or Kubernetes' kubelet)
    /// needs inside: unobstructed proc and sysfs mounts, so that nested user namespaces may
    /// mount their own, and a `/dev/kmsg`.
    pub nesting: bool,
    /// LXD's `security.syscalls.deny_*` keys: which seccomp deny lists apply.
    pub syscalls: SyscallPolicy,
    /// How the container's root is made from the image: overlayfs or a btrfs snapshot.
    pub snapshot: SnapshotMethod,
    /// How an unprivileged container's files come to belong to its ids
    /// (`security.idmap.shift`).
    pub id_shift: IdShift,
    /// Host paths bound into the container (LXD's disk devices).
    pub disks: Vec<crate::disk::DiskMount>,
}

/// Resource limits, applied through the container's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// How many CPUs the container may run on (the first N of the host's).
    pub cpu_count: Option<u32>,
    pub cpu_allowance: Option<CpuAllowance>,
    /// The most tasks (processes and threads) the container may have at once.
    pub processes: Option<u64>,
}

/// How much CPU time the container gets, as LXD's `limits.cpu.allowance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuAllowance {
    /// A relative weight under contention: 100 is a normal share.
    SharePercent(u32),
    /// A hard cap: at most `quota` of CPU time in each `period`.
    Quota { quota: Duration, period: Duration },
}

/// The container's network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Network {
    /// Its own network namespace with only a loopback device (up).
    #[default]
    None,
    /// LXD's bridged nic: a veth pair whose host end joins a bridge.
    Bridged(BridgedNic),
}

/// LXD's `nictype=bridged` nic device: a veth pair whose host end (`veth` and eight random
/// hex digits, or `host_name`) joins the bridge `parent`, and whose other end is `name`
/// (`eth0`) inside the container with the MAC address `hwaddr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgedNic {
    /// The host bridge (`parent=`).
    pub parent: String,
    /// The container end's MAC address (`hwaddr=`).
    pub hwaddr: [u8; 6],
    /// The interface's name inside the container (`name=`, default `eth0`).
    pub name: String,
    /// The container end's MTU (`mtu=`); the bridge's when `None`. The host end always takes
    /// the bridge's, so as never to lower it.
    pub mtu: Option<u32>,
    /// The host end's name (`host_name=`); `None` picks `veth<random>` at each start.
    pub host_name: Option<String>,
}

/// Which of LXD's seccomp deny lists apply (`security.syscalls.deny_default`, on by default;
/// `security.syscalls.deny_compat`, off by default). See `seccomp` for what they refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallPolicy {
    pub deny_default: bool,
    pub deny_compat: bool,
}

impl Default for SyscallPolicy {
    fn default() -> Self {
        Self {
            deny_default: true,
            deny_compat: false,
        }
    }
}

/// The MAC prefix LXD gives the addresses it makes up (Xensource's OUI, 00:16:3e).
pub const LXD_MAC_PREFIX: [u8; 3] = [0x00, 0x16, 0x3e];

impl BridgedNic {
    /// A nic on `parent` named `eth0`, with a made-up `00:16:3e:xx:xx:xx` MAC address as LXD
    /// makes them.
    pub fn new(parent: &str) -> Self {
        let mut random = [0u8; 3];
        fill_random(&mut random);
        Self {
            parent: parent.to_string(),
            hwaddr: [
                LXD_MAC_PREFIX[0],
                LXD_MAC_PREFIX[1],
                LXD_MAC_PREFIX[2],
                random[0],
                random[1],
                random[2],
            ],
            name: "eth0".to_string(),
            mtu: None,
            host_name: None,
        }
    }

    /// The nic from an LXD nic device's keys (`type=nic`, `nictype=bridged`, `parent`, and
    /// optionally `hwaddr`, `name`, `mtu`, `host_name`), validated. Without `hwaddr` a MAC is
    /// made up: the caller should keep it (LXD stores it as `volatile.<name>.hwaddr`).
    pub fn from_device(keys: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let parent = keys
            .get("parent")
            .map(|value| value.trim())
            .ok_or(ConfigError::NicWithoutParent)?;
        let mut nic = Self::new(parent);
        for (key, value) in keys {
            let value = value.trim();
            let refuse_type = || ConfigError::NicType {
                key: key.clone(),
                value: value.to_string(),
            };
            match key.as_str() {
                "type" if value != "nic" => return Err(refuse_type()),
                "nictype" if value != "bridged" => return Err(refuse_type()),
                "type" | "nictype" | "parent" => {}
                "hwaddr" => nic.hwaddr = parse_mac(value)?,
                "name" => nic.name = value.to_string(),
                "mtu" => {
                    nic.mtu = Some(
                        value
                            .parse()
                            .map_err(|_| ConfigError::Mtu(value.to_string()))?,
                    )
                }
                "host_name" => nic.host_name = Some(value.to_string()),
                _ => return Err(ConfigError::UnknownNicKey(key.clone())),
            }
        }
        if !keys.contains_key("nictype") {
            return Err(ConfigError::NicType {
                key: "nictype".to_string(),
                value: String::new(),
            });
        }
        nic.validate()?;
        Ok(nic)
    }

    /// The MAC address as LXD writes it: `00:16:3e:12:34:56`.
    pub fn hwaddr_text(&self) -> String {
        format_mac(&self.hwaddr)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("parent", Some(&self.parent)),
            ("name", Some(&self.name)),
            ("host_name", self.host_name.as_ref()),
        ] {
            if let Some(value) = value {
                if !is_valid_interface_name(value) {
                    return Err(ConfigError::InterfaceName {
                        key: key.to_string(),
                        value: value.clone(),
                    });
                }
            }
        }
        // Bit 0 of the first byte marks a multicast address; all zeros is no address.
        if self.hwaddr[0] & 1 != 0 || self.hwaddr == [0; 6] {
            return Err(ConfigError::MacAddress(self.hwaddr_text()));
        }
        if let Some(mtu) = self.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(ConfigError::Mtu(mtu.to_string()));
            }
        }
        Ok(())
    }
}

/// A Linux interface name: 1 to 15 bytes (IFNAMSIZ less the NUL), none of them a slash, a
/// colon or white space, and not `.` or `..`.
pub fn is_valid_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'/' && byte != b':')
}

/// Parses `00:16:3e:12:34:56` (or with dashes).
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let error = || ConfigError::MacAddress(text.to_string());
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next().ok_or_else(error)?;
        if part.len() != 2 || !part.bytes().all(|digit| digit.is_ascii_hexdigit()) {
            return Err(error());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| error())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(error());
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Fills `bytes` from the kernel's random pool (getrandom(2)); a failure, which only very
/// early boot could cause, leaves the clock's nanoseconds there instead.
pub(crate) fn fill_random(bytes: &mut [u8]) {
    // SAFETY: `bytes` is live and writable for its whole length.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if usize::try_from(filled).ok() != Some(bytes.len()) {
        let nanoseconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
            .to_ne_bytes();
        for (byte, noise) in bytes.iter_mut().zip(nanoseconds.iter().cycle()) {
            *byte = *noise;
        }
    }
}

/// How the container's root is made from its image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SnapshotMethod {
    /// A btrfs snapshot where the image is a btrfs subvolume and the containers directory is
    /// on the same btrfs file system (a storage pool holding both, as LXD's), else overlayfs.
    #[default]
    Detect,
    /// An overlayfs snapshot with the image as its lower layer.
    Overlay,
    /// A btrfs snapshot of the image, which must be a subvolume on the file system of the
    /// containers directory.
    Btrfs,
}

/// How an unprivileged container's files come to belong to its ids.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IdShift {
    /// An idmapped mount of the image, or of the snapshot; where the kernel or the image's
    /// file system refuses one, the one-time chown of the snapshot (`auto`).
    #[default]
    Auto,
    /// An idmapped mount only: starting fails where it is refused (`idmapped`).
    Idmapped,
    /// The one-time chown of the snapshot, even where an idmapped mount would work (`chown`).
    Chown,
}

/// Which init the image runs, which decides how it is asked to shut down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InitSystem {
    /// Look at the image's /sbin/init when the container starts.
    #[default]
    Detect,
    /// systemd: halts on SIGRTMIN+3.
    Systemd,
    /// SysV init, busybox init and the like: halt on SIGPWR.
    Classic,
}

impl ContainerConfig {
    /// An unprivileged container named `name` running the image at `rootfs`, with no limits.
    pub fn new(name: &str, rootfs: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_string(),
            rootfs: rootfs.into(),
            hostname: name.to_string(),
            privileged: false,
            id_map: None,
            limits: Limits::default(),
            network: Network::None,
            init: InitSystem::Detect,
            nesting: false,
            syscalls: SyscallPolicy::default(),
            snapshot: SnapshotMethod::Detect,
            id_shift: IdShift::Auto,
            disks: Vec::new(),
        }
    }

    /// A configuration from LXD-style keys, validated.
    pub fn from_keys(
        name: &str,
        rootfs: impl Into<PathBuf>,
        keys: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut config = Self::new(name, rootfs);
        let mut id_map_base = None;
        let mut id_map_size = None;
        for (key, value) in keys {
            let value = value.trim();
            match key.as_str() {
                "limits.memory" => config.limits.memory_bytes = Some(parse_size(key, value)?),
                "limits.cpu" => {
                    config.limits.cpu_count = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|count| *count > 0)
                            .ok_or_else(|| ConfigError::CpuCount(value.to_string()))?,
                    )
                }
                "limits.cpu.allowance" => {
                    config.limits.cpu_allowance = Some(parse_cpu_allowance(value)?)
                }
                "limits.processes" => {
                    config.limits.processes = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|count| *count > 0)
                            .ok_or_else(|| ConfigError::Processes(value.to_string()))?,
                    )
                }
                "security.privileged" => config.privileged = parse_boolean(key, value)?,
                "security.nesting" => config.nesting = parse_boolean(key, value)?,
                "security.syscalls.deny_default" => {
                    config.syscalls.deny_default = parse_boolean(key, value)?
                }
                "security.syscalls.deny_compat" => {
                    config.syscalls.deny_compat = parse_boolean(key, value)?
                }
                "security.idmap.base" => id_map_base = Some(parse_number(key, value)?),
                "security.idmap.size" => id_map_size = Some(parse_number(key, value)?),
                "security.idmap.shift" => {
                    config.id_shift = match value {
                        "auto" => IdShift::Auto,
                        "idmapped" => IdShift::Idmapped,
                        "chown" => IdShift::Chown,
                        _ => return Err(ConfigError::IdShift(value.to_string())),
                    }
                }
                "user.hostname" => config.hostname = value.to_string(),
                _ => return Err(ConfigError::UnknownKey(key.clone())),
            }
        }
        if id_map_base.is_some() || id_map_size.is_some() {
            config.id_map = Some(IdMap::uniform(
                id_map_base.unwrap_or(crate::idmap::DEFAULT_BASE),
                id_map_size.unwrap_or(crate::idmap::DEFAULT_SIZE),
            ));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; nothing is created before this passes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_valid_label(&self.name) || !self.name.starts_with(|c: char| c.is_ascii_alphabetic())
        {
            return Err(ConfigError::Name(self.name.clone()));
        }
        if !is_valid_label(&self.hostname) {
            return Err(ConfigError::Hostname(self.hostname.clone()));
        }
        if !self.rootfs.is_dir() {
            return Err(ConfigError::RootfsMissing(self.rootfs.clone()));
        }
        // An absolute symlink such as /sbin/init -> /bin/busybox resolves on the host, so look
        // at the link itself.
        if std::fs::symlink_metadata(self.rootfs.join("sbin/init")).is_err() {
            return Err(ConfigError::NoInit(self.rootfs.clone()));
        }
        if let Some(memory) = self.limits.memory_bytes {
            if memory < MIN_MEMORY_BYTES {
                return Err(ConfigError::MemoryTooSmall(memory));
            }
        }
        if let Some(map) = &self.id_map {
            for range in [map.uid, map.gid] {
                if range
                    .host_base
                    .checked_add(range.size)
                    .is_none_or(|end| end == u32::MAX)
                {
                    return Err(ConfigError::IdMapOverflow {
                        base: range.host_base,
                        size: range.size,
                    });
                }
                if !self.privileged && range.size < 65536 {
                    return Err(ConfigError::IdMapTooSmall(range.size));
                }
            }
        }
        if let Network::Bridged(nic) = &self.network {
            nic.validate()?;
        }
        for disk in &self.disks {
            disk.validate()?;
        }
        Ok(())
    }
}

fn is_valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= MAX_NAME_LENGTH
        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Parses a size as LXD writes them: bytes, or a number with a decimal (kB, MB, GB, TB) or
/// binary (KiB, MiB, GiB, TiB) suffix.
pub fn parse_size(key: &str, value: &str) -> Result<u64, ConfigError> {
    let error = || ConfigError::MemorySize {
        key: key.to_string(),
        value: value.to_string(),
    };
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let number: u64 = number.parse().map_err(|_| error())?;
    let multiplier: u64 = match suffix.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(error()),
    };
    number.checked_mul(multiplier).ok_or_else(error)
}

fn parse_cpu_allowance(value: &str) -> Result<CpuAllowance, ConfigError> {
    let error = || ConfigError::CpuAllowance(value.to_string());
    if let Some(percent) = value.strip_suffix('%') {
        let percent: u32 = percent.parse().map_err(|_| error())?;
        if percent == 0 {
            return Err(error());
        }
        return Ok(CpuAllowance::SharePercent(percent));
    }
    let (quota, period) = value.split_once('/').ok_or_else(error)?;
    let milliseconds = |text: &str| -> Result<Duration, ConfigError> {
        let number: u64 = text
            .strip_suffix("ms")
            .and_then(|number| number.parse().ok())
            .filter(|number| *number > 0)
            .ok_or_else(error)?;
        Ok(Duration::from_millis(number))
    };
    let (quota, period) = (milliseconds(quota)?, milliseconds(period)?);
    // The kernel accepts periods from 1 ms to 1 s.
    if period > Duration::from_secs(1) {
        return Err(error());
    }
    Ok(CpuAllowance::Quota { quota, period })
}

fn parse_boolean(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ConfigError::Boolean {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

fn parse_number(key: &str, value: &str) -> Result<u32, ConfigError> {
    value.parse().map_err(|_| ConfigError::Number {
        key: key.to_string(),
        value: value.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal image directory, removed when dropped.
    struct TemporaryRootfs(PathBuf);

    impl Drop for TemporaryRootfs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rootfs(test: &str) -> TemporaryRootfs {
        let dir =
            std::env::temp_dir().join(format!("cove-config-test-{}-{test}", std::process::id()));
        std::fs::create_dir_all(dir.join("sbin")).expect("create a rootfs");
        let _ = std::os::unix::fs::symlink("/bin/busybox", dir.join("sbin/init"));
        TemporaryRootfs(dir)
    }

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn keys_become_typed_limits() {
        let rootfs = rootfs("keys");
        let config = ContainerConfig::from_keys(
            "web",
            &rootfs.0,
            &keys(&[
                ("limits.memory", "512MiB"),
                ("limits.cpu", "2"),
                ("limits.cpu.allowance", "25ms/100ms"),
                ("limits.processes", "100"),
                ("security.idmap.base", "2000000"),
            ]),
        )
        .expect("valid keys");
        assert_eq!(config.limits.memory_bytes, Some(512 << 20));
        assert_eq!(config.limits.cpu_count, Some(2));
        assert_eq!(
            config.limits.cpu_allowance,
            Some(CpuAllowance::Quota {
                quota: Duration::from_millis(25),
                period: Duration::from_millis(100)
            })
        );
        assert_eq!(config.limits.processes, Some(100));
        assert_eq!(
            config.id_map,
            Some(IdMap::uniform(2_000_000, 1_000_000_000))
        );
        assert!(!config.privileged);
        assert_eq!(config.hostname, "web");
        assert_eq!(config.id_shift, IdShift::Auto);
        let shifted = ContainerConfig::from_keys(
            "web",
            &rootfs.0,
            &keys(&[("security.idmap.shift", "chown")]),
        )
        .expect("valid keys");
        assert_eq!(shifted.id_shift, IdShift::Chown);
    }

    #[test]
    fn sizes_in_lxd_units() {
        assert_eq!(parse_size("k", "1024"), Ok(1024));
        assert_eq!(parse_size("k", "2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("k", "1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("k", "64 MiB"), Ok(64 << 20));
    }

    #[test]
    fn bad_values_are_named_in_the_error() {
        let rootfs = rootfs("bad-values");
        let rootfs = &rootfs.0;
        let refused = |pairs: &[(&str, &str)]| {
            ContainerConfig::from_keys("web", rootfs, &keys(pairs))
                .expect_err("must be refused")
                .to_string()
        };
        assert!(refused(&[("limits.memory", "lots")]).contains("invalid limits.memory \"lots\""));
        assert!(refused(&[("limits.memory", "1kB")]).contains("too small"));
        assert!(refused(&[("limits.memory", "99999999999TiB")]).contains("invalid limits.memory"));
        assert!(refused(&[("limits.cpu", "0")]).contains("limits.cpu \"0\""));
        assert!(refused(&[("limits.cpu.allowance", "fast")]).contains("25ms/100ms"));
        assert!(refused(&[("limits.cpu.allowance", "1ms/2s")]).contains("allowance"));
        assert!(refused(&[("limits.processes", "-1")]).contains("limits.processes"));
        assert!(refused(&[("security.privileged", "yes")]).contains("true or false"));
        assert!(refused(&[("limits.colour", "blue")]).contains("unknown configuration key"));
        assert!(refused(&[("security.idmap.size", "1000")]).contains("at least 65536"));
        assert!(refused(&[("security.idmap.base", "4294967000")]).contains("largest id"));
        assert!(refused(&[("security.idmap.shift", "shiftfs")]).contains("auto, idmapped or chown"));
    }

    #[test]
    fn security_keys_become_typed_settings() {
        let rootfs = rootfs("security");
        let config = ContainerConfig::from_keys(
            "web",
            &rootfs.0,
            &keys(&[
                ("security.nesting", "true"),
                ("security.syscalls.deny_default", "false"),
                ("security.syscalls.deny_compat", "true"),
            ]),
        )
        .expect("valid keys");
        assert!(config.nesting);
        assert_eq!(
            config.syscalls,
            SyscallPolicy {
                deny_default: false,
                deny_compat: true
            }
        );
        let defaults = ContainerConfig::new("web", &rootfs.0);
        assert!(!defaults.nesting);
        assert_eq!(defaults.syscalls, SyscallPolicy::default());
        assert!(defaults.syscalls.deny_default && !defaults.syscalls.deny_compat);
        let refused =
            ContainerConfig::from_keys("web", &rootfs.0, &keys(&[("security.nesting", "1")]))
                .expect_err("not a boolean");
        assert!(
            refused.to_string().contains("security.nesting"),
            "{refused}"
        );
    }

    #[test]
    fn an_lxd_bridged_nic_device_becomes_a_typed_nic() {
        let nic = BridgedNic::from_device(&keys(&[
            ("type", "nic"),
            ("nictype", "bridged"),
            ("parent", "covebr0"),
            ("hwaddr", "00:16:3E:aa:bb:0c"),
            ("mtu", "1400"),
            ("host_name", "vethweb"),
        ]))
        .expect("a valid device");
        assert_eq!(nic.parent, "covebr0");
        assert_eq!(nic.hwaddr, [0x00, 0x16, 0x3e, 0xaa, 0xbb, 0x0c]);
        assert_eq!(nic.hwaddr_text(), "00:16:3e:aa:bb:0c");
        assert_eq!(nic.name, "eth0");
        assert_eq!(nic.mtu, Some(1400));
        assert_eq!(nic.host_name.as_deref(), Some("vethweb"));

        let generated =
            BridgedNic::from_device(&keys(&[("nictype", "bridged"), ("parent", "br0")]))
                .expect("hwaddr is optional");
        assert_eq!(generated.hwaddr[..3], LXD_MAC_PREFIX);
        assert_eq!(generated.mtu, None);

        let refused = |pairs: &[(&str, &str)]| {
            BridgedNic::from_device(&keys(pairs))
                .expect_err("must be refused")
                .to_string()
        };
        let bridged = [("nictype", "bridged"), ("parent", "br0")];
        let with = |extra: (&'static str, &'static str)| {
            let mut pairs = bridged.to_vec();
            pairs.push(extra);
            pairs
        };
        assert!(refused(&[("nictype", "bridged")]).contains("parent="));
        assert!(refused(&[("parent", "br0")]).contains("nictype"));
        assert!(refused(&[("nictype", "macvlan"), ("parent", "br0")]).contains("macvlan"));
        assert!(refused(&with(("type", "disk"))).contains("type=\"disk\""));
        assert!(refused(&with(("hwaddr", "01:16:3e:00:00:01"))).contains("unicast"));
        assert!(refused(&with(("hwaddr", "00:16:3e:00:00"))).contains("hwaddr"));
        assert!(refused(&with(("hwaddr", "00:16:3e:00:00:+1"))).contains("hwaddr"));
        assert!(refused(&with(("mtu", "9"))).contains("mtu"));
        assert!(refused(&with(("mtu", "lots"))).contains("mtu"));
        assert!(refused(&with(("name", "a/b"))).contains("name=\"a/b\""));
        assert!(refused(&with(("host_name", "a-very-long-name0"))).contains("host_name"));
        assert!(refused(&with(("ipv4.address", "10.0.0.2"))).contains("unknown nic device key"));
    }

    #[test]
    fn interface_names_and_macs() {
        for good in ["eth0", "veth1a2b3c4d", "a", "br-lan.10"] {
            assert!(is_valid_interface_name(good), "{good}");
        }
        for bad in ["", ".", "..", "eth 0", "a:b", "a/b", "sixteen-chars-xx"] {
            assert!(!is_valid_interface_name(bad), "{bad}");
        }
        assert_eq!(parse_mac("00-16-3e-01-02-03"), Ok([0, 0x16, 0x3e, 1, 2, 3]));
        assert!(parse_mac("00:00:00:00:00:00").is_err());
        assert!(parse_mac("00:16:3e:01:02:03:04").is_err());
        assert_eq!(
            format_mac(&[0, 0x16, 0x3e, 0xab, 2, 3]),
            "00:16:3e:ab:02:03"
        );
    }

    #[test]
    fn names_and_rootfs_are_checked() {
        let rootfs = rootfs("names");
        let rootfs = &rootfs.0;
        for name in ["", "-web", "web-", "we b", "1web", &"a".repeat(64)] {
            assert_eq!(
                ContainerConfig::new(name, rootfs).validate(),
                Err(ConfigError::Name(name.to_string()))
            );
        }
        assert_eq!(ContainerConfig::new("web-1", rootfs).validate(), Ok(()));
        let missing = rootfs.join("missing");
        assert_eq!(
            ContainerConfig::new("web", &missing).validate(),
            Err(ConfigError::RootfsMissing(missing))
        );
        let no_init = rootfs.join("sbin");
        assert_eq!(
            ContainerConfig::new("web", &no_init).validate(),
            Err(ConfigError::NoInit(no_init))
        );
    }
}
