//! A virtual machine's root disk: where it lives, and how it is made from the same image a
//! container runs.
//!
//! An image's unpacked rootfs becomes an ext4 file system once per image (`mkfs.ext4 -d`,
//! cached beside the image as `images/<fingerprint>/vm.ext4`; a VM image's own ext4 disk,
//! `rootfs.img`, is copied and grown instead), with cove-agent and a tiny
//! init wrapper written into it (`debugfs`), so the image itself is never changed. Each VM gets
//! its own copy (`cp --reflink=auto --sparse=always`: a reflink where the file system has them,
//! otherwise a sparse copy of the blocks in use) as `root.img` in its directory. The guest
//! kernel boots with `init=` pointing at the wrapper, which starts the agent and then hands
//! PID 1 to the image's own init (see docs/api.md, "Virtual machines").

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the agent and the init wrapper are placed in the guest's root.
pub const GUEST_DIRECTORY: &str = "/usr/lib/cove";
/// The agent inside the guest.
pub const GUEST_AGENT: &str = "/usr/lib/cove/cove-agent";
/// The init the guest kernel runs (`init=`): starts the agent, then execs the image's init.
pub const GUEST_INIT: &str = "/usr/lib/cove/vm-init";
/// The size the guest sees (sparse on the host: only written blocks take space), as LXD's
/// default root disk.
pub const DISK_SIZE_BYTES: u64 = 10 << 30;

/// The init wrapper. A shell script because every image cove runs has a `/bin/sh` (busybox or
/// dash), and as a script it works for any init: the agent starts as a child of PID 1 (with
/// `--init`, it mounts /proc, /sys, /dev, /dev/pts, /run and /tmp where nothing is mounted yet,
/// which busybox's init does not do and systemd takes over as they are), then the image's init
/// replaces the shell as PID 1.
const INIT_WRAPPER: &str = "#!/bin/sh
# cove: start the guest agent, then hand PID 1 to the image's own init.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
/usr/lib/cove/cove-agent --init &
for init in /sbin/init /usr/sbin/init /lib/systemd/systemd /usr/lib/systemd/systemd; do
    [ -x \"$init\" ] && exec \"$init\" \"$@\"
done
echo 'cove: the image has no init (/sbin/init): only the agent runs' >&2
wait
";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("the image has no unpacked rootfs at {0}")]
    NoRootfs(PathBuf),
    #[error("cove-agent {0} does not exist: build it with guest-agent/build and give coved --vm-agent PATH")]
    NoAgent(PathBuf),
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed while {what}: {output}")]
    Tool {
        program: &'static str,
        what: String,
        output: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DiskError {
    let what = what.into();
    move |source| DiskError::Io { what, source }
}

/// The directory of every VM's files on the default pool. The one place that says where a
/// VM's disk lives, so choosing a pool changes only this.
pub fn machines_directory(cove_directory: &Path) -> PathBuf {
    cove_directory
        .join("storage-pools")
        .join("default")
        .join(MACHINES_FOLDER)
}

/// The folder of a pool that holds its VMs' directories.
pub const MACHINES_FOLDER: &str = "virtual-machines";

/// A VM's root disk inside its directory.
pub fn root_disk(machine_directory: &Path) -> PathBuf {
    machine_directory.join("root.img")
}

/// The cached ext4 disk of the image whose rootfs is `rootfs` (`images/<fp>/rootfs`).
pub fn image_disk(rootfs: &Path) -> PathBuf {
    rootfs.with_file_name("vm.ext4")
}

fn run(program: &'static str, arguments: &[&std::ffi::OsStr], what: &str) -> Result<(), DiskError> {
    let output = Command::new(program)
        .args(arguments)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("run {program}")))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if text.is_empty() {
        text = output.status.to_string();
    }
    Err(DiskError::Tool {
        program,
        what: what.to_string(),
        output: text,
    })
}

/// Holds an exclusive `flock` on a file while alive, so two launches from one image build its
/// disk once.
struct BuildLock {
    _file: File,
}

impl BuildLock {
    fn take(path: &Path) -> Result<Self, DiskError> {
        let file = File::create(path).map_err(io(format!("create {}", path.display())))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(DiskError::Io {
                what: format!("lock {}", path.display()),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self { _file: file })
    }
}

/// The image's VM disk, built now if it is not cached yet.
pub fn ensure_image_disk(rootfs: &Path, agent: &Path) -> Result<PathBuf, DiskError> {
    let disk = image_disk(rootfs);
    if disk.is_file() {
        return Ok(disk);
    }
    if !rootfs.is_dir() && !image_source_disk(rootfs).is_file() {
        return Err(DiskError::NoRootfs(rootfs.to_path_buf()));
    }
    if !agent.is_file() {
        return Err(DiskError::NoAgent(agent.to_path_buf()));
    }
    let _lock = BuildLock::take(&rootfs.with_file_name(".vm.ext4.lock"))?;
    if disk.is_file() {
        return Ok(disk);
    }
    let building = rootfs.with_file_name(format!(".vm.ext4.{}", std::process::id()));
    let result = build_image_disk(rootfs, agent, &building);
    if let Err(error) = result {
        let _ = std::fs::remove_file(&building);
        return Err(error);
    }
    std::fs::rename(&building, &disk).map_err(io(format!("move {} into place", disk.display())))?;
    Ok(disk)
}

/// A VM image's own disk (`images/<fp>/rootfs.img`), beside where a container image's rootfs
/// would be.
pub fn image_source_disk(rootfs: &Path) -> PathBuf {
    rootfs.with_file_name(crate::images::machine::DISK_FILE)
}

fn build_image_disk(rootfs: &Path, agent: &Path, building: &Path) -> Result<(), DiskError> {
    if rootfs.is_dir() {
        make_file_system(rootfs, building)?;
    } else {
        copy_image_disk(&image_source_disk(rootfs), building)?;
    }
    place_agent(agent, building)
}

/// A container image's rootfs as a new ext4 file system of the VM's size.
fn make_file_system(rootfs: &Path, building: &Path) -> Result<(), DiskError> {
    let file = File::create(building).map_err(io(format!("create {}", building.display())))?;
    file.set_len(DISK_SIZE_BYTES)
        .map_err(io(format!("size {}", building.display())))?;
    drop(file);
    run(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-L".as_ref(),
            "cove-root".as_ref(),
            "-d".as_ref(),
            rootfs.as_os_str(),
            building.as_os_str(),
        ],
        "making the image's file system",
    )
}

