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
    /// Its own network namespace with only a loopback device.
    #[default]
    None,
    /// A veth pair: the host end joins `bridge`, the container end is `eth0` with `mac`.
    /// Not implemented yet: starting a container with it is refused.
    Veth { bridge: String, mac: [u8; 6] },
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
                "security.idmap.base" => id_map_base = Some(parse_number(key, value)?),
                "security.idmap.size" => id_map_size = Some(parse_number(key, value)?),
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
