//! The VMM's HTTP API against a running test guest: info, pause (the guest's ticks stop),
//! resume (they go on), bad requests (refused, nothing changes), shutdown (the VMM exits 0).

use std::time::Duration;

use cove_tests::{
    api_request, raw_api_request, require_kvm, scratch_dir, test_guest, wait_for_path, Vmm,
};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn info_pause_resume_and_shutdown() {
    require_kvm();
    let dir = scratch_dir("api");
    let socket = dir.join("api.sock");
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    let vmm = Vmm::start(&[
        "--kernel",
        &guest,
        "--cmdline",
        "exit=tick",
        "--cpus",
        "boot=2",
        "--memory",
        "size=256M",
        "--api-socket",
        socket.to_str().expect("UTF-8"),
    ]);
    wait_for_path(&socket, TIMEOUT);
    vmm.wait_for_console("tick 1", TIMEOUT);

    let (status, body) = api_request(&socket, "GET", "/api/v1/vmm.ping");
    assert_eq!(status, 200, "{body}");
    let ping: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(ping["pid"], vmm.pid());

    let (status, body) = api_request(&socket, "GET", "/api/v1/vm.info");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(info["state"], "Running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_bytes"], 256u64 << 20);
    assert_eq!(info["boot_protocol"], "pvh");
    assert_eq!(info["config"]["kernel"]["cmdline"], "exit=tick");
    assert!(
        info["boot_time_us"]
            .as_u64()
            .is_some_and(|micros| micros > 0),
        "{info}"
    );

    // Paused: no tick is printed while the vCPUs are out of the guest.
    assert_eq!(api_request(&socket, "PUT", "/api/v1/vm.pause").0, 204);
    let (status, body) = api_request(&socket, "PUT", "/api/v1/vm.pause");
    assert_eq!(
        (status, body.as_str()),
        (409, r#"{"error":"the VM is already paused"}"#)
    );
    let info: serde_json::Value =
        serde_json::from_str(&api_request(&socket, "GET", "/api/v1/vm.info").1).expect("JSON");
    assert_eq!(info["state"], "Paused");
    let ticks_when_paused = vmm.count_console_lines("tick ");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        vmm.count_console_lines("tick "),
        ticks_when_paused,
        "the guest ran while paused"
    );

    assert_eq!(api_request(&socket, "PUT", "/api/v1/vm.resume").0, 204);
    assert_eq!(api_request(&socket, "PUT", "/api/v1/vm.resume").0, 409);
    vmm.wait_for_console(&format!("tick {}", ticks_when_paused + 2), TIMEOUT);

    // Bad requests are refused and change nothing.
    assert_eq!(api_request(&socket, "GET", "/api/v1/vm.pause").0, 405);
    assert_eq!(api_request(&socket, "GET", "/api/v1/nothing").0, 404);
    assert_eq!(raw_api_request(&socket, b"this is not http\r\n\r\n").0, 400);
    assert_eq!(
        raw_api_request(&socket, b"PUT /api/v1/vm.pause HTTP/9\r\n\r\n").0,
        505
    );
    let info: serde_json::Value =
        serde_json::from_str(&api_request(&socket, "GET", "/api/v1/vm.info").1).expect("JSON");
    assert_eq!(info["state"], "Running");

    assert_eq!(api_request(&socket, "PUT", "/api/v1/vm.shutdown").0, 204);
    let finished = vmm.wait(TIMEOUT);
    assert_eq!(
        finished.status.code(),
        Some(0),
        "stderr:\n{}",
        finished.stderr
    );
    assert!(finished
        .stderr
        .contains("VM stopped: shut down through the API"));
    assert!(!socket.exists(), "the VMM removes its socket on exit");
    std::fs::remove_dir_all(dir).expect("clean up");
}

#[test]
fn a_socket_in_use_is_refused_before_the_vm_is_made() {
    require_kvm();
    let dir = scratch_dir("api-in-use");
    let socket = dir.join("api.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    let finished = cove_tests::run_vmm(
        &[
            "--kernel",
            &guest,
            "--api-socket",
            socket.to_str().expect("UTF-8"),
        ],
        TIMEOUT,
    );
    assert_eq!(finished.status.code(), Some(1));
    assert!(
        finished.stderr.contains("is in use by a running process"),
        "{}",
        finished.stderr
    );
    assert_eq!(finished.stdout, "", "no guest ran");
    std::fs::remove_dir_all(dir).expect("clean up");
}
