//! System containers from a busybox image, driven through the cove-shim library as the monitor
//! will drive it: start, watch the console, run commands, read the state, stop. Real
//! namespaces, cgroups and mounts; run as root.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use cove_shim::{Container, ContainerConfig, ContainerError, ExecRequest, IdMap, Status};
use cove_tests::container::{
    busybox_image, listing, mounted_under, require_root, TestContainer, TestHost, BOOT_MARKER,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn run(container: &Container, command: &[&str]) -> (i32, String) {
    let output = container
        .exec_output(&ExecRequest::new(command), b"")
        .unwrap_or_else(|error| panic!("exec {command:?} failed: {error}"));
    (output.exit_code, output.stdout + &output.stderr)
}

#[test]
fn busybox_boots_and_runs_commands() {
    let config = ContainerConfig::new("boots", busybox_image());
    let test = TestContainer::start("boots", &config);
    test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    let container = test.get();

    assert_eq!(run(container, &["hostname"]), (0, "boots\n".to_string()));
    assert_eq!(run(container, &["sh", "-c", "exit 3"]).0, 3);
    assert_eq!(
        run(container, &["cat", "/proc/1/comm"]),
        (0, "init\n".to_string())
    );

    let echoed = container
        .exec_output(&ExecRequest::new(&["cat"]), b"through stdin")
        .expect("exec cat");
    assert_eq!(echoed.stdout, "through stdin");

    let mut request = ExecRequest::new(&["sh", "-c", "pwd; id -u; id -g; echo $GREETING"]);
    request.working_directory = "/tmp".into();
    request.uid = 1000;
    request.gid = 1000;
    request
        .environment
        .push(("GREETING".to_string(), "hello".to_string()));
    let output = container
        .exec_output(&request, b"")
        .expect("exec as a user");
    assert_eq!(output.stdout, "/tmp\n1000\n1000\nhello\n");

    let missing = container
        .exec_output(&ExecRequest::new(&["no-such-command"]), b"")
        .expect_err("a missing command is an error");
    assert!(
        missing.to_string().contains("no-such-command"),
        "unclear error: {missing}"
    );

    let (status, mounts) = run(container, &["cat", "/proc/self/mountinfo"]);
    assert_eq!(status, 0);
    for mount_point in [
        " / ",
        " /proc ",
        " /sys ",
        " /dev ",
        " /dev/pts ",
        " /dev/shm ",
        " /dev/mqueue ",
        " /dev/console ",
        " /dev/null ",
        " /sys/fs/cgroup ",
    ] {
        assert!(
            mounts.contains(mount_point),
            "no {mount_point} in:\n{mounts}"
        );
    }
    let (status, devices) = run(
        container,
        &["sh", "-c", "echo x > /dev/null && head -c 4 /dev/zero | wc -c && head -c 4 /dev/urandom | wc -c && ls /dev/pts/ptmx"],
    );
    assert_eq!((status, devices.as_str()), (0, "4\n4\n/dev/pts/ptmx\n"));

    // Host-wide kernel knobs are read-only; the container's own network namespace is not.
    let (status, _) = run(
        container,
        &[
            "sh",
            "-c",
            "cat /proc/sys/kernel/panic > /proc/sys/kernel/panic",
        ],
    );
    assert_ne!(status, 0, "/proc/sys/kernel is writable");
    let (status, _) = run(container, &["sh", "-c", "echo 1 > /proc/sysrq-trigger"]);
    assert_ne!(status, 0, "/proc/sysrq-trigger is writable");
    let (status, forwarding) = run(
        container,
        &[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward && cat /proc/sys/net/ipv4/ip_forward",
        ],
    );
    assert_eq!((status, forwarding.as_str()), (0, "1\n"));
}

#[test]
fn unprivileged_root_is_a_high_uid_on_the_host_and_the_image_stays_unchanged() {
    let image = busybox_image();
    let before = listing(image);
    let config = ContainerConfig::new("shifted", image);
    let test = TestContainer::start("shifted", &config);
    let container = test.get();
    let base = container
        .id_map()
        .expect("unprivileged by default")
        .uid
        .host_base;

    assert_eq!(run(container, &["id", "-u"]), (0, "0\n".to_string()));
    let (status, _) = run(
        container,
        &[
            "sh",
            "-c",
            "echo written > /written-by-container && echo more >> /etc/passwd && rm /etc/hostname",
        ],
    );
    assert_eq!(status, 0);
    // Inside, the image's files belong to the container's root.
    assert_eq!(
        run(container, &["stat", "-c", "%u:%g", "/bin/busybox"]),
        (0, "0:0\n".to_string())
    );

    let written = container.upper_directory().join("written-by-container");
    let metadata = std::fs::metadata(&written).expect("the written file is in the upper directory");
    assert_eq!((metadata.uid(), metadata.gid()), (base, base));
    assert_eq!(
        std::fs::read_to_string(&written).expect("read it"),
        "written\n"
    );
    assert_eq!(listing(image), before, "the image directory changed");
}

#[test]
fn configured_id_map_base_is_used() {
    let mut config = ContainerConfig::new("based", busybox_image());
    config.id_map = Some(IdMap::uniform(2_000_000, 65536));
    let test = TestContainer::start("based", &config);
    let container = test.get();
    let (status, _) = run(container, &["touch", "/root/mine"]);
    assert_eq!(status, 0);
    let metadata = std::fs::metadata(container.upper_directory().join("root/mine"))
        .expect("the file is in the upper directory");
    assert_eq!((metadata.uid(), metadata.gid()), (2_000_000, 2_000_000));
    let (_, map) = run(container, &["cat", "/proc/self/uid_map"]);
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", "2000000", "65536"]
    );
}

