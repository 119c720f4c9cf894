//! coved end to end, over its Unix socket, on a throw-away COVE_DIR: images imported as
//! `lxc image import` sends them, containers launched, listed, exec'd (output, exit code,
//! stdin), files pushed and pulled, stopped and deleted; bad input refused without leftovers;
//! 20 launches at once; `kill -9` of coved in the middle of launches; and the same flows
//! driven by Debian's `lxc` client and by pylxd. Real containers under real cove-shim
//! monitors; run as root.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use cove_tests::container::BOOT_MARKER;
use cove_tests::coved::{
    busybox_split_tarballs, busybox_unified_tarball, debian_tarball, eventually, http, multipart,
    processes_mentioning, try_http, Coved,
};
use serde_json::{json, Value};

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

fn console(coved: &Coved, name: &str) -> String {
    let response = coved.request("GET", &format!("/1.0/instances/{name}/console"), None);
    assert_eq!(response.status, 200);
    String::from_utf8_lossy(&response.body).into_owned()
}

/// Nothing of `name` is left: no run-directory entry, no container directory, no monitor.
fn assert_gone(coved: &Coved, name: &str) {
    assert!(
        !coved.run_directory().join(name).exists(),
        "the run directory still has {name}"
    );
    assert!(
        !coved.containers_directory().join(name).exists(),
        "the container directory of {name} is still there"
    );
    let needle = format!("--name\0{name}\0");
    let run = coved.run_directory().to_string_lossy().into_owned();
    let left: Vec<_> = processes_mentioning(&needle)
        .into_iter()
        .filter(|(_, line)| line.contains(&run))
        .collect();
    assert!(left.is_empty(), "monitors of {name} still run: {left:?}");
}

