//! Storage pools and custom volumes under coved, as LXD users know them: a btrfs pool on a
//! loop file holds twenty containers for little more than one image's space (each is a
//! snapshot of one image subvolume); a custom volume attached to two containers shares its
//! files; a pool in use cannot be deleted; pools are mounted again when coved restarts; and
//! refused pools leave nothing behind. Real loop devices, btrfs, mounts and containers under
//! cove-shim monitors; run as root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cove_tests::container::{busybox_image, mounted_under, BOOT_MARKER};
use cove_tests::coved::{eventually, Coved};
use serde_json::{json, Value};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// The image's extra file: big enough that a copy per container would show.
const BIG_FILE_BYTES: usize = 32 << 20;
const CONTAINERS: usize = 20;
const MIB: u64 = 1 << 20;

fn command(program: &str, arguments: &[&str]) -> String {
    let output = Command::new(program)
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The busybox image with a 32 MiB file of incompressible bytes, as a unified tarball.
fn big_busybox_tarball(directory: &Path) -> PathBuf {
    let staging = directory.join("big-image");
    let rootfs = staging.join("rootfs");
    std::fs::create_dir_all(&staging).expect("create the staging directory");
    command(
        "cp",
        &[
            "-a",
            &busybox_image().to_string_lossy(),
            &rootfs.to_string_lossy(),
        ],
    );
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut bytes = Vec::with_capacity(BIG_FILE_BYTES);
    while bytes.len() < BIG_FILE_BYTES {
        // xorshift: incompressible enough that neither gzip nor a file system shrinks it.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    std::fs::write(rootfs.join("big.bin"), &bytes).expect("write the big file");
    std::fs::write(
        staging.join("metadata.yaml"),
        "architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  description: big \
         busybox\n  os: busybox\n  release: test\n",
    )
    .expect("write metadata.yaml");
    let tarball = directory.join("big-busybox.tar.gz");
    command(
        "tar",
        &[
            "-czf",
            &tarball.to_string_lossy(),
            "-C",
            &staging.to_string_lossy(),
            "metadata.yaml",
            "rootfs",
        ],
    );
    let _ = std::fs::remove_dir_all(&staging);
    tarball
}

fn is_mount_point(path: &Path) -> bool {
    let wanted = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_ref()))
}

/// Unmounts what a failed test left mounted under coved's directory (its pools; a loop file's
/// device goes with its mount), then removes the directory. Declared before the `Coved`, so
/// that it runs after coved's own cleanup.
struct Unmount(Option<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        let Some(directory) = &self.0 else {
            return;
        };
        let prefix = directory.to_string_lossy().into_owned();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|mount_point| mount_point.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        mounts.sort_by_key(|mount_point| std::cmp::Reverse(mount_point.len()));
        for mount_point in &mounts {
            let _ = Command::new("umount").arg(mount_point).status();
        }
        if !mounts.is_empty() && !mounted_under(directory) {
            let _ = std::fs::remove_dir_all(directory);
        }
    }
}

fn pool_used(coved: &Coved, pool: &str) -> u64 {
    // btrfs counts space when a transaction commits: commit first.
    command(
        "sync",
        &["-f", &pool_directory(coved, pool).to_string_lossy()],
    );
    coved.get(&format!("/1.0/storage-pools/{pool}/resources"))["space"]["used"]
        .as_u64()
        .expect("space.used")
}

fn pool_directory(coved: &Coved, pool: &str) -> PathBuf {
    coved.directory.join("storage-pools").join(pool)
}

fn create_instance(coved: &Coved, name: &str, devices: Value) {
    coved.operation(
        "POST",
        "/1.0/instances",
        Some(json!({
            "name": name,
            "source": {"type": "image", "alias": "big"},
            "devices": devices,
        })),
    );
    coved.operation(
        "PUT",
        &format!("/1.0/instances/{name}/state"),
        Some(json!({"action": "start"})),
    );
}

