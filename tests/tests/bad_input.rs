//! Bad input is answered before any VM is made: one line on stderr that says what is wrong,
//! exit status 1, no guest output, no hang.

use std::process::Command;
use std::time::Duration;

use cove_tests::{cove_vmm, require_kvm, run_vmm, scratch_dir, test_guest, Finished};

const TIMEOUT: Duration = Duration::from_secs(30);

fn refused(arguments: &[&str], message: &str) {
    let finished = run_vmm(arguments, TIMEOUT);
    assert_refused(&finished, message);
}

fn assert_refused(finished: &Finished, message: &str) {
    assert_eq!(
        finished.status.code(),
        Some(1),
        "stderr:\n{}",
        finished.stderr
    );
    assert_eq!(finished.stdout, "", "nothing may run");
    assert_eq!(
        finished.stderr.lines().count(),
        1,
        "one line:\n{}",
        finished.stderr
    );
    assert!(
        finished.stderr.contains(message),
        "expected {message:?} in:\n{}",
        finished.stderr
    );
}

#[test]
fn missing_or_unreadable_kernel() {
    require_kvm();
    refused(
        &["--kernel", "/nonexistent/vmlinux"],
        "cannot open kernel /nonexistent/vmlinux: No such file or directory",
    );
    refused(&["--kernel", "/"], "/ is not a kernel");
    refused(&["--memory", "64M"], "--kernel is required");
}

#[test]
fn a_file_that_is_not_a_kernel() {
    require_kvm();
    let dir = scratch_dir("not-a-kernel");
    let text = dir.join("notes.txt");
    std::fs::write(&text, "hello\n".repeat(200)).expect("write");
    refused(
        &["--kernel", text.to_str().expect("UTF-8")],
        "is not a kernel: expected an ELF vmlinux, a PVH ELF or a bzImage",
    );
    std::fs::remove_dir_all(dir).expect("clean up");
}

#[test]
fn bad_sizes_and_counts() {
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    refused(
        &["--kernel", &guest, "--memory", "12X"],
        "invalid memory size \"12X\"",
    );
    refused(&["--kernel", &guest, "--memory", "size=1K"], "too small");
    refused(
        &["--kernel", &guest, "--cpus", "boot=0"],
        "at least one vCPU",
    );
    refused(
        &["--kernel", &guest, "--cpus", "boot=-1"],
        "invalid vCPU count",
    );
    refused(
        &["--kernel", &guest, "--serial", "printer"],
        "expected tty, off or file=PATH",
    );
    refused(
        &["--kernel", &guest, "--cpu-features", "-warp-drive"],
        "unknown CPU feature \"warp-drive\"",
    );
    refused(
        &["--kernel", &guest, "--frobnicate"],
        "unknown argument \"--frobnicate\"",
    );
}

#[test]
fn more_vcpus_than_kvm_allows() {
    require_kvm();
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    refused(
        &["--kernel", &guest, "--cpus", "boot=100000"],
        "this host allows at most",
    );
}

#[test]
fn no_permission_for_dev_kvm() {
    require_kvm();
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    // The test binaries and the guest must be reachable by an unprivileged user.
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(cove_vmm())
        .args(["--kernel", &guest])
        .output()
        .expect("run setpriv (util-linux)");
    let finished = Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    if finished.stderr.contains("Permission denied")
        && finished.stderr.contains("cove-vmm")
        && !finished.stderr.contains("/dev/kvm")
    {
        panic!(
            "the unprivileged user cannot execute cove-vmm itself:\n{}",
            finished.stderr
        );
    }
    assert_refused(&finished, "cannot open /dev/kvm: Permission denied");
}

#[test]
fn help_documents_every_flag() {
    let finished = run_vmm(&["--help"], TIMEOUT);
    assert_eq!(finished.status.code(), Some(0));
    for flag in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--cpus",
        "--cpu-features",
        "--memory",
        "--serial",
        "--api-socket",
        "--config",
    ] {
        assert!(
            finished.stdout.contains(flag),
            "--help does not mention {flag}"
        );
    }
}
