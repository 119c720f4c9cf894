//! Storage pools and custom volumes, as LXD's: where instances' directories, the images they
//! are made from (as btrfs subvolumes on a btrfs pool) and custom volumes live.
//!
//! Every pool is mounted (or simply is a directory) at `$COVE_DIR/storage-pools/<pool>`:
//! - `dir`: the directory itself, or an existing empty directory (`source`) bound there;
//!   containers run on overlayfs snapshots of the image.
//! - `btrfs`: a loop file `$COVE_DIR/disks/<pool>.img` (no `source`), a block device, or an
//!   existing empty directory on a btrfs file system (bound there); each image is made once
//!   into a read-only subvolume `images/<fingerprint>`, and containers run on writable
//!   snapshots of it (the container core picks the btrfs snapshot by itself).
//!
//! Under the pool: `containers/<name>/` (an instance's directory), `images/<fingerprint>`
//! (btrfs only), `custom/<volume>` (a directory, or a subvolume on btrfs).
//!
//! `pools.rs` makes, mounts and removes pools; `volumes.rs` custom volumes; `placement.rs`
//! decides where an instance's files live and what its disk devices bind. What must not live
//! here: HTTP (see `server/storage.rs`) and rows (see `store/pools.rs`).

pub mod placement;
pub mod pools;
pub mod volumes;

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::daemon::DaemonError;

/// The drivers coved knows.
pub const DRIVERS: &[&str] = &["dir", "btrfs"];

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "invalid {kind} name \"{name}\": use 1 to 63 letters, digits, dashes, dots or \
         underscores, not starting with a dot or a dash"
    )]
    Name { kind: &'static str, name: String },
    #[error("unknown storage driver \"{0}\": cove knows \"dir\" and \"btrfs\"")]
    UnknownDriver(String),
    #[error("unknown key \"{key}\" for a {driver} storage pool: cove knows {known}")]
    UnknownKey {
        driver: String,
        key: String,
        known: &'static str,
    },
    #[error("invalid size \"{value}\": {problem}")]
    Size { value: String, problem: String },
    #[error("the source {0} does not exist: give an existing empty directory or block device")]
    SourceMissing(PathBuf),
    #[error("the source {0} is not empty: give an empty directory or block device")]
    SourceNotEmpty(PathBuf),
    #[error(
        "the source directory {0} is not on a btrfs file system: give a directory on btrfs, a \
         block device, or no source (a loop file)"
    )]
    SourceNotBtrfs(PathBuf),
    #[error(
        "the block device {path} holds a {found} file system: a btrfs pool takes an empty device \
         or an empty btrfs one; wipe it first (wipefs -a) if its data can go"
    )]
    SourceFileSystem { path: PathBuf, found: String },
    #[error("the source {0} is neither a directory nor a block device")]
    SourceKind(PathBuf),
    #[error("a {driver} pool cannot be {what}")]
    Unsupported { driver: String, what: &'static str },
    #[error("{path} already exists: remove it, or choose another pool name")]
    Leftover { path: PathBuf },
    #[error("{what}: {message}")]
    Command { what: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is in use by {users}: remove it from them first")]
    InUse { what: String, users: String },
}

impl From<StorageError> for DaemonError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::Command { .. } | StorageError::Io { .. } => {
                DaemonError::Internal(error.to_string())
            }
            StorageError::Leftover { .. } => DaemonError::Conflict(error.to_string()),
            other => DaemonError::BadRequest(other.to_string()),
        }
    }
}

/// An io error with what was being done.
pub(crate) fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StorageError {
    let what = what.into();
    move |source| StorageError::Io { what, source }
}

/// LXD's storage names: no slashes, nothing hidden.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), StorageError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(StorageError::Name {
            kind,
            name: name.to_string(),
        })
    }
}

/// Runs a command to its end; its stderr is the error's message.
pub(crate) fn run(program: &str, arguments: &[&str], what: &str) -> Result<String, StorageError> {
    let output = Command::new(program)
        .args(arguments)
        .output()
        .map_err(|error| StorageError::Command {
            what: what.to_string(),
            message: format!("cannot run {program}: {error}"),
        })?;
    if !output.status.success() {
        return Err(StorageError::Command {
            what: what.to_string(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// True when something is mounted exactly at `path` (in coved's mount namespace).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    table.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|mount_point| unescape(mount_point) == wanted)
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' && index + 3 < bytes.len() {
            if let Ok(value) = u8::from_str_radix(&field[index + 1..index + 4], 8) {
                out.push(value);
                index += 4;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when `path` is a directory with nothing in it.
pub(crate) fn is_empty_directory(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_are_plain_labels() {
        for good in ["default", "fast-pool", "pool_2", "a.b"] {
            validate_name("storage pool", good).unwrap();
        }
        for bad in ["", ".hidden", "-x", "a/b", "sp ace", &"x".repeat(64)] {
            assert!(validate_name("storage pool", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mountinfo_escapes_are_read_back() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert!(is_mount_point(Path::new("/")));
    }
}
