//! Snapshots and copies as LXD users make them: through the API and through Debian's `lxc`
//! client, on real containers under real cove-shim monitors; run as root. A snapshot, a change,
//! a restore: exactly the snapshot's files are back. A copy is an instance of its own.

use std::time::Duration;

use cove_tests::container::BOOT_MARKER;
use cove_tests::coved::{busybox_unified_tarball, eventually, Coved};
use serde_json::json;

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

fn booted(coved: &Coved, name: &str) {
    eventually("the boot marker", BOOT_TIMEOUT, || {
        let response = coved.request("GET", &format!("/1.0/instances/{name}/console"), None);
        String::from_utf8_lossy(&response.body).contains(BOOT_MARKER)
    });
}

fn shell(coved: &Coved, name: &str, script: &str) -> String {
    let (code, stdout, stderr) = coved.exec(name, &["sh", "-c", script], b"");
    assert_eq!(code, 0, "`{script}` in {name} failed: {stderr}");
    stdout
}

fn snapshot_names(coved: &Coved, name: &str) -> Vec<String> {
    coved
        .get(&format!("/1.0/instances/{name}/snapshots?recursion=1"))
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|snapshot| snapshot["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn failure(coved: &Coved, method: &str, path: &str, body: serde_json::Value) -> (u16, String) {
    let response = coved.request(method, path, Some(body));
    let status = response.status;
    if status == 202 {
        let url = response.json()["operation"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let done = coved.get(&format!("{url}/wait?timeout=60"));
        return (400, done["err"].as_str().unwrap_or_default().to_string());
    }
    (
        status,
        response.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[test]
fn snapshot_change_restore_brings_back_exactly_the_snapshot() {
    let coved = Coved::start("snapshots", &[]);
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    coved.launch("web", "busybox", json!({"limits.memory": "64MiB"}));
    booted(&coved, "web");
    shell(
        &coved,
        "web",
        "echo before > /root/note; echo old > /etc/motd",
    );

    // A snapshot of the running instance, named by the server.
    coved.operation("POST", "/1.0/instances/web/snapshots", Some(json!({})));
    assert_eq!(snapshot_names(&coved, "web"), ["snap0"]);
    let snapshot = coved.get("/1.0/instances/web/snapshots/snap0");
    assert_eq!(snapshot["config"]["limits.memory"], "64MiB");
    assert_eq!(snapshot["stateful"], false);
    assert!(
        snapshot["size"].as_i64().unwrap_or_default() > 0,
        "{snapshot}"
    );

    shell(
        &coved,
        "web",
        "echo after > /root/note; rm /etc/motd; echo new > /root/extra",
    );
    let patched = coved.request(
        "PATCH",
        "/1.0/instances/web",
        Some(json!({"config": {"limits.memory": "128MiB"}})),
    );
    assert_eq!(patched.status, 200, "{}", patched.json());

    // Restoring a running instance stops it, restores files and config, starts it again.
    coved.operation(
        "PUT",
        "/1.0/instances/web",
        Some(json!({"restore": "snap0"})),
    );
    assert_eq!(coved.status("web"), "Running");
    booted(&coved, "web");
    assert_eq!(
        shell(&coved, "web", "cat /root/note /etc/motd"),
        "before\nold\n"
    );
    assert_eq!(
        shell(
            &coved,
            "web",
            "test -e /root/extra && echo present || echo absent"
        ),
        "absent\n"
    );
    assert_eq!(
        coved.get("/1.0/instances/web")["config"]["limits.memory"],
        "64MiB"
    );

    // Rename, expiry, delete.
    coved.operation(
        "POST",
        "/1.0/instances/web/snapshots/snap0",
        Some(json!({"name": "baseline"})),
    );
    assert_eq!(snapshot_names(&coved, "web"), ["baseline"]);
    let response = coved.request(
        "PATCH",
        "/1.0/instances/web/snapshots/baseline",
        Some(json!({"expires_at": "2099-01-01T00:00:00Z"})),
    );
    assert_eq!(response.status, 200, "{}", response.json());
    assert_eq!(
        coved.get("/1.0/instances/web/snapshots/baseline")["expires_at"],
        "2099-01-01T00:00:00Z"
    );

    // Bad requests are refused and change nothing.
    for (method, path, body, status, words) in [
        (
            "POST",
            "/1.0/instances/web/snapshots",
            json!({"name": "baseline"}),
            409,
            "already exists",
        ),
        (
            "POST",
            "/1.0/instances/web/snapshots",
            json!({"name": "a/b"}),
            400,
            "invalid snapshot name",
        ),
        (
            "POST",
            "/1.0/instances/web/snapshots",
            json!({"stateful": true}),
            400,
            "stateful",
        ),
        (
            "POST",
            "/1.0/instances/web/snapshots",
            json!({"expires_at": "soon"}),
            400,
            "expires_at",
        ),
        (
            "POST",
            "/1.0/instances/absent/snapshots",
            json!({}),
            404,
            "not found",
        ),
        (
            "PUT",
            "/1.0/instances/web",
            json!({"restore": "nothing"}),
            404,
            "not found",
        ),
        (
            "POST",
            "/1.0/instances/web/snapshots/nothing",
            json!({"name": "x"}),
            404,
            "not found",
        ),
    ] {
        let (got, message) = failure(&coved, method, path, body.clone());
        assert_eq!(got, status, "{method} {path} {body}: {message}");
        assert!(message.contains(words), "{method} {path}: {message}");
    }
    assert_eq!(snapshot_names(&coved, "web"), ["baseline"]);

    // Snapshots survive a restart of coved.
    let mut coved = coved;
    coved.restart();
    assert_eq!(snapshot_names(&coved, "web"), ["baseline"]);

    coved.operation("DELETE", "/1.0/instances/web/snapshots/baseline", None);
    assert!(snapshot_names(&coved, "web").is_empty());
    let directory = coved.containers_directory().join("web").join("snapshots");
    let left: Vec<_> = std::fs::read_dir(&directory)
        .map(|entries| entries.flatten().map(|entry| entry.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "files of a deleted snapshot remain: {left:?}"
    );
}

#[test]
fn a_copy_is_an_instance_of_its_own() {
    let coved = Coved::start("copies", &[]);
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    coved.launch("origin", "busybox", json!({"user.role": "origin"}));
    booted(&coved, "origin");
    shell(&coved, "origin", "echo first > /root/note");
    coved.operation(
        "POST",
        "/1.0/instances/origin/snapshots",
        Some(json!({"name": "first"})),
    );
    shell(&coved, "origin", "echo second > /root/note");

    // A copy of the running instance, and one of its snapshot.
    coved.operation(
        "POST",
        "/1.0/instances",
        Some(json!({"name": "twin", "source": {"type": "copy", "source": "origin"}})),
    );
    coved.operation(
        "POST",
        "/1.0/instances",
        Some(json!({"name": "past", "source": {"type": "copy", "source": "origin/first", "instance_only": true}, "start": true})),
    );
    let twin = coved.get("/1.0/instances/twin");
    assert_eq!(twin["config"]["user.role"], "origin");
    assert_eq!(twin["status"], "Stopped");
    assert_eq!(
        snapshot_names(&coved, "twin"),
        ["first"],
        "a copy takes the snapshots"
    );
    assert!(snapshot_names(&coved, "past").is_empty());

    coved.operation(
        "PUT",
        "/1.0/instances/twin/state",
        Some(json!({"action": "start"})),
    );
    booted(&coved, "twin");
    booted(&coved, "past");
    assert_eq!(shell(&coved, "twin", "cat /root/note"), "second\n");
    assert_eq!(shell(&coved, "past", "cat /root/note"), "first\n");

    // Independent: a change in the copy does not reach the source, and the reverse.
    shell(&coved, "twin", "echo twin > /root/note");
    shell(&coved, "origin", "echo origin > /root/other");
    assert_eq!(shell(&coved, "origin", "cat /root/note"), "second\n");
    assert_eq!(
        shell(
            &coved,
            "twin",
            "test -e /root/other && echo present || echo absent"
        ),
        "absent\n"
    );
    let twin_hwaddr = coved.get("/1.0/instances/twin")["config"]["volatile.eth0.hwaddr"].clone();
    let origin_hwaddr =
        coved.get("/1.0/instances/origin")["config"]["volatile.eth0.hwaddr"].clone();
    if !twin_hwaddr.is_null() {
        assert_ne!(twin_hwaddr, origin_hwaddr, "a copy gets its own MAC");
    }

    // Deleting the source leaves the copies whole.
    coved.operation(
        "PUT",
        "/1.0/instances/origin/state",
        Some(json!({"action": "stop", "force": true})),
    );
    coved.operation("DELETE", "/1.0/instances/origin", None);
    assert_eq!(shell(&coved, "twin", "cat /root/note"), "twin\n");

    // Copies that cannot be made are refused before anything exists.
    for (body, status) in [
        (
            json!({"name": "x", "source": {"type": "copy", "source": "origin"}}),
            404,
        ),
        (
            json!({"name": "x", "source": {"type": "copy", "source": "twin/none"}}),
            404,
        ),
        (
            json!({"name": "past", "source": {"type": "copy", "source": "twin"}}),
            409,
        ),
        (json!({"name": "x", "source": {"type": "copy"}}), 400),
    ] {
        let response = coved.request("POST", "/1.0/instances", Some(body.clone()));
        assert_eq!(response.status, status, "{body}: {}", response.json());
    }
    assert_eq!(coved.request("GET", "/1.0/instances/x", None).status, 404);
}

#[test]
fn the_lxc_client_snapshots_restores_and_copies() {
    let coved = Coved::start("snapshots-lxc", &[]);
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    coved.lxc_ok(&["launch", "busybox", "box"]);
    booted(&coved, "box");
    shell(&coved, "box", "echo one > /root/note");
    coved.lxc_ok(&["snapshot", "box", "one"]);
    let info = coved.lxc_ok(&["info", "box"]);
    assert!(
        info.contains("Snapshots:") && info.contains("one"),
        "{info}"
    );
    let listed = coved.lxc_ok(&["list", "box", "-c", "nS", "--format", "csv"]);
    assert_eq!(listed.trim(), "box,1");

    shell(&coved, "box", "echo two > /root/note");
    coved.lxc_ok(&["restore", "box", "one"]);
    booted(&coved, "box");
    assert_eq!(shell(&coved, "box", "cat /root/note"), "one\n");

    coved.lxc_ok(&["copy", "box/one", "boxcopy"]);
    coved.lxc_ok(&["start", "boxcopy"]);
    booted(&coved, "boxcopy");
    assert_eq!(shell(&coved, "boxcopy", "cat /root/note"), "one\n");

    coved.lxc_ok(&["rename", "box/one", "box/first"]);
    assert_eq!(snapshot_names(&coved, "box"), ["first"]);
    coved.lxc_ok(&["delete", "box/first"]);
    assert!(snapshot_names(&coved, "box").is_empty());
}

/// Reads `/path` from the ext4 file system in `disk` with debugfs (no boot needed).
fn disk_file(disk: &std::path::Path, path: &str) -> String {
    let output = std::process::Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(disk)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Replaces `/path` in the ext4 file system in `disk` with `text`.
fn write_disk_file(disk: &std::path::Path, path: &str, text: &str) {
    let source = disk.with_extension("source");
    std::fs::write(&source, text).expect("write the source file");
    for request in [
        format!("rm {path}"),
        format!("write {} {path}", source.display()),
    ] {
        let status = std::process::Command::new("debugfs")
            .args(["-w", "-R", &request])
            .arg(disk)
            .output()
            .expect("run debugfs")
            .status;
        assert!(status.success(), "debugfs {request}");
    }
    let _ = std::fs::remove_file(source);
}

#[test]
fn a_vm_disk_is_snapshotted_restored_and_copied() {
    cove_tests::require_kvm();
    let agent = cove_tests::cove_agent();
    let coved = Coved::start(
        "snapshots-vm",
        &[
            "--vmm",
            cove_tests::cove_vmm().to_str().unwrap(),
            "--vm-agent",
            agent.to_str().unwrap(),
        ],
    );
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    // Made, not started: the disk is built by the creating operation; no boot is needed to
    // check what snapshots do with it.
    coved.operation(
        "POST",
        "/1.0/instances",
        Some(json!({
            "name": "vm", "type": "virtual-machine",
            "source": {"type": "image", "alias": "busybox"},
            "config": {"boot.allow_emulated_kvm": "true"},
        })),
    );
    let disk = coved
        .directory
        .join("storage-pools/default/virtual-machines/vm/root.img");
    assert!(disk.exists(), "the VM's disk");
    write_disk_file(&disk, "/etc/motd", "before\n");
    coved.operation(
        "POST",
        "/1.0/instances/vm/snapshots",
        Some(json!({"name": "clean"})),
    );
    write_disk_file(&disk, "/etc/motd", "after\n");
    assert_eq!(disk_file(&disk, "/etc/motd"), "after\n");

    coved.operation(
        "PUT",
        "/1.0/instances/vm",
        Some(json!({"restore": "clean"})),
    );
    assert_eq!(disk_file(&disk, "/etc/motd"), "before\n");

    coved.operation(
        "POST",
        "/1.0/instances",
        Some(json!({"name": "vm2", "source": {"type": "copy", "source": "vm/clean"}})),
    );
    let copy = coved.get("/1.0/instances/vm2");
    assert_eq!(copy["type"], "virtual-machine");
    let copied_disk = coved
        .directory
        .join("storage-pools/default/virtual-machines/vm2/root.img");
    assert_eq!(disk_file(&copied_disk, "/etc/motd"), "before\n");
    write_disk_file(&copied_disk, "/etc/motd", "copy\n");
    assert_eq!(
        disk_file(&disk, "/etc/motd"),
        "before\n",
        "the copy is its own disk"
    );

    coved.operation("DELETE", "/1.0/instances/vm", None);
    coved.operation("DELETE", "/1.0/instances/vm2", None);
    assert!(!disk.exists() && !copied_disk.exists());
}
