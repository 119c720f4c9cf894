//! The full-system path into a VM: the Debian image of `resources/build-rootfs` (systemd, the
//! agent as an early systemd unit, DHCP networking) as the root disk of the project kernel,
//! with the host talking to the agent over vsock once it announces itself.
//!
//! This needs a host with hardware virtualisation. On kvm-pvm, where guest kernel code runs
//! under emulation and every process the guest starts costs a large fraction of a second,
//! systemd's boot of dozens of units is not runnable in a test's time: the test says so and
//! checks only that the image it would boot is there, with the agent and its unit inside.

use std::path::Path;
use std::time::{Duration, Instant};

use cove_agent::client::{self, Client, Endpoint};
use cove_agent::protocol::{
    ExecRequest, PowerAction, DEFAULT_ANNOUNCE_PORT, DEFAULT_PATH, DEFAULT_PORT,
};
use cove_tests::{built_by, host_is_kvm_pvm, require_kvm, scratch_dir, Vmm};

const BOOT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

fn path(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}

/// The tree and the ext4 image, with the agent built in.
fn debian_image() -> (std::path::PathBuf, std::path::PathBuf) {
    let image = built_by(
        "resources/build-rootfs",
        &["--agent", "build", "--format", "ext4"],
    );
    let tree = image
        .parent()
        .expect("the image lies beside its tree")
        .join("rootfs");
    (tree, image)
}

#[test]
fn debian_image_boots_systemd_and_its_agent_answers_over_vsock() {
    require_kvm();
    let (tree, image) = debian_image();
    assert!(tree.join("usr/local/bin/cove-agent").is_file(), "{tree:?}");
    let unit = [
        "etc/systemd/system",
        "lib/systemd/system",
        "usr/lib/systemd/system",
    ]
    .iter()
    .map(|directory| tree.join(directory).join("cove-agent.service"))
    .find(|unit| unit.is_file())
    .expect("cove-agent.service in the image");
    let unit = std::fs::read_to_string(unit).expect("read the unit");
    assert!(unit.contains("cove-agent"), "{unit}");
    assert!(image.metadata().map(|m| m.len() > 0).unwrap_or(false));
    if host_is_kvm_pvm() {
        eprintln!(
            "NOT RUNNABLE on kvm-pvm: booting systemd from the Debian image needs hardware \
             virtualisation; checked only that {} holds the agent and its unit",
            image.display()
        );
        return;
    }

    let kernel = built_by("resources/build-kernel", &[]);
    let scratch = scratch_dir("agent-debian-vm");
    let disk = scratch.join("root.ext4");
    let copied = std::process::Command::new("cp")
        .args(["--sparse=always", &path(&image), &path(&disk)])
        .status()
        .expect("run cp");
    assert!(copied.success(), "copy the image for this VM");
    let socket = scratch.join("v.sock");
    let serial = scratch.join("serial.log");
    let announcements = std::os::unix::net::UnixListener::bind(client::announce_path(
        &socket,
        DEFAULT_ANNOUNCE_PORT,
    ))
    .expect("listen where the agent announces itself");
    let disk_option = format!("path={}", path(&disk));
    let vsock_option = format!("cid=3,socket={}", path(&socket));
    let serial_option = format!("file={}", path(&serial));
    let started = Instant::now();
    let vmm = Vmm::start(&[
        "--kernel",
        &path(&kernel),
        "--cpus",
        "boot=2",
        "--memory",
        "size=1G",
        "--disk",
        &disk_option,
        "--vsock",
        &vsock_option,
        "--serial",
        &serial_option,
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw",
    ]);
    let console = || std::fs::read_to_string(&serial).unwrap_or_default();
    let hello = client::wait_ready(&announcements, BOOT_TIMEOUT)
        .unwrap_or_else(|error| panic!("no announcement: {error}\nconsole:\n{}", console()));
    eprintln!(
        "hardware-virtualised host: the Debian image's agent announced itself {:.1} s after \
         cove-vmm started",
        started.elapsed().as_secs_f64()
    );
    let boot = hello.boot.expect("boot facts");
    assert_ne!(boot.pid, 1, "systemd is init, the agent a service");
    let client = Client::new(Endpoint::Vsock {
        socket: socket.clone(),
        port: DEFAULT_PORT,
    });
    let request = ExecRequest {
        argv: ["systemctl", "is-system-running", "--wait"]
            .map(str::to_string)
            .to_vec(),
        environment: [("PATH".to_string(), DEFAULT_PATH.to_string())].into(),
        ..ExecRequest::default()
    };
    let output = client.run(&request, b"").expect("exec over vsock");
    let state = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        state == "running" || state == "degraded",
        "systemd: {state}\nconsole:\n{}",
        console()
    );
    client
        .shutdown(PowerAction::Poweroff, None)
        .expect("shutdown");
    let finished = vmm.wait(BOOT_TIMEOUT);
    assert_eq!(finished.status.code(), Some(0), "{}", finished.stderr);
    let _ = std::fs::remove_dir_all(scratch);
}
