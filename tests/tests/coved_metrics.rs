//! What coved tells watchers: `/1.0/metrics` in LXD's Prometheus names (a container's memory
//! rises when it allocates; its processes and interfaces are counted) and `/1.0/events`
//! lifecycle events for every change of an instance's state. Real containers; run as root.

use std::os::unix::net::UnixStream;
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

fn metrics(coved: &Coved) -> String {
    let response = coved.request("GET", "/1.0/metrics", None);
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|kind| kind.starts_with("text/plain")),
        "the Prometheus text format"
    );
    String::from_utf8_lossy(&response.body).into_owned()
}

/// The value of `metric` for the instance `name` (first sample whose labels hold `extra`).
fn sample(text: &str, metric: &str, name: &str, extra: &str) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .filter(|line| line.contains(&format!("name=\"{name}\"")) && line.contains(extra))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_follow_a_container_that_allocates() {
    let coved = Coved::start("metrics", &[]);
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    coved.launch("hog", "busybox", json!({"limits.memory": "256MiB"}));
    coved.launch("idle", "busybox", json!({}));
    booted(&coved, "hog");
    coved.operation(
        "PUT",
        "/1.0/instances/idle/state",
        Some(json!({"action": "stop", "force": true})),
    );

    let before = metrics(&coved);
    for family in [
        "# TYPE lxd_memory_MemTotal_bytes gauge",
        "# TYPE lxd_procs_total gauge",
        "# TYPE lxd_cpu_seconds_total counter",
        "# TYPE lxd_network_receive_bytes_total counter",
        "# TYPE lxd_filesystem_avail_bytes gauge",
    ] {
        assert!(before.contains(family), "{family} missing:\n{before}");
    }
    assert!(
        !before.contains("name=\"idle\""),
        "a stopped instance is not scraped"
    );
    let total = sample(&before, "lxd_memory_MemTotal_bytes", "hog", "").expect("MemTotal");
    assert_eq!(
        total,
        (256u64 << 20) as f64,
        "the limit is the container's MemTotal"
    );
    let used_before = total - sample(&before, "lxd_memory_MemFree_bytes", "hog", "").unwrap();
    assert!(sample(&before, "lxd_procs_total", "hog", "").unwrap() >= 1.0);
    assert!(sample(
        &before,
        "lxd_network_receive_bytes_total",
        "hog",
        "device=\"lo\""
    )
    .is_some());

    // 96 MiB in a tmpfs of its own is memory the container's cgroup is charged for.
    let (code, _, stderr) = coved.exec(
        "hog",
        &[
            "sh",
            "-c",
            "mkdir -p /fill && mount -t tmpfs -o size=128m fill /fill && head -c 100663296 /dev/zero > /fill/block",
        ],
        b"",
    );
    assert_eq!(code, 0, "{stderr}");
    let after = metrics(&coved);
    let used_after = total - sample(&after, "lxd_memory_MemFree_bytes", "hog", "").unwrap();
    assert!(
        used_after - used_before >= (80u64 << 20) as f64,
        "memory in use went from {used_before} to {used_after}"
    );
    assert!(sample(&after, "lxd_memory_Shmem_bytes", "hog", "").unwrap() >= (80u64 << 20) as f64);
}

#[test]
fn every_state_change_is_a_lifecycle_event() {
    let coved = Coved::start("events", &[]);
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    let stream = UnixStream::connect(coved.socket()).expect("connect");
    let (mut events, _) =
        tungstenite::client::client("ws://cove/1.0/events?type=lifecycle", stream)
            .expect("the events websocket");
    events
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    coved.launch("watched", "busybox", json!({}));
    booted(&coved, "watched");
    let state = |action: &str| {
        coved.operation(
            "PUT",
            "/1.0/instances/watched/state",
            Some(json!({"action": action, "force": true, "timeout": 0})),
        );
    };
    state("freeze");
    state("unfreeze");
    state("restart");
    coved.operation(
        "POST",
        "/1.0/instances/watched/snapshots",
        Some(json!({"name": "s"})),
    );
    coved.operation(
        "PUT",
        "/1.0/instances/watched",
        Some(json!({"restore": "s"})),
    );
    state("stop");
    coved.operation("DELETE", "/1.0/instances/watched", None);

    let expected = [
        "instance-created",
        "instance-started",
        "instance-paused",
        "instance-resumed",
        "instance-restarted",
        "instance-snapshot-created",
        "instance-restored",
        "instance-stopped",
        "instance-deleted",
    ];
    let mut seen = Vec::new();
    while !expected
        .iter()
        .all(|action| seen.iter().any(|got| got == action))
    {
        let message = events.read().unwrap_or_else(|error| {
            panic!("events ended before {expected:?} were all seen ({seen:?}): {error}")
        });
        let text = match message {
            tungstenite::Message::Text(text) => text.to_string(),
            tungstenite::Message::Binary(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => continue,
        };
        let event: serde_json::Value = serde_json::from_str(&text).expect("an event is JSON");
        assert_eq!(event["type"], "lifecycle");
        seen.push(
            event["metadata"]["action"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let position = |action: &str| seen.iter().position(|got| got == action).unwrap();
    assert!(position("instance-created") < position("instance-started"));
    let last = |action: &str| seen.iter().rposition(|got| got == action).unwrap();
    assert!(last("instance-stopped") < last("instance-deleted"));
}