/// A VM image's ext4 disk, copied (sparse) and grown to the VM's size when smaller, so that
/// the guest has room to write whatever size the image was made at.
fn copy_image_disk(disk: &Path, building: &Path) -> Result<(), DiskError> {
    run(
        "cp",
        &[
            "--reflink=auto".as_ref(),
            "--sparse=always".as_ref(),
            disk.as_os_str(),
            building.as_os_str(),
        ],
        "copying the VM image's disk",
    )?;
    let size = building
        .metadata()
        .map_err(io(format!("read the size of {}", building.display())))?
        .len();
    if size >= DISK_SIZE_BYTES {
        return Ok(());
    }
    // resize2fs wants a freshly checked file system; e2fsck exits 1 when it fixed something.
    let checked = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(building)
        .stdin(Stdio::null())
        .output()
        .map_err(io("run e2fsck"))?;
    if !matches!(checked.status.code(), Some(0 | 1)) {
        return Err(DiskError::Tool {
            program: "e2fsck",
            what: "checking the VM image's disk".into(),
            output: String::from_utf8_lossy(&checked.stdout).trim().to_string(),
        });
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(building)
        .map_err(io(format!("open {}", building.display())))?;
    file.set_len(DISK_SIZE_BYTES)
        .map_err(io(format!("size {}", building.display())))?;
    drop(file);
    run(
        "resize2fs",
        &["-f".as_ref(), building.as_os_str()],
        "growing the VM image's disk",
    )
}

/// Writes cove-agent and the init wrapper into the disk's file system.
fn place_agent(agent: &Path, building: &Path) -> Result<(), DiskError> {
    let wrapper = building.with_extension("init");
    std::fs::write(&wrapper, INIT_WRAPPER).map_err(io("write the init wrapper"))?;
    let commands = format!(
        "mkdir /usr\nmkdir /usr/lib\nmkdir {GUEST_DIRECTORY}\n\
         rm {GUEST_AGENT}\nrm {GUEST_INIT}\n\
         write {agent} {GUEST_AGENT}\nsif {GUEST_AGENT} mode 0100755\n\
         sif {GUEST_AGENT} uid 0\nsif {GUEST_AGENT} gid 0\n\
         write {wrapper} {GUEST_INIT}\nsif {GUEST_INIT} mode 0100755\n\
         sif {GUEST_INIT} uid 0\nsif {GUEST_INIT} gid 0\n",
        agent = agent.display(),
        wrapper = wrapper.display(),
    );
    let script = building.with_extension("debugfs");
    std::fs::write(&script, commands).map_err(io("write the debugfs script"))?;
    // debugfs reports a `mkdir` of an existing directory (and an `rm` of a missing file: a
    // VM image's disk may already hold an older agent, which `write` would not replace) and
    // goes on; whether the files arrived is checked below.
    let result = run(
        "debugfs",
        &[
            "-w".as_ref(),
            "-f".as_ref(),
            script.as_os_str(),
            building.as_os_str(),
        ],
        "placing cove-agent in the image's disk",
    );
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(&wrapper);
    result?;
    let listing = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {GUEST_INIT}"))
        .arg(building)
        .stdin(Stdio::null())
        .output()
        .map_err(io("run debugfs"))?;
    if !String::from_utf8_lossy(&listing.stdout).contains("Type: regular") {
        return Err(DiskError::Tool {
            program: "debugfs",
            what: "placing cove-agent in the image's disk".into(),
            output: format!(
                "{GUEST_INIT} is missing afterwards: {}",
                String::from_utf8_lossy(&listing.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Gives a VM its own copy of the image disk as `root.img` in `machine_directory`.
pub fn clone_disk(image_disk: &Path, machine_directory: &Path) -> Result<PathBuf, DiskError> {
    let target = root_disk(machine_directory);
    let partial = machine_directory.join(".root.img.partial");
    run(
        "cp",
        &[
            "--reflink=auto".as_ref(),
            "--sparse=always".as_ref(),
            image_disk.as_os_str(),
            partial.as_os_str(),
        ],
        "copying the image's disk for the VM",
    )
    .inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })?;
    std::fs::rename(&partial, &target)
        .map_err(io(format!("move {} into place", target.display())))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_disk_lies_beside_its_rootfs() {
        assert_eq!(
            image_disk(Path::new("/var/lib/cove/images/abc/rootfs")),
            Path::new("/var/lib/cove/images/abc/vm.ext4")
        );
        assert_eq!(
            root_disk(&machines_directory(Path::new("/var/lib/cove")).join("web")),
            Path::new("/var/lib/cove/storage-pools/default/virtual-machines/web/root.img")
        );
    }

    #[test]
    fn the_wrapper_starts_the_agent_before_handing_over() {
        let agent = INIT_WRAPPER.find(GUEST_AGENT).unwrap();
        let handover = INIT_WRAPPER.find("exec \"$init\"").unwrap();
        assert!(agent < handover);
    }
}