fn booted(coved: &Coved, name: &str) {
    eventually("the boot marker", BOOT_TIMEOUT, || {
        let response = coved.request("GET", &format!("/1.0/instances/{name}/console"), None);
        String::from_utf8_lossy(&response.body).contains(BOOT_MARKER)
    });
}

fn refused(coved: &Coved, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let response = coved.request(method, path, body);
    let status = response.status;
    let message = response.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        (400..500).contains(&status),
        "{method} {path} answered {status}, not a 4xx: {}",
        response.json()
    );
    (status, message)
}

#[test]
fn btrfs_pool_holds_many_snapshots_shares_a_volume_and_survives_a_restart() {
    let mut unmount = Unmount(None);
    let mut coved = Coved::start("storage-btrfs", &[]);
    unmount.0 = Some(coved.directory.clone());
    coved.get("/1.0");
    let ok = coved.request(
        "POST",
        "/1.0/storage-pools",
        Some(json!({"name": "fast", "driver": "btrfs", "config": {"size": "3GiB"}})),
    );
    assert_eq!(ok.status, 200, "{}", ok.json());
    let pool = pool_directory(&coved, "fast");
    let loop_file = coved.directory.join("disks/fast.img");
    assert!(is_mount_point(&pool), "the pool is not mounted at {pool:?}");
    assert!(loop_file.is_file(), "no loop file {loop_file:?}");
    let recorded = coved.get("/1.0/storage-pools/fast");
    assert_eq!(recorded["driver"], "btrfs");
    assert_eq!(recorded["config"]["size"], "3GiB");
    assert_eq!(
        recorded["config"]["source"],
        loop_file.to_string_lossy().as_ref()
    );

    let fingerprint = coved.import_image(&big_busybox_tarball(&coved.directory), "big");
    let on_fast = json!({"root": {"type": "disk", "path": "/", "pool": "fast"}});
    create_instance(&coved, "c0", on_fast.clone());
    booted(&coved, "c0");
    let image_subvolume = pool.join("images").join(&fingerprint);
    assert!(
        cove_shim::btrfs::is_subvolume(&image_subvolume),
        "the image is not a subvolume of the pool"
    );
    let used_with_one = pool_used(&coved, "fast");
    assert!(
        used_with_one > BIG_FILE_BYTES as u64,
        "the pool holds {used_with_one} bytes, less than the image"
    );
    for index in 1..CONTAINERS {
        create_instance(&coved, &format!("c{index}"), on_fast.clone());
    }
    for index in 0..CONTAINERS {
        let name = format!("c{index}");
        booted(&coved, &name);
        let directory = pool.join("containers").join(&name);
        assert!(
            cove_shim::btrfs::is_subvolume(&directory.join("snapshot")),
            "{name} is not a btrfs snapshot"
        );
        let (code, stdout, _) = coved.exec(&name, &["ls", "-l", "/big.bin"], b"");
        assert_eq!(code, 0, "{name} misses the image's file");
        assert!(stdout.contains(&BIG_FILE_BYTES.to_string()), "{stdout}");
    }
    let used_with_all = pool_used(&coved, "fast");
    let growth = used_with_all.saturating_sub(used_with_one);
    let per_container = growth / (CONTAINERS as u64 - 1);
    eprintln!(
        "pool used: {used_with_one} bytes with one container, {used_with_all} with \
         {CONTAINERS}: {per_container} bytes per container"
    );
    assert!(
        per_container < 4 * MIB,
        "each container took {per_container} bytes of the pool (from {used_with_one} to \
         {used_with_all}); a snapshot should take far less than the {BIG_FILE_BYTES}-byte image"
    );
    assert!(!coved
        .directory
        .join("storage-pools/default/containers/c0")
        .exists());

    // A custom volume seen by two containers.
    let ok = coved.request(
        "POST",
        "/1.0/storage-pools/fast/volumes/custom",
        Some(json!({"name": "shared"})),
    );
    assert_eq!(ok.status, 200, "{}", ok.json());
    assert!(cove_shim::btrfs::is_subvolume(&pool.join("custom/shared")));
    let with_volume = json!({
        "root": {"type": "disk", "path": "/", "pool": "fast"},
        "data": {"type": "disk", "pool": "fast", "source": "shared", "path": "/mnt/data"},
    });
    create_instance(&coved, "writer", with_volume.clone());
    create_instance(&coved, "reader", with_volume);
    booted(&coved, "writer");
    booted(&coved, "reader");
    let (code, _, stderr) =
        coved.exec("writer", &["sh", "-c", "echo across > /mnt/data/note"], b"");
    assert_eq!(code, 0, "writing to the volume failed: {stderr}");
    assert_eq!(
        coved.exec("reader", &["cat", "/mnt/data/note"], b""),
        (0, "across\n".to_string(), String::new())
    );

    // What is in use cannot go.
    let (_, message) = refused(&coved, "DELETE", "/1.0/storage-pools/fast", None);
    assert!(message.contains("in use"), "{message}");
    let (_, message) = refused(
        &coved,
        "DELETE",
        "/1.0/storage-pools/fast/volumes/custom/shared",
        None,
    );
    assert!(message.contains("writer"), "{message}");
    assert!(is_mount_point(&pool));
    let used_by = coved.get("/1.0/storage-pools/fast")["used_by"].clone();
    assert!(
        used_by
            .as_array()
            .is_some_and(|users| users.iter().any(|user| user == "/1.0/instances/c7")),
        "{used_by}"
    );

    // LXD's own client reads the pools.
    let listing = coved.lxc_ok(&["storage", "list"]);
    assert!(
        listing.contains("fast") && listing.contains("btrfs"),
        "{listing}"
    );
    let volumes = coved.lxc_ok(&["storage", "volume", "list", "fast"]);
    assert!(volumes.contains("shared"), "{volumes}");
    let info = coved.lxc_ok(&["storage", "info", "fast"]);
    assert!(
        info.contains("space used:") && info.contains("total space:"),
        "{info}"
    );
    let host = coved.lxc_ok(&["info", "--resources"]);
    assert!(host.contains("CPU") && host.contains("Memory"), "{host}");

    // Pools are mounted again at coved's start.
    coved.delete_all();
    coved.kill();
    // An image subvolume whose image was never recorded (a crash while it was made).
    let stray = pool.join("images").join("0123456789abcdef");
    cove_shim::btrfs::create_subvolume(&stray).expect("make a stray subvolume");
    command("umount", &[&pool.to_string_lossy()]);
    assert!(!is_mount_point(&pool));
    coved.restart();
    assert!(is_mount_point(&pool), "coved did not mount the pool again");
    assert!(!stray.exists(), "coved kept an unrecorded image subvolume");
    assert!(cove_shim::btrfs::is_subvolume(&image_subvolume));
    assert_eq!(
        std::fs::read_to_string(pool.join("custom/shared/note")).expect("the volume's file"),
        "across\n"
    );
    assert_eq!(coved.get("/1.0/storage-pools/fast")["driver"], "btrfs");

    // Deleting the image removes its subvolume; deleting the pool removes its loop file.
    let response = coved.request("DELETE", &format!("/1.0/images/{fingerprint}"), None);
    coved.wait(&response);
    assert!(!image_subvolume.exists(), "the image's subvolume stayed");
    let ok = coved.request(
        "DELETE",
        "/1.0/storage-pools/fast/volumes/custom/shared",
        None,
    );
    assert_eq!(ok.status, 200, "{}", ok.json());
    let ok = coved.request("DELETE", "/1.0/storage-pools/fast", None);
    assert_eq!(ok.status, 200, "{}", ok.json());
    assert!(!is_mount_point(&pool));
    assert!(!pool.exists() && !loop_file.exists());
    assert!(!mounted_under(&coved.directory));
}

