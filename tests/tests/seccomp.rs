//! Every cove-vmm thread runs under a seccomp filter once the VM runs, as /proc shows it; and
//! `--seccomp off` leaves them unfiltered.

use std::time::Duration;

use cove_tests::{require_kvm, test_guest, Vmm};

const TIMEOUT: Duration = Duration::from_secs(60);

/// (thread name, seccomp mode) for every thread of `pid`, from /proc.
fn thread_modes(pid: u32) -> Vec<(String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list the threads");
    tasks
        .map(|task| {
            let status = std::fs::read_to_string(task.expect("a thread").path().join("status"))
                .expect("read a thread's status");
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix(name))
                    .map(|value| value.trim().to_string())
                    .unwrap_or_default()
            };
            (field("Name:"), field("Seccomp:"))
        })
        .collect()
}

fn modes_while_ticking(extra: &[&str]) -> Vec<(String, String)> {
    require_kvm();
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    let mut arguments = vec!["--kernel", &guest, "--cpus", "2", "--cmdline", "exit=tick"];
    arguments.extend_from_slice(extra);
    let vmm = Vmm::start(&arguments);
    vmm.wait_for_console("tick 1", TIMEOUT);
    let modes = thread_modes(vmm.pid());
    vmm.signal(libc::SIGTERM);
    let finished = vmm.wait(TIMEOUT);
    assert_eq!(
        finished.status.code(),
        Some(0),
        "stderr:\n{}",
        finished.stderr
    );
    modes
}

#[test]
fn every_thread_is_filtered_by_default() {
    let modes = modes_while_ticking(&[]);
    let names: Vec<&str> = modes.iter().map(|(name, _)| name.as_str()).collect();
    assert!(
        names.contains(&"vcpu0") && names.contains(&"vcpu1"),
        "threads: {names:?}"
    );
    for (name, mode) in &modes {
        // 2 is SECCOMP_MODE_FILTER.
        assert_eq!(mode, "2", "thread {name} is not filtered: {modes:?}");
    }
}

#[test]
fn seccomp_off_leaves_threads_unfiltered() {
    let modes = modes_while_ticking(&["--seccomp", "off"]);
    for (name, mode) in &modes {
        assert_eq!(mode, "0", "thread {name} is filtered: {modes:?}");
    }
}
