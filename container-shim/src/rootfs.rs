//! The container's root file system on the host: a copy-on-write overlayfs snapshot of the
//! image directory, so starting a container never copies the image and never writes to it.
//!
//! Layout under the container's directory: `upper/` (what the container changed), `work/`
//! (overlayfs's scratch space), `rootfs/` (where the snapshot is mounted, on the host as LXD
//! does, so the host can reach a running container's files).
//!
//! For an unprivileged container the image (owned by host root) is seen through an idmapped
//! mount, so inside the container its files belong to the container's root, while writes land
//! in `upper/` owned by the mapped host ids (1000000 and up). Nothing is chowned, so starting
//! costs the same whatever the image's size.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::idmap::IdMap;
use crate::kernel;

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
         image's file system does not support idmapped mounts: run the container privileged"
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
}

/// A mounted snapshot; unmount it with [`Snapshot::unmount`].
#[derive(Debug)]
pub struct Snapshot {
    pub upper: PathBuf,
    pub root: PathBuf,
}

/// The directory names inside a container's directory.
pub const UPPER: &str = "upper";
pub const WORK: &str = "work";
pub const ROOT: &str = "rootfs";
const IDMAPPED_IMAGE: &str = "image";

impl Snapshot {
    /// Mounts a snapshot of `image` in `container_directory` (which must exist). With an id
    /// map the container sees the image owned by its own root.
    pub fn mount(
        image: &Path,
        container_directory: &Path,
        id_map: Option<&IdMap>,
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

        let lower = match id_map {
            None => image.to_path_buf(),
            Some(map) => {
                let lower = container_directory.join(IDMAPPED_IMAGE);
                std::fs::create_dir(&lower).map_err(|source| RootfsError::CreateDirectory {
                    path: lower.clone(),
                    source,
                })?;
                attach_idmapped(image, &lower, map)?;
                lower
            }
        };
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let overlay = kernel::mount(
            Some(c"overlay"),
            &c_path(&root),
            Some(c"overlay"),
            0,
            Some(&CString::new(options).unwrap_or_default()),
        );
        if id_map.is_some() {
            // overlayfs holds its own reference to the idmapped layer: the staging mount can go.
            let _ = kernel::detach_mount(&c_path(&lower));
            let _ = std::fs::remove_dir(&lower);
        }
        overlay.map_err(|errno| RootfsError::Overlay {
            image: image.to_path_buf(),
            target: root.clone(),
            source: io::Error::from_raw_os_error(errno),
        })?;
        Ok(Self { upper, root })
    }

    /// Unmounts the snapshot (lazily: a process still inside it keeps its view).
    pub fn unmount(&self) -> Result<(), RootfsError> {
        unmount_if_mounted(&self.root)
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