#[test]
fn privileged_container_is_host_root() {
    let mut config = ContainerConfig::new("privileged", busybox_image());
    config.privileged = true;
    let test = TestContainer::start("privileged", &config);
    let container = test.get();
    assert!(container.id_map().is_none());
    let (status, _) = run(container, &["touch", "/root-owned"]);
    assert_eq!(status, 0);
    let metadata = std::fs::metadata(container.upper_directory().join("root-owned"))
        .expect("the file is in the upper directory");
    assert_eq!(metadata.uid(), 0);
    // Host root inside, but the host's kernel knobs stay read-only (the value written back is
    // the current one, so a failed protection changes nothing).
    let (status, error) = run(
        container,
        &[
            "sh",
            "-c",
            "cat /proc/sys/kernel/panic > /proc/sys/kernel/panic",
        ],
    );
    assert_ne!(
        status, 0,
        "/proc/sys/kernel is writable in a privileged container"
    );
    assert!(error.contains("Read-only file system"), "{error}");
}

#[test]
fn limits_show_in_the_cgroup_and_state_reports_usage() {
    let keys: BTreeMap<String, String> = [
        ("limits.memory", "64MiB"),
        ("limits.processes", "50"),
        ("limits.cpu.allowance", "50ms/100ms"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value.to_string()))
    .collect();
    let config = ContainerConfig::from_keys("limited", busybox_image(), &keys).expect("valid keys");
    let mut test = TestContainer::start("limited", &config);
    test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    let cgroup = test.get().cgroup();
    let memory = cgroup
        .layout()
        .controller_directory("memory", cgroup.relative())
        .expect("a memory controller");
    let limit = ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .find_map(|file| std::fs::read_to_string(memory.join(file)).ok())
        .expect("a memory limit file");
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    let pids = cgroup
        .layout()
        .controller_directory("pids", cgroup.relative())
        .expect("a pids controller");
    assert_eq!(
        std::fs::read_to_string(pids.join("pids.max"))
            .expect("read pids.max")
            .trim(),
        "50"
    );

    // The container sees its own cgroup as the root of its cgroup namespace.
    let (_, own) = run(test.get(), &["cat", "/proc/self/cgroup"]);
    assert!(
        own.lines().all(|line| line.ends_with(":/")),
        "not namespaced:\n{own}"
    );

    // The cgroup is delegated: the container's root may make sub-cgroups (as systemd does).
    let delegated = if cgroup.layout().is_unified() {
        "/sys/fs/cgroup/delegated"
    } else {
        "/sys/fs/cgroup/pids/delegated"
    };
    assert_eq!(run(test.get(), &["mkdir", delegated]), (0, String::new()));
    assert!(pids.join("delegated").is_dir());
    // Once init moves itself there (as systemd does to init.scope), exec joins it there.
    let move_init = format!("echo 1 > {delegated}/cgroup.procs");
    assert_eq!(run(test.get(), &["sh", "-c", &move_init]).0, 0);
    let (_, own) = run(test.get(), &["cat", "/proc/self/cgroup"]);
    assert!(
        own.contains("pids:/delegated"),
        "exec did not join init's cgroup:\n{own}"
    );

    let state = test.get_mut().state();
    assert_eq!(state.status, Status::Running);
    assert!(state.init_pid.is_some());
    assert!(
        state.memory_bytes.unwrap_or(0) > 0,
        "no memory usage in {state:?}"
    );
    assert!(
        state.cpu_time.unwrap_or_default() > Duration::ZERO,
        "no CPU time in {state:?}"
    );
    assert!(
        state.processes.unwrap_or(0) >= 1,
        "no processes in {state:?}"
    );
}

