//! A container runtime inside a system container: the Debian image with containerd and runc
//! (`resources/build-rootfs --with containerd`), unprivileged. systemd starts containerd, and
//! `ctr run` starts a busybox container through runc, as a Kubernetes node in a cove container
//! does for each pod. With `security.nesting=true`, runc may also give its container a user
//! namespace of its own (as nested LXD and user-namespaced pods need); without it the kernel
//! refuses that container a `/proc`. Real namespaces, cgroups and mounts; run as root. The
//! Debian image is built once per machine (minutes when cold; cached by content hash).

use std::time::{Duration, Instant};

use cove_shim::{Container, ContainerConfig, ExecRequest};
use cove_tests::container::{debian_containerd_image, wait_for_systemd, TestContainer};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn run(container: &Container, command: &[&str], input: &[u8]) -> (i32, String) {
    let output = container
        .exec_output(&ExecRequest::new(command), input)
        .unwrap_or_else(|error| panic!("exec {command:?} failed: {error}"));
    (output.exit_code, output.stdout + &output.stderr)
}

/// Starts the containerd image, waits for systemd and containerd, and puts a busybox root file
/// system (the host's static busybox) at `/root/nested/rootfs`.
fn start_with_containerd(name: &str, nesting: bool) -> TestContainer {
    let mut config = ContainerConfig::new(name, debian_containerd_image());
    config.nesting = nesting;
    let started = Instant::now();
    let test = TestContainer::start(name, &config);
    let container = test.get();
    let boot = wait_for_systemd(container, started + BOOT_TIMEOUT);
    assert!(
        boot.unexpected_failures().is_empty(),
        "systemd: {}, failed units: {:?}",
        boot.state,
        boot.failed
    );
    // containerd answers on its socket once systemd has started it.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let (status, output) = run(container, &["ctr", "version"], b"");
        if status == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "containerd did not come up: {output}\n{}",
            run(container, &["systemctl", "status", "containerd"], b"").1
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox");
    let (status, output) = run(
        container,
        &[
            "sh",
            "-c",
            "mkdir -p /root/nested/rootfs/bin && cd /root/nested/rootfs/bin && \
             cat > busybox && chmod 755 busybox && ln -s busybox sh && ln -s busybox cat",
        ],
        &busybox,
    );
    assert_eq!(status, 0, "{output}");
    test
}

/// `runc run` of a bundle whose spec (`runc spec --rootless`) gives the container its own user
/// namespace, mapping its root to the caller's: what nested LXD and user-namespaced pods do.
const RUNC_IN_A_USER_NAMESPACE: &str = r#"cd /root/nested && runc spec --rootless &&
sed -i 's/"terminal": true/"terminal": false/;
        s/^\(\s*\)"sh"$/\1"sh", "-c", "echo pid $$; cat \/proc\/self\/uid_map"/' config.json &&
runc run cove-nested-userns"#;

#[test]
fn nested_containerd_runs_containers_with_runc() {
    let test = start_with_containerd("nested", true);
    let container = test.get();

    // runc makes its pid, mount, network, ipc and uts namespaces, mounts a fresh /proc and
    // puts the container in a cgroup below the delegated one.
    let (status, output) = run(
        container,
        &[
            "ctr",
            "run",
            "--rm",
            "--rootfs",
            "/root/nested/rootfs",
            "cove-nested-test",
            "/bin/busybox",
            "sh",
            "-c",
            "echo pid $$; cat /proc/1/cmdline | /bin/busybox tr '\\0' ' '",
        ],
        b"",
    );
    assert_eq!(status, 0, "ctr run failed: {output}");
    assert_eq!(
        output,
        "pid 1\n/bin/busybox sh -c echo pid $$; cat /proc/1/cmdline | /bin/busybox tr '\\0' ' ' "
    );

    // The same with a nested user namespace: its /proc needs the unobstructed one nesting
    // provides.
    let (status, output) = run(container, &["sh", "-c", RUNC_IN_A_USER_NAMESPACE], b"");
    assert_eq!(status, 0, "runc in a user namespace failed: {output}");
    assert_eq!(
        output.split_whitespace().collect::<Vec<_>>(),
        ["pid", "1", "0", "0", "1"],
        "{output}"
    );
}

#[test]
fn without_nesting_runc_cannot_mount_proc_in_a_nested_user_namespace() {
    let test = start_with_containerd("flatnested", false);
    let (status, output) = run(test.get(), &["sh", "-c", RUNC_IN_A_USER_NAMESPACE], b"");
    assert_ne!(status, 0, "{output}");
    assert!(
        output.contains("mount proc") && output.contains("operation not permitted"),
        "{output}"
    );
}
