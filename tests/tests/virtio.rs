//! cove-vmm's virtio devices driven by the bare-metal test guest's own small drivers, end to
//! end on real KVM: queue notifications through ioeventfds, completions through irqfds on
//! IOAPIC pins, the registers through MMIO exits. The guest halts until each completion's
//! interrupt and reports how each arrived (`interrupts=`, `polled=`); the tests check those
//! counts, every fact the guest prints, and what the host side saw: the bytes in the disk
//! image, the ping the host's kernel answered, the bytes the host's echo server got.
//!
//! The guest's options and output lines are specified in `tests/guest/src/virtio/` (one module
//! per device). The tests need root (a tap in a network namespace of their own) and
//! /dev/kvm; they run one VM at a time, because the guest's time limits are in real time and
//! the development machines have two cores.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cove_tests::{
    require_kvm, scratch_dir, start_vmm_in_own_network_namespace, test_guest, Finished, Vmm,
};

/// Generous: where the hypervisor emulates the guest, a mebibyte over vsock takes a while.
const TIMEOUT: Duration = Duration::from_secs(300);
const SECTOR_SIZE: usize = 512;
const IMAGE_SECTORS: u64 = 2048;
const WRITE_SECTOR: u64 = 8;
const HOST_TEXT: &str = "cove test image: hello from the host";
const HOST_ADDRESS: &str = "192.0.2.1";
const GUEST_ADDRESS: &str = "192.0.2.2";
const GUEST_MAC: &str = "52:54:00:c0:7e:01";
const GUEST_CID: u64 = 3;
const VSOCK_PORT: u32 = 5000;
const VSOCK_BYTES: u64 = 1 << 20;
/// The guest's stream pattern (see `tests/guest/src/virtio/vsock.rs`).
const PATTERN_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// virtio device ids, as the guest prints them.
const TYPE_NET: u32 = 1;
const TYPE_BLOCK: u32 = 2;
const TYPE_RNG: u32 = 4;
const TYPE_VSOCK: u32 = 19;

/// One VM at a time (see the module documentation).
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn require_root() {
    // SAFETY: geteuid() has no preconditions and cannot fail.
    let user = unsafe { libc::geteuid() };
    assert_eq!(
        user, 0,
        "the virtio tests need root: they create a network namespace with a tap in it; \
         run them as root (tools/test does)"
    );
}

/// Boots the test guest with `cpus` vCPUs, `options` on its command line and `devices` as
/// cove-vmm flags, in a network namespace of its own, and waits for it to reset.
fn boot(cpus: u32, options: &str, devices: &[String]) -> Finished {
    require_kvm();
    require_root();
    let _one_vm = ONE_VM_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    let cpus = format!("boot={cpus}");
    let cmdline = format!("exit=reset {options}");
    let mut arguments = vec![
        "--kernel",
        &guest,
        "--cpus",
        &cpus,
        "--memory",
        "size=128M",
        "--cmdline",
        &cmdline,
    ];
    arguments.extend(devices.iter().map(String::as_str));
    let vmm: Vmm = start_vmm_in_own_network_namespace(&arguments);
    let finished = vmm.wait(TIMEOUT);
    assert_eq!(
        finished.status.code(),
        Some(0),
        "console:\n{}\nstderr:\n{}",
        finished.stdout,
        finished.stderr
    );
    assert!(
        finished.values("error:").is_empty()
            && finished.values("cove-test-guest: panic").is_empty(),
        "the guest reported a problem; console:\n{}\nstderr:\n{}",
        finished.stdout,
        finished.stderr
    );
    assert_eq!(
        finished.values("cove-test-guest: "),
        ["hello", "done", "reset"],
        "console:\n{}",
        finished.stdout
    );
    assert_eq!(finished.value("virtio: devices="), devices_count(devices));
    assert_eq!(
        finished.value("virtio: done "),
        "unexpected-interrupts=0",
        "console:\n{}",
        finished.stdout
    );
    finished
}

fn devices_count(devices: &[String]) -> String {
    devices
        .iter()
        .filter(|argument| argument.starts_with("--"))
        .count()
        .to_string()
}

