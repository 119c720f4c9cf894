//! The one-time ownership shift of a snapshot: the fallback for hosts where an idmapped mount
//! is refused (a kernel older than 5.19 for overlayfs layers, a file system without idmapped
//! mounts) or where `security.idmap.shift=chown` asks for it. Every file is chowned once so
//! that host ids `base + n` stand for container ids `n`, as LXD did before idmapped mounts.
//!
//! chown alone would lose three things, which are carried over: the set-user-ID and
//! set-group-ID bits (the kernel clears them on chown), file capabilities (cleared too; they
//! are written back as version 3, owned by the container's root, or the kernel would not honour
//! them inside its user namespace) and the user and group entries of POSIX ACLs.
//!
//! Ids beyond the map's range are left as they are (inside they show as `nobody`).

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::idmap::{IdMap, IdRange};

const CAPABILITY_XATTR: &CStr = c"security.capability";
const ACCESS_ACL_XATTR: &CStr = c"system.posix_acl_access";
const DEFAULT_ACL_XATTR: &CStr = c"system.posix_acl_default";

/// `VFS_CAP_REVISION_*` and `VFS_CAP_FLAGS_EFFECTIVE` from `<linux/capability.h>`.
const CAPABILITY_REVISION_MASK: u32 = 0xff00_0000;
const CAPABILITY_REVISION_1: u32 = 0x0100_0000;
const CAPABILITY_REVISION_2: u32 = 0x0200_0000;
const CAPABILITY_REVISION_3: u32 = 0x0300_0000;
const CAPABILITY_EFFECTIVE: u32 = 0x0000_0001;
/// `POSIX_ACL_XATTR_VERSION` and the tags whose entries carry an id.
const ACL_VERSION: u32 = 2;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;

#[derive(Debug, thiserror::Error)]
#[error("cannot shift the ownership of {path}: {source}")]
pub struct ShiftError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Shifts the ownership of every file in `source` by `map`, applying it to the same path below
/// `target`; returns how many files it shifted.
///
/// `source == target` shifts a tree in place (a btrfs snapshot): a file with several hard links
/// is shifted once. Otherwise `source` is the unshifted original (the image below an overlayfs
/// snapshot mounted at `target`), whose ids are read, so that chowning a name twice is harmless.
/// Does not descend into other file systems.
pub fn shift_tree(source: &Path, target: &Path, map: &IdMap) -> Result<u64, ShiftError> {
    let error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ShiftError { path, source }
    };
    let in_place = source == target;
    let device = std::fs::symlink_metadata(source)
        .map_err(error(source))?
        .dev();
    let mut seen = HashSet::new();
    let mut shifted = 0;
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let original = source.join(&relative);
        let metadata = std::fs::symlink_metadata(&original).map_err(error(&original))?;
        if metadata.is_dir() && metadata.dev() == device {
            for entry in std::fs::read_dir(&original).map_err(error(&original))? {
                let entry = entry.map_err(error(&original))?;
                pending.push(relative.join(entry.file_name()));
            }
        }
        if in_place
            && !metadata.is_dir()
            && metadata.nlink() > 1
            && !seen.insert((metadata.dev(), metadata.ino()))
        {
            continue;
        }
        let destination = target.join(&relative);
        shift_file(&original, &destination, &metadata, map).map_err(error(&destination))?;
        shifted += 1;
    }
    Ok(shifted)
}

fn shift_file(
    original: &Path,
    destination: &Path,
    metadata: &std::fs::Metadata,
    map: &IdMap,
) -> io::Result<()> {
    let original = path_text(original)?;
    let is_symlink = metadata.file_type().is_symlink();
    let capabilities = if metadata.is_file() {
        read_xattr(&original, CAPABILITY_XATTR)?
    } else {
        None
    };
    let mut acls = Vec::new();
    if !is_symlink {
        let names: &[&CStr] = if metadata.is_dir() {
            &[ACCESS_ACL_XATTR, DEFAULT_ACL_XATTR]
        } else {
            &[ACCESS_ACL_XATTR]
        };
        for name in names {
            if let Some(acl) = read_xattr(&original, name)? {
                acls.push((*name, acl));
            }
        }
    }

    std::os::unix::fs::lchown(
        destination,
        Some(shift_id(metadata.uid(), map.uid)),
        Some(shift_id(metadata.gid(), map.gid)),
    )?;
    let mode = metadata.mode() & 0o7777;
    if metadata.is_file() && mode & 0o6000 != 0 {
        std::fs::set_permissions(destination, std::fs::Permissions::from_mode(mode))?;
    }
    let destination = path_text(destination)?;
    if let Some(shifted) = capabilities.and_then(|value| shift_capabilities(&value, map.uid)) {
        write_xattr(&destination, CAPABILITY_XATTR, &shifted)?;
    }
    for (name, acl) in acls {
        if let Some(shifted) = shift_acl(&acl, map) {
            write_xattr(&destination, name, &shifted)?;
        }
    }
    Ok(())
}

