//! What a virtual machine may be before anything is made for it: the host must run VMs well
//! enough (a kvm-pvm host only with the opt-in key), `limits.cpu` and `limits.memory` must fit,
//! and the guest kernel must be found. Every check here runs before an instance's row, disk or
//! process exists, so a refusal leaves nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cove_vmm::cpuid::HostKind;

/// The key that allows VMs on a host whose /dev/kvm is kvm-pvm (guest kernel code emulated).
pub const ALLOW_EMULATED_KVM: &str = "boot.allow_emulated_kvm";

/// LXD's defaults for a VM.
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;

/// The most vCPUs cove-vmm gives a guest.
const MAX_CPUS: u32 = 254;

/// The keys a VM's runtime needs from the expanded config.
const MACHINE_KEYS: &[&str] = &["limits.cpu", "limits.memory", ALLOW_EMULATED_KVM];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaunchError {
    #[error(
        "this host's /dev/kvm is kvm-pvm, a software hypervisor: guest kernel code is emulated, \
         so a VM boots in a minute or more and only with the project kernel's kvm-pvm flavour. \
         Set {ALLOW_EMULATED_KVM}=true on the instance (or its profile) to run VMs here anyway, \
         or use a container"
    )]
    EmulatedKvm,
    #[error("this host cannot run virtual machines: /dev/kvm cannot be opened ({0})")]
    NoKvm(String),
    #[error(
        "invalid value for limits.cpu: \"{0}\": a VM takes a number of vCPUs from 1 to {MAX_CPUS}"
    )]
    Cpus(String),
    #[error("invalid value for limits.memory: \"{value}\": {reason}")]
    Memory { value: String, reason: String },
    #[error(
        "limits.memory {requested} ({requested_bytes} bytes) is more than this host's memory \
         ({host_bytes} bytes): give the VM less"
    )]
    MemoryAboveHost {
        requested: String,
        requested_bytes: u64,
        host_bytes: u64,
    },
    #[error(
        "no guest kernel of the {flavour} flavour was found under {directory}: build it with \
         `resources/build-kernel --flavour {flavour}` or give coved --vm-kernel PATH"
    )]
    NoKernel {
        flavour: &'static str,
        directory: String,
    },
}

/// The VM a runtime starts, from the instance's expanded config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineShape {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub host: HostKind,
}

/// The keys of `expanded` a VM's runtime needs.
pub fn launch_keys(expanded: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    expanded
        .iter()
        .filter(|(key, _)| MACHINE_KEYS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kibibytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kibibytes * 1024)
}

/// Checks a would-be VM against this host; `keys` is its expanded config.
pub fn admit(keys: &BTreeMap<String, String>) -> Result<MachineShape, LaunchError> {
    if let Err(error) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(LaunchError::NoKvm(error.to_string()));
    }
    let host = HostKind::detect();
    if host == HostKind::KvmPvm && !crate::instances::config::truthy(keys.get(ALLOW_EMULATED_KVM)) {
        return Err(LaunchError::EmulatedKvm);
    }
    shape(keys, host, host_memory_bytes())
}

/// The vCPUs and memory `keys` ask for, checked against the host's memory when known.
pub fn shape(
    keys: &BTreeMap<String, String>,
    host: HostKind,
    host_memory: Option<u64>,
) -> Result<MachineShape, LaunchError> {
    let cpus = match keys.get("limits.cpu") {
        None => DEFAULT_CPUS,
        Some(value) => value
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|count| (1..=MAX_CPUS).contains(count))
            .ok_or_else(|| LaunchError::Cpus(value.clone()))?,
    };
    let memory_bytes = match keys.get("limits.memory") {
        None => DEFAULT_MEMORY_BYTES,
        Some(value) if value.trim().ends_with('%') => {
            return Err(LaunchError::Memory {
                value: value.clone(),
                reason: "a VM needs a size such as 2GiB, not a share of the host".into(),
            })
        }
        Some(value) => {
            let bytes = cove_shim::config::parse_size("limits.memory", value).map_err(|error| {
                LaunchError::Memory {
                    value: value.clone(),
                    reason: error.to_string(),
                }
            })?;
            if bytes < 64 << 20 {
                return Err(LaunchError::Memory {
                    value: value.clone(),
                    reason: "a VM needs at least 64MiB".into(),
                });
            }
            bytes
        }
    };
    if let Some(host_bytes) = host_memory {
        if memory_bytes > host_bytes {
            return Err(LaunchError::MemoryAboveHost {
                requested: keys.get("limits.memory").cloned().unwrap_or_default(),
                requested_bytes: memory_bytes,
                host_bytes,
            });
        }
    }
    Ok(MachineShape {
        cpus,
        memory_bytes,
        host,
    })
}

