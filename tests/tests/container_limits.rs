//! Limits that hold under pressure: a process that outgrows `limits.memory` is killed while the
//! container lives on, and `limits.processes` stops a fork bomb. Real cgroups; run as root.

use std::collections::BTreeMap;
use std::time::Duration;

use cove_shim::{Container, ContainerConfig, ExecRequest, Status};
use cove_tests::container::{busybox_image, TestContainer, BOOT_MARKER};

const BOOT_TIMEOUT: Duration = Duration::from_secs(10);

fn limited(name: &str, keys: &[(&str, &str)]) -> TestContainer {
    let keys: BTreeMap<String, String> = keys
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    let config = ContainerConfig::from_keys(name, busybox_image(), &keys).expect("valid keys");
    let test = TestContainer::start(name, &config);
    test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    test
}

fn run(container: &Container, command: &[&str]) -> (i32, String) {
    let output = container
        .exec_output(&ExecRequest::new(command), b"")
        .unwrap_or_else(|error| panic!("exec {command:?} failed: {error}"));
    (output.exit_code, output.stdout + &output.stderr)
}

#[test]
fn a_memory_hog_is_killed_and_the_container_survives() {
    let mut test = limited("memory-hog", &[("limits.memory", "32MiB")]);
    // dd holds one 64 MiB block in memory and fills it: twice the limit.
    let (code, output) = run(
        test.get(),
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
    );
    assert_eq!(
        code,
        128 + libc::SIGKILL,
        "the out-of-memory killer ends the hog: {output}"
    );
    // A command that fits still runs, and init was never touched.
    let (code, output) = run(
        test.get(),
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=1M", "count=4"],
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(run(test.get(), &["echo", "alive"]), (0, "alive\n".into()));
    assert_eq!(test.get_mut().state().status, Status::Running);
}

#[test]
fn a_fork_bomb_stops_at_the_process_limit() {
    let mut test = limited("fork-bomb", &[("limits.processes", "20")]);
    // Forty short sleepers, each a process, in a cgroup that allows twenty in all: busybox's
    // shell gives up at the first fork the kernel refuses.
    let script = "for i in $(seq 40); do sleep 3 >/dev/null 2>&1 & done; echo all forked";
    let (code, output) = run(test.get(), &["sh", "-c", script]);
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("can't fork") && !output.contains("all forked"),
        "forks beyond the limit are refused: {output}"
    );
    let processes = test.get_mut().state().processes.unwrap_or(u64::MAX);
    assert!(processes <= 20, "{processes} processes under a limit of 20");
    // Once the sleepers are gone, the container runs commands again.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(run(test.get(), &["echo", "alive"]), (0, "alive\n".into()));
    assert_eq!(test.get_mut().state().status, Status::Running);
}
