//! The container's root file system on the host: a copy-on-write snapshot of the image
//! directory, so starting a container never copies the image and never writes to it. Two kinds:
//!
//! - **overlayfs** (any image directory). Layout under the container's directory: `upper/`
//!   (what the container changed), `work/` (overlayfs's scratch space), `rootfs/` (where the
//!   snapshot is mounted, on the host as LXD does, so the host can reach a running container's
//!   files).
//! - **btrfs** (an image that is a btrfs subvolume, with the containers directory on the same
//!   file system): `snapshot/` is a writable subvolume snapshot of the image, as LXD's btrfs
//!   driver makes them, mounted (bound) on `rootfs/`.
//!
//! For an unprivileged container the image (owned by host root) is seen through an idmapped
//! mount (the overlay's lower layer, or the btrfs snapshot), so inside the container its files
//! belong to the container's root. Nothing is chowned, so starting costs the same whatever the
//! image's size. Where the kernel or the file system refuses an idmapped mount, or
//! `security.idmap.shift=chown` asks for it, the snapshot is chowned once instead (`shift`):
//! the btrfs snapshot in place, the overlayfs one through the overlay mounted with
//! `metacopy=on`, so that only metadata is copied up.
//!
//! The snapshot outlives stops: the first start makes it and writes `snapshot.json` (its
//! kind, whether it was chowned, and the id map it was made for); every later start mounts
//! the same writable layer again (overlayfs's `upper/` with a fresh `work/`, or the same
//! btrfs subvolume) and never shifts it twice. `delete` removes it.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::btrfs::{self, BtrfsError};
use crate::config::{IdShift, SnapshotMethod};
use crate::idmap::IdMap;
use crate::kernel;
use crate::shift::{self, ShiftError};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot create {path}: {source}")]
    CreateDirectory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the path {0} contains a comma, colon or newline, which overlayfs options cannot carry; \
         move it to a plainer path"
    )]
    UnusablePath(PathBuf),
    #[error("cannot make a user namespace to idmap the image: {0}")]
    UserNamespace(#[source] io::Error),
    #[error("cannot write the id map of the helper user namespace: {0}")]
    IdMap(#[from] crate::idmap::IdMapError),
    #[error(
        "cannot make an idmapped mount of the image {path}: {source}; the host kernel or the \
         image's file system does not support idmapped mounts: run the container privileged \
         or let it fall back to chowning its snapshot (security.idmap.shift=auto or chown)"
    )]
    Idmap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount the overlayfs snapshot of {image} on {target}: {source}")]
    Overlay {
        image: PathBuf,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot unmount {path}: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the snapshot {source_path} on {target}: {source}")]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the image {0} is not a btrfs subvolume: a btrfs snapshot needs the image as a \
         subvolume on the file system of the containers directory"
    )]
    NotSubvolume(PathBuf),
    #[error(transparent)]
    Btrfs(#[from] BtrfsError),
    #[error(transparent)]
    Shift(#[from] ShiftError),
    #[error("cannot record the snapshot in {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the snapshot in {directory} was made for {recorded} and cannot be started with \
         {wanted}: delete the container and create it again, or restore its earlier \
         security.privileged and security.idmap.* keys"
    )]
    IdMapChanged {
        directory: PathBuf,
        recorded: String,
        wanted: String,
    },
}

/// What a container directory's first start made, so that later starts reuse it as it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SnapshotRecord {
    /// `overlay` or `btrfs`.
    kind: String,
    /// True once the files were chowned to the container's ids (the fallback): never again.
    shifted: bool,
    /// The id map's host bases; `None` for a privileged container.
    uid_base: Option<u32>,
    gid_base: Option<u32>,
}

impl SnapshotRecord {
    fn describe_map(uid_base: Option<u32>) -> String {
        uid_base.map_or("a privileged container".to_string(), |base| {
            format!("the id map at host id {base}")
        })
    }
}

/// The record of what the first start made.
pub const SNAPSHOT_RECORD: &str = "snapshot.json";

/// True when `container_directory` holds a snapshot a start made (it may be started again).
pub fn is_container_directory(container_directory: &Path) -> bool {
    read_record(container_directory).is_some()
}