#[test]
fn bad_pools_and_disks_are_refused_and_leave_nothing() {
    let mut unmount = Unmount(None);
    let coved = Coved::start("storage-refused", &[]);
    unmount.0 = Some(coved.directory.clone());
    let pools_before = coved.get("/1.0/storage-pools");
    let occupied = coved.directory.join("occupied");
    std::fs::create_dir_all(&occupied).expect("create a directory");
    std::fs::write(occupied.join("kept"), b"mine").expect("write a file");
    let not_btrfs = coved.directory.join("plain");
    std::fs::create_dir_all(&not_btrfs).expect("create a directory");
    let cases = [
        (
            json!({"name": "p", "driver": "dir", "config": {"source": occupied}}),
            "not empty",
        ),
        (
            json!({"name": "p", "driver": "btrfs", "config": {"source": not_btrfs}}),
            "not on a btrfs",
        ),
        (
            json!({"name": "p", "driver": "zfs"}),
            "unknown storage driver",
        ),
        (
            json!({"name": "p", "driver": "btrfs", "config": {"size": "huge"}}),
            "invalid size",
        ),
        (
            json!({"name": "p", "driver": "btrfs", "config": {"size": "1MiB"}}),
            "at least",
        ),
        (
            json!({"name": "p", "driver": "dir", "config": {"colour": "blue"}}),
            "unknown key",
        ),
        (
            json!({"name": "../p", "driver": "dir"}),
            "invalid storage pool name",
        ),
        (
            json!({"name": "default", "driver": "dir"}),
            "already exists",
        ),
    ];
    for (body, expected) in cases {
        let (_, message) = refused(&coved, "POST", "/1.0/storage-pools", Some(body.clone()));
        assert!(
            message.contains(expected),
            "{body}: \"{message}\" does not say \"{expected}\""
        );
    }
    assert_eq!(coved.get("/1.0/storage-pools"), pools_before);
    assert!(!pool_directory(&coved, "p").exists());
    assert!(!coved.directory.join("disks/p.img").exists());
    assert!(!mounted_under(&coved.directory));
    assert_eq!(
        std::fs::read(occupied.join("kept")).expect("the file stays"),
        b"mine"
    );

    // A dir pool on an empty directory, bound there and released.
    let empty = coved.directory.join("empty");
    std::fs::create_dir_all(&empty).expect("create a directory");
    let ok = coved.request(
        "POST",
        "/1.0/storage-pools",
        Some(json!({"name": "side", "driver": "dir", "config": {"source": empty}})),
    );
    assert_eq!(ok.status, 200, "{}", ok.json());
    assert!(is_mount_point(&pool_directory(&coved, "side")));
    let (status, _) = refused(
        &coved,
        "PATCH",
        "/1.0/storage-pools/side",
        Some(json!({"config": {"source": "/elsewhere"}})),
    );
    assert_eq!(status, 400);

    // Disk devices naming what does not exist, or a relative path.
    coved.import_image(
        &cove_tests::coved::busybox_unified_tarball(&coved.directory),
        "busybox",
    );
    let devices_cases = [
        (
            json!({"root": {"type": "disk", "path": "/", "pool": "nowhere"}}),
            "storage pool \"nowhere\" does not exist",
        ),
        (
            json!({"data": {"type": "disk", "pool": "side", "source": "ghost", "path": "/mnt"}}),
            "storage volume \"ghost\" does not exist",
        ),
        (
            json!({"data": {"type": "disk", "source": "/tmp", "path": "mnt/x"}}),
            "must be an absolute path",
        ),
        (
            json!({"data": {"type": "disk", "source": "/no/such/dir", "path": "/mnt/x"}}),
            "does not exist",
        ),
    ];
    for (devices, expected) in devices_cases {
        let (status, message) = refused(
            &coved,
            "POST",
            "/1.0/instances",
            Some(json!({
                "name": "bad",
                "source": {"type": "image", "alias": "busybox"},
                "devices": devices,
            })),
        );
        assert_eq!(status, 400);
        assert!(
            message.contains(expected),
            "{devices}: \"{message}\" does not say \"{expected}\""
        );
    }
    assert_eq!(coved.get("/1.0/instances"), json!([]));

    // An instance stays on the pool it was made on.
    coved.operation(
        "POST",
        "/1.0/instances",
        Some(json!({"name": "stay", "source": {"type": "image", "alias": "busybox"}})),
    );
    let (_, message) = refused(
        &coved,
        "PATCH",
        "/1.0/instances/stay",
        Some(json!({"devices": {"root": {"type": "disk", "path": "/", "pool": "side"}}})),
    );
    assert!(message.contains("moving it"), "{message}");
    coved.operation("DELETE", "/1.0/instances/stay", None);

    // A volume on the dir pool is a directory; a duplicate is refused.
    let volume = json!({"name": "notes"});
    let ok = coved.request(
        "POST",
        "/1.0/storage-pools/side/volumes/custom",
        Some(volume.clone()),
    );
    assert_eq!(ok.status, 200, "{}", ok.json());
    assert!(empty.join("custom/notes").is_dir());
    let (status, _) = refused(
        &coved,
        "POST",
        "/1.0/storage-pools/side/volumes/custom",
        Some(volume),
    );
    assert_eq!(status, 409);
    let (_, message) = refused(&coved, "DELETE", "/1.0/storage-pools/side", None);
    assert!(message.contains("notes"), "{message}");
    let ok = coved.request(
        "DELETE",
        "/1.0/storage-pools/side/volumes/custom/notes",
        None,
    );
    assert_eq!(ok.status, 200, "{}", ok.json());
    let ok = coved.request("DELETE", "/1.0/storage-pools/side", None);
    assert_eq!(ok.status, 200, "{}", ok.json());
    assert!(!mounted_under(&coved.directory));
    assert!(empty.is_dir(), "the given source directory must stay");
    assert!(!pool_directory(&coved, "side").exists());
}

