//! cove-agent as the init of a microVM: the project kernel boots the agent initramfs
//! (`resources/build-agent-initramfs`: the static agent as /init, busybox beside it) under
//! cove-vmm with a virtio-vsock device. The host listens where the agent announces itself
//! (`<vsock socket>_1024`) before the VM starts, then talks to the agent over vsock through
//! the client library, and ends with a shutdown that must end cove-vmm with status 0.
//!
//! Where the host has hardware virtualisation this runs the whole agent suite over vsock
//! (`agent_suite`, as `agent.rs` does in namespaces). On kvm-pvm, where guest kernel code is
//! emulated and every process the guest starts costs seconds, it runs one exec that names
//! the kernel, a push and a pull, the state and the shutdown: about a minute, most of it the
//! boot. `COVE_AGENT_VM_FULL_SUITE=1` runs the whole suite there too (many minutes). The test
//! says which it did, and how long the agent took to be ready.

mod agent_suite;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent_suite::Target;
use cove_agent::client::{self, Attributes, Client, Endpoint};
use cove_agent::protocol::{FileKind, PowerAction, DEFAULT_ANNOUNCE_PORT, DEFAULT_PORT};
use cove_tests::{
    built_by, cove_agent, host_is_kvm_pvm, kernel_release, project_kernel, require_kvm,
    scratch_dir, Vmm,
};

/// Generous: on kvm-pvm a boot takes about a minute, and CI machines are shared.
const LINUX_TIMEOUT: Duration = Duration::from_secs(20 * 60);

fn path(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}

