//! A system container from the Debian image (`resources/build-rootfs`): systemd boots as PID 1
//! to `running` (or `degraded`, with the failed units printed), the hostname is the one cove
//! set, the console log shows the boot and the shutdown, and SIGRTMIN+3 halts it cleanly with
//! nothing left behind. Real namespaces, cgroups and mounts; run as root.
//!
//! The boot time is printed: `cargo test -p cove-tests --test container_systemd -- --nocapture`.

use std::path::Path;
use std::time::{Duration, Instant};

use cove_shim::{Container, ContainerConfig, ExecRequest, InitSystem, Status};
use cove_tests::container::{debian_image, mounted_under, wait_for_systemd, TestContainer};

/// How long systemd may take to finish booting (`systemctl is-system-running --wait`).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

fn run(container: &Container, command: &[&str]) -> (i32, String) {
    let output = container
        .exec_output(&ExecRequest::new(command), b"")
        .unwrap_or_else(|error| panic!("exec {command:?} failed: {error}"));
    (output.exit_code, output.stdout + &output.stderr)
}

#[test]
fn systemd_boots_and_halts_on_sigrtmin_3() {
    let config = ContainerConfig::new("debian", debian_image());
    let started = Instant::now();
    let mut test = TestContainer::start("systemd", &config);
    assert_eq!(test.get().init_system(), InitSystem::Systemd);

    let boot = wait_for_systemd(test.get(), started + BOOT_TIMEOUT);
    let boot_time = started.elapsed();
    let (_, warnings) = run(
        test.get(),
        &["journalctl", "--boot", "--priority=warning", "--no-pager"],
    );
    eprintln!(
        "systemd is {} {boot_time:?} after the start; failed units: {:?}\n\
         journal warnings:\n{warnings}",
        boot.state, boot.failed
    );
    assert!(
        boot.state == "running" || boot.state == "degraded",
        "systemd did not finish booting: {boot:?}"
    );
    assert!(
        boot.unexpected_failures().is_empty(),
        "units failed: {:?}",
        boot.unexpected_failures()
    );

    assert_eq!(run(test.get(), &["hostname"]), (0, "debian\n".to_string()));
    let console = std::fs::read_to_string(test.get().console_log()).expect("read the console");
    assert!(
        console.contains("Debian GNU/Linux 12") && console.contains("Reached target"),
        "the boot did not show on the console log:\n{console}"
    );

    let container = test.get_mut();
    let cgroup_files = container.cgroup().process_files();
    let root = container.root_directory().to_path_buf();
    let stopping = Instant::now();
    let outcome = container.stop(STOP_TIMEOUT).expect("stop");
    eprintln!("stopped in {:?}: {outcome:?}", stopping.elapsed());
    assert!(
        outcome.clean,
        "systemd ignored SIGRTMIN+3 and was killed: {outcome:?}"
    );
    // A halted pid namespace's init is ended by SIGINT (a reboot would be SIGHUP).
    assert_eq!(outcome.exit_code, 128 + libc::SIGINT);
    assert_eq!(container.state().status, Status::Stopped);
    let console = std::fs::read_to_string(container.console_log()).expect("read the console");
    assert!(
        console.contains("Halting system."),
        "the shutdown did not show on the console log:\n{console}"
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
        !Path::new(&directory).exists(),
        "{} was not removed",
        directory.display()
    );
}

/// Privileged, systemd finds nothing to fail: the bounding set lacks CAP_SYS_RAWIO (LXD's
/// `lxc.cap.drop` for privileged containers), so it skips mounting debugfs.
#[test]
fn a_privileged_systemd_container_boots_to_running() {
    let mut config = ContainerConfig::new("debian-privileged", debian_image());
    config.privileged = true;
    let started = Instant::now();
    let mut test = TestContainer::start("systemd-privileged", &config);
    let boot = wait_for_systemd(test.get(), started + BOOT_TIMEOUT);
    eprintln!(
        "privileged: systemd is {} after {:?}",
        boot.state,
        started.elapsed()
    );
    assert_eq!(boot.state, "running", "{boot:?}");
    assert_eq!(
        run(test.get(), &["hostname"]),
        (0, "debian-privileged\n".to_string())
    );
    let outcome = test.get_mut().stop(STOP_TIMEOUT).expect("stop");
    assert!(outcome.clean, "{outcome:?}");
}
