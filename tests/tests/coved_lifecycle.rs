//! A container's life under coved as LXD users know it: files written inside survive stop and
//! start and a rename, and go with `delete`; `security.nesting` set through the API reaches
//! the container core; a `signal` on exec's control websocket reaches the command. Real
//! containers under real cove-shim monitors; run as root. The bridged nic's test runs coved in
//! a network namespace of the test's own, never on the host's network.

use std::time::Duration;

use cove_tests::container::{in_private_network, BOOT_MARKER, BRIDGE};
use cove_tests::coved::{busybox_unified_tarball, eventually, Coved};
use serde_json::json;

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

fn change_state(coved: &Coved, name: &str, action: &str) {
    coved.operation(
        "PUT",
        &format!("/1.0/instances/{name}/state"),
        Some(json!({"action": action, "timeout": 10, "force": true})),
    );
}

fn booted(coved: &Coved, name: &str) {
    eventually("the boot marker", BOOT_TIMEOUT, || {
        let response = coved.request("GET", &format!("/1.0/instances/{name}/console"), None);
        String::from_utf8_lossy(&response.body).contains(BOOT_MARKER)
    });
}

#[test]
fn files_survive_stop_start_and_rename_and_go_with_delete() {
    let coved = Coved::start("lifecycle", &[]);
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    coved.launch("keeper", "busybox", json!({}));
    booted(&coved, "keeper");
    assert_eq!(
        coved
            .exec("keeper", &["sh", "-c", "echo kept > /root/note"], b"")
            .0,
        0
    );

    change_state(&coved, "keeper", "stop");
    assert_eq!(coved.status("keeper"), "Stopped");
    change_state(&coved, "keeper", "start");
    assert_eq!(coved.status("keeper"), "Running");
    assert_eq!(
        coved.exec("keeper", &["cat", "/root/note"], b""),
        (0, "kept\n".to_string(), String::new())
    );
    // Starting a running instance is still refused.
    let again = coved.request(
        "PUT",
        "/1.0/instances/keeper/state",
        Some(json!({"action": "start"})),
    );
    let refused = if again.status == 202 {
        let url = again.json()["operation"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        coved.get(&format!("{url}/wait?timeout=60"))["status"] != "Success"
    } else {
        true
    };
    assert!(refused, "a running instance was started twice");

    change_state(&coved, "keeper", "stop");
    coved.operation(
        "POST",
        "/1.0/instances/keeper",
        Some(json!({"name": "moved"})),
    );
    assert!(!coved.containers_directory().join("keeper").exists());
    change_state(&coved, "moved", "start");
    assert_eq!(
        coved.exec("moved", &["cat", "/root/note"], b""),
        (0, "kept\n".to_string(), String::new())
    );

    change_state(&coved, "moved", "stop");
    coved.operation("DELETE", "/1.0/instances/moved", None);
    for name in ["keeper", "moved"] {
        assert!(!coved.containers_directory().join(name).exists(), "{name}");
        assert!(!coved.run_directory().join(name).exists(), "{name}");
    }
}

#[test]
fn security_nesting_through_the_api_reaches_the_container() {
    let coved = Coved::start("nesting", &[]);
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    let nested_proc = [
        "sh",
        "-c",
        "unshare -U -r -m -p -f --mount-proc sh -c 'echo $$'",
    ];

    coved.launch("nested", "busybox", json!({"security.nesting": "true"}));
    booted(&coved, "nested");
    let (code, stdout, stderr) = coved.exec("nested", &nested_proc, b"");
    assert_eq!((code, stdout.as_str()), (0, "1\n"), "{stderr}");

    coved.launch("flat", "busybox", json!({}));
    booted(&coved, "flat");
    let (code, _, stderr) = coved.exec("flat", &nested_proc, b"");
    assert_ne!(
        code, 0,
        "a nested user namespace mounted proc without nesting"
    );
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    coved.delete_all();
}

#[test]
fn a_signal_on_the_control_websocket_ends_the_command() {
    let coved = Coved::start("exec-signal", &[]);
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    coved.launch("sleeper", "busybox", json!({}));
    booted(&coved, "sleeper");

    let operation = coved.websocket_operation(
        "/1.0/instances/sleeper/exec",
        json!({
            "command": ["sleep", "100"], "wait-for-websocket": true, "interactive": false,
        }),
    );
    let connect = |fd: &str| operation.connect(fd);
    let mut control = connect("control");
    let _streams: Vec<_> = ["0", "1", "2"].into_iter().map(connect).collect();
    // The command runs once 0, 1 and 2 are connected; give sleep a moment to be exec'd.
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    control
        .send(tungstenite::Message::Text(
            json!({"command": "signal", "signal": 15})
                .to_string()
                .into(),
        ))
        .expect("send the signal");
    let done = coved.get(&format!("{}/wait?timeout=60", operation.url));
    assert_eq!(done["status"], "Success", "{done}");
    assert_eq!(done["metadata"]["return"], 143, "{done}");
    assert!(started.elapsed() < Duration::from_secs(20), "sleep ran on");
    coved.delete_all();
}

#[test]
fn a_bridged_nic_device_reaches_the_bridge_and_its_address_shows_in_state() {
    in_private_network(|| {
        let coved = Coved::start("bridged", &[]);
        coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
        coved.operation(
            "POST",
            "/1.0/instances",
            Some(json!({
                "name": "wired", "source": {"type": "image", "alias": "busybox"},
                "devices": {"eth0": {"type": "nic", "nictype": "bridged", "parent": BRIDGE}},
            })),
        );
        change_state(&coved, "wired", "start");
        booted(&coved, "wired");
        let (code, stdout, stderr) = coved.exec(
            "wired",
            &[
                "sh",
                "-c",
                "ip addr add 192.0.2.2/24 dev eth0 && ping -c1 -W5 192.0.2.1",
            ],
            b"",
        );
        assert_eq!(code, 0, "{stdout}{stderr}");
        let state = coved.get("/1.0/instances/wired/state");
        let addresses = &state["network"]["eth0"]["addresses"];
        assert!(
            addresses
                .as_array()
                .is_some_and(|list| list.iter().any(|entry| entry["address"] == "192.0.2.2")),
            "{state}"
        );
        coved.delete_all();
    });
}
