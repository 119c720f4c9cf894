//! Custom volumes on the host: a directory (`dir` pool) or a subvolume (`btrfs` pool) at
//! `<pool>/custom/<volume>`, which disk devices bind into containers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{io_error, StorageError};

/// The keys a custom volume takes. `size` is checked and recorded, not enforced (no quota).
const KNOWN_KEYS: &str = "size";

pub fn volume_directory(pool_directory: &Path, name: &str) -> PathBuf {
    pool_directory.join("custom").join(name)
}

/// Checks a volume's config keys.
pub fn validate_config(config: &BTreeMap<String, String>) -> Result<(), StorageError> {
    for (key, value) in config {
        match key.as_str() {
            "size" => {
                cove_shim::config::parse_size("size", value.trim()).map_err(|_| {
                    StorageError::Size {
                        value: value.clone(),
                        problem: "expected a size such as 10GiB, 500MB or a number of bytes".into(),
                    }
                })?;
            }
            _ => {
                return Err(StorageError::UnknownKey {
                    driver: "custom volume on a".into(),
                    key: key.clone(),
                    known: KNOWN_KEYS,
                })
            }
        }
    }
    Ok(())
}

/// Makes the volume's directory, owned by `owner` (the host ids of an unprivileged
/// container's root, so that its root may write there, as LXD shifts a new volume).
pub fn create(
    pool_directory: &Path,
    driver: &str,
    name: &str,
    owner: (u32, u32),
) -> Result<PathBuf, StorageError> {
    super::validate_name("storage volume", name)?;
    let custom = pool_directory.join("custom");
    std::fs::create_dir_all(&custom)
        .map_err(io_error(format!("cannot create {}", custom.display())))?;
    let directory = volume_directory(pool_directory, name);
    if crate::daemon::exists(&directory) {
        return Err(StorageError::Leftover { path: directory });
    }
    if driver == "btrfs" {
        cove_shim::btrfs::create_subvolume(&directory).map_err(|error| StorageError::Command {
            what: format!("cannot create the subvolume {}", directory.display()),
            message: error.to_string(),
        })?;
    } else {
        std::fs::create_dir(&directory)
            .map_err(io_error(format!("cannot create {}", directory.display())))?;
    }
    if let Err(error) = std::os::unix::fs::chown(&directory, Some(owner.0), Some(owner.1)) {
        let _ = remove(pool_directory, name);
        return Err(io_error(format!("cannot chown {}", directory.display()))(
            error,
        ));
    }
    Ok(directory)
}

/// Removes the volume's directory with its files.
pub fn remove(pool_directory: &Path, name: &str) -> Result<(), StorageError> {
    let directory = volume_directory(pool_directory, name);
    if cove_shim::btrfs::is_subvolume(&directory) {
        cove_shim::btrfs::delete_subvolume(&directory).map_err(|error| StorageError::Command {
            what: format!("cannot delete the subvolume {}", directory.display()),
            message: error.to_string(),
        })?;
    } else if directory.exists() {
        std::fs::remove_dir_all(&directory)
            .map_err(io_error(format!("cannot remove {}", directory.display())))?;
    }
    Ok(())
}