fn path(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// The guest's line for device `slot` of `kind` (`blk`, `net`, ...) that starts with `what`,
/// without that prefix.
fn device_line(finished: &Finished, kind: &str, slot: usize, what: &str) -> String {
    finished.value(&format!("virtio-{kind}: device={slot} {what}"))
}

/// cove-vmm put device `slot` at its place in the MMIO hole and on its IOAPIC pin, and it is
/// the device the guest expects there.
fn assert_announced(finished: &Finished, slot: usize, device_type: u32) {
    assert_eq!(
        finished.value(&format!("virtio: device={slot} ")),
        format!(
            "base={:#x} irq={} type={device_type}",
            0xd000_0000u64 + slot as u64 * 0x1000,
            5 + slot
        )
    );
}

/// How the guest's waits for device `slot` ended.
struct Completions {
    completions: u64,
    interrupts: u64,
    polled: u64,
}

fn completions(finished: &Finished, kind: &str, slot: usize) -> Completions {
    let line = device_line(finished, kind, slot, "completions=");
    let fields: Vec<u64> = line
        .split(' ')
        .enumerate()
        .map(|(index, field)| {
            let value = if index == 0 {
                field
            } else {
                field
                    .split_once('=')
                    .unwrap_or_else(|| panic!("not a count in {line:?}"))
                    .1
            };
            value
                .parse()
                .unwrap_or_else(|_| panic!("not a count in {line:?}"))
        })
        .collect();
    assert_eq!(fields.len(), 3, "{line:?}");
    Completions {
        completions: fields[0],
        interrupts: fields[1],
        polled: fields[2],
    }
}

/// Every completion the guest waited for on device `slot` was announced by the device's
/// interrupt: the irqfd reached the guest through the IOAPIC, at least `minimum` times.
fn assert_completed_by_interrupts(finished: &Finished, kind: &str, slot: usize, minimum: u64) {
    let counts = completions(finished, kind, slot);
    assert_eq!(
        counts.polled, 0,
        "virtio-{kind} device {slot}: completions that no interrupt announced; console:\n{}",
        finished.stdout
    );
    assert!(
        counts.completions >= minimum && counts.interrupts >= 1,
        "virtio-{kind} device {slot}: {} completions, {} interrupts, expected at least {minimum}; console:\n{}",
        counts.completions,
        counts.interrupts,
        finished.stdout
    );
}

// ---- block ----

/// A raw image of [`IMAGE_SECTORS`] sectors with [`HOST_TEXT`] and a newline at sector 0.
fn disk_image(directory: &Path, name: &str) -> PathBuf {
    let image = directory.join(name);
    let mut bytes = vec![0u8; IMAGE_SECTORS as usize * SECTOR_SIZE];
    bytes[..HOST_TEXT.len()].copy_from_slice(HOST_TEXT.as_bytes());
    bytes[HOST_TEXT.len()] = b'\n';
    std::fs::write(&image, bytes).expect("write the disk image");
    image
}

/// What the guest writes to `sector` (see `tests/guest/src/virtio/block.rs`).
fn guest_sector(sector: u64) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..SECTOR_SIZE).map(|offset| offset as u8).collect();
    let marker = format!("cove-test-guest wrote sector {sector}\n");
    bytes[..marker.len()].copy_from_slice(marker.as_bytes());
    bytes
}

/// The guest read the disk's id and sector 0, wrote its pattern to [`WRITE_SECTOR`], read it
/// back and flushed; the image holds the pattern there and nothing else changed.
fn assert_disk_written(finished: &Finished, slot: usize, serial: &str, image: &Path) {
    assert_announced(finished, slot, TYPE_BLOCK);
    assert_eq!(
        device_line(finished, "blk", slot, "capacity="),
        format!("{IMAGE_SECTORS} read-only=no serial={serial}")
    );
    assert_eq!(device_line(finished, "blk", slot, "sector0="), HOST_TEXT);
    assert_eq!(
        device_line(finished, "blk", slot, "write sector="),
        format!("{WRITE_SECTOR} status=ok")
    );
    assert_eq!(
        device_line(finished, "blk", slot, "read-back sector="),
        format!("{WRITE_SECTOR} matches=yes")
    );
    assert_eq!(device_line(finished, "blk", slot, "flush status="), "ok");
    // GET_ID, sector 0, the write, the read-back and the flush, one interrupt each.
    let counts = completions(finished, "blk", slot);
    assert_eq!(
        (counts.completions, counts.interrupts, counts.polled),
        (5, 5, 0),
        "console:\n{}",
        finished.stdout
    );

    let bytes = std::fs::read(image).expect("read the disk image back");
    assert_eq!(bytes.len(), IMAGE_SECTORS as usize * SECTOR_SIZE);
    let sector = |index: u64| &bytes[index as usize * SECTOR_SIZE..][..SECTOR_SIZE];
    assert_eq!(
        sector(WRITE_SECTOR),
        guest_sector(WRITE_SECTOR),
        "the guest's pattern is not in the image at sector {WRITE_SECTOR}"
    );
    assert!(sector(0).starts_with(HOST_TEXT.as_bytes()));
    let others_zero = (1..IMAGE_SECTORS)
        .filter(|&index| index != WRITE_SECTOR)
        .all(|index| sector(index).iter().all(|&byte| byte == 0));
    assert!(others_zero, "the guest changed sectors it did not write");
}

