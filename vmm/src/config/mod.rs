//! The VM's configuration: one typed value, read from the command line or a JSON file and
//! validated once, before anything is created. Everything past this module takes a `VmConfig`
//! and never re-parses strings.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod devices;

pub use devices::{DeviceConfigError, DiskConfig, NetConfig, OptionError, OptionList, VsockConfig};

/// The largest guest memory accepted: 1 TiB, far below what the guest-physical address space
/// allows and far above anything a microVM needs.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// The smallest guest memory that holds the boot structures, a kernel and its stack.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
/// Each virtio device takes one IOAPIC pin, from 5 to 23 (4 is COM1's).
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Linux reads at most this much of its command line on x86 (COMMAND_LINE_SIZE).
pub const MAX_CMDLINE_BYTES: usize = 2048;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "a serial input socket needs a serial port: give --serial file=PATH (or tty), not off"
    )]
    SerialInputWithoutSerial,
    #[error(
        "invalid memory size \"{0}\": expected a number of bytes with an optional K, M, G or T \
         suffix, such as 512M or 2G"
    )]
    MemorySize(String),
    #[error("guest memory of {0} bytes is too small: give at least 4M")]
    MemoryTooSmall(u64),
    #[error("guest memory of {0} bytes is too large: give at most 1T")]
    MemoryTooLarge(u64),
    #[error("--cpus boot=0: a VM needs at least one vCPU")]
    NoVcpus,
    #[error("invalid vCPU count \"{0}\": expected a whole number such as boot=2")]
    VcpuCount(String),
    #[error("the kernel command line is {0} bytes long; Linux reads at most 2048")]
    CmdlineTooLong(usize),
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("unknown CPU feature \"{0}\": see --help for the names cove-vmm knows")]
    UnknownCpuFeature(String),
    #[error(
        "invalid CPU feature change \"{0}\": write +NAME to show a feature or -NAME to hide it"
    )]
    CpuFeatureSyntax(String),
    #[error(transparent)]
    Device(#[from] DeviceConfigError),
    #[error("{0} virtio devices asked for; cove-vmm has interrupt lines for at most {max}", max = MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
}

/// Everything that describes one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: KernelConfig,
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// A Unix socket whose client's bytes are typed into COM1 (`--serial-input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_input: Option<PathBuf>,
    #[serde(default)]
    pub seccomp: crate::seccomp::SeccompMode,
    /// virtio-blk disks, in the order the guest finds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, in the order the guest finds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// A virtio-rng device fed by the host's getrandom.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rng: bool,
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
}

/// The vCPUs and the CPUID they see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot: u32,
    #[serde(default)]
    pub profile: CpuProfile,
    /// Changes to the profile's CPUID, applied after it: `-name` hides a feature, `+name` shows
    /// one that the profile hid (only if KVM supports it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<FeatureChange>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot: 1,
            profile: CpuProfile::Auto,
            features: Vec::new(),
        }
    }
}

/// Which CPUID shape the guest gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuProfile {
    /// `kvm-pvm` on a software-virtualised host, `host` otherwise.
    #[default]
    Auto,
    /// Everything KVM supports.
    Host,
    /// What a kvm-pvm host can emulate in guest kernel mode.
    KvmPvm,
}

impl std::str::FromStr for CpuProfile {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "host" => Ok(Self::Host),
            "kvm-pvm" => Ok(Self::KvmPvm),
            other => Err(format!(
                "unknown CPU profile \"{other}\": expected auto, host or kvm-pvm"
            )),
        }
    }
}

/// One `+name` or `-name` change to the guest's CPUID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FeatureChange {
    pub name: String,
    pub enable: bool,
}

impl TryFrom<String> for FeatureChange {
    type Error = ConfigError;

    fn try_from(text: String) -> Result<Self, ConfigError> {
        text.parse()
    }
}

impl From<FeatureChange> for String {
    fn from(change: FeatureChange) -> String {
        change.to_string()
    }
}

impl std::str::FromStr for FeatureChange {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, ConfigError> {
        let (enable, name) = match text.split_at_checked(1) {
            Some(("+", name)) => (true, name),
            Some(("-", name)) => (false, name),
            _ => return Err(ConfigError::CpuFeatureSyntax(text.to_string())),
        };
        if crate::cpuid::feature(name).is_none() {
            return Err(ConfigError::UnknownCpuFeature(name.to_string()));
        }
        Ok(Self {
            name: name.to_string(),
            enable,
        })
    }
}

impl fmt::Display for FeatureChange {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}{}", if self.enable { '+' } else { '-' }, self.name)
    }
}

/// Guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    pub size: MemorySize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: MemorySize(128 << 20),
        }
    }
}

/// A size in bytes, written in JSON either as a number or as a string such as "512M".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SizeText", into = "u64")]
pub struct MemorySize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeText {
    Bytes(u64),
    Text(String),
}

impl TryFrom<SizeText> for MemorySize {
    type Error = ConfigError;

