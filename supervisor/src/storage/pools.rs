//! Making, mounting and removing pools on the host. Each step that makes something is undone
//! when a later one fails, so that a refused pool leaves no loop file, mount or directory.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{io_error, is_empty_directory, is_mount_point, run, StorageError};

/// The smallest pool on a loop file or device that mkfs.btrfs makes.
const MIN_SIZE: u64 = 256 << 20;
/// LXD's bounds for the default loop file size (a fifth of the free space).
const DEFAULT_MIN_SIZE: u64 = 5 << 30;
const DEFAULT_MAX_SIZE: u64 = 30 << 30;

/// Where the pool `name` is mounted (or lives, for a plain `dir` pool).
pub fn pool_directory(cove_directory: &Path, name: &str) -> PathBuf {
    cove_directory.join("storage-pools").join(name)
}

/// The loop file a btrfs pool without a source lives in.
pub fn loop_file(cove_directory: &Path, name: &str) -> PathBuf {
    cove_directory.join("disks").join(format!("{name}.img"))
}

/// A size as LXD writes it (`20GiB`), at least what mkfs.btrfs needs.
pub fn parse_size(value: &str) -> Result<u64, StorageError> {
    let bytes =
        cove_shim::config::parse_size("size", value.trim()).map_err(|_| StorageError::Size {
            value: value.to_string(),
            problem: "expected a size such as 10GiB, 500MB or a number of bytes".into(),
        })?;
    if bytes < MIN_SIZE {
        return Err(StorageError::Size {
            value: value.to_string(),
            problem: "a btrfs pool needs at least 256MiB".into(),
        });
    }
    Ok(bytes)
}

/// LXD's default: a fifth of the free space where the loop file goes, between 5 and 30 GiB,
/// in whole GiB.
pub fn default_size(cove_directory: &Path) -> u64 {
    let free = statvfs(cove_directory)
        .map(|stats| stats.f_bavail * stats.f_frsize)
        .unwrap_or(0);
    let size = (free / 5).clamp(DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE);
    size / (1 << 30) * (1 << 30)
}

