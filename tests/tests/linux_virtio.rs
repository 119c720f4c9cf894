//! Linux's virtio drivers against cove-vmm's virtio devices: the project kernel boots from an
//! ext4 image on a virtio-blk disk, writes a file there, pings the host through a virtio-net
//! tap, and talks to the host over virtio-vsock in both directions. The guest's side is the
//! `/init` of `resources/build-virtio-rootfs`, which reports each step on the console; the host's
//! side is here: a Unix listener the guest's connection reaches, a connection into the guest
//! through cove-vmm's vsock socket, and a look into the disk image after the VM is gone.
//!
//! cove-vmm creates its tap in a network namespace of the test's own, so no address ever
//! appears on the host's network. On a host with VT-x/AMD-V this takes seconds; on kvm-pvm,
//! where guest kernel code is emulated, minutes. The test says which case it saw.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use cove_tests::{
    built_by, host_is_kvm_pvm, require_kvm, scratch_dir, start_vmm_in_own_network_namespace,
};

/// Generous: on kvm-pvm a boot takes minutes, and CI machines are shared.
const LINUX_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// The guest's address on its virtio-net interface, and the host's on the tap.
const GUEST_ADDRESS: &str = "192.0.2.2/24";
const HOST_ADDRESS: &str = "192.0.2.1";
/// The host port the guest connects to, and the guest port the host connects to.
const HOST_PORT: u32 = 1024;
const GUEST_PORT: u32 = 1025;
/// What the host sends the guest's listener.
const HOST_LINE: &str = "hello from the host";

fn path(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}

#[test]
fn project_kernel_uses_virtio_disk_network_and_vsock() {
    require_kvm();
    let started = Instant::now();
    let kernel = built_by("resources/build-kernel", &[]);
    let image = built_by("resources/build-virtio-rootfs", &[]);
    let scratch = scratch_dir("linux-virtio");
    // The guest writes to its disk: it gets a copy, never the cached image.
    let disk = scratch.join("rootfs.ext4");
    std::fs::copy(&image, &disk).expect("copy the root filesystem image");
    let token = format!("virtio-token-{}", std::process::id());

    // A guest connection to the host's port P reaches the listener at <socket>_P.
    let vsock_socket = scratch.join("v.sock");
    let from_guest = echo_one_line(&PathBuf::from(format!(
        "{}_{HOST_PORT}",
        vsock_socket.display()
    )));

    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 rodata=off root=/dev/vda rw init=/init \
         cove.token={token} cove.ip={GUEST_ADDRESS} cove.host={HOST_ADDRESS} \
         cove.vsock_host_port={HOST_PORT} cove.vsock_guest_port={GUEST_PORT}"
    );
    let disk_option = format!("path={}", path(&disk));
    let net_option = format!("ip={HOST_ADDRESS},mask=255.255.255.0");
    let vsock_option = format!("cid=3,socket={}", path(&vsock_socket));
    let vmm = start_vmm_in_own_network_namespace(&[
        "--kernel",
        &path(&kernel),
        "--cpus",
        "boot=2",
        "--memory",
        "size=512M",
        "--disk",
        &disk_option,
        "--net",
        &net_option,
        "--vsock",
        &vsock_option,
        "--cmdline",
        &cmdline,
    ]);

    // The guest's listener comes up late in its boot: keep trying until the VM is gone.
    let vm_gone = Arc::new(AtomicBool::new(false));
    let into_guest = {
        let vm_gone = vm_gone.clone();
        let socket = vsock_socket.clone();
        std::thread::spawn(move || {
            exchange_with_guest(
                &socket,
                GUEST_PORT,
                HOST_LINE,
                started + LINUX_TIMEOUT,
                &vm_gone,
            )
        })
    };
    let finished = vmm.wait(LINUX_TIMEOUT);
    vm_gone.store(true, Ordering::SeqCst);
    let answer_from_guest = into_guest.join().expect("the vsock client thread");
    eprintln!(
        "{} host: the project kernel ({}) with a virtio disk, network and vsock: {}, whole test {:.1} s",
        if host_is_kvm_pvm() {
            "kvm-pvm"
        } else {
            "hardware-virtualised"
        },
        kernel.display(),
        finished
            .stderr
            .lines()
            .find(|line| line.contains("guest boot time: "))
            .unwrap_or("no boot time reported"),
        started.elapsed().as_secs_f64()
    );

    for line in finished.stdout.lines() {
        if line.starts_with("cove-virtio: ") || line.starts_with("vsock-probe: ") {
            eprintln!("guest: {line}");
        }
    }
    let context = format!(
        "console:\n{}\nstderr:\n{}",
        finished.stdout, finished.stderr
    );
    assert_eq!(finished.status.code(), Some(0), "{context}");
    assert!(
        finished.values("cove-virtio: error").is_empty(),
        "the guest reported a failed step\n{context}"
    );
    assert_eq!(
        finished.value("cove-virtio: root "),
        "/dev/vda ext4",
        "the root filesystem is the virtio disk\n{context}"
    );
    assert!(
        finished.stdout.contains("cove-virtio: wrote /from-guest"),
        "{context}"
    );
    assert!(
        finished.stdout.contains("cove-virtio: ping ok"),
        "the host answers the guest's ping\n{context}"
    );
    assert_eq!(
        finished.value("vsock-probe: reply "),
        format!("from-host: {token}"),
        "the guest's vsock connection reached the host's listener and got its answer\n{context}"
    );
    assert_eq!(
        from_guest.try_recv().ok(),
        Some(Ok(token.clone())),
        "the host's listener got the guest's line\n{context}"
    );
    assert_eq!(
        answer_from_guest,
        Ok(format!("echo: {HOST_LINE}")),
        "the host's vsock connection into the guest\n{context}"
    );
    assert_eq!(
        finished.value("vsock-probe: served "),
        HOST_LINE,
        "{context}"
    );
    assert!(finished.stdout.contains("cove-virtio: done"), "{context}");
    assert!(
        finished.stderr.contains("guest boot time: "),
        "init wrote the boot timer\n{context}"
    );
    assert!(
        finished
            .stderr
            .contains("VM stopped: the guest reset the machine"),
        "{context}"
    );

    // What the guest wrote and synced is in the image, for the host to read.
    let debugfs = Command::new("debugfs")
        .args(["-R", "cat /from-guest"])
        .arg(&disk)
        .output()
        .expect("run debugfs (e2fsprogs, which build-virtio-rootfs installs)");
    assert!(debugfs.status.success(), "debugfs: {debugfs:?}");
    assert_eq!(
        String::from_utf8_lossy(&debugfs.stdout).trim_end(),
        token,
        "/from-guest in the disk image"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Listens at `path` for one connection, reads a line, answers `from-host: <line>`; the line
/// (or what went wrong) arrives on the returned channel.
fn echo_one_line(path: &Path) -> mpsc::Receiver<Result<String, String>> {
    let listener = UnixListener::bind(path)
        .unwrap_or_else(|error| panic!("cannot listen at {}: {error}", path.display()));
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let (stream, _) = listener.accept().map_err(|error| error.to_string())?;
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .map_err(|error| error.to_string())?;
            let mut line = String::new();
            BufReader::new(&stream)
                .read_line(&mut line)
                .map_err(|error| format!("reading the guest's line: {error}"))?;
            let line = line.trim_end_matches('\n').to_string();
            (&stream)
                .write_all(format!("from-host: {line}\n").as_bytes())
                .map_err(|error| format!("answering the guest: {error}"))?;
            Ok(line)
        })();
        let _ = sender.send(result);
    });
    receiver
}