/// A loop device over a sparse file, detached and removed when dropped.
struct LoopDevice {
    file: PathBuf,
    device: String,
}

impl LoopDevice {
    fn new(directory: &Path) -> Self {
        let file = directory.join("device.img");
        std::fs::File::create(&file)
            .and_then(|created| created.set_len(512 << 20))
            .expect("make the device's file");
        let device = command("losetup", &["--find", "--show", &file.to_string_lossy()])
            .trim()
            .to_string();
        Self { file, device }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
        let _ = std::fs::remove_file(&self.file);
    }
}

#[test]
fn btrfs_pool_on_a_block_device_formats_an_empty_one_and_refuses_another_file_system() {
    let mut unmount = Unmount(None);
    let coved = Coved::start("storage-device", &[]);
    unmount.0 = Some(coved.directory.clone());
    let device = LoopDevice::new(&coved.directory);
    let body = json!({"name": "disk", "driver": "btrfs", "config": {"source": device.device}});
    let ok = coved.request("POST", "/1.0/storage-pools", Some(body.clone()));
    assert_eq!(ok.status, 200, "{}", ok.json());
    let pool = pool_directory(&coved, "disk");
    assert!(is_mount_point(&pool));
    assert!(cove_shim::btrfs::is_btrfs(&pool));
    let ok = coved.request("DELETE", "/1.0/storage-pools/disk", None);
    assert_eq!(ok.status, 200, "{}", ok.json());
    assert!(!is_mount_point(&pool) && !pool.exists());

    command("mkfs.ext4", &["-q", "-F", &device.device]);
    let (_, message) = refused(&coved, "POST", "/1.0/storage-pools", Some(body));
    assert!(message.contains("ext4"), "{message}");
    assert!(!pool.exists());
    assert!(!mounted_under(&coved.directory));
}

