//! Container roots as btrfs snapshots, and the one-time ownership shift that stands in for an
//! idmapped mount where the kernel refuses one (forced here with `security.idmap.shift=chown`,
//! since this kernel supports idmapped mounts).
//!
//! Each btrfs test makes its own pool: a 1 GiB loop-file btrfs under a scratch directory
//! holding an image subvolume and the containers directory, as an LXD btrfs storage pool does.
//! Real namespaces, cgroups and mounts; run as root.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cove_shim::btrfs;
use cove_shim::rootfs::SnapshotKind;
use cove_shim::{Container, ContainerConfig, ExecRequest, Host, IdShift, SnapshotMethod};
use cove_tests::container::{
    busybox_image, debian_image, listing, require_root, wait_for_systemd, TestContainer, TestHost,
    BOOT_MARKER,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(10);

fn run(container: &Container, command: &[&str]) -> (i32, String) {
    let output = container
        .exec_output(&ExecRequest::new(command), b"")
        .unwrap_or_else(|error| panic!("exec {command:?} failed: {error}"));
    (output.exit_code, output.stdout + &output.stderr)
}

fn command(program: &str, arguments: &[&str]) {
    let status = Command::new(program)
        .args(arguments)
        .status()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(status.success(), "{program} {arguments:?} failed: {status}");
}

/// A loop-file btrfs mounted under a scratch directory; unmounted and removed when dropped.
struct Pool {
    scratch: PathBuf,
    mount: PathBuf,
}

impl Pool {
    fn new(test: &str) -> Self {
        require_root();
        if Command::new("mkfs.btrfs")
            .arg("--version")
            .output()
            .is_err()
        {
            let status = Command::new("apt-get")
                .args(["install", "-y", "btrfs-progs"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .expect("run apt-get");
            assert!(status.success(), "apt-get install btrfs-progs failed");
        }
        let scratch = cove_tests::scratch_dir(&format!("{test}-pool"));
        let file = scratch.join("pool.img");
        let mount = scratch.join("pool");
        std::fs::create_dir(&mount).expect("create the mount point");
        let file_text = file.to_string_lossy();
        command("truncate", &["-s", "1G", &file_text]);
        command("mkfs.btrfs", &["-q", &file_text]);
        command(
            "mount",
            &["-o", "loop", &file_text, &mount.to_string_lossy()],
        );
        Self { scratch, mount }
    }

    /// A copy of `image` as the subvolume `images/<name>` (the files keep their owners).
    fn image(&self, name: &str, image: &Path) -> PathBuf {
        let images = self.mount.join("images");
        std::fs::create_dir_all(&images).expect("create images/");
        let subvolume = images.join(name);
        btrfs::create_subvolume(&subvolume).expect("create the image subvolume");
        let source = format!("{}/.", image.display());
        command("cp", &["-a", &source, &subvolume.to_string_lossy()]);
        subvolume
    }

    /// A test host whose containers live in the pool.
    fn host(&self) -> TestHost {
        TestHost {
            host: Host {
                containers_directory: self.mount.join("scratch/containers"),
                cgroup_parent: format!("cove-test-{}", std::process::id()),
            },
        }
    }

    fn start(&self, config: &ContainerConfig) -> TestContainer {
        let host = self.host();
        let container = Container::start(config, &host.host)
            .unwrap_or_else(|error| panic!("container {} did not start: {error}", config.name));
        TestContainer {
            container: Some(container),
            host,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let mount = self.mount.to_string_lossy().into_owned();
        let unmounted = Command::new("umount").arg(&mount).status();
        if !unmounted.is_ok_and(|status| status.success()) {
            let _ = Command::new("umount").args(["-l", &mount]).status();
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path = CString::new(path.as_os_str().as_bytes()).expect("a path");
    let name = CString::new(name).expect("a name");
    let mut value = vec![0u8; 256];
    // SAFETY: NUL-terminated strings and a live buffer of the length passed.
    let length = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    (length >= 0).then(|| {
        value.truncate(length as usize);
        value
    })
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let path = CString::new(path.as_os_str().as_bytes()).expect("a path");
    let name = CString::new(name).expect("a name");
    // SAFETY: NUL-terminated strings and a live value of the length passed.
    let result = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(result, 0, "lsetxattr {name:?}");
}

fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|word| word.to_le_bytes()).collect()
}

#[test]
fn an_unprivileged_container_runs_on_an_idmapped_btrfs_snapshot() {
    let pool = Pool::new("btrfs-idmapped");
    let image = pool.image("busybox", busybox_image());
    let before = listing(&image);
    let config = ContainerConfig::new("snapshotted", &image);
    let mut test = pool.start(&config);
    test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    let container = test.get();
    let snapshot = container.snapshot();
    assert_eq!(snapshot.kind, SnapshotKind::Btrfs);
    assert_eq!(snapshot.id_shift, Some(IdShift::Idmapped));
    let subvolume = container.upper_directory().to_path_buf();
    assert!(btrfs::is_subvolume(&subvolume), "{subvolume:?}");

    assert_eq!(
        run(container, &["stat", "-c", "%u:%g", "/bin/busybox"]),
        (0, "0:0\n".to_string())
    );
    let (status, _) = run(
        container,
        &[
            "sh",
            "-c",
            "echo written > /written && echo more >> /etc/passwd && rm /etc/hostname",
        ],
    );
    assert_eq!(status, 0);
    // Through the idmapped mount the container's root writes as the image's owner.
    let written = std::fs::metadata(subvolume.join("written")).expect("written in the snapshot");
    assert_eq!((written.uid(), written.gid()), (0, 0));
    assert!(!subvolume.join("etc/hostname").exists());
    assert_eq!(listing(&image), before, "the image subvolume changed");

    // A subvolume made inside the container's snapshot goes with it.
    btrfs::create_subvolume(&subvolume.join("root/nested")).expect("a nested subvolume");
    std::fs::write(subvolume.join("root/nested/file"), "x").expect("write in it");

    let started = Instant::now();
    test.container
        .take()
        .expect("present")
        .delete()
        .expect("delete");
    eprintln!("deleted in {:?}", started.elapsed());
    assert!(!subvolume.exists(), "the snapshot {subvolume:?} is left");
    let subvolumes = Command::new("btrfs")
        .args(["subvolume", "list", "-o", &pool.mount.to_string_lossy()])
        .output()
        .expect("btrfs subvolume list");
    let subvolumes = String::from_utf8_lossy(&subvolumes.stdout);
    assert_eq!(
        subvolumes.lines().count(),
        1,
        "only the image should be left:\n{subvolumes}"
    );
    assert_eq!(listing(&image), before, "the image subvolume changed");
}

#[test]
fn a_privileged_container_runs_on_a_plain_btrfs_snapshot() {
    let pool = Pool::new("btrfs-privileged");
    let image = pool.image("busybox", busybox_image());
    let mut config = ContainerConfig::new("privileged", &image);
    config.privileged = true;
    config.snapshot = SnapshotMethod::Btrfs;
    let test = pool.start(&config);
    let container = test.get();
    assert_eq!(container.snapshot().kind, SnapshotKind::Btrfs);
    assert_eq!(container.snapshot().id_shift, None);
    assert_eq!(run(container, &["touch", "/mine"]).0, 0);
    let mine =
        std::fs::metadata(container.upper_directory().join("mine")).expect("in the snapshot");
    assert_eq!(mine.uid(), 0);
    assert!(!image.join("mine").exists());
}

#[test]
fn a_btrfs_snapshot_is_refused_for_an_image_that_is_no_subvolume() {
    require_root();
    let test_host = TestHost::new("btrfs-refused");
    let mut config = ContainerConfig::new("refused", busybox_image());
    config.snapshot = SnapshotMethod::Btrfs;
    let error = Container::start(&config, &test_host.host).expect_err("not a subvolume");
    assert!(
        error.to_string().contains("not a btrfs subvolume"),
        "{error}"
    );
    assert!(!test_host.host.containers_directory.join("refused").exists());
}

#[test]
fn the_chown_fallback_shifts_a_btrfs_snapshot_once() {
    let pool = Pool::new("btrfs-chown");
    let image = pool.image("busybox", busybox_image());
    // What chown would lose: a set-user-ID bit, a file capability, an ACL entry.
    let tool = image.join("bin/tool");
    std::fs::write(&tool, "#!/bin/sh\necho tool\n").expect("write a tool");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
    let net_raw = 1 << 13;
    set_xattr(
        &tool,
        "security.capability",
        &words(&[0x0200_0001, net_raw, 0, 0, 0]),
    );
    // user::rwx, user:1000:r-x, group::r-x, mask::r-x, other::r-x
    let acl = [
        (0x01u16, 7u16, u32::MAX),
        (0x02, 5, 1000),
        (0x04, 5, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 5, u32::MAX),
    ]
    .iter()
    .fold(words(&[2]), |mut bytes, (tag, perm, id)| {
        bytes.extend_from_slice(&tag.to_le_bytes());
        bytes.extend_from_slice(&perm.to_le_bytes());
        bytes.extend_from_slice(&id.to_le_bytes());
        bytes
    });
    set_xattr(&image.join("etc"), "system.posix_acl_access", &acl);
    let before = listing(&image);

    let config = ContainerConfig::from_keys(
        "chowned",
        &image,
        &keys(&[("security.idmap.shift", "chown")]),
    )
    .expect("valid keys");
    let started = Instant::now();
    let test = pool.start(&config);
    eprintln!("started with the chown shift in {:?}", started.elapsed());
    test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    let container = test.get();
    assert_eq!(container.snapshot().kind, SnapshotKind::Btrfs);
    assert_eq!(container.snapshot().id_shift, Some(IdShift::Chown));
    let base = container.id_map().expect("unprivileged").uid.host_base;
    let snapshot = container.upper_directory();

    // On the host the snapshot belongs to the mapped ids; inside, to the container's root.
    let busybox = std::fs::metadata(snapshot.join("bin/busybox")).expect("busybox");
    assert_eq!((busybox.uid(), busybox.gid()), (base, base));
    let shifted_tool = std::fs::metadata(snapshot.join("bin/tool")).expect("the tool");
    assert_eq!(shifted_tool.mode() & 0o7777, 0o4755, "the set-user-ID bit");
    assert_eq!(
        xattr(&snapshot.join("bin/tool"), "security.capability"),
        Some(words(&[0x0300_0001, net_raw, 0, 0, 0, base])),
        "the file capability, owned by the container's root"
    );
    let shifted_acl = xattr(&snapshot.join("etc"), "system.posix_acl_access").expect("an ACL");
    assert_eq!(
        u32::from_le_bytes(shifted_acl[16..20].try_into().expect("four bytes")),
        base + 1000,
        "the ACL's user entry"
    );
    assert_eq!(
        run(
            container,
            &["stat", "-c", "%u:%g %a", "/bin/busybox", "/bin/tool"]
        ),
        (0, "0:0 755\n0:0 4755\n".to_string())
    );
    assert_eq!(run(container, &["touch", "/root/mine"]).0, 0);
    let mine = std::fs::metadata(snapshot.join("root/mine")).expect("in the snapshot");
    assert_eq!((mine.uid(), mine.gid()), (base, base));
    assert_eq!(listing(&image), before, "the image subvolume changed");
}

#[test]
fn the_chown_fallback_shifts_an_overlay_through_metadata_copies() {
    require_root();
    let image = busybox_image();
    let before = listing(image);
    let config = ContainerConfig::from_keys(
        "overlaid",
        image,
        &keys(&[("security.idmap.shift", "chown")]),
    )
    .expect("valid keys");
    let started = Instant::now();
    let test = TestContainer::start("overlay-chown", &config);
    eprintln!("started with the chown shift in {:?}", started.elapsed());
    test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    let container = test.get();
    assert_eq!(container.snapshot().kind, SnapshotKind::Overlay);
    assert_eq!(container.snapshot().id_shift, Some(IdShift::Chown));
    let base = container.id_map().expect("unprivileged").uid.host_base;

    assert_eq!(
        run(container, &["stat", "-c", "%u:%g", "/bin/busybox", "/etc"]),
        (0, "0:0\n0:0\n".to_string())
    );
    // The chown copied up busybox's metadata only: no data blocks in the upper layer.
    let upper = container.upper_directory().join("bin/busybox");
    let copied = std::fs::metadata(&upper).expect("busybox was copied up");
    assert_eq!((copied.uid(), copied.gid()), (base, base));
    assert!(
        xattr(&upper, "trusted.overlay.metacopy").is_some(),
        "not a metadata-only copy"
    );
    assert!(
        copied.blocks() * 512 < copied.len() / 10,
        "busybox's data was copied up: {copied:?}"
    );
    assert_eq!(
        run(container, &["sh", "-c", "echo more >> /etc/passwd"]).0,
        0
    );
    assert_eq!(listing(image), before, "the image directory changed");
}

/// The Debian image on a btrfs pool, shifted by chown (its setuid programs included): systemd
/// boots as on an overlayfs snapshot.
#[test]
fn systemd_boots_on_a_chowned_btrfs_snapshot() {
    let pool = Pool::new("btrfs-systemd");
    let copying = Instant::now();
    let image = pool.image("debian", debian_image());
    eprintln!(
        "copied the Debian image into the pool in {:?}",
        copying.elapsed()
    );
    let mut config = ContainerConfig::new("debian-btrfs", &image);
    config.id_shift = IdShift::Chown;
    let started = Instant::now();
    let test = pool.start(&config);
    let shifted = started.elapsed();
    let boot = wait_for_systemd(test.get(), started + Duration::from_secs(120));
    eprintln!(
        "shifted in {shifted:?}; systemd is {} {:?} after the start; failed units: {:?}",
        boot.state,
        started.elapsed(),
        boot.failed
    );
    assert!(
        boot.state == "running" || boot.state == "degraded",
        "systemd did not finish booting: {boot:?}"
    );
    assert!(
        boot.unexpected_failures().is_empty(),
        "units failed: {:?}",
        boot.unexpected_failures()
    );
    assert_eq!(
        run(test.get(), &["stat", "-c", "%u:%g %a", "/usr/bin/su"]),
        (0, "0:0 4755\n".to_string())
    );
}

/// A copy of the busybox image on ramfs, which refuses idmapped mounts (EINVAL from
/// mount_setattr): the automatic fallback's case. Unmounted when dropped.
struct RamfsImage {
    scratch: PathBuf,
    image: PathBuf,
}

impl RamfsImage {
    fn new(test: &str) -> Self {
        require_root();
        let scratch = cove_tests::scratch_dir(&format!("{test}-ramfs"));
        let image = scratch.join("image");
        std::fs::create_dir(&image).expect("create the mount point");
        command("mount", &["-t", "ramfs", "ramfs", &image.to_string_lossy()]);
        let source = format!("{}/.", busybox_image().display());
        command("cp", &["-a", &source, &image.to_string_lossy()]);
        Self { scratch, image }
    }
}

impl Drop for RamfsImage {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.image).status();
        if !unmounted.is_ok_and(|status| status.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.image).status();
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

#[test]
fn where_idmapped_mounts_are_refused_the_snapshot_is_chowned() {
    let ramfs = RamfsImage::new("refusing");
    let before = listing(&ramfs.image);

    let strict = ContainerConfig::from_keys(
        "strict",
        &ramfs.image,
        &keys(&[("security.idmap.shift", "idmapped")]),
    )
    .expect("valid keys");
    let test_host = TestHost::new("idmap-refused");
    let error = Container::start(&strict, &test_host.host).expect_err("idmapped mounts refused");
    assert!(
        error
            .to_string()
            .contains("does not support idmapped mounts"),
        "{error}"
    );
    assert!(!test_host.host.containers_directory.join("strict").exists());
    drop(test_host);

    let config = ContainerConfig::new("fallback", &ramfs.image);
    let test = TestContainer::start("idmap-fallback", &config);
    test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    let container = test.get();
    assert_eq!(container.snapshot().kind, SnapshotKind::Overlay);
    assert_eq!(container.snapshot().id_shift, Some(IdShift::Chown));
    assert_eq!(
        run(container, &["stat", "-c", "%u:%g", "/bin/busybox"]),
        (0, "0:0\n".to_string())
    );
    assert_eq!(run(container, &["touch", "/root/mine"]).0, 0);
    drop(test);
    assert_eq!(listing(&ramfs.image), before, "the image changed");
}

/// The Debian image on an overlayfs snapshot shifted by chown through `metacopy=on`: systemd
/// boots as with an idmapped lower layer.
#[test]
fn systemd_boots_on_a_chowned_overlay() {
    let mut config = ContainerConfig::new("debian-overlay", debian_image());
    config.id_shift = IdShift::Chown;
    let started = Instant::now();
    let test = TestContainer::start("overlay-systemd", &config);
    let shifted = started.elapsed();
    let boot = wait_for_systemd(test.get(), started + Duration::from_secs(120));
    eprintln!(
        "shifted in {shifted:?}; systemd is {} {:?} after the start; failed units: {:?}",
        boot.state,
        started.elapsed(),
        boot.failed
    );
    assert!(
        boot.state == "running" || boot.state == "degraded",
        "systemd did not finish booting: {boot:?}"
    );
    assert!(
        boot.unexpected_failures().is_empty(),
        "units failed: {:?}",
        boot.unexpected_failures()
    );
    assert_eq!(
        run(test.get(), &["stat", "-c", "%u:%g %a", "/usr/bin/su"]),
        (0, "0:0 4755\n".to_string())
    );
}

#[test]
fn an_image_on_another_btrfs_file_system_gets_an_overlay() {
    let images = Pool::new("btrfs-elsewhere-images");
    let containers = Pool::new("btrfs-elsewhere-containers");
    let image = images.image("busybox", busybox_image());

    let mut forced = ContainerConfig::new("forced", &image);
    forced.snapshot = SnapshotMethod::Btrfs;
    let test_host = containers.host();
    let error = Container::start(&forced, &test_host.host).expect_err("a cross-device snapshot");
    assert!(error.to_string().contains("cannot snapshot"), "{error}");
    assert!(!test_host.host.containers_directory.join("forced").exists());
    drop(test_host);

    let config = ContainerConfig::new("elsewhere", &image);
    let test = containers.start(&config);
    test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    assert_eq!(test.get().snapshot().kind, SnapshotKind::Overlay);
    assert_eq!(test.get().snapshot().id_shift, Some(IdShift::Idmapped));
}