#[test]
fn the_guest_reads_and_writes_a_disk() {
    let directory = scratch_dir("virtio-disk");
    let image = disk_image(&directory, "disk.img");
    let finished = boot(
        1,
        &format!("blk-write={WRITE_SECTOR}"),
        &["--disk".into(), format!("path={},id=data", path(&image))],
    );
    assert_disk_written(&finished, 0, "data", &image);
    std::fs::remove_dir_all(directory).expect("clean up");
}

#[test]
fn a_read_only_disk_refuses_the_guest_write() {
    let directory = scratch_dir("virtio-disk-readonly");
    let image = disk_image(&directory, "golden.img");
    let before = std::fs::read(&image).expect("read the image");
    let finished = boot(
        1,
        &format!("blk-write={WRITE_SECTOR}"),
        &[
            "--disk".into(),
            format!("path={},readonly=on,id=golden", path(&image)),
        ],
    );
    assert_announced(&finished, 0, TYPE_BLOCK);
    assert_eq!(
        device_line(&finished, "blk", 0, "capacity="),
        format!("{IMAGE_SECTORS} read-only=yes serial=golden")
    );
    assert_eq!(device_line(&finished, "blk", 0, "sector0="), HOST_TEXT);
    assert_eq!(
        device_line(&finished, "blk", 0, "write sector="),
        format!("{WRITE_SECTOR} status=ioerr")
    );
    assert!(finished.values("virtio-blk: device=0 read-back").is_empty());
    // GET_ID, sector 0, the refused write and the flush.
    assert_completed_by_interrupts(&finished, "blk", 0, 4);
    assert_eq!(
        std::fs::read(&image).expect("read the image again"),
        before,
        "the read-only image changed"
    );
    std::fs::remove_dir_all(directory).expect("clean up");
}

// ---- network ----

fn net_device() -> [String; 2] {
    [
        "--net".into(),
        format!("ip={HOST_ADDRESS},mask=255.255.255.0,mac={GUEST_MAC}"),
    ]
}

fn net_options() -> String {
    format!("net-ip={GUEST_ADDRESS} net-peer={HOST_ADDRESS}")
}

/// The guest resolved the host's address on the tap with ARP and the host's kernel answered
/// its ping.
fn assert_pinged(finished: &Finished, slot: usize) {
    assert_announced(finished, slot, TYPE_NET);
    assert_eq!(
        device_line(finished, "net", slot, "mac="),
        format!("{GUEST_MAC} ip={GUEST_ADDRESS} peer={HOST_ADDRESS}")
    );
    let host_mac = device_line(
        finished,
        "net",
        slot,
        &format!("arp reply from {HOST_ADDRESS} mac="),
    );
    let octets: Vec<u8> = host_mac
        .split(':')
        .map(|octet| u8::from_str_radix(octet, 16).expect("a MAC address"))
        .collect();
    assert_eq!(octets.len(), 6, "{host_mac:?}");
    assert!(
        octets[0] & 1 == 0 && host_mac != GUEST_MAC,
        "the ARP reply's sender {host_mac} is not the tap"
    );
    let reply = device_line(
        finished,
        "net",
        slot,
        &format!("ping reply from {HOST_ADDRESS} seq="),
    );
    assert!(reply.ends_with(" bytes=56"), "{reply:?}");
    let frames = device_line(finished, "net", slot, "frames sent=");
    let sent: u64 = frames
        .split(' ')
        .next()
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("{frames:?}"));
    assert!(sent >= 2, "{frames:?}");
    // At least the wait for the ARP reply and the one for the echo reply.
    assert_completed_by_interrupts(finished, "net", slot, 2);
}