/// One try at reaching the guest's listener.
enum Attempt {
    Answered(String),
    /// Nobody listens yet (or cove-vmm has not created its socket): worth another try.
    NotYet(String),
    /// The guest accepted, then the exchange went wrong: another try cannot help.
    Failed(String),
}

/// Connects to the guest's `port` through cove-vmm's vsock socket (Firecracker's protocol:
/// `CONNECT <port>\n`, answered `OK <host port>\n`), sends `line` and returns the guest's
/// answer. Tries again each second until the guest listens, `deadline` passes or `vm_gone`.
fn exchange_with_guest(
    socket: &Path,
    port: u32,
    line: &str,
    deadline: Instant,
    vm_gone: &AtomicBool,
) -> Result<String, String> {
    let mut attempts = 0;
    let mut last = String::from("no attempt made");
    while Instant::now() < deadline && !vm_gone.load(Ordering::SeqCst) {
        attempts += 1;
        match try_exchange(socket, port, line) {
            Attempt::Answered(answer) => return Ok(answer),
            Attempt::Failed(error) => return Err(error),
            Attempt::NotYet(reason) => last = reason,
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Err(format!(
        "the guest's port {port} never accepted ({attempts} attempts; last: {last})"
    ))
}

fn try_exchange(socket: &Path, port: u32, line: &str) -> Attempt {
    let stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(error) => return Attempt::NotYet(format!("connect to {}: {error}", socket.display())),
    };
    let io = |what: &str, error: std::io::Error| format!("{what}: {error}");
    if let Err(error) = stream.set_read_timeout(Some(Duration::from_secs(30))) {
        return Attempt::Failed(io("set a read timeout", error));
    }
    if let Err(error) = (&stream).write_all(format!("CONNECT {port}\n").as_bytes()) {
        return Attempt::NotYet(io("send CONNECT", error));
    }
    let mut reader = BufReader::new(&stream);
    let mut reply = String::new();
    match reader.read_line(&mut reply) {
        Ok(_) if reply.starts_with("OK ") => {}
        Ok(0) => return Attempt::NotYet("cove-vmm closed the connection: nobody listens".into()),
        Ok(_) => return Attempt::NotYet(format!("cove-vmm answered CONNECT with {reply:?}")),
        Err(error) => return Attempt::NotYet(io("read the answer to CONNECT", error)),
    }
    if let Err(error) = (&stream).write_all(format!("{line}\n").as_bytes()) {
        return Attempt::Failed(io("send the line to the guest", error));
    }
    let mut answer = String::new();
    match reader.read_line(&mut answer) {
        Ok(_) => Attempt::Answered(answer.trim_end_matches('\n').to_string()),
        Err(error) => Attempt::Failed(io("read the guest's answer", error)),
    }
}