/// The host id that stands for container id `id`; ids beyond the range stay.
pub fn shift_id(id: u32, range: IdRange) -> u32 {
    if id < range.size {
        range.host_base.saturating_add(id)
    } else {
        id
    }
}

/// A `security.capability` value rewritten as version 3 owned by the shifted root id; `None`
/// for a value this does not understand.
pub fn shift_capabilities(value: &[u8], uids: IdRange) -> Option<Vec<u8>> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(value.get(at..at + 4)?.try_into().ok()?))
    };
    let magic = word(0)?;
    // data[0] and data[1]: (permitted, inheritable) for capabilities 0-31 and 32-63.
    let (data, root) = match (magic & CAPABILITY_REVISION_MASK, value.len()) {
        (CAPABILITY_REVISION_1, 12) => ([word(4)?, word(8)?, 0, 0], 0),
        (CAPABILITY_REVISION_2, 20) => ([word(4)?, word(8)?, word(12)?, word(16)?], 0),
        (CAPABILITY_REVISION_3, 24) => ([word(4)?, word(8)?, word(12)?, word(16)?], word(20)?),
        _ => return None,
    };
    let mut shifted = Vec::with_capacity(24);
    let magic = CAPABILITY_REVISION_3 | (magic & CAPABILITY_EFFECTIVE);
    for word in [
        magic,
        data[0],
        data[1],
        data[2],
        data[3],
        shift_id(root, uids),
    ] {
        shifted.extend_from_slice(&word.to_le_bytes());
    }
    Some(shifted)
}

/// A POSIX ACL xattr value with its user and group entries shifted; `None` for a value this
/// does not understand.
pub fn shift_acl(value: &[u8], map: &IdMap) -> Option<Vec<u8>> {
    let version = u32::from_le_bytes(value.get(..4)?.try_into().ok()?);
    if version != ACL_VERSION || (value.len() - 4) % 8 != 0 {
        return None;
    }
    let mut shifted = value.to_vec();
    for entry in shifted[4..].chunks_exact_mut(8) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let range = match tag {
            ACL_USER => map.uid,
            ACL_GROUP => map.gid,
            _ => continue,
        };
        let id = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
        entry[4..8].copy_from_slice(&shift_id(id, range).to_le_bytes());
    }
    Some(shifted)
}

fn path_text(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))
}

/// An extended attribute of `path` itself (not a symlink's target); `None` when it has none or
/// its file system has no extended attributes.
fn read_xattr(path: &CStr, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let mut value = vec![0u8; 256];
    loop {
        // SAFETY: both strings are NUL-terminated; `value` is live and writable for the
        // length passed.
        let length = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if length >= 0 {
            value.truncate(length as usize);
            return Ok(Some(value));
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => return Ok(None),
            Some(libc::ERANGE) if value.len() < 1 << 16 => value.resize(value.len() * 4, 0),
            _ => return Err(error),
        }
    }
}