fn statvfs(path: &Path) -> Result<libc::statvfs, std::io::Error> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: an all-zero statvfs is a valid value for the kernel to overwrite.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stats` is a live, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stats)
}

/// A pool's space and inodes, from its file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub space_total: u64,
    pub space_used: u64,
    pub inodes_total: u64,
    pub inodes_used: u64,
}

pub fn usage(directory: &Path) -> Result<Usage, StorageError> {
    let stats = statvfs(directory).map_err(io_error(format!(
        "cannot read the usage of {}",
        directory.display()
    )))?;
    let block = stats.f_frsize;
    let total = stats.f_blocks * block;
    Ok(Usage {
        space_total: total,
        space_used: total.saturating_sub(stats.f_bfree * block),
        inodes_total: stats.f_files,
        inodes_used: stats.f_files.saturating_sub(stats.f_ffree),
    })
}

/// What a half-made pool has made, undone when dropped before `disarm`.
#[derive(Default)]
struct Undo {
    mount: Option<PathBuf>,
    file: Option<PathBuf>,
    directory: Option<PathBuf>,
}

impl Undo {
    fn disarm(mut self) {
        self.mount = None;
        self.file = None;
        self.directory = None;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(mount) = &self.mount {
            let _ = run("umount", &[&mount.to_string_lossy()], "unmount");
        }
        if let Some(file) = &self.file {
            let _ = std::fs::remove_file(file);
        }
        if let Some(directory) = &self.directory {
            let _ = std::fs::remove_dir(directory);
        }
    }
}

fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The file system type on a block device, `None` when it holds none blkid knows.
fn file_system_on(device: &Path) -> Result<Option<String>, StorageError> {
    let output = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .output()
        .map_err(io_error("cannot run blkid"))?;
    let found = String::from_utf8_lossy(&output.stdout).trim().to_string();
    match output.status.code() {
        Some(0) if !found.is_empty() => Ok(Some(found)),
        // blkid's "nothing found".
        Some(0 | 2) => Ok(None),
        _ => Err(StorageError::Command {
            what: format!("cannot probe {}", device.display()),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        }),
    }
}

fn make_btrfs(target: &Path) -> Result<(), StorageError> {
    run(
        "mkfs.btrfs",
        &["-q", "-f", &text(target)],
        &format!("cannot format {} as btrfs", target.display()),
    )
    .map(drop)
}

/// Makes the pool `name` on the host and returns the config to record (`source`, and `size`
/// for a loop file). On failure nothing it made is left.
pub fn create(
    cove_directory: &Path,
    name: &str,
    driver: &str,
    config: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, StorageError> {
    if !super::DRIVERS.contains(&driver) {
        return Err(StorageError::UnknownDriver(driver.to_string()));
    }
    for key in config.keys() {
        if key != "source" && key != "size" {
            return Err(StorageError::UnknownKey {
                driver: driver.to_string(),
                key: key.clone(),
                known: "source and size",
            });
        }
    }
    let size = config
        .get("size")
        .map(|value| parse_size(value))
        .transpose()?;
    let source = config
        .get("source")
        .filter(|source| !source.is_empty())
        .map(PathBuf::from);
    let directory = pool_directory(cove_directory, name);
    if super::super::daemon::exists(&directory) {
        return Err(StorageError::Leftover { path: directory });
    }
    let mut recorded = BTreeMap::new();
    let mut undo = Undo::default();
    std::fs::create_dir_all(directory.parent().unwrap_or(cove_directory))
        .map_err(io_error("cannot create the storage-pools directory"))?;
    std::fs::create_dir(&directory)
        .map_err(io_error(format!("cannot create {}", directory.display())))?;
    undo.directory = Some(directory.clone());
    match (driver, source) {
        ("dir", None) => {
            recorded.insert("source".to_string(), text(&directory));
        }
        ("dir", Some(source)) => {
            if size.is_some() {
                return Err(StorageError::Unsupported {
                    driver: driver.into(),
                    what: "given a size (it takes what its directory's file system has)",
                });
            }
            check_empty_directory(&source)?;
            bind(&source, &directory)?;
            undo.mount = Some(directory.clone());
            recorded.insert("source".to_string(), text(&source));
        }
        (_, None) => {
            let file = loop_file(cove_directory, name);
            if super::super::daemon::exists(&file) {
                return Err(StorageError::Leftover { path: file });
            }
            let bytes = size.unwrap_or_else(|| default_size(cove_directory));
            std::fs::create_dir_all(cove_directory.join("disks"))
                .map_err(io_error("cannot create the disks directory"))?;
            let created = std::fs::File::create_new(&file)
                .map_err(io_error(format!("cannot create {}", file.display())))?;
            undo.file = Some(file.clone());
            // Sparse: the file takes only what the pool holds.
            created
                .set_len(bytes)
                .map_err(io_error(format!("cannot size {}", file.display())))?;
            drop(created);
            make_btrfs(&file)?;
            mount_loop(&file, &directory)?;
            undo.mount = Some(directory.clone());
            recorded.insert("source".to_string(), text(&file));
            recorded.insert(
                "size".to_string(),
                config
                    .get("size")
                    .cloned()
                    .unwrap_or_else(|| format!("{}GiB", bytes >> 30)),
            );
        }
        (_, Some(source)) => {
            if size.is_some() {
                return Err(StorageError::Unsupported {
                    driver: driver.into(),
                    what: "given a size with a source (it takes the source's)",
                });
            }
            let metadata = std::fs::metadata(&source)
                .map_err(|_| StorageError::SourceMissing(source.clone()))?;
            if metadata.file_type().is_block_device() {
                match file_system_on(&source)? {
                    None => make_btrfs(&source)?,
                    Some(found) if found == "btrfs" => {}
                    Some(found) => {
                        return Err(StorageError::SourceFileSystem {
                            path: source,
                            found,
                        })
                    }
                }
                run(
                    "mount",
                    &["-t", "btrfs", &text(&source), &text(&directory)],
                    &format!("cannot mount {}", source.display()),
                )?;
                undo.mount = Some(directory.clone());
                if !is_empty_directory(&directory) {
                    return Err(StorageError::SourceNotEmpty(source));
                }
            } else if metadata.is_dir() {
                check_empty_directory(&source)?;
                if !cove_shim::btrfs::is_btrfs(&source) {
                    return Err(StorageError::SourceNotBtrfs(source));
                }
                bind(&source, &directory)?;
                undo.mount = Some(directory.clone());
            } else {
                return Err(StorageError::SourceKind(source));
            }
            recorded.insert("source".to_string(), text(&source));
        }
    }
    std::fs::create_dir_all(directory.join("containers"))
        .map_err(io_error("cannot create the pool's containers directory"))?;
    undo.disarm();
    Ok(recorded)
}

fn check_empty_directory(source: &Path) -> Result<(), StorageError> {
    if !source.is_absolute() || !source.exists() {
        return Err(StorageError::SourceMissing(source.to_path_buf()));
    }
    if !source.is_dir() {
        return Err(StorageError::SourceKind(source.to_path_buf()));
    }
    if !is_empty_directory(source) {
        return Err(StorageError::SourceNotEmpty(source.to_path_buf()));
    }
    Ok(())
}

fn bind(source: &Path, target: &Path) -> Result<(), StorageError> {
    run(
        "mount",
        &["--bind", &text(source), &text(target)],
        &format!("cannot bind {} on {}", source.display(), target.display()),
    )
    .map(drop)
}

fn mount_loop(file: &Path, target: &Path) -> Result<(), StorageError> {
    run(
        "mount",
        &["-t", "btrfs", "-o", "loop", &text(file), &text(target)],
        &format!("cannot mount {} on {}", file.display(), target.display()),
    )
    .map(drop)
}

/// Mounts a recorded pool where it belongs, if it is not already (at coved's start).
pub fn mount(
    cove_directory: &Path,
    name: &str,
    config: &BTreeMap<String, String>,
) -> Result<(), StorageError> {
    let directory = pool_directory(cove_directory, name);
    std::fs::create_dir_all(&directory)
        .map_err(io_error(format!("cannot create {}", directory.display())))?;
    let Some(source) = config.get("source").map(PathBuf::from) else {
        return Ok(());
    };
    if source == directory || is_mount_point(&directory) {
        return Ok(());
    }
    let metadata =
        std::fs::metadata(&source).map_err(|_| StorageError::SourceMissing(source.clone()))?;
    if metadata.is_file() {
        mount_loop(&source, &directory)
    } else if metadata.file_type().is_block_device() {
        run(
            "mount",
            &[&text(&source), &text(&directory)],
            &format!("cannot mount {}", source.display()),
        )
        .map(drop)
    } else {
        bind(&source, &directory)
    }
}

/// Removes an unused pool from the host: its image subvolumes and empty directories, its
/// mount, its loop file. A given source directory or device stays (emptied).
pub fn destroy(
    cove_directory: &Path,
    name: &str,
    config: &BTreeMap<String, String>,
) -> Result<(), StorageError> {
    let directory = pool_directory(cove_directory, name);
    let images = directory.join("images");
    if let Ok(entries) = std::fs::read_dir(&images) {
        for entry in entries.flatten() {
            super::placement::remove_image_subvolume(&entry.path())?;
        }
    }
    for subdirectory in ["images", "containers", "custom", "virtual-machines"] {
        let path = directory.join(subdirectory);
        if path.exists() {
            std::fs::remove_dir(&path).map_err(io_error(format!(
                "cannot remove {} (is something left in it?)",
                path.display()
            )))?;
        }
    }
    if is_mount_point(&directory) {
        run(
            "umount",
            &[&text(&directory)],
            &format!("cannot unmount {}", directory.display()),
        )?;
    }
    let file = loop_file(cove_directory, name);
    if config.get("source").map(PathBuf::from) == Some(file.clone()) {
        std::fs::remove_file(&file)
            .map_err(io_error(format!("cannot remove {}", file.display())))?;
    }
    if directory.exists() {
        std::fs::remove_dir(&directory)
            .map_err(io_error(format!("cannot remove {}", directory.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_read_as_lxd_writes_them() {
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1MiB")
            .unwrap_err()
            .to_string()
            .contains("256MiB"));
    }

    #[test]
    fn the_default_size_stays_within_lxd_bounds() {
        let size = default_size(Path::new("/"));
        assert!((DEFAULT_MIN_SIZE..=DEFAULT_MAX_SIZE).contains(&size));
        assert_eq!(size % (1 << 30), 0);
    }

    #[test]
    fn a_refused_pool_leaves_nothing() {
        let cove = std::env::temp_dir().join(format!("cove-pools-{}", std::process::id()));
        std::fs::create_dir_all(&cove).unwrap();
        let occupied = cove.join("occupied");
        std::fs::create_dir_all(&occupied).unwrap();
        std::fs::write(occupied.join("file"), b"x").unwrap();
        let config = BTreeMap::from([("source".to_string(), text(&occupied))]);
        assert!(matches!(
            create(&cove, "p", "dir", &config),
            Err(StorageError::SourceNotEmpty(_))
        ));
        assert!(matches!(
            create(&cove, "p", "zfs", &BTreeMap::new()),
            Err(StorageError::UnknownDriver(_))
        ));
        let sized = BTreeMap::from([("size".to_string(), "tiny".to_string())]);
        assert!(matches!(
            create(&cove, "p", "btrfs", &sized),
            Err(StorageError::Size { .. })
        ));
        assert!(!pool_directory(&cove, "p").exists());
        assert!(!loop_file(&cove, "p").exists());
        std::fs::remove_dir_all(&cove).unwrap();
    }
}