#[test]
fn library_runtime_binds_a_read_only_host_directory() {
    let coved = Coved::start("storage-library", &["--runtime", "library"]);
    let share = coved.directory.join("host-share");
    std::fs::create_dir_all(&share).expect("create the shared directory");
    std::fs::write(share.join("greeting"), b"from the host\n").expect("write a file");
    // Writable by anyone: only `readonly` may stop the container's root.
    std::fs::set_permissions(&share, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("open the directory to all");
    coved.import_image(
        &cove_tests::coved::busybox_unified_tarball(&coved.directory),
        "busybox",
    );
    coved.operation(
        "POST",
        "/1.0/instances",
        Some(json!({
            "name": "guest",
            "source": {"type": "image", "alias": "busybox"},
            "devices": {"share": {
                "type": "disk", "source": share, "path": "/mnt/share", "readonly": "true",
            }},
        })),
    );
    coved.operation(
        "PUT",
        "/1.0/instances/guest/state",
        Some(json!({"action": "start"})),
    );
    assert_eq!(
        coved.exec("guest", &["cat", "/mnt/share/greeting"], b""),
        (0, "from the host\n".to_string(), String::new())
    );
    let (code, _, _) = coved.exec("guest", &["touch", "/mnt/share/written"], b"");
    assert_ne!(code, 0, "a read-only disk took a write");
    assert!(!share.join("written").exists());
    assert!(coved
        .directory
        .join("storage-pools/default/containers/guest")
        .is_dir());
}

#[test]
fn snapshots_on_a_btrfs_pool_are_read_only_subvolumes_that_go_with_their_instance() {
    let mut unmount = Unmount(None);
    let coved = Coved::start("storage-btrfs-snapshots", &[]);
    unmount.0 = Some(coved.directory.clone());
    let created = coved.request(
        "POST",
        "/1.0/storage-pools",
        Some(json!({"name": "snaps", "driver": "btrfs", "config": {"size": "2GiB"}})),
    );
    assert_eq!(created.status, 200, "{}", created.json());
    coved.import_image(&big_busybox_tarball(&coved.directory), "big");
    let root = json!({"root": {"type": "disk", "path": "/", "pool": "snaps"}});
    create_instance(&coved, "web", root);
    booted(&coved, "web");
    let shell = |name: &str, script: &str| {
        let (code, stdout, stderr) = coved.exec(name, &["sh", "-c", script], b"");
        assert_eq!(code, 0, "`{script}` in {name}: {stderr}");
        stdout
    };
    shell("web", "echo before > /root/note");
    coved.operation(
        "POST",
        "/1.0/instances/web/snapshots",
        Some(json!({"name": "s1"})),
    );
    let instance = pool_directory(&coved, "snaps").join("containers/web");
    let captured = instance.join("snapshots/s1/snapshot");
    let shown = command("btrfs", &["subvolume", "show", &captured.to_string_lossy()]);
    assert!(shown.contains("readonly"), "a read-only subvolume: {shown}");

    shell("web", "echo after > /root/note; rm /bin/vi");
    coved.operation("PUT", "/1.0/instances/web", Some(json!({"restore": "s1"})));
    booted(&coved, "web");
    assert_eq!(shell("web", "cat /root/note"), "before\n");
    shell("web", "test -e /bin/vi");

    coved.operation(
        "POST",
        "/1.0/instances",
        Some(json!({"name": "twin", "source": {"type": "copy", "source": "web"}})),
    );
    let twin = pool_directory(&coved, "snaps").join("containers/twin");
    command(
        "btrfs",
        &[
            "subvolume",
            "show",
            &twin.join("snapshot").to_string_lossy(),
        ],
    );
    assert!(
        twin.join("snapshots/s1/snapshot").exists(),
        "the copy took the snapshot"
    );

    coved.operation(
        "PUT",
        "/1.0/instances/web/state",
        Some(json!({"action": "stop", "force": true})),
    );
    for name in ["web", "twin"] {
        coved.operation("DELETE", &format!("/1.0/instances/{name}"), None);
    }
    assert!(
        !instance.exists() && !twin.exists(),
        "nothing of the instances remains"
    );
    let deleted = coved.request("DELETE", "/1.0/storage-pools/snaps", None);
    assert_eq!(deleted.status, 200, "{}", deleted.json());
}