fn write_xattr(path: &CStr, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated; `value` is live for the length passed and only
    // read.
    let result = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: IdMap = IdMap {
        uid: IdRange {
            host_base: 1_000_000,
            size: 65536,
        },
        gid: IdRange {
            host_base: 2_000_000,
            size: 65536,
        },
    };

    fn words(values: &[u32]) -> Vec<u8> {
        values.iter().flat_map(|word| word.to_le_bytes()).collect()
    }

    #[test]
    fn ids_in_the_range_move_and_others_stay() {
        assert_eq!(shift_id(0, MAP.uid), 1_000_000);
        assert_eq!(shift_id(65535, MAP.uid), 1_065_535);
        assert_eq!(shift_id(65536, MAP.uid), 65536);
    }

    #[test]
    fn capabilities_become_version_3_owned_by_the_shifted_root() {
        // cap_net_raw+ep as setcap writes it for host root: version 2, effective.
        let version_2 = words(&[CAPABILITY_REVISION_2 | 1, 1 << 13, 0, 0, 0]);
        assert_eq!(
            shift_capabilities(&version_2, MAP.uid),
            Some(words(&[
                CAPABILITY_REVISION_3 | 1,
                1 << 13,
                0,
                0,
                0,
                1_000_000
            ]))
        );
        let version_3 = words(&[CAPABILITY_REVISION_3, 1, 2, 3, 4, 5]);
        assert_eq!(
            shift_capabilities(&version_3, MAP.uid),
            Some(words(&[CAPABILITY_REVISION_3, 1, 2, 3, 4, 1_000_005]))
        );
        let version_1 = words(&[CAPABILITY_REVISION_1, 7, 8]);
        assert_eq!(
            shift_capabilities(&version_1, MAP.uid),
            Some(words(&[CAPABILITY_REVISION_3, 7, 8, 0, 0, 1_000_000]))
        );
        assert_eq!(shift_capabilities(&[1, 2, 3], MAP.uid), None);
        assert_eq!(shift_capabilities(&words(&[0x0400_0000, 1]), MAP.uid), None);
    }

    #[test]
    fn acl_user_and_group_entries_shift() {
        let entry = |tag: u16, perm: u16, id: u32| {
            let mut bytes = tag.to_le_bytes().to_vec();
            bytes.extend_from_slice(&perm.to_le_bytes());
            bytes.extend_from_slice(&id.to_le_bytes());
            bytes
        };
        let acl = |entries: &[(u16, u16, u32)]| {
            let mut bytes = ACL_VERSION.to_le_bytes().to_vec();
            for (tag, perm, id) in entries {
                bytes.extend(entry(*tag, *perm, *id));
            }
            bytes
        };
        let undefined = u32::MAX;
        let before = acl(&[
            (0x01, 6, undefined),
            (ACL_USER, 6, 1000),
            (0x04, 4, undefined),
            (ACL_GROUP, 4, 50),
            (0x20, 4, undefined),
        ]);
        let after = acl(&[
            (0x01, 6, undefined),
            (ACL_USER, 6, 1_001_000),
            (0x04, 4, undefined),
            (ACL_GROUP, 4, 2_000_050),
            (0x20, 4, undefined),
        ]);
        assert_eq!(shift_acl(&before, &MAP), Some(after));
        assert_eq!(shift_acl(&before[..7], &MAP), None);
        assert_eq!(shift_acl(&[], &MAP), None);
    }

    #[test]
    fn a_tree_is_shifted_in_place_once_per_inode() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: chown needs root");
            return;
        }
        let root = std::env::temp_dir().join(format!("cove-shift-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bin")).expect("create the tree");
        std::fs::write(root.join("bin/tool"), "x").expect("write a file");
        std::fs::hard_link(root.join("bin/tool"), root.join("bin/same")).expect("hard link");
        std::os::unix::fs::symlink("tool", root.join("bin/link")).expect("symlink");
        std::fs::set_permissions(
            root.join("bin/tool"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .expect("chmod");
        std::os::unix::fs::lchown(root.join("bin/link"), Some(5), Some(6)).expect("chown");

        let shifted = shift_tree(&root, &root, &MAP).expect("shift");
        let metadata = |name: &str| std::fs::symlink_metadata(root.join(name)).expect("stat");
        assert_eq!(shifted, 4, "root, bin, one of the hard links, the symlink");
        assert_eq!(
            (metadata("").uid(), metadata("").gid()),
            (1_000_000, 2_000_000)
        );
        assert_eq!(metadata("bin/tool").uid(), 1_000_000);
        assert_eq!(metadata("bin/tool").mode() & 0o7777, 0o4755);
        assert_eq!(
            (metadata("bin/link").uid(), metadata("bin/link").gid()),
            (1_000_005, 2_000_006)
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