/// The kernel flavour a host needs (`resources/build-kernel --flavour`).
pub fn kernel_flavour(host: HostKind) -> &'static str {
    match host {
        HostKind::KvmPvm => "kvm-pvm",
        HostKind::Hardware => "standard",
    }
}

/// Where `resources/build-kernel` caches its kernels.
fn kernel_cache() -> PathBuf {
    std::env::var_os("COVE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/cove"))
        .join("kernel")
}

/// The guest kernel: `configured` when given, else the newest cached build of the host's
/// flavour (`<cache>/kernel/<flavour>-<hash>/vmlinux`).
pub fn find_kernel(configured: Option<&Path>, host: HostKind) -> Result<PathBuf, LaunchError> {
    if let Some(path) = configured {
        return Ok(path.to_path_buf());
    }
    let flavour = kernel_flavour(host);
    let directory = kernel_cache();
    let prefix = format!("{flavour}-");
    let newest = std::fs::read_dir(&directory)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .map(|entry| entry.path().join("vmlinux"))
        .filter_map(|path| {
            let modified = path.metadata().ok()?.modified().ok()?;
            Some((modified, path))
        })
        .max();
    newest.map(|(_, path)| path).ok_or(LaunchError::NoKernel {
        flavour,
        directory: directory.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn the_defaults_are_lxds() {
        let shape = shape(&keys(&[]), HostKind::Hardware, Some(8 << 30)).unwrap();
        assert_eq!((shape.cpus, shape.memory_bytes), (1, 1 << 30));
    }

    #[test]
    fn limits_become_vcpus_and_memory() {
        let shape = shape(
            &keys(&[("limits.cpu", "2"), ("limits.memory", "512MiB")]),
            HostKind::Hardware,
            Some(8 << 30),
        )
        .unwrap();
        assert_eq!((shape.cpus, shape.memory_bytes), (2, 512 << 20));
    }

    #[test]
    fn bad_limits_are_refused_by_name() {
        for (key, value) in [
            ("limits.cpu", "0"),
            ("limits.cpu", "0-3"),
            ("limits.memory", "50%"),
            ("limits.memory", "lots"),
            ("limits.memory", "1MiB"),
        ] {
            let error = shape(&keys(&[(key, value)]), HostKind::Hardware, None).unwrap_err();
            assert!(error.to_string().contains(key), "{error}");
        }
    }

    #[test]
    fn memory_above_the_host_names_both() {
        let error = shape(
            &keys(&[("limits.memory", "64GiB")]),
            HostKind::Hardware,
            Some(4 << 30),
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("64GiB") && text.contains(&(4u64 << 30).to_string()),
            "{text}"
        );
    }

    #[test]
    fn the_refusal_names_the_key() {
        assert!(LaunchError::EmulatedKvm
            .to_string()
            .contains(ALLOW_EMULATED_KVM));
    }

    #[test]
    fn launch_keys_keep_only_what_the_vm_needs() {
        let kept = launch_keys(&keys(&[
            ("limits.cpu", "2"),
            ("security.nesting", "true"),
            (ALLOW_EMULATED_KVM, "true"),
        ]));
        assert_eq!(kept.len(), 2);
    }
}
