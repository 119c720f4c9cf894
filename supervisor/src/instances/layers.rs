//! An instance's writable layer on disk, and the copies of it that snapshots and `copy` make.
//!
//! What a stopped instance's directory holds that is its own (everything else is the image):
//! - a container on overlayfs: `upper/` (its changes, with overlayfs's whiteouts and xattrs)
//!   and `snapshot.json` (how the monitor made it);
//! - a container on btrfs: the writable subvolume `snapshot/` and `snapshot.json`;
//! - a virtual machine: its disk, `root.img`.
//!
//! A capture copies exactly those into a directory of its own: `upper/` with `cp -a
//! --reflink=auto` (owners, modes, xattrs, device nodes and sparse files kept; shared blocks
//! where the file system can), `snapshot/` as a read-only btrfs snapshot (instant, sharing
//! every block), `root.img` as a reflinked or sparse copy. A never-started container has no
//! layer: its capture is empty, and restoring it makes the next start begin from the image.
//! Captures are made under a temporary name and renamed into place, so a crash leaves either
//! a whole capture or a leftover that [`remove`] clears.
//!
//! What must not live here: which instance runs or may be touched (the caller makes sure the
//! instance is stopped before a restore) and the store's rows.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use cove_shim::btrfs;
use cove_shim::rootfs::{BTRFS_SNAPSHOT, SNAPSHOT_RECORD, UPPER, WORK};

/// A virtual machine's disk in its instance directory.
pub const VM_DISK: &str = "root.img";

/// Where an instance's snapshots live, inside its directory (so that they move with a rename
/// and go with a delete).
pub const SNAPSHOTS: &str = "snapshots";

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot copy {from} to {to}: {detail}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        detail: String,
    },
    #[error(transparent)]
    Btrfs(#[from] btrfs::BtrfsError),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LayerError {
    let path = path.to_path_buf();
    move |source| LayerError::Io { what, path, source }
}

/// The directory of snapshot `name` of the instance whose directory is `instance_directory`.
pub fn snapshot_directory(instance_directory: &Path, name: &str) -> PathBuf {
    instance_directory.join(SNAPSHOTS).join(name)
}