#[test]
fn stop_ends_init_and_releases_everything() {
    let config = ContainerConfig::new("stopping", busybox_image());
    let mut test = TestContainer::start("stopping", &config);
    test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    let container = test.get_mut();
    let init = container.init_pid().expect("running");
    let cgroup_files = container.cgroup().process_files();
    let root = container.root_directory().to_path_buf();

    let started = Instant::now();
    let outcome = container.stop(STOP_TIMEOUT).expect("stop");
    assert!(
        outcome.clean,
        "init ignored its halt signal and was killed: {outcome:?}"
    );
    eprintln!("stopped in {:?}: {outcome:?}", started.elapsed());
    assert!(started.elapsed() < STOP_TIMEOUT + Duration::from_secs(2));
    let state = container.state();
    assert_eq!(state.status, Status::Stopped, "{outcome:?}");
    assert_eq!(state.init_pid, None);
    assert!(
        !Path::new(&format!("/proc/{init}")).exists(),
        "init {init} still exists"
    );
    for file in cgroup_files {
        assert!(!file.exists(), "{} was not removed", file.display());
    }
    assert!(!mounted_under(&root), "{} is still mounted", root.display());

    let directory = container.directory().to_path_buf();
    test.container
        .take()
        .expect("present")
        .delete()
        .expect("delete");
    assert!(
        !directory.exists(),
        "{} was not removed",
        directory.display()
    );
}

#[test]
fn stop_kills_init_after_the_timeout() {
    let config = ContainerConfig::new("killed", busybox_image());
    let mut test = TestContainer::start("killed", &config);
    test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    // busybox init takes about two seconds to halt: far longer than this timeout.
    let timeout = Duration::from_millis(100);
    let started = Instant::now();
    let outcome = test.get_mut().stop(timeout).expect("stop");
    let took = started.elapsed();
    assert!(!outcome.clean, "{outcome:?}");
    assert_eq!(outcome.exit_code, 128 + libc::SIGKILL);
    assert!(
        took < timeout + Duration::from_secs(1),
        "stop took {took:?}"
    );
    assert_eq!(test.get_mut().state().status, Status::Stopped);
}

#[test]
fn bad_input_is_refused_and_leaves_nothing_behind() {
    require_root();
    let test_host = TestHost::new("refused");
    let host = &test_host.host;
    let missing = ContainerConfig::new("missing", "/nonexistent/image");
    let error = Container::start(&missing, host).expect_err("a missing rootfs is refused");
    assert!(matches!(error, ContainerError::Config(_)), "{error}");
    assert!(error.to_string().contains("/nonexistent/image"), "{error}");
    assert!(!host.containers_directory.join("missing").exists());

    let keys: BTreeMap<String, String> = [("limits.memory".to_string(), "lots".to_string())].into();
    let error = ContainerConfig::from_keys("lots", busybox_image(), &keys).expect_err("refused");
    assert_eq!(
        error.to_string(),
        "invalid limits.memory \"lots\": expected a size such as 512MiB, 2GB or a number of bytes"
    );

    // Refused half-way, after its cgroup was made: everything is undone.
    let mut greedy = ContainerConfig::new("greedy", busybox_image());
    greedy.limits.cpu_count = Some(4096);
    let error = Container::start(&greedy, host).expect_err("more CPUs than the host has");
    assert!(error.to_string().contains("limits.cpu=4096"), "{error}");
    assert!(!host.containers_directory.join("greedy").exists());
    let layout = cove_shim::cgroup::CgroupLayout::detect().expect("cgroups");
    for mount in layout.mounts() {
        let cgroup = mount.join(&host.cgroup_parent).join("greedy");
        assert!(!cgroup.exists(), "{} was left behind", cgroup.display());
    }

    let config = ContainerConfig::new("twice", busybox_image());
    let first = TestContainer::start("twice", &config);
    first.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    let entries = |directory: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(directory)
            .expect("read the container directory")
            .map(|entry| {
                entry
                    .expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    };
    let before = entries(first.get().directory());
    let error = Container::start(&config, &first.host.host).expect_err("a name clash is refused");
    assert_eq!(
        error.to_string(),
        "container \"twice\" already exists: choose another name or delete it first"
    );
    assert_eq!(entries(first.get().directory()), before);
    assert!(first.get().cgroup().process_files()[0].exists());
    assert_eq!(
        run(first.get(), &["true"]).0,
        0,
        "the first container was harmed"
    );
}

/// Time from a validated config to init running, and to the first exec's exit, median of 10.
/// A measurement, not a test of a budget: run it with
/// `cargo test -p cove-tests --test container -- --ignored start_time --nocapture`.
#[test]
#[ignore]
fn start_time() {
    require_root();
    let mut to_init = Vec::new();
    let mut to_exec = Vec::new();
    for round in 0..10 {
        let name = format!("timed{round}");
        let host = TestHost::new(&name);
        let config = ContainerConfig::new(&name, busybox_image());
        let started = Instant::now();
        let container = Container::start(&config, &host.host).expect("start");
        to_init.push(started.elapsed());
        let test = TestContainer {
            container: Some(container),
            host,
        };
        assert_eq!(run(test.get(), &["true"]).0, 0);
        to_exec.push(started.elapsed());
    }
    to_init.sort();
    to_exec.sort();
    println!(
        "config to init running: median {:?} (min {:?}, max {:?}); to first exec done: median {:?}",
        to_init[5], to_init[0], to_init[9], to_exec[5]
    );
}