#[test]
fn the_guest_pings_the_host_through_a_tap() {
    let finished = boot(1, &net_options(), &net_device());
    assert_pinged(&finished, 0);
}

// ---- vsock ----

fn pattern_byte(offset: u64) -> u8 {
    let word = (offset / 8 + 1).wrapping_mul(PATTERN_MULTIPLIER);
    (word >> (8 * (offset % 8))) as u8
}

/// What the host's echo server saw on the one connection the guest made.
#[derive(Debug)]
struct Echoed {
    bytes: u64,
    /// The stream offset of the first byte that was not the guest's pattern.
    mismatch: Option<u64>,
}

/// Listens at `<socket>_<port>`, where cove-vmm connects a guest's connection to host port
/// `port`, and echoes one connection's bytes back, checking them against the guest's pattern.
fn start_echo_server(socket: &Path, port: u32) -> mpsc::Receiver<Result<Echoed, String>> {
    let listening = PathBuf::from(format!("{}_{port}", socket.display()));
    let listener = UnixListener::bind(&listening)
        .unwrap_or_else(|error| panic!("cannot listen at {}: {error}", listening.display()));
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(echo_one_connection(&listener));
    });
    receiver
}

fn echo_one_connection(listener: &UnixListener) -> Result<Echoed, String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("the guest never connected".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => return Err(format!("accept failed: {error}")),
        }
    };
    stream
        .set_nonblocking(false)
        .map_err(|error| error.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|error| error.to_string())?;
    let mut echoed = Echoed {
        bytes: 0,
        mismatch: None,
    };
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let length = match stream.read(&mut buffer) {
            Ok(0) => return Ok(echoed),
            Ok(length) => length,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => {
                return Err(format!("reading after {} bytes: {error}", echoed.bytes));
            }
        };
        if echoed.mismatch.is_none() {
            echoed.mismatch = buffer[..length]
                .iter()
                .zip(echoed.bytes..)
                .find(|&(&byte, offset)| byte != pattern_byte(offset))
                .map(|(_, offset)| offset);
        }
        echoed.bytes += length as u64;
        stream
            .write_all(&buffer[..length])
            .map_err(|error| format!("echoing after {} bytes: {error}", echoed.bytes))?;
    }
}

fn vsock_device(directory: &Path) -> [String; 2] {
    [
        "--vsock".into(),
        format!(
            "cid={GUEST_CID},socket={}",
            directory.join("v.sock").display()
        ),
    ]
}

fn vsock_options() -> String {
    format!("vsock-port={VSOCK_PORT} vsock-bytes={VSOCK_BYTES}")
}

/// The guest connected to the host's echo server, which received the guest's mebibyte intact
/// and sent it back, where the guest checked every byte; the connection ended with the
/// guest's SHUTDOWN and the host's RST.
fn assert_echoed(
    finished: &Finished,
    slot: usize,
    server: &mpsc::Receiver<Result<Echoed, String>>,
) {
    assert_announced(finished, slot, TYPE_VSOCK);
    assert_eq!(
        device_line(finished, "vsock", slot, "guest-cid="),
        GUEST_CID.to_string()
    );
    assert_eq!(
        device_line(finished, "vsock", slot, "connected to cid=2 port="),
        format!("{VSOCK_PORT} from port=49152")
    );
    let transfer = device_line(finished, "vsock", slot, "sent=");
    assert!(
        transfer.starts_with(&format!(
            "{VSOCK_BYTES} received={VSOCK_BYTES} verified=yes credit-updates="
        )),
        "{transfer:?}"
    );
    assert_eq!(
        device_line(finished, "vsock", slot, "shutdown answered by "),
        "rst"
    );
    assert_eq!(device_line(finished, "vsock", slot, "echo "), "ok");
    // At least the waits for RESPONSE and RST.
    assert_completed_by_interrupts(finished, "vsock", slot, 2);

    let echoed = server
        .recv_timeout(Duration::from_secs(30))
        .expect("the echo server finishes once the connection is closed")
        .unwrap_or_else(|error| panic!("echo server: {error}"));
    assert_eq!(echoed.bytes, VSOCK_BYTES, "bytes the host received");
    assert_eq!(echoed.mismatch, None, "where the host saw a wrong byte");
}