#[test]
fn busybox_launch_exec_files_stop_delete() {
    let coved = Coved::start("busybox", &[]);
    let server = coved.get("/1.0");
    assert_eq!(server["auth"], "trusted");
    assert_eq!(server["api_version"], "1.0");
    assert!(server["api_extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("instances")));
    assert_eq!(coved.get("/"), json!(["/1.0"]));

    let fingerprint = coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    assert_eq!(fingerprint.len(), 64);
    let images = coved.get("/1.0/images?recursion=1");
    assert_eq!(images[0]["fingerprint"], fingerprint);
    assert_eq!(images[0]["aliases"][0]["name"], "busybox");
    assert_eq!(images[0]["properties"]["os"], "busybox");
    assert!(coved
        .directory
        .join("images")
        .join(&fingerprint)
        .join("rootfs/bin/busybox")
        .exists());

    coved.launch(
        "web",
        "busybox",
        json!({"limits.processes": "100", "user.note": "x"}),
    );
    assert_eq!(coved.get("/1.0/instances"), json!(["/1.0/instances/web"]));
    let listed = coved.get("/1.0/instances?recursion=1");
    assert_eq!(listed[0]["status"], "Running");
    assert_eq!(listed[0]["status_code"], 103);
    assert_eq!(listed[0]["expanded_devices"]["root"]["pool"], "default");
    let full = coved.get("/1.0/instances?recursion=2");
    assert!(full[0]["state"]["pid"].as_i64().unwrap() > 1);
    let state = coved.get("/1.0/instances/web/state");
    assert_eq!(state["status"], "Running");
    eventually("the boot marker", BOOT_TIMEOUT, || {
        console(&coved, "web").contains(BOOT_MARKER)
    });

    // exec: output, exit code, stdin, environment.
    assert_eq!(
        coved.exec("web", &["hostname"], b""),
        (0, "web\n".to_string(), String::new())
    );
    assert_eq!(
        coved.exec("web", &["sh", "-c", "echo out; echo err >&2; exit 7"], b""),
        (7, "out\n".to_string(), "err\n".to_string())
    );
    assert_eq!(
        coved.exec("web", &["cat"], b"through stdin").1,
        "through stdin"
    );
    assert_eq!(
        coved
            .exec("web", &["sh", "-c", "echo $GREETING $HOME"], b"")
            .1,
        "hello /root\n"
    );
    assert_eq!(
        coved
            .exec("web", &["cat", "/sys/fs/cgroup/pids/pids.max"], b"")
            .0,
        0,
        "the container has a pids cgroup"
    );

    // Files: push lands in the snapshot with the container's owner; pull reads it back.
    let push = http(
        &coved.socket(),
        "POST",
        "/1.0/instances/web/files?path=/root/pushed.txt",
        &[
            ("X-LXD-uid", "1000"),
            ("X-LXD-gid", "1000"),
            ("X-LXD-mode", "0640"),
        ],
        b"pushed content\n",
    );
    assert_eq!(push.status, 200, "{}", push.json());
    let on_disk = coved
        .containers_directory()
        .join("web/upper/root/pushed.txt");
    assert_eq!(
        std::fs::read_to_string(&on_disk).unwrap(),
        "pushed content\n"
    );
    let metadata = std::fs::metadata(&on_disk).unwrap();
    assert_eq!(metadata.mode() & 0o7777, 0o640);
    assert!(
        metadata.uid() >= 1000,
        "pushed file owned by a mapped uid, got {}",
        metadata.uid()
    );
    assert_eq!(
        coved
            .exec("web", &["stat", "-c", "%u:%g %a", "/root/pushed.txt"], b"")
            .1,
        "1000:1000 640\n"
    );
    let pulled = coved.request(
        "GET",
        "/1.0/instances/web/files?path=/root/pushed.txt",
        None,
    );
    assert_eq!(pulled.status, 200);
    assert_eq!(pulled.body, b"pushed content\n");
    assert_eq!(pulled.header("x-lxd-uid"), Some("1000"));
    assert_eq!(pulled.header("x-lxd-mode"), Some("0640"));
    assert_eq!(pulled.header("x-lxd-type"), Some("file"));
    let directory = coved.request("GET", "/1.0/instances/web/files?path=/etc", None);
    assert_eq!(directory.header("x-lxd-type"), Some("directory"));
    assert!(directory.json()["metadata"]
        .as_array()
        .unwrap()
        .contains(&json!("passwd")));
    // Out of the root: refused, whatever the spelling; a symlink cannot lead out either.
    let escape = coved.request(
        "GET",
        "/1.0/instances/web/files?path=/../../etc/shadow",
        None,
    );
    assert_eq!(escape.status, 400, "{}", escape.json());
    assert!(escape.json()["error"].as_str().unwrap().contains(".."));
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    coved.exec(
        "web",
        &["ln", "-s", "/../../../../../etc", "/root/escape"],
        b"",
    );
    let through = coved.request(
        "GET",
        "/1.0/instances/web/files?path=/root/escape/hostname",
        None,
    );
    assert_eq!(through.status, 200);
    assert_eq!(
        through.body, b"image\n",
        "a symlink led out of the container"
    );
    assert_ne!(String::from_utf8_lossy(&through.body), host_hostname);
    let link = coved.request("GET", "/1.0/instances/web/files?path=/root/escape", None);
    assert_eq!(link.header("x-lxd-type"), Some("symlink"));
    assert_eq!(link.body, b"/../../../../../etc");
    let write_through = http(
        &coved.socket(),
        "POST",
        "/1.0/instances/web/files?path=/root/escape/cove-written",
        &[],
        b"not really",
    );
    assert_eq!(write_through.status, 200);
    assert_eq!(
        coved.exec("web", &["cat", "/etc/cove-written"], b"").1,
        "not really",
        "the write stayed inside the container"
    );
    let deleted = coved.request(
        "DELETE",
        "/1.0/instances/web/files?path=/root/pushed.txt",
        None,
    );
    assert_eq!(deleted.status, 200);
    assert!(!on_disk.exists());

    // Recorded exec output.
    let recorded = coved.operation(
        "POST",
        "/1.0/instances/web/exec",
        Some(json!({"command": ["echo", "kept"], "record-output": true, "wait-for-websocket": false})),
    );
    assert_eq!(recorded["metadata"]["return"], 0);
    let log = recorded["metadata"]["output"]["1"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(coved.request("GET", &log, None).body, b"kept\n");

    // Freeze, unfreeze, stop, delete.
    coved.operation(
        "PUT",
        "/1.0/instances/web/state",
        Some(json!({"action": "freeze"})),
    );
    assert_eq!(coved.status("web"), "Frozen");
    coved.operation(
        "PUT",
        "/1.0/instances/web/state",
        Some(json!({"action": "unfreeze"})),
    );
    assert_eq!(coved.status("web"), "Running");
    let init = coved.get("/1.0/instances/web/state")["pid"]
        .as_i64()
        .unwrap();
    let running_delete = coved.request("DELETE", "/1.0/instances/web", None);
    assert_eq!(
        running_delete.status, 400,
        "a running instance is not deleted"
    );
    coved.operation(
        "PUT",
        "/1.0/instances/web/state",
        Some(json!({"action": "stop", "timeout": 30})),
    );
    assert_eq!(coved.status("web"), "Stopped");
    assert!(
        !std::path::Path::new(&format!("/proc/{init}")).exists(),
        "init {init} still runs"
    );
    coved.operation("DELETE", "/1.0/instances/web", None);
    assert_eq!(coved.get("/1.0/instances"), json!([]));
    assert_gone(&coved, "web");
    assert_eq!(coved.request("GET", "/1.0/instances/web", None).status, 404);
}

#[test]
fn split_images_upload_as_multipart_and_bad_uploads_are_refused() {
    let coved = Coved::start("images", &["--max-image-size", "8MiB"]);
    let (metadata, rootfs) = busybox_split_tarballs(&coved.directory);
    let (content_type, body) = multipart(&metadata, &rootfs);
    let response = http(
        &coved.socket(),
        "POST",
        "/1.0/images",
        &[
            ("Content-Type", &content_type),
            ("X-LXD-properties", "os=busybox&release=split"),
        ],
        &body,
    );
    let done = coved.wait(&response);
    let fingerprint = done["metadata"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    // LXD's fingerprint of a split image: SHA-256 of the metadata file then the rootfs file.
    let mut both = std::fs::read(&metadata).unwrap();
    both.extend(std::fs::read(&rootfs).unwrap());
    let expected = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&both)?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(String::from_utf8_lossy(&expected.stdout).starts_with(&fingerprint));
    let image = coved.get(&format!("/1.0/images/{}", &fingerprint[..12]));
    assert_eq!(image["properties"]["release"], "split");

    // The same upload again: a conflict, nothing new.
    let again = http(
        &coved.socket(),
        "POST",
        "/1.0/images",
        &[("Content-Type", &content_type)],
        &body,
    );
    assert_eq!(again.status, 409, "{}", again.json());
    // Not an image.
    let junk = http(
        &coved.socket(),
        "POST",
        "/1.0/images",
        &[],
        b"this is not a tarball",
    );
    assert_eq!(junk.status, 400);
    assert!(junk.json()["error"]
        .as_str()
        .unwrap()
        .contains("not an image"));
    // Too large.
    let large = vec![0u8; 9 << 20];
    let too_large = http(&coved.socket(), "POST", "/1.0/images", &[], &large);
    assert_eq!(too_large.status, 413, "{}", too_large.json());
    // An empty body, and JSON asking for a download.
    assert_eq!(
        http(&coved.socket(), "POST", "/1.0/images", &[], b"").status,
        400
    );
    let remote = coved.request(
        "POST",
        "/1.0/images",
        Some(json!({"source": {"type": "url", "url": "https://example.com/x"}})),
    );
    assert_eq!(remote.status, 400);
    assert_eq!(coved.get("/1.0/images").as_array().unwrap().len(), 1);
    let staging = coved.directory.join("images/.staging");
    assert!(
        std::fs::read_dir(&staging).map_or(true, |mut entries| entries.next().is_none()),
        "uploads left staging files behind"
    );

    // Aliases: create, clash, rename, delete; an image in use is not deleted.
    let alias = json!({"name": "bb", "target": &fingerprint[..10]});
    assert_eq!(
        coved
            .request("POST", "/1.0/images/aliases", Some(alias.clone()))
            .status,
        200
    );
    assert_eq!(
        coved
            .request("POST", "/1.0/images/aliases", Some(alias))
            .status,
        409
    );
    assert_eq!(coved.get("/1.0/images/aliases/bb")["target"], fingerprint);
    coved.launch("user", "bb", json!({}));
    let in_use = coved.request("DELETE", &format!("/1.0/images/{fingerprint}"), None);
    assert_eq!(in_use.status, 400, "{}", in_use.json());
    assert_eq!(
        coved
            .request(
                "POST",
                "/1.0/images/aliases/bb",
                Some(json!({"name": "busybox"}))
            )
            .status,
        200
    );
    assert_eq!(
        coved
            .request("DELETE", "/1.0/images/aliases/busybox", None)
            .status,
        200
    );
    coved.operation(
        "PUT",
        "/1.0/instances/user/state",
        Some(json!({"action": "stop", "force": true})),
    );
    coved.operation("DELETE", "/1.0/instances/user", None);
    coved.operation("DELETE", &format!("/1.0/images/{fingerprint}"), None);
    assert_eq!(coved.get("/1.0/images"), json!([]));
    assert!(!coved.directory.join("images").join(&fingerprint).exists());
}

#[test]
fn bad_requests_get_error_envelopes_and_change_nothing() {
    let coved = Coved::start("bad-input", &[]);
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    let source = json!({"type": "image", "alias": "busybox"});
    let cases: Vec<(&str, &str, Option<Value>, u16, &str)> = vec![
        (
            "POST",
            "/1.0/instances",
            Some(json!({"name": "-bad", "source": source})),
            400,
            "invalid instance name",
        ),
        (
            "POST",
            "/1.0/instances",
            Some(json!({"name": "a/b", "source": source})),
            400,
            "invalid instance name",
        ),
        (
            "POST",
            "/1.0/instances",
            Some(json!({"name": "ok", "source": {"type": "image", "alias": "nope"}})),
            404,
            "nope",
        ),
        (
            "POST",
            "/1.0/instances",
            Some(json!({"name": "ok", "source": {"type": "image", "fingerprint": "abcdef"}})),
            404,
            "abcdef",
        ),
        (
            "POST",
            "/1.0/instances",
            Some(json!({"source": source})),
            400,
            "name",
        ),
        (
            "POST",
            "/1.0/instances",
            Some(json!({"name": "ok", "source": source, "config": {"limits.memroy": "1GiB"}})),
            400,
            "limits.memroy",
        ),
        (
            "POST",
            "/1.0/instances",
            Some(json!({"name": "ok", "source": source, "config": {"limits.memory": "lots"}})),
            400,
            "limits.memory",
        ),
        (
            "POST",
            "/1.0/instances",
            Some(json!({"name": "ok", "source": source, "devices": {"eth0": {"type": "nic"}}})),
            400,
            "eth0",
        ),
        (
            "POST",
            "/1.0/instances",
            Some(json!({"name": "ok", "source": source, "profiles": ["nope"]})),
            400,
            "nope",
        ),
        (
            "POST",
            "/1.0/instances",
            Some(json!({
                "name": "ok", "type": "virtual-machine", "source": source,
                "config": {"boot.allow_emulated_kvm": "true", "limits.cpu": "0-3"},
            })),
            400,
            "limits.cpu",
        ),
        (
            "PUT",
            "/1.0/instances/ghost/state",
            Some(json!({"action": "start"})),
            404,
            "ghost",
        ),
        (
            "POST",
            "/1.0/profiles",
            Some(json!({"name": "p", "config": {"bogus": "1"}})),
            400,
            "bogus",
        ),
        ("DELETE", "/1.0/profiles/default", None, 400, "default"),
        ("GET", "/1.0/operations/nope", None, 404, "nope"),
        ("GET", "/1.0/nowhere", None, 404, "not found"),
    ];
    for (method, path, body, status, needle) in cases {
        let response = coved.request(method, path, body.clone());
        let answer = response.json();
        assert_eq!(
            response.status, status,
            "{method} {path} {body:?}: {answer}"
        );
        assert_eq!(answer["type"], "error");
        assert_eq!(answer["error_code"], status);
        assert!(
            answer["error"].as_str().unwrap().contains(needle),
            "{method} {path}: {answer}"
        );
    }
    let not_json = http(&coved.socket(), "POST", "/1.0/instances", &[], b"{not json");
    assert_eq!(not_json.status, 400);
    assert!(not_json.json()["error"].as_str().unwrap().contains("JSON"));

    // A duplicate name.
    coved.operation(
        "POST",
        "/1.0/instances",
        Some(json!({"name": "one", "source": source})),
    );
    let duplicate = coved.request(
        "POST",
        "/1.0/instances",
        Some(json!({"name": "one", "source": source})),
    );
    assert_eq!(duplicate.status, 409);
    assert_eq!(coved.get("/1.0/instances"), json!(["/1.0/instances/one"]));
    assert!(!coved.containers_directory().join("ok").exists());

    // ETags: a stale If-Match is refused; PATCH merges, an unknown key is refused by name.
    let response = coved.request("GET", "/1.0/instances/one", None);
    let etag = response.header("etag").unwrap().to_string();
    let stale = http(
        &coved.socket(),
        "PUT",
        "/1.0/instances/one",
        &[
            ("If-Match", "\"0000\""),
            ("Content-Type", "application/json"),
        ],
        b"{}",
    );
    assert_eq!(stale.status, 412);
    let patched = coved.request(
        "PATCH",
        "/1.0/instances/one",
        Some(json!({"config": {"user.a": "b"}})),
    );
    assert_eq!(patched.status, 200, "{}", patched.json());
    let after = coved.request("GET", "/1.0/instances/one", None);
    assert_ne!(after.header("etag").unwrap(), etag);
    assert_eq!(after.json()["metadata"]["config"]["user.a"], "b");
    let refused = coved.request(
        "PATCH",
        "/1.0/instances/one",
        Some(json!({"config": {"nope.key": "1"}})),
    );
    assert_eq!(refused.status, 400);
    assert!(refused.json()["error"]
        .as_str()
        .unwrap()
        .contains("nope.key"));
    let fresh = http(
        &coved.socket(),
        "PUT",
        "/1.0/instances/one",
        &[
            ("If-Match", after.header("etag").unwrap()),
            ("Content-Type", "application/json"),
        ],
        json!({"config": {"boot.autostart": "false"}, "profiles": ["default"]})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(fresh.status, 202, "{}", fresh.json());
    let config = coved.get("/1.0/instances/one")["config"].clone();
    assert_eq!(config["boot.autostart"], "false");
    assert!(config.get("user.a").is_none());

    // Exec and files on a stopped instance say so.
    let exec = coved.request(
        "POST",
        "/1.0/instances/one/exec",
        Some(json!({"command": ["true"]})),
    );
    assert_eq!(exec.status, 400);
    assert!(exec.json()["error"]
        .as_str()
        .unwrap()
        .contains("not running"));
    let files = coved.request("GET", "/1.0/instances/one/files?path=/etc/hostname", None);
    assert_eq!(files.status, 400);

    // Rename, then profiles in use.
    coved.operation("POST", "/1.0/instances/one", Some(json!({"name": "two"})));
    assert_eq!(coved.get("/1.0/instances"), json!(["/1.0/instances/two"]));
    assert_eq!(
        coved
            .request(
                "POST",
                "/1.0/profiles",
                Some(json!({"name": "extra", "config": {"limits.cpu": "1"}}))
            )
            .status,
        200
    );
    coved.request(
        "PATCH",
        "/1.0/instances/two",
        Some(json!({"profiles": ["default", "extra"]})),
    );
    assert_eq!(
        coved.get("/1.0/instances/two")["expanded_config"]["limits.cpu"],
        "1"
    );
    assert_eq!(
        coved.request("DELETE", "/1.0/profiles/extra", None).status,
        400
    );
    assert_eq!(
        coved.get("/1.0/profiles/extra")["used_by"],
        json!(["/1.0/instances/two"])
    );
    assert_eq!(coved.get("/1.0/storage-pools/default")["driver"], "dir");
    assert!(coved
        .get("/1.0/networks")
        .as_array()
        .unwrap()
        .contains(&json!("/1.0/networks/lo")));
}

#[test]
fn twenty_concurrent_launches_all_run_and_all_go() {
    let coved = Arc::new(Coved::start("concurrent", &[]));
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    let names: Vec<String> = (0..20).map(|index| format!("c{index:02}")).collect();
    let launches: Vec<_> = names
        .iter()
        .map(|name| {
            let coved = coved.clone();
            let name = name.clone();
            std::thread::spawn(move || coved.launch(&name, "busybox", json!({})))
        })
        .collect();
    for launch in launches {
        launch.join().expect("a launch thread");
    }
    let listed = coved.get("/1.0/instances?recursion=1");
    let running: BTreeSet<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|instance| instance["status"] == "Running")
        .map(|instance| instance["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(running, names.iter().cloned().collect());
    for name in &names {
        assert_eq!(coved.exec(name, &["hostname"], b"").1, format!("{name}\n"));
    }
    let deletions: Vec<_> = names
        .iter()
        .map(|name| {
            let coved = coved.clone();
            let name = name.clone();
            std::thread::spawn(move || {
                coved.operation(
                    "PUT",
                    &format!("/1.0/instances/{name}/state"),
                    Some(json!({"action": "stop", "force": true})),
                );
                coved.operation("DELETE", &format!("/1.0/instances/{name}"), None);
            })
        })
        .collect();
    for deletion in deletions {
        deletion.join().expect("a deletion thread");
    }
    assert_eq!(coved.get("/1.0/instances"), json!([]));
    for name in &names {
        assert_gone(&coved, name);
    }
}

#[test]
fn kill_9_during_launches_loses_and_duplicates_nothing() {
    let mut coved = Coved::start("kill9", &[]);
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    coved.launch("before", "busybox", json!({"boot.autostart": "false"}));
    let before_pid = coved.get("/1.0/instances/before/state")["pid"]
        .as_i64()
        .unwrap();
    // A stopped autostart instance, started at coved's next start.
    coved.operation(
        "POST",
        "/1.0/instances",
        Some(json!({"name": "auto", "source": {"type": "image", "alias": "busybox"}, "config": {"boot.autostart": "true"}})),
    );

    // Launch in a burst (create-and-start, one request each); kill coved in the middle.
    let socket = coved.socket();
    let launches: Vec<_> = (0..12)
        .map(|index| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let name = format!("k{index:02}");
                std::thread::sleep(Duration::from_millis(25 * index));
                let body = json!({"name": name, "start": true, "source": {"type": "image", "alias": "busybox"}});
                let acknowledged = try_http(
                    &socket,
                    "POST",
                    "/1.0/instances",
                    &[("Content-Type", "application/json")],
                    body.to_string().as_bytes(),
                )
                .ok()
                .filter(|response| response.status == 202);
                (name, acknowledged.is_some())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150));
    coved.kill();
    let mut acknowledged = BTreeSet::new();
    for launch in launches {
        let (name, ok) = launch.join().expect("a launch thread");
        if ok {
            acknowledged.insert(name);
        }
    }
    assert!(
        !acknowledged.is_empty(),
        "coved acknowledged no launch before the kill"
    );
    eprintln!(
        "coved acknowledged {} of 12 launches before kill -9: {acknowledged:?}",
        acknowledged.len()
    );

    coved.restart();
    // Every acknowledged instance is there and running; none is there twice.
    let expected: BTreeSet<String> = acknowledged
        .iter()
        .cloned()
        .chain(["before".to_string(), "auto".to_string()])
        .collect();
    eventually(
        "acknowledged launches running",
        Duration::from_secs(120),
        || {
            let listed = coved.get("/1.0/instances?recursion=1");
            let running: BTreeSet<String> = listed
                .as_array()
                .unwrap()
                .iter()
                .filter(|instance| instance["status"] == "Running")
                .map(|instance| instance["name"].as_str().unwrap().to_string())
                .collect();
            expected.is_subset(&running)
        },
    );
    let names: Vec<String> = coved
        .get("/1.0/instances")
        .as_array()
        .unwrap()
        .iter()
        .map(|url| {
            url.as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    let unique: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(names.len(), unique.len(), "duplicated instances: {names:?}");
    let run = coved.run_directory().to_string_lossy().into_owned();
    for name in &names {
        let monitors: Vec<_> = processes_mentioning(&format!("--name\0{name}\0"))
            .into_iter()
            .filter(|(_, line)| line.contains(&run))
            .collect();
        let status = coved.status(name);
        if status == "Running" {
            assert_eq!(
                monitors.len(),
                1,
                "{name} should have one monitor: {monitors:?}"
            );
        }
    }
    // The instance that ran before the kill kept running: the same init.
    assert_eq!(
        coved.get("/1.0/instances/before/state")["pid"]
            .as_i64()
            .unwrap(),
        before_pid
    );
    assert_eq!(coved.exec("before", &["hostname"], b"").1, "before\n");

    // A clean stop of coved leaves instances running too.
    coved.terminate();
    assert!(std::path::Path::new(&format!("/proc/{before_pid}")).exists());
    coved.restart();
    assert_eq!(coved.status("before"), "Running");
}

#[test]
fn debian_image_boots_and_runs_commands() {
    let coved = Coved::start("debian", &[]);
    let tarball = debian_tarball(&coved.directory);
    coved.import_image(&tarball, "debian");
    std::fs::remove_file(&tarball).ok();
    coved.launch("deb", "debian", json!({}));
    eventually("systemd running as PID 1", BOOT_TIMEOUT, || {
        coved.exec("deb", &["cat", "/proc/1/comm"], b"").1 == "systemd\n"
    });
    let (code, version, _) = coved.exec("deb", &["cat", "/etc/debian_version"], b"");
    assert_eq!(code, 0);
    assert!(version.starts_with("12"), "{version}");
    assert_eq!(coved.exec("deb", &["sh", "-c", "exit 3"], b"").0, 3);
    assert_eq!(
        coved.exec("deb", &["cat"], b"debian stdin").1,
        "debian stdin"
    );
    coved.operation(
        "PUT",
        "/1.0/instances/deb/state",
        Some(json!({"action": "stop", "timeout": 30})),
    );
    coved.operation("DELETE", "/1.0/instances/deb", None);
    assert_gone(&coved, "deb");
}

#[test]
fn lxc_client_drives_coved() {
    let coved = Coved::start("lxc", &[]);
    let tarball = busybox_unified_tarball(&coved.directory);
    let imported = coved.lxc_ok(&[
        "image",
        "import",
        tarball.to_str().unwrap(),
        "--alias",
        "busybox",
    ]);
    assert!(imported.contains("fingerprint"), "{imported}");
    let (metadata, rootfs) = busybox_split_tarballs(&coved.directory);
    coved.lxc_ok(&[
        "image",
        "import",
        metadata.to_str().unwrap(),
        rootfs.to_str().unwrap(),
        "--alias",
        "split",
    ]);
    let images = coved.lxc_ok(&["image", "list", "--format", "csv"]);
    assert!(
        images.contains("busybox") && images.contains("split"),
        "{images}"
    );

    coved.lxc_ok(&["launch", "busybox", "l1"]);
    coved.lxc_ok(&["launch", "split", "l2", "-c", "limits.memory=64MiB"]);
    let list = coved.lxc_ok(&["list", "--format", "csv", "-c", "ns"]);
    assert!(
        list.contains("l1,RUNNING") && list.contains("l2,RUNNING"),
        "{list}"
    );

    assert_eq!(coved.lxc_ok(&["exec", "l1", "--", "hostname"]), "l1\n");
    let failed = coved.lxc(&[
        "exec",
        "l1",
        "--",
        "sh",
        "-c",
        "echo to-stderr >&2; exit 42",
    ]);
    assert_eq!(failed.status.code(), Some(42));
    assert_eq!(String::from_utf8_lossy(&failed.stderr), "to-stderr\n");
    assert_eq!(
        coved
            .lxc_ok(&[
                "exec",
                "l2",
                "--",
                "cat",
                "/sys/fs/cgroup/memory/memory.limit_in_bytes"
            ])
            .trim(),
        (64u64 << 20).to_string()
    );

    let local = coved.directory.join("local.txt");
    std::fs::write(&local, "from the host\n").unwrap();
    coved.lxc_ok(&["file", "push", local.to_str().unwrap(), "l1/root/local.txt"]);
    assert_eq!(
        coved.lxc_ok(&["exec", "l1", "--", "cat", "/root/local.txt"]),
        "from the host\n"
    );
    let back = coved.directory.join("back.txt");
    coved.lxc_ok(&["file", "pull", "l1/root/local.txt", back.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "from the host\n");
    coved.lxc_ok(&["config", "set", "l1", "user.color", "blue"]);
    assert_eq!(
        coved.lxc_ok(&["config", "get", "l1", "user.color"]).trim(),
        "blue"
    );
    let info = coved.lxc_ok(&["info", "l1"]);
    assert!(info.contains("RUNNING"), "{info}");
    coved.lxc_ok(&["pause", "l1"]);
    assert!(coved
        .lxc_ok(&["list", "--format", "csv", "-c", "ns"])
        .contains("l1,FROZEN"));
    coved.lxc_ok(&["start", "l1"]);
    coved.lxc_ok(&["restart", "l1"]);
    coved.lxc_ok(&["stop", "l1"]);
    assert!(coved
        .lxc_ok(&["list", "--format", "csv", "-c", "ns"])
        .contains("l1,STOPPED"));
    coved.lxc_ok(&["rename", "l1", "renamed"]);
    coved.lxc_ok(&["delete", "renamed"]);
    coved.lxc_ok(&["delete", "--force", "l2"]);
    assert_eq!(coved.lxc_ok(&["list", "--format", "csv"]), "");
    coved.lxc_ok(&["profile", "create", "small"]);
    coved.lxc_ok(&["profile", "set", "small", "limits.cpu", "1"]);
    assert!(coved
        .lxc_ok(&["profile", "list", "--format", "csv"])
        .contains("small"));
    coved.lxc_ok(&["profile", "delete", "small"]);
    assert!(coved
        .lxc_ok(&["storage", "list", "--format", "csv"])
        .contains("default,dir"));
    for line in coved
        .lxc_ok(&["network", "list", "--format", "csv"])
        .lines()
    {
        let interface = line.split(',').next().unwrap();
        assert!(
            std::path::Path::new("/sys/class/net")
                .join(interface)
                .exists(),
            "lxc network list shows {interface}, which the host does not have"
        );
    }
    coved.lxc_ok(&["image", "delete", "split"]);
    let unknown = coved.lxc(&["launch", "nosuchimage", "x1"]);
    assert!(!unknown.status.success());
    assert_gone(&coved, "renamed");
    assert_gone(&coved, "l2");
}

#[test]
fn pylxd_drives_coved() {
    let coved = Coved::start("pylxd", &[]);
    let tarball = busybox_unified_tarball(&coved.directory);
    let script = cove_tests::repository().join("tests/pylxd/test_coved.py");
    let output = cove_tests::container_monitor::run_with_timeout(
        {
            let mut command =
                std::process::Command::new(cove_tests::repository().join("tests/pylxd/run"));
            command
                .arg(&script)
                .arg(&tarball)
                .env("LXD_DIR", &coved.directory)
                .stdin(std::process::Stdio::null());
            command
        },
        Duration::from_secs(300),
    );
    assert!(
        output.status.success(),
        "the pylxd test failed ({}):\n{}{}\ncoved's log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        coved.log()
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("pylxd: all passed"));
    assert_eq!(coved.get("/1.0/instances"), json!([]));
}
