//! btrfs subvolumes through the kernel's ioctls (no `btrfs` command needed): whether a path is
//! a subvolume, creating one, snapshotting one and deleting one with the subvolumes nested in
//! it. Where an image is a subvolume, a container's root is a writable snapshot of it, as LXD's
//! btrfs storage driver makes them: instant, and sharing every block until written.
//!
//! Nothing here knows about containers; `rootfs` decides when to use it.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `statfs(2)`'s `f_type` of a btrfs file system.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
/// The inode number of every subvolume's root directory (`BTRFS_FIRST_FREE_OBJECTID`).
const SUBVOLUME_ROOT_INODE: u64 = 256;
/// The longest name `struct btrfs_ioctl_vol_args` carries (`BTRFS_PATH_NAME_MAX`).
const PATH_NAME_MAX: usize = 4087;
/// The longest name `struct btrfs_ioctl_vol_args_v2` carries (`BTRFS_SUBVOL_NAME_MAX`).
const SUBVOLUME_NAME_MAX: usize = 4039;
/// `BTRFS_SUBVOL_RDONLY`: the snapshot is read-only.
const SUBVOLUME_READ_ONLY: u64 = 1 << 1;

/// `struct btrfs_ioctl_vol_args` from `<linux/btrfs.h>`.
#[repr(C)]
struct VolumeArguments {
    fd: i64,
    name: [u8; PATH_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_vol_args_v2` from `<linux/btrfs.h>` (the `size`/`qgroup_inherit` union
/// is its `unused[4]` here, and the name union its `name`).
#[repr(C)]
struct VolumeArgumentsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; SUBVOLUME_NAME_MAX + 1],
}

/// `_IOW(0x94, number, size)`: the btrfs ioctls that pass a structure in.
const fn write_ioctl(number: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (0x94 << 8) | number
}
const IOC_SUBVOL_CREATE: u64 = write_ioctl(14, std::mem::size_of::<VolumeArguments>());
const IOC_SNAP_DESTROY: u64 = write_ioctl(15, std::mem::size_of::<VolumeArguments>());
const IOC_SNAP_CREATE_V2: u64 = write_ioctl(23, std::mem::size_of::<VolumeArgumentsV2>());

#[derive(Debug, thiserror::Error)]
pub enum BtrfsError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0} has no parent directory and a name that btrfs can carry (at most 4039 bytes, \
         no NUL)"
    )]
    Name(PathBuf),
    #[error("cannot create the btrfs subvolume {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot snapshot the btrfs subvolume {source_path} as {path}: {source}")]
    Snapshot {
        source_path: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot delete the btrfs subvolume {path}: {source}")]
    Delete {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// True if `path` is on a btrfs file system.
pub fn is_btrfs(path: &Path) -> bool {
    let Ok(path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut info: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `info` is a live, writable statfs.
    let result = unsafe { libc::statfs(path.as_ptr(), &mut info) };
    result == 0 && info.f_type as i64 == BTRFS_SUPER_MAGIC
}

/// True if `path` is the root directory of a btrfs subvolume.
pub fn is_subvolume(path: &Path) -> bool {
    is_btrfs(path)
        && std::fs::symlink_metadata(path)
            .is_ok_and(|metadata| metadata.is_dir() && metadata.ino() == SUBVOLUME_ROOT_INODE)
}

/// The parent directory, opened, and the last component of `path`, as the ioctls take them.
fn split(path: &Path, longest: usize) -> Result<(File, &OsStr), BtrfsError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(BtrfsError::Name(path.to_path_buf()));
    };
    if name.len() > longest || name.as_bytes().contains(&0) {
        return Err(BtrfsError::Name(path.to_path_buf()));
    }
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let directory = File::open(parent).map_err(|source| BtrfsError::Open {
        path: parent.to_path_buf(),
        source,
    })?;
    Ok((directory, name))
}

fn volume_arguments(name: &OsStr) -> Box<VolumeArguments> {
    let mut arguments = Box::new(VolumeArguments {
        fd: 0,
        name: [0; PATH_NAME_MAX + 1],
    });
    arguments.name[..name.len()].copy_from_slice(name.as_bytes());
    arguments
}

/// Creates an empty subvolume at `path`.
pub fn create_subvolume(path: &Path) -> Result<(), BtrfsError> {
    let (directory, name) = split(path, PATH_NAME_MAX)?;
    let arguments = volume_arguments(name);
    // SAFETY: BTRFS_IOC_SUBVOL_CREATE reads one btrfs_ioctl_vol_args, which `arguments` is
    // (repr(C), of the size encoded in the request number), live for the call.
    let result = unsafe {
        libc::ioctl(
            directory.as_raw_fd(),
            IOC_SUBVOL_CREATE as _,
            &*arguments as *const VolumeArguments,
        )
    };
    if result < 0 {
        return Err(BtrfsError::Create {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Makes `path` a snapshot of the subvolume `source` (writable unless `read_only`). Both must
/// be on the same btrfs file system: otherwise the error's source is EXDEV.
pub fn snapshot(source: &Path, path: &Path, read_only: bool) -> Result<(), BtrfsError> {
    let snapshot_error = |error| BtrfsError::Snapshot {
        source_path: source.to_path_buf(),
        path: path.to_path_buf(),
        source: error,
    };
    let (directory, name) = split(path, SUBVOLUME_NAME_MAX)?;
    let subvolume = File::open(source).map_err(|error| BtrfsError::Open {
        path: source.to_path_buf(),
        source: error,
    })?;
    let mut arguments = Box::new(VolumeArgumentsV2 {
        fd: i64::from(subvolume.as_raw_fd()),
        transid: 0,
        flags: if read_only { SUBVOLUME_READ_ONLY } else { 0 },
        unused: [0; 4],
        name: [0; SUBVOLUME_NAME_MAX + 1],
    });
    arguments.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: BTRFS_IOC_SNAP_CREATE_V2 reads one btrfs_ioctl_vol_args_v2, which `arguments`
    // is (repr(C), of the size encoded in the request number), live for the call; the fd in
    // it is open.
    let result = unsafe {
        libc::ioctl(
            directory.as_raw_fd(),
            IOC_SNAP_CREATE_V2 as _,
            &*arguments as *const VolumeArgumentsV2,
        )
    };
    if result < 0 {
        return Err(snapshot_error(io::Error::last_os_error()));
    }
    Ok(())
}

/// Deletes the subvolume at `path` with every subvolume nested below it (a container may have
/// made its own: systemd-nspawn and docker do on btrfs).
pub fn delete_subvolume(path: &Path) -> Result<(), BtrfsError> {
    let delete_error = |source| BtrfsError::Delete {
        path: path.to_path_buf(),
        source,
    };
    match destroy(path) {
        Err(error) if error.raw_os_error() == Some(libc::ENOTEMPTY) => {
            for nested in nested_subvolumes(path).map_err(delete_error)? {
                delete_subvolume(&nested)?;
            }
            destroy(path).map_err(delete_error)
        }
        result => result.map_err(delete_error),
    }
}

fn destroy(path: &Path) -> io::Result<()> {
    let (directory, name) = split(path, PATH_NAME_MAX).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, "no parent or an unusable name")
    })?;
    let arguments = volume_arguments(name);
    // SAFETY: BTRFS_IOC_SNAP_DESTROY reads one btrfs_ioctl_vol_args, which `arguments` is
    // (repr(C), of the size encoded in the request number), live for the call.
    let result = unsafe {
        libc::ioctl(
            directory.as_raw_fd(),
            IOC_SNAP_DESTROY as _,
            &*arguments as *const VolumeArguments,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The subvolumes directly nested in the subvolume `root` (not those nested in them): the
/// directories with a subvolume root's inode number on another device number.
fn nested_subvolumes(root: &Path) -> io::Result<Vec<PathBuf>> {
    let device = std::fs::symlink_metadata(root)?.dev();
    let mut nested = Vec::new();
    let mut directories = vec![root.to_path_buf()];
    while let Some(directory) = directories.pop() {
        for entry in std::fs::read_dir(&directory)? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let metadata = entry.metadata()?;
            if metadata.dev() != device && metadata.ino() == SUBVOLUME_ROOT_INODE {
                nested.push(entry.path());
            } else if metadata.dev() == device {
                directories.push(entry.path());
            }
        }
    }
    Ok(nested)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_linux_btrfs_h() {
        assert_eq!(std::mem::size_of::<VolumeArguments>(), 4096);
        assert_eq!(std::mem::size_of::<VolumeArgumentsV2>(), 4096);
        assert_eq!(IOC_SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(IOC_SNAP_DESTROY, 0x5000_940f);
        assert_eq!(IOC_SNAP_CREATE_V2, 0x5000_9417);
    }

    #[test]
    fn names_too_long_or_without_parent_are_refused() {
        assert!(matches!(
            snapshot(Path::new("/"), Path::new("/"), false),
            Err(BtrfsError::Name(_))
        ));
        let long = PathBuf::from("/tmp").join("x".repeat(SUBVOLUME_NAME_MAX + 1));
        assert!(matches!(
            snapshot(Path::new("/"), &long, false),
            Err(BtrfsError::Name(_))
        ));
    }

    #[test]
    fn missing_paths_are_no_subvolumes() {
        assert!(!is_subvolume(Path::new("/nonexistent/path")));
        assert!(!is_btrfs(Path::new("/nonexistent/path")));
    }
}