#[test]
fn agent_as_init_of_a_microvm_serves_the_host_over_vsock() {
    require_kvm();
    let started = Instant::now();
    let kernel = project_kernel();
    let agent = cove_agent();
    let initramfs = built_by(
        "resources/build-agent-initramfs",
        &["--agent", &path(agent)],
    );
    let scratch = scratch_dir("agent-vm");
    let socket = scratch.join("v.sock");
    let serial = scratch.join("serial.log");
    let announcements = UnixListener::bind(client::announce_path(&socket, DEFAULT_ANNOUNCE_PORT))
        .expect("listen where the agent announces itself");

    let vsock_option = format!("cid=3,socket={}", path(&socket));
    let serial_option = format!("file={}", path(&serial));
    let vmm_started = Instant::now();
    let vmm = Vmm::start(&[
        "--kernel",
        &path(kernel),
        "--initramfs",
        &path(&initramfs),
        "--cpus",
        "boot=2",
        "--memory",
        "size=512M",
        "--vsock",
        &vsock_option,
        "--serial",
        &serial_option,
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 rodata=off",
    ]);
    // A hung guest must fail the test, not hang it: past the deadline cove-vmm is killed,
    // which ends every vsock connection.
    let (finished_in_time, watchdog) = mpsc::channel::<()>();
    let vmm_pid = vmm.pid() as i32;
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = watchdog.recv_timeout(LINUX_TIMEOUT) {
            eprintln!("watchdog: the VM ran past {LINUX_TIMEOUT:?}; killing cove-vmm");
            // SAFETY: kill() takes no pointers; the pid is the test's own cove-vmm.
            unsafe { libc::kill(vmm_pid, libc::SIGKILL) };
        }
    });
    let console = || std::fs::read_to_string(&serial).unwrap_or_default();

    let hello = client::wait_ready(&announcements, LINUX_TIMEOUT).unwrap_or_else(|error| {
        panic!(
            "the agent did not announce itself: {error}\nconsole:\n{}",
            console()
        )
    });
    let ready_after = vmm_started.elapsed();
    let boot = hello.boot.clone().expect("the announcement's boot facts");
    assert_eq!(boot.pid, 1, "the agent is the guest's init");
    assert_eq!(boot.serving, format!("vsock:{DEFAULT_PORT}"));

    let client = Client::new(Endpoint::Vsock {
        socket: socket.clone(),
        port: DEFAULT_PORT,
    });
    // The exec that shows the agent is in this very kernel.
    let version = agent_suite::run_ok(
        &Target {
            client: &client,
            scratch: "/tmp".into(),
            processes_hold_still: false,
        },
        &["cat", "/proc/version"],
    );
    assert!(
        version.starts_with(&format!("Linux version {} ", boot.kernel)),
        "{version:?}"
    );
    if let Some(release) = kernel_release(kernel) {
        assert_eq!(
            boot.kernel, release,
            "the guest runs the kernel that was built"
        );
    }

    let full_suite = !host_is_kvm_pvm() || std::env::var_os("COVE_AGENT_VM_FULL_SUITE").is_some();
    if full_suite {
        eprintln!("running the whole agent suite over vsock");
        let target = Target {
            client: &client,
            scratch: "/tmp/suite".into(),
            processes_hold_still: false,
        };
        client
            .push_directory(
                &target.scratch,
                Attributes {
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                },
            )
            .unwrap();
        agent_suite::echo_prints_hi_and_exits_0(&target);
        agent_suite::exit_codes_and_signals_are_returned(&target);
        agent_suite::stdout_and_stderr_stay_apart(&target);
        agent_suite::a_missing_program_is_a_clear_error(&target);
        agent_suite::ten_mib_through_stdin_come_back_unchanged(&target);
        agent_suite::environment_directory_and_user_are_the_requested_ones(&target);
        agent_suite::a_pty_exec_sees_a_terminal_and_its_size(&target);
        agent_suite::kill_reaches_the_process(&target);
        agent_suite::many_execs_run_at_once(&target);
        agent_suite::push_and_pull_keep_checksum_mode_and_owner(&target, 50 << 20);
        agent_suite::directories_and_symlinks(&target);
        agent_suite::missing_paths_and_a_full_disk_are_clear_errors(&target);
        agent_suite::state_reports_real_figures(&target);
        agent_suite::a_malformed_frame_closes_only_its_connection(&target);
    } else {
        eprintln!(
            "kvm-pvm host: one exec, a push and a pull, the state and a shutdown over vsock \
             (the whole suite runs where the host has hardware virtualisation, or with \
             COVE_AGENT_VM_FULL_SUITE=1)"
        );
        let bytes = agent_suite::noise(100 << 10, 5);
        let attributes = Attributes {
            mode: 0o600,
            uid: 7,
            gid: 8,
        };
        let written = client
            .push_file("/tmp/pushed", attributes, &mut &bytes[..])
            .unwrap();
        assert_eq!(written, bytes.len() as u64);
        let mut pulled = Vec::new();
        let info = client.pull("/tmp/pushed", &mut pulled).unwrap();
        assert_eq!(info.kind, FileKind::File);
        assert_eq!((info.mode, info.uid, info.gid), (0o600, 7, 8));
        assert!(pulled == bytes, "the pulled bytes are the pushed ones");
        let state = client.state().unwrap();
        assert!(
            (400 << 20..512 << 20).contains(&state.memory.total_bytes),
            "MemTotal of a 512 MiB guest: {state:?}"
        );
        assert_eq!(state.kernel, boot.kernel);
        assert_eq!(state.cpus, 2);
        assert!(state.processes >= 1);
        let loopback = state
            .interfaces
            .iter()
            .find(|interface| interface.name == "lo")
            .expect("lo");
        assert!(loopback.up, "the agent as init brings lo up");
    }

    client.shutdown(PowerAction::Poweroff, None).unwrap();
    let finished = vmm.wait(LINUX_TIMEOUT);
    let _ = finished_in_time.send(());
    eprintln!(
        "{} host: cove-vmm start to the agent's announcement {:.1} s (guest uptime {:.1} s), \
         whole test {:.1} s",
        if host_is_kvm_pvm() {
            "kvm-pvm"
        } else {
            "hardware-virtualised"
        },
        ready_after.as_secs_f64(),
        boot.uptime_seconds,
        started.elapsed().as_secs_f64()
    );
    let context = format!("console:\n{}\nstderr:\n{}", console(), finished.stderr);
    assert_eq!(finished.status.code(), Some(0), "{context}");
    assert!(
        finished
            .stderr
            .contains("VM stopped: the guest reset the machine"),
        "the project kernel has no ACPI, so the agent's power-off is a reset\n{context}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