    fn try_from(size: SizeText) -> Result<Self, ConfigError> {
        match size {
            SizeText::Bytes(bytes) => Ok(Self(bytes)),
            SizeText::Text(text) => parse_size(&text).map(Self),
        }
    }
}

impl From<MemorySize> for u64 {
    fn from(size: MemorySize) -> u64 {
        size.0
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SerialConfig {
    /// Output to stdout, input from stdin.
    #[default]
    Tty,
    /// Output appended to a file.
    File(PathBuf),
    /// No serial port at all.
    Off,
}

/// Parses `128M`, `2G`, `4096` (bytes), `512K`, `1T`; suffixes are powers of 1024 and may be
/// followed by `B` or `iB`.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let error = || ConfigError::MemorySize(text.to_string());
    let trimmed = text.trim();
    let without_bytes = trimmed
        .strip_suffix("iB")
        .or_else(|| trimmed.strip_suffix('B'))
        .unwrap_or(trimmed);
    let split = without_bytes
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(without_bytes.len());
    let (digits, suffix) = without_bytes.split_at(split);
    if digits.is_empty() {
        return Err(error());
    }
    let shift = match suffix {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(error()),
    };
    let number: u64 = digits.parse().map_err(|_| error())?;
    number.checked_mul(1 << shift).ok_or_else(error)
}

impl VmConfig {
    /// Checks what can be checked without touching the host: sizes, counts and names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let memory = self.memory.size.0;
        if memory < MIN_MEMORY_BYTES {
            return Err(ConfigError::MemoryTooSmall(memory));
        }
        if memory > MAX_MEMORY_BYTES {
            return Err(ConfigError::MemoryTooLarge(memory));
        }
        if self.cpus.boot == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.kernel.cmdline.len() >= MAX_CMDLINE_BYTES {
            return Err(ConfigError::CmdlineTooLong(self.kernel.cmdline.len()));
        }
        if self.kernel.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        if self.serial_input.is_some() && self.serial == SerialConfig::Off {
            return Err(ConfigError::SerialInputWithoutSerial);
        }
        if self.virtio_device_count() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(self.virtio_device_count()));
        }
        devices::validate(&self.disks, &self.nets, self.vsock.as_ref())?;
        Ok(())
    }

    /// How many virtio devices the VM gets.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in [
            "12X",
            "",
            "M",
            "-1G",
            "1.5G",
            "99999999999999999999",
            "16777216T",
            "4096Q",
        ] {
            assert_eq!(
                parse_size(bad),
                Err(ConfigError::MemorySize(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn json_takes_sizes_as_numbers_or_text_and_refuses_unknown_fields() {
        let config: VmConfig = serde_json::from_str(
            r#"{"kernel": {"path": "/k"}, "memory": {"size": "256M"}, "cpus": {"boot": 2,
                "features": ["-cx16", "+popcnt"]}, "serial": {"file": "/tmp/console"}}"#,
        )
        .unwrap();
        assert_eq!(config.memory.size, MemorySize(256 << 20));
        assert_eq!(config.cpus.boot, 2);
        assert_eq!(
            config.cpus.features[0],
            FeatureChange {
                name: "cx16".into(),
                enable: false
            }
        );
        assert_eq!(config.serial, SerialConfig::File("/tmp/console".into()));
        let bytes: VmConfig =
            serde_json::from_str(r#"{"kernel": {"path": "/k"}, "memory": {"size": 8388608}}"#)
                .unwrap();
        assert_eq!(bytes.memory.size, MemorySize(8 << 20));

        let typo = serde_json::from_str::<VmConfig>(r#"{"kernel": {"path": "/k"}, "cpu": {}}"#);
        assert!(typo
            .unwrap_err()
            .to_string()
            .contains("unknown field `cpu`"));
        let bad_feature = serde_json::from_str::<VmConfig>(
            r#"{"kernel": {"path": "/k"}, "cpus": {"boot": 1, "features": ["-frobnicate"]}}"#,
        );
        assert!(bad_feature
            .unwrap_err()
            .to_string()
            .contains("unknown CPU feature"));
    }

    #[test]
    fn validation_names_the_problem() {
        let mut config: VmConfig = serde_json::from_str(r#"{"kernel": {"path": "/k"}}"#).unwrap();
        assert_eq!(config.validate(), Ok(()));
        config.cpus.boot = 0;
        assert_eq!(config.validate(), Err(ConfigError::NoVcpus));
        config.cpus.boot = 1;
        config.memory.size = MemorySize(1 << 20);
        assert_eq!(config.validate(), Err(ConfigError::MemoryTooSmall(1 << 20)));
        config.memory.size = MemorySize(2 << 40);
        assert_eq!(config.validate(), Err(ConfigError::MemoryTooLarge(2 << 40)));
        config.memory.size = MemorySize(64 << 20);
        config.kernel.cmdline = "x".repeat(3000);
        assert_eq!(config.validate(), Err(ConfigError::CmdlineTooLong(3000)));
    }
}