/// True while something (the snapshot) is mounted on the directory's `rootfs/`.
pub fn is_mounted(container_directory: &Path) -> bool {
    let device = |path: &Path| std::fs::symlink_metadata(path).map(|metadata| metadata.dev());
    match (
        device(container_directory),
        device(&container_directory.join(ROOT)),
    ) {
        (Ok(directory), Ok(root)) => directory != root,
        _ => false,
    }
}

fn read_record(container_directory: &Path) -> Option<SnapshotRecord> {
    let text = std::fs::read(container_directory.join(SNAPSHOT_RECORD)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_record(container_directory: &Path, record: &SnapshotRecord) -> Result<(), RootfsError> {
    let path = container_directory.join(SNAPSHOT_RECORD);
    let text = serde_json::to_vec_pretty(record).unwrap_or_default();
    std::fs::write(&path, text).map_err(|source| RootfsError::Record { path, source })
}

/// A mounted snapshot; unmount it with [`Snapshot::unmount`], then remove what the container
/// directory holds with [`remove_snapshot`].
#[derive(Debug)]
pub struct Snapshot {
    /// The container's own files as the host stores them: overlayfs's upper directory, or the
    /// whole btrfs snapshot.
    pub upper: PathBuf,
    /// Where the snapshot is mounted: the container's root.
    pub root: PathBuf,
    pub kind: SnapshotKind,
    /// How the files came to belong to the container's ids; `None` when privileged.
    pub id_shift: Option<IdShift>,
}

/// How a snapshot was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    Overlay,
    Btrfs,
}

/// The directory names inside a container's directory.
pub const UPPER: &str = "upper";
pub const WORK: &str = "work";
pub const ROOT: &str = "rootfs";
/// The btrfs snapshot (a subvolume).
pub const BTRFS_SNAPSHOT: &str = "snapshot";
const IDMAPPED_IMAGE: &str = "image";

impl Snapshot {
    /// Mounts a snapshot of `image` in `container_directory` (which must exist), made by
    /// `method`. With an id map the container sees the image owned by its own root, by the
    /// means `id_shift` allows.
    pub fn mount(
        image: &Path,
        container_directory: &Path,
        id_map: Option<&IdMap>,
        method: SnapshotMethod,
        id_shift: IdShift,
    ) -> Result<Self, RootfsError> {
        if let Some(record) = read_record(container_directory) {
            return Self::mount_again(image, container_directory, id_map, &record);
        }
        let snapshot = Self::mount_new(image, container_directory, id_map, method, id_shift)?;
        let record = SnapshotRecord {
            kind: match snapshot.kind {
                SnapshotKind::Overlay => "overlay",
                SnapshotKind::Btrfs => "btrfs",
            }
            .to_string(),
            shifted: snapshot.id_shift == Some(IdShift::Chown),
            uid_base: id_map.map(|map| map.uid.host_base),
            gid_base: id_map.map(|map| map.gid.host_base),
        };
        if let Err(error) = write_record(container_directory, &record) {
            let _ = snapshot.unmount();
            return Err(error);
        }
        Ok(snapshot)
    }

    /// Mounts the writable layer an earlier start made, as that start made it: the same
    /// kind, and no second chown.
    fn mount_again(
        image: &Path,
        container_directory: &Path,
        id_map: Option<&IdMap>,
        record: &SnapshotRecord,
    ) -> Result<Self, RootfsError> {
        let wanted = id_map.map(|map| map.uid.host_base);
        if wanted != record.uid_base || id_map.map(|map| map.gid.host_base) != record.gid_base {
            return Err(RootfsError::IdMapChanged {
                directory: container_directory.to_path_buf(),
                recorded: SnapshotRecord::describe_map(record.uid_base),
                wanted: SnapshotRecord::describe_map(wanted),
            });
        }
        let root = container_directory.join(ROOT);
        create_missing(&root)?;
        let id_shift = id_map.map(|_| {
            if record.shifted {
                IdShift::Chown
            } else {
                IdShift::Idmapped
            }
        });
        if record.kind == "btrfs" {
            let upper = container_directory.join(BTRFS_SNAPSHOT);
            match (id_map, id_shift) {
                (Some(map), Some(IdShift::Idmapped)) => attach_idmapped(&upper, &root, map)?,
                _ => bind(&upper, &root)?,
            }
            return Ok(Self {
                upper,
                root,
                kind: SnapshotKind::Btrfs,
                id_shift,
            });
        }
        let upper = container_directory.join(UPPER);
        let work = container_directory.join(WORK);
        // overlayfs wants an empty work directory of its own; the old one may hold its
        // leftovers (`work/work`, mode 000).
        if work.exists() {
            std::fs::remove_dir_all(&work).map_err(|source| RootfsError::CreateDirectory {
                path: work.clone(),
                source,
            })?;
        }
        create_missing(&upper)?;
        create_missing(&work)?;
        let overlay_error = |errno: i32| RootfsError::Overlay {
            image: image.to_path_buf(),
            target: root.clone(),
            source: io::Error::from_raw_os_error(errno),
        };
        match (id_map, id_shift) {
            (Some(map), Some(IdShift::Idmapped)) => {
                mount_idmapped_overlay(image, container_directory, map)?
            }
            // Chowned before: the upper layer holds every file's new owner already.
            (Some(_), _) => overlay_mount(image, &upper, &work, &root, true)
                .or_else(|errno| match errno {
                    libc::EINVAL => overlay_mount(image, &upper, &work, &root, false),
                    errno => Err(errno),
                })
                .map_err(overlay_error)?,
            (None, _) => {
                overlay_mount(image, &upper, &work, &root, false).map_err(overlay_error)?
            }
        }
        Ok(Self {
            upper,
            root,
            kind: SnapshotKind::Overlay,
            id_shift,
        })
    }

    /// The first start's snapshot, made by `method`.
    fn mount_new(
        image: &Path,
        container_directory: &Path,
        id_map: Option<&IdMap>,
        method: SnapshotMethod,
        id_shift: IdShift,
    ) -> Result<Self, RootfsError> {
        let use_btrfs = match method {
            SnapshotMethod::Overlay => false,
            SnapshotMethod::Btrfs => true,
            SnapshotMethod::Detect => {
                btrfs::is_subvolume(image) && btrfs::is_btrfs(container_directory)
            }
        };
        if use_btrfs {
            match Self::mount_btrfs(image, container_directory, id_map, id_shift) {
                // Another btrfs file system than the containers directory's: overlayfs works.
                Err(RootfsError::Btrfs(BtrfsError::Snapshot { source, .. }))
                    if method == SnapshotMethod::Detect
                        && source.raw_os_error() == Some(libc::EXDEV) => {}
                result => return result,
            }
        }
        Self::mount_overlay(image, container_directory, id_map, id_shift)
    }

    /// A btrfs snapshot of the subvolume `image` at `snapshot/`, bound (or idmapped) on
    /// `rootfs/`.
    fn mount_btrfs(
        image: &Path,
        container_directory: &Path,
        id_map: Option<&IdMap>,
        id_shift: IdShift,
    ) -> Result<Self, RootfsError> {
        if !btrfs::is_subvolume(image) {
            return Err(RootfsError::NotSubvolume(image.to_path_buf()));
        }
        let upper = container_directory.join(BTRFS_SNAPSHOT);
        let root = container_directory.join(ROOT);
        // First, so that a refused snapshot (EXDEV) leaves nothing in the way of overlayfs.
        btrfs::snapshot(image, &upper, false)?;
        let mounted = (|| {
            std::fs::create_dir(&root).map_err(|source| RootfsError::CreateDirectory {
                path: root.clone(),
                source,
            })?;
            let Some(map) = id_map else {
                bind(&upper, &root)?;
                return Ok(None);
            };
            if id_shift != IdShift::Chown {
                match attach_idmapped(&upper, &root, map) {
                    Ok(()) => return Ok(Some(IdShift::Idmapped)),
                    Err(error) if id_shift == IdShift::Auto && idmap_refused(&error) => {}
                    Err(error) => return Err(error),
                }
            }
            shift::shift_tree(&upper, &upper, map)?;
            bind(&upper, &root)?;
            Ok(Some(IdShift::Chown))
        })();
        match mounted {
            Ok(id_shift) => Ok(Self {
                upper,
                root,
                kind: SnapshotKind::Btrfs,
                id_shift,
            }),
            Err(error) => {
                let _ = unmount_if_mounted(&root);
                let _ = btrfs::delete_subvolume(&upper);
                Err(error)
            }
        }
    }

    /// An overlayfs snapshot of `image` mounted on `rootfs/`.
    fn mount_overlay(
        image: &Path,
        container_directory: &Path,
        id_map: Option<&IdMap>,
        id_shift: IdShift,
    ) -> Result<Self, RootfsError> {
        for path in [image, container_directory] {
            if path
                .as_os_str()
                .as_bytes()
                .iter()
                .any(|byte| matches!(byte, b',' | b':' | b'\n'))
            {
                return Err(RootfsError::UnusablePath(path.to_path_buf()));
            }
        }
        let upper = container_directory.join(UPPER);
        let work = container_directory.join(WORK);
        let root = container_directory.join(ROOT);
        for path in [&upper, &work, &root] {
            std::fs::create_dir(path).map_err(|source| RootfsError::CreateDirectory {
                path: path.clone(),
                source,
            })?;
        }
        // The snapshot's root directory takes its owner and mode from upper/.
        let image_root = std::fs::metadata(image).map_err(|source| RootfsError::Overlay {
            image: image.to_path_buf(),
            target: root.clone(),
            source,
        })?;
        let (uid, gid) = match id_map {
            Some(map) => (map.uid.host_base, map.gid.host_base),
            None => (image_root.uid(), image_root.gid()),
        };
        let set_owner = || -> io::Result<()> {
            std::os::unix::fs::chown(&upper, Some(uid), Some(gid))?;
            std::fs::set_permissions(&upper, image_root.permissions())
        };
        set_owner().map_err(|source| RootfsError::CreateDirectory {
            path: upper.clone(),
            source,
        })?;

        let overlay_error = |errno: i32| RootfsError::Overlay {
            image: image.to_path_buf(),
            target: root.clone(),
            source: io::Error::from_raw_os_error(errno),
        };
        let snapshot = |id_shift| Self {
            upper: upper.clone(),
            root: root.clone(),
            kind: SnapshotKind::Overlay,
            id_shift,
        };
        let Some(map) = id_map else {
            overlay_mount(image, &upper, &work, &root, false).map_err(overlay_error)?;
            return Ok(snapshot(None));
        };
        if id_shift != IdShift::Chown {
            match mount_idmapped_overlay(image, container_directory, map) {
                Ok(()) => return Ok(snapshot(Some(IdShift::Idmapped))),
                Err(error) if id_shift == IdShift::Auto && idmap_refused(&error) => {}
                Err(error) => return Err(error),
            }
        }
        // The fallback: an overlay of the image as it is, chowned once through the overlay.
        // metacopy=on copies up only the metadata (kernels without it copy whole files).
        overlay_mount(image, &upper, &work, &root, true)
            .or_else(|errno| match errno {
                libc::EINVAL => overlay_mount(image, &upper, &work, &root, false),
                errno => Err(errno),
            })
            .map_err(overlay_error)?;
        if let Err(error) = shift::shift_tree(image, &root, map) {
            let _ = unmount_if_mounted(&root);
            return Err(error.into());
        }
        Ok(snapshot(Some(IdShift::Chown)))
    }

    /// Unmounts the snapshot (lazily: a process still inside it keeps its view).
    pub fn unmount(&self) -> Result<(), RootfsError> {
        unmount_if_mounted(&self.root)
    }
}

/// Creates `path` unless it is there already.
fn create_missing(path: &Path) -> Result<(), RootfsError> {
    match std::fs::create_dir(path) {
        Err(source) if source.kind() != io::ErrorKind::AlreadyExists => {
            Err(RootfsError::CreateDirectory {
                path: path.to_path_buf(),
                source,
            })
        }
        _ => Ok(()),
    }
}

/// Unmounts `path` if something is mounted there.
pub fn unmount_if_mounted(path: &Path) -> Result<(), RootfsError> {
    match kernel::detach_mount(&c_path(path)) {
        Ok(()) | Err(libc::EINVAL) | Err(libc::ENOENT) => Ok(()),
        Err(errno) => Err(RootfsError::Unmount {
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(errno),
        }),
    }
}

/// The overlay on `<container_directory>/rootfs` with an idmapped view of `image` as its
/// lower layer.
fn mount_idmapped_overlay(
    image: &Path,
    container_directory: &Path,
    map: &IdMap,
) -> Result<(), RootfsError> {
    let lower = container_directory.join(IDMAPPED_IMAGE);
    let root = container_directory.join(ROOT);
    std::fs::create_dir(&lower).map_err(|source| RootfsError::CreateDirectory {
        path: lower.clone(),
        source,
    })?;
    let attached = attach_idmapped(image, &lower, map);
    let overlay = attached.and_then(|()| {
        overlay_mount(
            &lower,
            &container_directory.join(UPPER),
            &container_directory.join(WORK),
            &root,
            false,
        )
        .map_err(|errno| RootfsError::Overlay {
            image: image.to_path_buf(),
            target: root.clone(),
            source: io::Error::from_raw_os_error(errno),
        })
    });
    // overlayfs holds its own reference to the idmapped layer: the staging mount can go.
    let _ = kernel::detach_mount(&c_path(&lower));
    let _ = std::fs::remove_dir(&lower);
    overlay
}

fn overlay_mount(
    lower: &Path,
    upper: &Path,
    work: &Path,
    target: &Path,
    metacopy: bool,
) -> Result<(), i32> {
    let mut options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    if metacopy {
        options.push_str(",metacopy=on");
    }
    kernel::mount(
        Some(c"overlay"),
        &c_path(target),
        Some(c"overlay"),
        0,
        Some(&CString::new(options).unwrap_or_default()),
    )
}

/// True when `error` says the kernel or the file system refuses an idmapped mount (or
/// overlayfs refuses an idmapped layer, before Linux 5.19), which the one-time chown can
/// stand in for.
fn idmap_refused(error: &RootfsError) -> bool {
    let errno = match error {
        RootfsError::Idmap { source, .. } | RootfsError::Overlay { source, .. } => {
            source.raw_os_error()
        }
        _ => None,
    };
    matches!(
        errno,
        Some(libc::EINVAL | libc::EPERM | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

fn bind(source: &Path, target: &Path) -> Result<(), RootfsError> {
    kernel::mount(
        Some(&c_path(source)),
        &c_path(target),
        None,
        libc::MS_BIND,
        None,
    )
    .map_err(|errno| RootfsError::Bind {
        source_path: source.to_path_buf(),
        target: target.to_path_buf(),
        source: io::Error::from_raw_os_error(errno),
    })
}

/// Removes what `remove_dir_all` cannot take from an unmounted container directory: a btrfs
/// snapshot (deleted with the subvolumes the container made in it).
pub fn remove_snapshot(container_directory: &Path) -> Result<(), RootfsError> {
    let snapshot = container_directory.join(BTRFS_SNAPSHOT);
    if btrfs::is_subvolume(&snapshot) {
        btrfs::delete_subvolume(&snapshot)?;
    }
    Ok(())
}

/// Attaches an idmapped view of `image` at `target`.
fn attach_idmapped(image: &Path, target: &Path, map: &IdMap) -> Result<(), RootfsError> {
    let idmap_error = |source| RootfsError::Idmap {
        path: image.to_path_buf(),
        source,
    };
    let user_namespace = user_namespace_with(map)?;
    let tree = kernel::clone_tree(&c_path(image)).map_err(idmap_error)?;
    kernel::idmap_mount(&tree, &user_namespace).map_err(idmap_error)?;
    kernel::attach_mount(&tree, &c_path(target)).map_err(idmap_error)
}

/// A user namespace carrying `map`. An idmapped mount copies the mapping when it is made, so
/// the namespace's short-lived holder is killed right after.
///
/// The holder waits for SIGKILL rather than for a pipe to close: other threads may be cloning
/// children at the same moment, and each would hold a copy of the pipe's write end until it
/// execs, so "closed" could come late or never.
fn user_namespace_with(map: &IdMap) -> Result<OwnedFd, RootfsError> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the child only makes async-signal-safe system calls and never returns.
    let pid = unsafe { kernel::clone_into_namespaces(libc::CLONE_NEWUSER) }
        .map_err(RootfsError::UserNamespace)?;
    if pid == 0 {
        // SAFETY: prctl, getppid and pause take integers only. If the parent is gone already,
        // nobody will kill the holder: leave.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                kernel::exit_child(0);
            }
            loop {
                libc::pause();
            }
        }
    }
    let result = map.write_to(pid).map_err(RootfsError::from).and_then(|()| {
        std::fs::File::open(format!("/proc/{pid}/ns/user"))
            .map(OwnedFd::from)
            .map_err(RootfsError::UserNamespace)
    });
    // SAFETY: kill(2) on our own unreaped child, whose pid cannot be recycled yet.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = kernel::wait_for_exit(pid);
    result
}

/// A path as a C string (paths from the OS never hold NUL bytes).
pub fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}