/// Copies a file or directory tree with `cp`, which keeps what a root file system needs kept
/// (owners, modes, times, xattrs, device nodes, hard links, holes) and shares blocks where the
/// file system can.
fn copy_tree(from: &Path, to: &Path) -> Result<(), LayerError> {
    let output = Command::new("cp")
        .args(["-a", "--reflink=auto", "--sparse=always", "--"])
        .arg(from)
        .arg(to)
        .output()
        .map_err(io_error("run cp to copy", from))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(LayerError::Copy {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Copies the writable layer found in `from` (an instance directory or a capture) into the
/// empty directory `to`. `read_only` makes a btrfs layer a read-only snapshot (a capture) or
/// a writable one (an instance's own).
fn copy_layer(from: &Path, to: &Path, read_only: bool) -> Result<(), LayerError> {
    let subvolume = from.join(BTRFS_SNAPSHOT);
    if btrfs::is_subvolume(&subvolume) {
        btrfs::snapshot(&subvolume, &to.join(BTRFS_SNAPSHOT), read_only)?;
    }
    for entry in [UPPER, SNAPSHOT_RECORD, VM_DISK] {
        let source = from.join(entry);
        if source.symlink_metadata().is_ok() {
            copy_tree(&source, &to.join(entry))?;
        }
    }
    Ok(())
}

/// Removes a directory that may hold btrfs subvolumes (captures are read-only snapshots,
/// which only a subvolume delete removes). Absent is fine.
pub fn remove(directory: &Path) -> Result<(), LayerError> {
    if directory.symlink_metadata().is_err() {
        return Ok(());
    }
    let subvolume = directory.join(BTRFS_SNAPSHOT);
    if btrfs::is_subvolume(&subvolume) {
        btrfs::delete_subvolume(&subvolume)?;
    }
    std::fs::remove_dir_all(directory).map_err(io_error("remove", directory))
}

/// Removes every capture in an instance's directory (before the directory itself goes).
pub fn remove_all_snapshots(instance_directory: &Path) -> Result<(), LayerError> {
    for capture in unrecorded(instance_directory, &[]) {
        remove(&capture)?;
    }
    Ok(())
}

/// A sibling of `path` to build into before renaming onto it; emptied first.
fn staging_for(path: &Path) -> Result<PathBuf, LayerError> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = path.with_file_name(format!(".{name}.partial"));
    remove(&staging)?;
    std::fs::create_dir_all(&staging).map_err(io_error("create", &staging))?;
    Ok(staging)
}

/// Captures the instance's writable layer as `capture` (which must not exist yet).
pub fn capture(instance_directory: &Path, capture: &Path) -> Result<(), LayerError> {
    if let Some(parent) = capture.parent() {
        std::fs::create_dir_all(parent).map_err(io_error("create", parent))?;
    }
    let staging = staging_for(capture)?;
    let result = copy_layer(instance_directory, &staging, true)
        .and_then(|()| std::fs::rename(&staging, capture).map_err(io_error("create", capture)));
    if result.is_err() {
        let _ = remove(&staging);
    }
    result
}

/// Replaces a stopped instance's writable layer with the one in `capture` (a snapshot, or
/// another instance's directory for a copy). The new layer is built beside the old one and
/// swapped in entry by entry; the overlayfs scratch directory goes, as every start makes a
/// fresh one.
pub fn restore(instance_directory: &Path, capture: &Path) -> Result<(), LayerError> {
    std::fs::create_dir_all(instance_directory).map_err(io_error("create", instance_directory))?;
    let staging = staging_for(&instance_directory.join("restore"))?;
    if let Err(error) = copy_layer(capture, &staging, false) {
        let _ = remove(&staging);
        return Err(error);
    }
    let discard = staging_for(&instance_directory.join("discard"))?;
    for entry in [SNAPSHOT_RECORD, UPPER, BTRFS_SNAPSHOT, WORK, VM_DISK] {
        let current = instance_directory.join(entry);
        if current.symlink_metadata().is_ok() {
            std::fs::rename(&current, discard.join(entry)).map_err(io_error("move", &current))?;
        }
    }
    // The record last: until it is in place, a start makes a fresh layer rather than mount a
    // half-restored one.
    for entry in [UPPER, BTRFS_SNAPSHOT, VM_DISK, SNAPSHOT_RECORD] {
        let restored = staging.join(entry);
        if restored.symlink_metadata().is_ok() {
            let target = instance_directory.join(entry);
            std::fs::rename(&restored, &target).map_err(io_error("move", &target))?;
        }
    }
    remove(&staging)?;
    remove(&discard)
}

/// Renames a capture.
pub fn rename(from: &Path, to: &Path) -> Result<(), LayerError> {
    if to.symlink_metadata().is_ok() {
        return Err(LayerError::Io {
            what: "rename a snapshot onto",
            path: to.to_path_buf(),
            source: io::Error::from(io::ErrorKind::AlreadyExists),
        });
    }
    std::fs::rename(from, to).map_err(io_error("rename", from))
}

/// The captures in an instance's directory that `keep` does not name, and leftovers of
/// captures cut short: what a crash between the files and the store's row can leave.
pub fn unrecorded(instance_directory: &Path, keep: &[String]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(instance_directory.join(SNAPSHOTS)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            !keep.contains(&name)
        })
        .map(|entry| entry.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn read(path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }

    #[test]
    fn capture_restore_brings_back_exactly_the_captured_files() {
        let scratch = tempfile::tempdir().unwrap();
        let instance = scratch.path().join("web");
        write(&instance.join("upper/etc/motd"), "before");
        write(&instance.join("upper/root/keep"), "kept");
        std::fs::set_permissions(
            instance.join("upper/root/keep"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        write(&instance.join(SNAPSHOT_RECORD), "{\"kind\":\"overlay\"}");
        write(&instance.join("console.log"), "boot 1");

        let snapshot = snapshot_directory(&instance, "snap0");
        capture(&instance, &snapshot).unwrap();

        write(&instance.join("upper/etc/motd"), "after");
        write(&instance.join("upper/tmp/new"), "new");
        std::fs::remove_file(instance.join("upper/root/keep")).unwrap();
        write(&instance.join("work/scratch"), "x");

        restore(&instance, &snapshot).unwrap();
        assert_eq!(
            read(&instance.join("upper/etc/motd")).as_deref(),
            Some("before")
        );
        assert_eq!(
            read(&instance.join("upper/root/keep")).as_deref(),
            Some("kept")
        );
        let mode = std::fs::metadata(instance.join("upper/root/keep"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!instance.join("upper/tmp/new").exists());
        assert!(!instance.join(WORK).exists(), "a fresh overlayfs work dir");
        assert_eq!(
            read(&instance.join("console.log")).as_deref(),
            Some("boot 1")
        );
        assert!(
            snapshot.join("upper/etc/motd").exists(),
            "the snapshot stays"
        );
        let left: Vec<_> = std::fs::read_dir(&instance)
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "no staging left: {left:?}");
    }

    #[test]
    fn an_empty_capture_restores_to_the_image() {
        let scratch = tempfile::tempdir().unwrap();
        let instance = scratch.path().join("web");
        let snapshot = snapshot_directory(&instance, "fresh");
        capture(&instance, &snapshot).unwrap();
        write(&instance.join("upper/etc/motd"), "changed");
        write(&instance.join(SNAPSHOT_RECORD), "{}");
        restore(&instance, &snapshot).unwrap();
        assert!(!instance.join(UPPER).exists());
        assert!(!instance.join(SNAPSHOT_RECORD).exists());
    }

    #[test]
    fn a_vm_disk_is_captured_whole() {
        let scratch = tempfile::tempdir().unwrap();
        let instance = scratch.path().join("vm");
        write(&instance.join(VM_DISK), "disk contents");
        let snapshot = snapshot_directory(&instance, "s");
        capture(&instance, &snapshot).unwrap();
        write(&instance.join(VM_DISK), "changed");
        restore(&instance, &snapshot).unwrap();
        assert_eq!(
            read(&instance.join(VM_DISK)).as_deref(),
            Some("disk contents")
        );
    }

    #[test]
    fn unrecorded_captures_are_found() {
        let scratch = tempfile::tempdir().unwrap();
        let instance = scratch.path().join("web");
        capture(&instance, &snapshot_directory(&instance, "a")).unwrap();
        capture(&instance, &snapshot_directory(&instance, "b")).unwrap();
        let found = unrecorded(&instance, &["a".to_string()]);
        assert_eq!(found, vec![snapshot_directory(&instance, "b")]);
        rename(
            &snapshot_directory(&instance, "a"),
            &snapshot_directory(&instance, "c"),
        )
        .unwrap();
        assert!(rename(
            &snapshot_directory(&instance, "b"),
            &snapshot_directory(&instance, "c"),
        )
        .is_err());
    }
}
