//! Virtual machines through coved's API (`"type": "virtual-machine"`), as a user drives them
//! with the API, `cove` and Debian's `lxc`: each VM runs under its own cove-vmm with the
//! project kernel, its disk made from the same image a container runs, and exec, files and
//! state go through the guest's cove-agent.
//!
//! On a kvm-pvm host (this project's development machines) a VM is refused unless the opt-in
//! key `boot.allow_emulated_kvm` is set, and the refusal leaves nothing behind; with the key the
//! busybox image boots (a minute or more: guest kernel code is emulated), so the whole story
//! runs once, on one boot. The same story with the Debian image (systemd) needs hardware
//! virtualisation and says NOT RUNNABLE elsewhere.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cove_tests::container::{in_private_network, ip, BRIDGE};
use cove_tests::coved::{
    busybox_unified_tarball, debian_tarball, http, processes_mentioning, Coved, VM_BOOT_TIMEOUT,
};
use cove_tests::{
    cove_agent, cove_vmm, host_is_kvm_pvm, kernel_release, project_kernel, require_kvm, scratch_dir,
};
use serde_json::{json, Value};

const OPT_IN: &str = "boot.allow_emulated_kvm";

fn path(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn machines_directory(coved: &Coved) -> PathBuf {
    coved
        .directory
        .join("storage-pools")
        .join("default")
        .join("virtual-machines")
}

/// cove-vmm processes that work for this coved.
fn vmm_processes(coved: &Coved) -> Vec<u32> {
    processes_mentioning(&path(&coved.directory))
        .into_iter()
        .filter(|(_, line)| {
            line.split('\0')
                .next()
                .is_some_and(|program| program.ends_with("cove-vmm"))
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// Nothing of `name` anywhere: no instance, no files, no cove-vmm, no image disk.
fn assert_nothing_left(coved: &Coved, name: &str) {
    let instances = coved.get("/1.0/instances");
    assert_eq!(instances, json!([]), "no instance remains");
    assert!(
        !machines_directory(coved).join(name).exists(),
        "no VM directory remains"
    );
    assert!(
        !coved.run_directory().join(name).exists(),
        "no run directory remains"
    );
    assert!(vmm_processes(coved).is_empty(), "no cove-vmm runs");
}

fn import_busybox(coved: &Coved) {
    // One directory per coved: the tests of this file run at once.
    let scratch = coved.directory.join("busybox-upload");
    std::fs::create_dir_all(&scratch).expect("create the upload directory");
    let tarball = busybox_unified_tarball(&scratch);
    coved.import_image(&tarball, "busybox");
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn a_vm_on_kvm_pvm_is_refused_without_the_opt_in_key_and_nothing_is_left() {
    require_kvm();
    let coved = Coved::start_with_vms("vm-refused", &[]);
    import_busybox(&coved);

    // More memory than the host has: refused with both figures, on any host.
    let response = coved.request(
        "POST",
        "/1.0/instances",
        Some(json!({
            "name": "big", "type": "virtual-machine",
            "source": {"type": "image", "alias": "busybox"},
            "config": {OPT_IN: "true", "limits.memory": "64TiB"},
        })),
    );
    let body = response.json();
    assert_eq!(response.status, 400, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("limits.memory 64TiB") && message.contains("host's memory"),
        "{message}"
    );
    assert_nothing_left(&coved, "big");

    // A disk device besides the root: not something a VM takes yet, refused by name.
    let response = coved.request(
        "POST",
        "/1.0/instances",
        Some(json!({
            "name": "disky", "type": "virtual-machine",
            "source": {"type": "image", "alias": "busybox"},
            "config": {OPT_IN: "true"},
            "devices": {"data": {"type": "disk", "source": "/srv", "path": "/mnt"}},
        })),
    );
    let body = response.json();
    assert_eq!(response.status, 400, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("\"data\"") && message.contains("not supported on virtual machines"),
        "{message}"
    );
    assert_nothing_left(&coved, "disky");

    if !host_is_kvm_pvm() {
        eprintln!("NOT RUNNABLE: this host has hardware virtualisation, where VMs need no opt-in");
        return;
    }

    let response = coved.request(
        "POST",
        "/1.0/instances",
        Some(json!({
            "name": "vm1", "type": "virtual-machine",
            "source": {"type": "image", "alias": "busybox"},
        })),
    );
    let body = response.json();
    assert_eq!(response.status, 400, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains("kvm-pvm"), "{message}");
    assert!(
        message.contains(OPT_IN),
        "the refusal names the key: {message}"
    );
    assert_nothing_left(&coved, "vm1");

    let output = coved.cove(&["launch", "busybox", "vm2", "--vm"]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(text(&output).contains(OPT_IN), "{}", text(&output));
    assert_nothing_left(&coved, "vm2");

    // Debian's lxc (LXD 5.0) takes the instance type from the image's and refuses `--vm` for a
    // container image before asking the server; through the API's create it gets coved's
    // refusal like any client.
    let output = coved.lxc(&["launch", "busybox", "vm3", "--vm"]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains(OPT_IN) || text(&output).contains("image is of type container"),
        "{}",
        text(&output)
    );
    assert_nothing_left(&coved, "vm3");
    let fingerprint = coved.get("/1.0/images/aliases/busybox")["target"]
        .as_str()
        .expect("the alias's fingerprint")
        .to_string();
    let request = json!({
        "name": "vm4", "type": "virtual-machine",
        "source": {"type": "image", "fingerprint": fingerprint},
    });
    let output = coved.lxc(&[
        "query",
        "-X",
        "POST",
        "/1.0/instances",
        "--data",
        &request.to_string(),
    ]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(text(&output).contains(OPT_IN), "{}", text(&output));
    assert_nothing_left(&coved, "vm4");

    // Refused before its disk: the image's VM disk was never built.
    let images = coved.directory.join("images");
    let built: Vec<_> = std::fs::read_dir(&images)
        .expect("read images")
        .flatten()
        .filter(|entry| entry.path().join("vm.ext4").exists())
        .collect();
    assert!(built.is_empty(), "no VM disk was built");
}

/// Waits for the operation an async answer names, up to `timeout`; returns it.
fn wait_long(
    coved: &Coved,
    response: &cove_tests::coved::HttpResponse,
    timeout: Duration,
) -> Value {
    let body = response.json();
    assert_eq!(response.status, 202, "expected an operation: {body}");
    let operation = body["operation"]
        .as_str()
        .expect("an operation")
        .to_string();
    coved.get(&format!("{operation}/wait?timeout={}", timeout.as_secs()))
}

fn state(coved: &Coved, name: &str) -> Value {
    coved.get(&format!("/1.0/instances/{name}/state"))
}

/// The whole life of one VM from `alias`, on one boot: launch, exec, files, state, console,
/// coved killed and restarted under it, clean stop, delete. `shutdown_line` is what the
/// image's init prints when it is stopped cleanly.
fn vm_story(coved: &mut Coved, alias: &str, shutdown_line: Option<&str>) {
    let name = "vm1";
    let response = coved.request(
        "POST",
        "/1.0/instances",
        Some(json!({
            "name": name, "type": "virtual-machine", "start": true,
            "source": {"type": "image", "alias": alias},
            "config": {OPT_IN: "true", "limits.cpu": "2", "limits.memory": "512MiB"},
        })),
    );
    let launched = wait_long(coved, &response, VM_BOOT_TIMEOUT);
    assert_eq!(
        launched["status"],
        "Success",
        "launch: {launched}\n{}",
        coved.log()
    );
    let instance = coved.get(&format!("/1.0/instances/{name}"));
    assert_eq!(instance["type"], "virtual-machine");
    assert_eq!(instance["status"], "Running");
    let disk = machines_directory(coved).join(name).join("root.img");
    assert!(disk.is_file(), "the VM's own disk {}", disk.display());

    // The guest runs the project kernel, and exit codes come back.
    let (code, stdout, stderr) = coved.exec(name, &["uname", "-r"], b"");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.trim(),
        kernel_release(project_kernel()).expect("kernelrelease= in build-info")
    );
    let (code, _, _) = coved.exec(name, &["sh", "-c", "exit 7"], b"");
    assert_eq!(code, 7);
    let (code, stdout, _) = coved.exec(name, &["cat"], b"through stdin\n");
    assert_eq!((code, stdout.as_str()), (0, "through stdin\n"));

    // Files go in and come back with their mode.
    let content: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let pushed = http(
        &coved.socket(),
        "POST",
        &format!("/1.0/instances/{name}/files?path=/root/pushed"),
        &[
            ("X-LXD-uid", "0"),
            ("X-LXD-gid", "0"),
            ("X-LXD-mode", "0640"),
        ],
        &content,
    );
    assert_eq!(pushed.status, 200, "{}", pushed.json());
    let pulled = http(
        &coved.socket(),
        "GET",
        &format!("/1.0/instances/{name}/files?path=/root/pushed"),
        &[],
        b"",
    );
    assert_eq!(pulled.status, 200);
    assert_eq!(pulled.header("x-lxd-mode"), Some("0640"));
    assert!(
        pulled.body == content,
        "the pulled bytes are the pushed ones"
    );
    let (code, stdout, _) = coved.exec(name, &["wc", "-c", "/root/pushed"], b"");
    assert_eq!(code, 0);
    assert!(stdout.trim().starts_with("20000"), "{stdout}");
    let removed = http(
        &coved.socket(),
        "DELETE",
        &format!("/1.0/instances/{name}/files?path=/root/pushed"),
        &[],
        b"",
    );
    assert_eq!(removed.status, 200, "{}", removed.json());
    let gone = http(
        &coved.socket(),
        "GET",
        &format!("/1.0/instances/{name}/files?path=/root/pushed"),
        &[],
        b"",
    );
    assert_eq!(gone.status, 404);

    console_reaches_the_guest(coved, name);
    a_terminal_exec_gets_a_pty_of_its_size(coved, name);

    // Debian's lxc on the VM.
    let listed = coved.lxc_ok(&["list", name, "--format", "csv", "-c", "nt"]);
    assert_eq!(listed.trim(), format!("{name},VIRTUAL-MACHINE"));
    let info = coved.lxc_ok(&["info", name]);
    assert!(info.contains("Status: RUNNING"), "{info}");
    let released = coved.lxc_ok(&["exec", name, "--", "uname", "-r"]);
    assert_eq!(
        released.trim(),
        kernel_release(project_kernel()).expect("kernelrelease= in build-info")
    );
    let scratch = scratch_dir("coved-vm-lxc-files");
    std::fs::write(scratch.join("sent"), "through lxc\n").expect("write a local file");
    coved.lxc_ok(&[
        "file",
        "push",
        &path(&scratch.join("sent")),
        &format!("{name}/root/sent"),
    ]);
    coved.lxc_ok(&[
        "file",
        "pull",
        &format!("{name}/root/sent"),
        &path(&scratch.join("back")),
    ]);
    assert_eq!(
        std::fs::read_to_string(scratch.join("back")).expect("the pulled file"),
        "through lxc\n"
    );
    let _ = std::fs::remove_dir_all(&scratch);

    // State: running, with the guest's memory in use and its processes.
    let running = state(coved, name);
    assert_eq!(running["status"], "Running", "{running}");
    assert!(
        running["memory"]["usage"].as_i64().unwrap_or(0) > 0,
        "{running}"
    );
    assert!(running["processes"].as_i64().unwrap_or(0) > 0, "{running}");
    let vmm_pid = running["pid"].as_i64().expect("cove-vmm's pid");
    assert!(vmm_pid > 0);

    // The serial console's log has the kernel's boot lines, through the API and lxc.
    let console = http(
        &coved.socket(),
        "GET",
        &format!("/1.0/instances/{name}/console"),
        &[],
        b"",
    );
    let log = String::from_utf8_lossy(&console.body).into_owned();
    assert!(log.contains("Linux version"), "{log}");
    let shown = coved.lxc_ok(&["console", name, "--show-log"]);
    assert!(shown.contains("Linux version"), "{shown}");

    // coved dies; the VM does not, and the next coved finds it.
    coved.kill();
    assert!(
        Path::new(&format!("/proc/{vmm_pid}")).exists(),
        "cove-vmm outlives coved"
    );
    coved.restart();
    let found = state(coved, name);
    assert_eq!(found["status"], "Running", "{found}");
    assert_eq!(found["pid"].as_i64(), Some(vmm_pid), "the same cove-vmm");
    let (code, stdout, _) = coved.exec(name, &["echo", "still here"], b"");
    assert_eq!((code, stdout.trim()), (0, "still here"));

    // Freeze pauses the vCPUs (the agent cannot answer meanwhile); unfreeze resumes them.
    for (action, status) in [("freeze", "Frozen"), ("unfreeze", "Running")] {
        let response = coved.request(
            "PUT",
            &format!("/1.0/instances/{name}/state"),
            Some(json!({"action": action})),
        );
        let done = wait_long(coved, &response, Duration::from_secs(120));
        assert_eq!(done["status"], "Success", "{action}: {done}");
        assert_eq!(coved.status(name), status);
    }
    let (code, stdout, _) = coved.exec(name, &["echo", "thawed"], b"");
    assert_eq!((code, stdout.trim()), (0, "thawed"));

    // A restart boots the VM again: a new cove-vmm, a guest whose uptime starts over.
    let response = coved.request(
        "PUT",
        &format!("/1.0/instances/{name}/state"),
        Some(json!({"action": "restart", "timeout": 600})),
    );
    let restarted = wait_long(coved, &response, VM_BOOT_TIMEOUT);
    assert_eq!(restarted["status"], "Success", "restart: {restarted}");
    let again = state(coved, name);
    assert_eq!(again["status"], "Running", "{again}");
    assert_ne!(again["pid"].as_i64(), Some(vmm_pid), "a new cove-vmm");
    let (code, stdout, _) = coved.exec(name, &["cat", "/proc/uptime"], b"");
    assert_eq!(code, 0);
    let uptime: f64 = stdout
        .split_whitespace()
        .next()
        .and_then(|seconds| seconds.parse().ok())
        .expect("an uptime");
    assert!(uptime < 600.0, "the guest booted again: up {uptime} s");

    // A clean stop: the guest's init shuts down, then cove-vmm ends.
    let response = coved.request(
        "PUT",
        &format!("/1.0/instances/{name}/state"),
        Some(json!({"action": "stop", "timeout": 600})),
    );
    let stopped = wait_long(coved, &response, VM_BOOT_TIMEOUT);
    assert_eq!(stopped["status"], "Success", "stop: {stopped}");
    assert_eq!(coved.status(name), "Stopped");
    assert!(vmm_processes(coved).is_empty(), "cove-vmm ended");
    if let Some(line) = shutdown_line {
        let console = http(
            &coved.socket(),
            "GET",
            &format!("/1.0/instances/{name}/console"),
            &[],
            b"",
        );
        let log = String::from_utf8_lossy(&console.body).into_owned();
        assert!(
            log.contains(line),
            "the guest's init shut down cleanly:\n{log}"
        );
    }

    let response = coved.request("DELETE", &format!("/1.0/instances/{name}"), None);
    let deleted = wait_long(coved, &response, Duration::from_secs(120));
    assert_eq!(deleted["status"], "Success", "delete: {deleted}");
    assert_nothing_left(coved, name);
}

type Socket = tungstenite::WebSocket<UnixStream>;

/// `POST /console` and its two websockets, as `lxc console` opens them.
fn attach_console(coved: &Coved, name: &str) -> (Socket, Socket) {
    let operation = coved.websocket_operation(
        &format!("/1.0/instances/{name}/console"),
        json!({"type": "console", "width": 80, "height": 24}),
    );
    let connect = |fd: &str| {
        let socket = operation.connect(fd);
        socket
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("a read timeout");
        socket
    };
    (connect("0"), connect("control"))
}

/// What is typed on the console reaches the guest's serial port (a reader of /dev/ttyS0 in the
/// guest gets the line), and what the guest writes there (the terminal's echo) comes back.
fn console_reaches_the_guest(coved: &Coved, name: &str) {
    let line = "cove-console-check";
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| coved.exec(name, &["head", "-n", "1", "/dev/ttyS0"], b""));
        let (mut console, mut control) = attach_console(coved, name);
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !reader.is_finished() && std::time::Instant::now() < deadline {
            console
                .send(tungstenite::Message::Binary(
                    format!("{line}\n").into_bytes().into(),
                ))
                .expect("type on the console");
            let until = std::time::Instant::now() + Duration::from_secs(2);
            while std::time::Instant::now() < until {
                if let Ok(tungstenite::Message::Binary(bytes)) = console.read() {
                    seen.extend_from_slice(&bytes);
                }
            }
        }
        let (code, stdout, stderr) = reader.join().expect("the reader");
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(stdout.trim(), line, "the guest read the typed line");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&seen).contains(line) && std::time::Instant::now() < deadline
        {
            if let Ok(tungstenite::Message::Binary(bytes)) = console.read() {
                seen.extend_from_slice(&bytes);
            }
        }
        assert!(
            String::from_utf8_lossy(&seen).contains(line),
            "the guest's echo came back: {:?}",
            String::from_utf8_lossy(&seen)
        );
        let _ = console.close(None);
        let _ = control.close(None);
    });
}

/// An interactive exec (`interactive: true`, as `lxc exec` on a terminal) runs on a pty in the
/// guest, of the size the client gave, and its exit code comes back.
fn a_terminal_exec_gets_a_pty_of_its_size(coved: &Coved, name: &str) {
    let operation = coved.websocket_operation(
        &format!("/1.0/instances/{name}/exec"),
        json!({
            "command": ["sh", "-c", "tty; stty size; exit 5"], "wait-for-websocket": true,
            "interactive": true, "width": 100, "height": 30,
        }),
    );
    let connect = |fd: &str| operation.connect(fd);
    let mut terminal = connect("0");
    let _control = connect("control");
    let mut output = Vec::new();
    while let Ok(message) = terminal.read() {
        match message {
            tungstenite::Message::Binary(bytes) => output.extend_from_slice(&bytes),
            tungstenite::Message::Close(_) => break,
            _ => {}
        }
    }
    let done = coved.get(&format!("{}/wait?timeout=120", operation.url));
    assert_eq!(done["metadata"]["return"], 5, "{done}");
    let output = String::from_utf8_lossy(&output).into_owned();
    assert!(output.contains("/dev/pts/"), "a pty: {output:?}");
    assert!(output.contains("30 100"), "its size: {output:?}");
}

#[test]
fn a_busybox_vm_launches_execs_keeps_files_survives_coved_and_stops_cleanly() {
    require_kvm();
    let mut coved = Coved::start_with_vms("vm-busybox", &[]);
    import_busybox(&coved);
    vm_story(
        &mut coved,
        "busybox",
        Some("cove-test-image: shutting down"),
    );
}

#[test]
fn a_debian_vm_boots_systemd_and_runs_the_same_story() {
    require_kvm();
    if host_is_kvm_pvm() {
        eprintln!(
            "NOT RUNNABLE on kvm-pvm: booting systemd from the Debian image as a VM needs \
             hardware virtualisation (the busybox story runs here instead)"
        );
        return;
    }
    let mut coved = Coved::start_with_vms("vm-debian", &[]);
    let scratch = scratch_dir("coved-vm-debian-image");
    let tarball = debian_tarball(&scratch);
    coved.import_image(&tarball, "debian");
    let _ = std::fs::remove_dir_all(&scratch);
    vm_story(&mut coved, "debian", None);
}

#[test]
fn a_vm_nic_is_a_tap_on_its_bridge_and_a_failed_start_leaves_nothing() {
    require_kvm();
    in_private_network(|| {
        let coved = Coved::start_with_vms("vm-network", &[]);
        import_busybox(&coved);

        // A start that fails (no such bridge) takes the whole new instance with it.
        let response = coved.request(
            "POST",
            "/1.0/instances",
            Some(json!({
                "name": "lost", "type": "virtual-machine", "start": true,
                "source": {"type": "image", "alias": "busybox"},
                "config": {OPT_IN: "true"},
                "devices": {"eth0": {"type": "nic", "nictype": "bridged", "parent": "nosuchbr0"}},
            })),
        );
        let failed = wait_long(&coved, &response, VM_BOOT_TIMEOUT);
        assert_eq!(failed["status"], "Failure", "{failed}");
        assert!(
            failed["err"]
                .as_str()
                .unwrap_or_default()
                .contains("nosuchbr0"),
            "{failed}"
        );
        assert_nothing_left(&coved, "lost");
        assert!(!ip(&["-o", "link"]).contains("covevm"), "no tap remains");

        let name = "net1";
        let response = coved.request(
            "POST",
            "/1.0/instances",
            Some(json!({
                "name": name, "type": "virtual-machine", "start": true,
                "source": {"type": "image", "alias": "busybox"},
                "config": {OPT_IN: "true", "limits.memory": "256MiB"},
                "devices": {"eth0": {
                    "type": "nic", "nictype": "bridged", "parent": BRIDGE,
                    "hwaddr": "00:16:3e:12:34:56",
                }},
            })),
        );
        let launched = wait_long(&coved, &response, VM_BOOT_TIMEOUT);
        assert_eq!(launched["status"], "Success", "{launched}\n{}", coved.log());
        let on_bridge = ip(&["-o", "link", "show", "master", BRIDGE]);
        assert!(
            on_bridge.contains("covevm"),
            "the VM's tap is on the bridge: {on_bridge}"
        );

        let (code, stdout, stderr) = coved.exec(
            name,
            &[
                "sh",
                "-c",
                "cat /sys/class/net/eth0/address && ip link set eth0 up && \
                 ip addr add 192.0.2.2/24 dev eth0 && ping -c 1 -W 10 192.0.2.1 >/dev/null && \
                 echo reached",
            ],
            b"",
        );
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stdout.starts_with("00:16:3e:12:34:56"), "{stdout}");
        assert!(
            stdout.contains("reached"),
            "the guest reaches the bridge: {stdout}"
        );
        let running = state(&coved, name);
        let eth0 = running["network"]["eth0"]["addresses"].to_string();
        assert!(
            eth0.contains("192.0.2.2"),
            "state shows eth0's address: {running}"
        );

        let response = coved.request(
            "PUT",
            &format!("/1.0/instances/{name}/state"),
            Some(json!({"action": "stop", "force": true})),
        );
        let stopped = wait_long(&coved, &response, Duration::from_secs(120));
        assert_eq!(stopped["status"], "Success", "{stopped}");
        assert!(
            !ip(&["-o", "link"]).contains("covevm"),
            "the tap went with the VM"
        );
    });
}

#[test]
fn pylxd_drives_a_vm() {
    require_kvm();
    // coved finds cove-vmm, the static agent and the kernel by itself here (beside it, in its
    // target directory, in the kernel cache); they only have to be built.
    let _ = (cove_vmm(), cove_agent(), project_kernel());
    let coved = Coved::start("vm-pylxd", &[]);
    let scratch = scratch_dir("vm-pylxd-image");
    let tarball = busybox_unified_tarball(&scratch);
    let script = cove_tests::repository().join("tests/pylxd/test_coved_vm.py");
    let mut command = Command::new(cove_tests::repository().join("tests/pylxd/run"));
    command
        .arg(&script)
        .arg(&tarball)
        .arg(if host_is_kvm_pvm() { "1" } else { "0" })
        .env("LXD_DIR", &coved.directory)
        .stdin(Stdio::null());
    let output = cove_tests::container_monitor::run_with_timeout(command, VM_BOOT_TIMEOUT);
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(
        output.status.success(),
        "the pylxd VM test failed ({}):\n{}\ncoved's log:\n{}",
        output.status,
        text(&output),
        coved.log()
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("pylxd vm: all passed"));
    assert_nothing_left(&coved, "pyvm");
}