#[test]
fn the_guest_has_a_mebibyte_echoed_over_vsock() {
    let directory = scratch_dir("virtio-vsock");
    let server = start_echo_server(&directory.join("v.sock"), VSOCK_PORT);
    let finished = boot(1, &vsock_options(), &vsock_device(&directory));
    assert_echoed(&finished, 0, &server);
    std::fs::remove_dir_all(directory).expect("clean up");
}

// ---- entropy ----

fn assert_random(finished: &Finished, slot: usize) {
    assert_announced(finished, slot, TYPE_RNG);
    assert_eq!(
        device_line(finished, "rng", slot, "read="),
        "64,64 varied=yes distinct=yes"
    );
    let counts = completions(finished, "rng", slot);
    assert_eq!(
        (counts.completions, counts.interrupts, counts.polled),
        (2, 2, 0),
        "console:\n{}",
        finished.stdout
    );
}

#[test]
fn the_guest_reads_random_bytes() {
    let finished = boot(1, "", &["--rng".into()]);
    assert_random(&finished, 0);
}

// ---- all at once ----

/// A disk, a network interface, vsock and rng in one VM, in the order cove-vmm announces
/// them; each works as it does alone.
fn all_devices_at_once(cpus: u32) {
    let directory = scratch_dir(&format!("virtio-all-{cpus}"));
    let image = disk_image(&directory, "disk.img");
    let server = start_echo_server(&directory.join("v.sock"), VSOCK_PORT);
    let mut devices = vec!["--rng".to_string()];
    devices.extend(vsock_device(&directory));
    devices.extend(net_device());
    devices.extend(["--disk".into(), format!("path={},id=all", path(&image))]);
    let options = format!(
        "blk-write={WRITE_SECTOR} {} {}",
        net_options(),
        vsock_options()
    );
    let finished = boot(cpus, &options, &devices);
    assert_eq!(finished.value("cpus-online: "), cpus.to_string());
    // Disks, nets, vsock, rng, whatever the order of the flags.
    assert_disk_written(&finished, 0, "all", &image);
    assert_pinged(&finished, 1);
    assert_echoed(&finished, 2, &server);
    assert_random(&finished, 3);
    std::fs::remove_dir_all(directory).expect("clean up");
}

#[test]
fn all_four_devices_at_once() {
    all_devices_at_once(1);
}

#[test]
fn all_four_devices_with_two_vcpus() {
    all_devices_at_once(2);
}

// ---- the notification path ----

/// Queue notifications reach the devices through KVM ioeventfds, without a VM exit: the
/// devices served the guest's requests, and no QueueNotify write ever reached a transport.
#[test]
fn queue_notifications_reach_the_devices_without_leaving_the_guest() {
    require_kvm();
    let _one_vm = ONE_VM_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let directory = scratch_dir("virtio-ioeventfd");
    let image = disk_image(&directory, "disk.img");
    let socket = directory.join("api.sock");
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    let disk = format!("path={}", path(&image));
    let cmdline = format!("exit=tick blk-write={WRITE_SECTOR}");
    let vmm = Vmm::start(&[
        "--kernel",
        &guest,
        "--cmdline",
        &cmdline,
        "--disk",
        &disk,
        "--rng",
        "--api-socket",
        path(&socket),
    ]);
    vmm.wait_for_console("virtio: done", TIMEOUT);
    let (status, body) = cove_tests::api_request(&socket, "GET", "/api/v1/vm.info");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("vm.info is JSON");
    let devices = info["virtio_devices"].as_array().expect("virtio_devices");
    assert_eq!(devices.len(), 2, "{body}");
    assert_eq!(devices[0]["type"], "block");
    assert!(devices[0]["requests"].as_u64() >= Some(5), "{body}");
    assert_eq!(devices[0]["failed_requests"], 0, "{body}");
    assert_eq!(devices[1]["type"], "rng");
    assert!(devices[1]["bytes_served"].as_u64() >= Some(128), "{body}");
    for device in devices {
        assert_eq!(device["queue_notify_exits"], 0, "{body}");
        assert_eq!(device["ignored_register_accesses"], 0, "{body}");
    }
    let (status, _) = cove_tests::api_request(&socket, "PUT", "/api/v1/vm.shutdown");
    assert_eq!(status, 204);
    let finished = vmm.wait(TIMEOUT);
    assert_eq!(finished.status.code(), Some(0), "{}", finished.stderr);
    std::fs::remove_dir_all(directory).expect("clean up");
}
