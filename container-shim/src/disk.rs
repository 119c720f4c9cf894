//! Disk devices: a host directory (or file) bound into the container at a path of its own, as
//! LXD's `disk` devices with a `source` and a `path`. coved resolves a storage volume to the
//! directory that holds it, so the container core only ever sees host paths.
//!
//! The bind mounts are made by the container's init in its new mount namespace before
//! `pivot_root` (see `filesystem.rs`), so they never show on the host. The mount point is
//! created inside the container's root; a symbolic link anywhere on the way there is refused,
//! since in that namespace it would resolve against the host's root.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskError {
    #[error(
        "unknown disk device key \"{0}\": the container core knows type, source, path and \
         readonly"
    )]
    UnknownKey(String),
    #[error("a disk device needs {0}: give it")]
    Missing(&'static str),
    #[error("disk device path \"{0}\" must be absolute, below / and without \"..\"")]
    Path(String),
    #[error("disk device source \"{0}\" must be an absolute host path")]
    Source(String),
    #[error("disk device source {0} does not exist on the host: create it first")]
    SourceMissing(PathBuf),
    #[error("invalid disk device readonly \"{0}\": expected true or false")]
    ReadOnly(String),
    #[error(
        "the container's {0} is a symbolic link: a disk device can only be mounted on a real \
         directory"
    )]
    Symlink(PathBuf),
}

/// A host path bound into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMount {
    /// The host directory or file.
    pub source: PathBuf,
    /// Where it shows inside the container (absolute).
    pub path: PathBuf,
    pub read_only: bool,
}

impl DiskMount {
    /// The mount from an LXD disk device's keys (`type=disk`, `source`, `path`, `readonly`),
    /// checked (the source's existence included).
    pub fn from_device(keys: &BTreeMap<String, String>) -> Result<Self, DiskError> {
        let mut read_only = false;
        for (key, value) in keys {
            match key.as_str() {
                "type" | "source" | "path" => {}
                "readonly" => {
                    read_only = match value.trim().to_ascii_lowercase().as_str() {
                        "true" | "1" | "yes" | "on" => true,
                        "false" | "0" | "no" | "off" | "" => false,
                        _ => return Err(DiskError::ReadOnly(value.clone())),
                    }
                }
                _ => return Err(DiskError::UnknownKey(key.clone())),
            }
        }
        let disk = Self {
            source: PathBuf::from(keys.get("source").ok_or(DiskError::Missing("a source"))?),
            path: PathBuf::from(keys.get("path").ok_or(DiskError::Missing("a path"))?),
            read_only,
        };
        disk.validate()?;
        Ok(disk)
    }

    /// Checks the paths' form and that the source exists.
    pub fn validate(&self) -> Result<(), DiskError> {
        let plain = |path: &Path| {
            path.is_absolute()
                && path
                    .components()
                    .all(|component| matches!(component, Component::RootDir | Component::Normal(_)))
        };
        if !plain(&self.path) || self.path == Path::new("/") {
            return Err(DiskError::Path(self.path.display().to_string()));
        }
        if !plain(&self.source) {
            return Err(DiskError::Source(self.source.display().to_string()));
        }
        if std::fs::metadata(&self.source).is_err() {
            return Err(DiskError::SourceMissing(self.source.clone()));
        }
        Ok(())
    }

    /// The mount point in the container's root on the host (`root` + `path`), after checking
    /// that no part of the way there that already exists is a symbolic link.
    pub fn target_under(&self, root: &Path) -> Result<PathBuf, DiskError> {
        let mut target = root.to_path_buf();
        for component in self.path.components() {
            if let Component::Normal(part) = component {
                target.push(part);
                if std::fs::symlink_metadata(&target)
                    .is_ok_and(|meta| meta.file_type().is_symlink())
                {
                    return Err(DiskError::Symlink(
                        target.strip_prefix(root).unwrap_or(&target).to_path_buf(),
                    ));
                }
            }
        }
        Ok(target)
    }
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
    fn a_disk_device_becomes_a_checked_mount() {
        let disk = DiskMount::from_device(&keys(&[
            ("type", "disk"),
            ("source", "/tmp"),
            ("path", "/mnt/data"),
            ("readonly", "true"),
        ]))
        .expect("a valid disk");
        assert_eq!(disk.source, Path::new("/tmp"));
        assert_eq!(disk.path, Path::new("/mnt/data"));
        assert!(disk.read_only);
    }

    #[test]
    fn a_symbolic_link_on_the_way_to_the_mount_point_is_refused() {
        let root = std::env::temp_dir().join(format!("cove-disk-{}", std::process::id()));
        std::fs::create_dir_all(root.join("mnt")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("mnt/escape")).unwrap();
        let disk = |path: &str| DiskMount {
            source: PathBuf::from("/tmp"),
            path: PathBuf::from(path),
            read_only: false,
        };
        assert_eq!(
            disk("/mnt/data/deep").target_under(&root).unwrap(),
            root.join("mnt/data/deep")
        );
        assert_eq!(
            disk("/mnt/escape/x").target_under(&root),
            Err(DiskError::Symlink(PathBuf::from("mnt/escape")))
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_disk_devices_are_refused_by_what_is_wrong() {
        let refused = |pairs: &[(&str, &str)]| {
            DiskMount::from_device(&keys(pairs))
                .expect_err("refused")
                .to_string()
        };
        assert!(refused(&[("source", "/tmp"), ("path", "mnt")]).contains("must be absolute"));
        assert!(refused(&[("source", "/tmp"), ("path", "/")]).contains("must be absolute"));
        assert!(refused(&[("source", "/tmp"), ("path", "/a/../b")]).contains("must be absolute"));
        assert!(refused(&[("source", "tmp"), ("path", "/mnt")]).contains("absolute host path"));
        assert!(refused(&[("source", "/no/such/cove"), ("path", "/mnt")]).contains("does not"));
        assert!(refused(&[("source", "/tmp")]).contains("needs a path"));
        assert!(refused(&[("source", "/tmp"), ("path", "/m"), ("pool", "x")]).contains("unknown"));
        assert!(
            refused(&[("source", "/tmp"), ("path", "/m"), ("readonly", "maybe")])
                .contains("readonly")
        );
    }
}
