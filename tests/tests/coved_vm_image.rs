//! VM images (LXD's `type: virtual-machine` images: `metadata.yaml` plus a disk,
//! `rootfs.img`) through coved, as Debian's `lxc` and `cove` import and launch them, and VMs on
//! a managed network.
//!
//! The disk is the busybox test image's rootfs as a raw ext4 file system (`mkfs.ext4 -d`):
//! cove boots its own kernel with `root=/dev/vda`, so a qcow2 or partitioned disk is refused
//! at import, leaving nothing. Debian's lxc 5.0 sends a split VM image (`lxc image import META
//! DISK`) only when the disk is qcow2 and refuses a raw one itself ("Unsupported
//! compression"), so with lxc the unified tarball is the form that works; `cove image import
//! META DISK` sends the split form.
//!
//! One boot in all (20 to 70 s each on a kvm-pvm host): a VM from the VM image, launched with
//! `lxc launch --vm` in a network namespace the test makes, on coved's managed network with a
//! static `ipv4.address` that busybox's `udhcpc` (run through exec) must get. Run as root.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cove_tests::container::{busybox_image, in_private_network, require_root};
use cove_tests::coved::{processes_mentioning, Coved};
use cove_tests::{host_is_kvm_pvm, kernel_release, project_kernel, require_kvm};
use serde_json::{json, Value};

const OPT_IN: &str = "boot.allow_emulated_kvm";

/// What busybox's `udhcpc` runs with the lease: the address and the default route.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
bound|renew)
    ip -4 address flush dev "$interface"
    ip address add "$ip/$mask" dev "$interface"
    for gateway in $router; do ip route replace default via "$gateway" dev "$interface"; break; done
    ;;
esac
"#;

fn path(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}

fn run(command: &mut Command) {
    let output = command.output().expect("run a command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The files of a VM image in `directory`: `metadata.yaml`, the busybox rootfs as a raw ext4
/// `rootfs.img`, the unified tarball of both and the metadata tarball alone.
struct VmImageFiles {
    disk: PathBuf,
    unified: PathBuf,
    metadata: PathBuf,
}

fn vm_image_files(directory: &Path) -> VmImageFiles {
    std::fs::create_dir_all(directory).expect("create the image directory");
    std::fs::write(
        directory.join("metadata.yaml"),
        "architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  description: busybox \
         VM\n  os: busybox\n  release: test\n",
    )
    .expect("write metadata.yaml");
    let disk = directory.join("rootfs.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "busybox-vm", "-d"])
        .arg(busybox_image())
        .arg(&disk)
        .arg("64M"));
    let unified = directory.join("busybox-vm.tar.gz");
    run(Command::new("tar")
        .arg("-cSzf")
        .arg(&unified)
        .arg("-C")
        .arg(directory)
        .args(["metadata.yaml", "rootfs.img"]));
    let metadata = directory.join("busybox-vm-metadata.tar.xz");
    run(Command::new("tar")
        .arg("-cJf")
        .arg(&metadata)
        .arg("-C")
        .arg(directory)
        .arg("metadata.yaml"));
    VmImageFiles {
        disk,
        unified,
        metadata,
    }
}

fn sha256_of(files: &[&Path]) -> String {
    let output = Command::new("sh")
        .arg("-c")
        .arg("cat \"$@\" | sha256sum")
        .arg("sh")
        .args(files)
        .output()
        .expect("run sha256sum");
    assert!(output.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Image fingerprints coved has, and what lies in its image and staging directories.
fn image_state(coved: &Coved) -> (Value, Vec<String>) {
    let mut files: Vec<String> = ["images", "images/.staging"]
        .iter()
        .flat_map(|folder| std::fs::read_dir(coved.directory.join(folder)).into_iter())
        .flatten()
        .flatten()
        .map(|entry| entry.path().display().to_string())
        .collect();
    files.sort();
    (coved.get("/1.0/images"), files)
}

/// `type` of the image behind an alias.
fn image_type(coved: &Coved, alias: &str) -> Value {
    let target = coved.get(&format!("/1.0/images/aliases/{alias}"))["target"].clone();
    coved.get(&format!(
        "/1.0/images/{}",
        target.as_str().unwrap_or_default()
    ))["type"]
        .clone()
}

#[test]
fn vm_images_import_with_lxc_and_cove_and_bad_disks_or_containers_are_refused() {
    require_root();
    let coved = Coved::start("vm-image-import", &[]);
    let files = vm_image_files(&coved.directory.join("vm-image"));

    // The unified tarball through Debian's lxc: a virtual-machine image named by the SHA-256
    // of the file, shown as such by `lxc image list`.
    coved.lxc_ok(&[
        "image",
        "import",
        &path(&files.unified),
        "--alias",
        "busybox-vm",
    ]);
    assert_eq!(image_type(&coved, "busybox-vm"), "virtual-machine");
    let fingerprint = coved.get("/1.0/images/aliases/busybox-vm")["target"].clone();
    assert_eq!(fingerprint, sha256_of(&[&files.unified]));
    assert_eq!(
        coved.get("/1.0/images/aliases/busybox-vm")["type"],
        "virtual-machine"
    );
    let listed = coved.lxc_ok(&["image", "list", "--format", "csv", "-c", "lt"]);
    assert!(
        listed.contains("busybox-vm,VIRTUAL-MACHINE"),
        "lxc image list shows the type: {listed}"
    );

    // The split form through `cove image import META DISK` (the disk goes as `rootfs.img`):
    // named by the SHA-256 of both files, in order.
    let output = coved.cove(&[
        "image",
        "import",
        &path(&files.metadata),
        &path(&files.disk),
        "--alias",
        "busybox-vm-split",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(image_type(&coved, "busybox-vm-split"), "virtual-machine");
    assert_eq!(
        coved.get("/1.0/images/aliases/busybox-vm-split")["target"],
        sha256_of(&[&files.metadata, &files.disk])
    );

    // Debian's lxc refuses a raw disk as the second file itself; a qcow2 one it sends as
    // `rootfs.img`, and coved refuses it saying what it takes. A partitioned disk in a unified
    // tarball is refused too. Nothing is left of either.
    let before = image_state(&coved);
    let bad = coved.directory.join("bad-disks");
    std::fs::create_dir_all(&bad).expect("create a directory");
    let mut qcow2 = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    qcow2.resize(4096, 0);
    std::fs::write(bad.join("disk.qcow2"), &qcow2).expect("write a qcow2 header");
    let output = coved.lxc(&[
        "image",
        "import",
        &path(&files.metadata),
        &path(&bad.join("disk.qcow2")),
    ]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("qcow2") && text(&output).contains("raw ext4"),
        "{}",
        text(&output)
    );
    let mut partitioned = vec![0u8; 1 << 20];
    partitioned[510] = 0x55;
    partitioned[511] = 0xaa;
    partitioned[512..520].copy_from_slice(b"EFI PART");
    std::fs::write(bad.join("rootfs.img"), &partitioned).expect("write a partitioned disk");
    std::fs::copy(
        files.disk.with_file_name("metadata.yaml"),
        bad.join("metadata.yaml"),
    )
    .expect("copy metadata.yaml");
    run(Command::new("tar")
        .arg("-cf")
        .arg(bad.join("partitioned.tar"))
        .arg("-C")
        .arg(&bad)
        .args(["metadata.yaml", "rootfs.img"]));
    let output = coved.lxc(&["image", "import", &path(&bad.join("partitioned.tar"))]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("partitioned disk"),
        "{}",
        text(&output)
    );
    assert_eq!(image_state(&coved), before, "the refusals left nothing");

    // A container from a VM image is refused (as LXD refuses it), with nothing made.
    let response = coved.request(
        "POST",
        "/1.0/instances",
        Some(json!({
            "name": "c1", "type": "container",
            "source": {"type": "image", "alias": "busybox-vm"},
        })),
    );
    let body = response.json();
    assert_eq!(response.status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("doesn't match instance type"),
        "{body}"
    );
    assert_eq!(coved.get("/1.0/instances"), json!([]));
    assert!(
        !coved
            .directory
            .join("storage-pools/default/containers/c1")
            .exists()
            && !coved
                .directory
                .join("storage-pools/default/virtual-machines/c1")
                .exists(),
        "no instance directory was made"
    );

    // Deleting the images removes their disks.
    for alias in ["busybox-vm", "busybox-vm-split"] {
        coved.lxc_ok(&["image", "delete", alias]);
    }
    assert_eq!(coved.get("/1.0/images"), json!([]));
}

/// The address on the VM's eth0, as coved's state reports it.
/// Stops the network's dnsmasq when the test ends, pass or fail: it outlives coved by design
/// and would otherwise keep the test's network namespace alive. Holds coved's directory, which
/// the dnsmasq command line names.
struct StopDnsmasq(Option<PathBuf>);

impl Drop for StopDnsmasq {
    fn drop(&mut self) {
        let Some(directory) = &self.0 else {
            return;
        };
        for (pid, line) in processes_mentioning(&path(directory)) {
            let program = line.split('\0').next().unwrap_or_default();
            if program.ends_with("dnsmasq") {
                // SAFETY: kill(2) takes no pointers; the pid is this test's dnsmasq.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
    }
}

fn address(coved: &Coved, name: &str) -> Option<Ipv4Addr> {
    let state = coved.get(&format!("/1.0/instances/{name}/state"));
    state["network"]["eth0"]["addresses"]
        .as_array()?
        .iter()
        .find(|address| address["family"] == "inet")
        .and_then(|address| address["address"].as_str()?.parse().ok())
}

#[test]
fn a_vm_from_a_vm_image_launches_with_lxc_and_gets_its_static_address_on_a_managed_network() {
    require_kvm();
    if !host_is_kvm_pvm() {
        eprintln!(
            "note: this host has hardware virtualisation; the opt-in key is set anyway and \
             changes nothing there"
        );
    }
    in_private_network(|| {
        // Declared before coved, so that it runs after coved is gone and cannot restart it.
        let mut stop_dnsmasq = StopDnsmasq(None);
        let coved = Coved::start_with_vms("vm-image-launch", &["--default-network", "covebr0"]);
        stop_dnsmasq.0 = Some(coved.directory.clone());
        let files = vm_image_files(&coved.directory.join("vm-image"));
        coved.lxc_ok(&[
            "image",
            "import",
            &path(&files.unified),
            "--alias",
            "busybox-vm",
        ]);

        let network = coved.get("/1.0/networks/covebr0");
        let gateway_text = network["config"]["ipv4.address"]
            .as_str()
            .expect("the network's ipv4.address")
            .to_string();
        let (gateway, _) = gateway_text.split_once('/').expect("ADDRESS/PREFIX");
        let gateway: Ipv4Addr = gateway.parse().expect("an IPv4 gateway");
        let [a, b, c, _] = gateway.octets();
        let wanted = Ipv4Addr::new(a, b, c, 77);

        // The static address comes through a profile, so the launch is a plain `lxc launch`.
        coved.lxc_ok(&["profile", "create", "fixed"]);
        coved.lxc_ok(&[
            "profile",
            "device",
            "add",
            "fixed",
            "eth0",
            "nic",
            "network=covebr0",
            &format!("ipv4.address={wanted}"),
        ]);
        let name = "v1";
        coved.lxc_ok(&[
            "launch",
            "busybox-vm",
            name,
            "--vm",
            "-p",
            "default",
            "-p",
            "fixed",
            "-c",
            &format!("{OPT_IN}=true"),
            "-c",
            "limits.memory=256MiB",
        ]);
        let shown = coved.get(&format!("/1.0/instances/{name}"));
        assert_eq!(shown["type"], "virtual-machine", "{shown}");
        assert_eq!(shown["status"], "Running", "{shown}");

        let released = coved.lxc_ok(&["exec", name, "--", "uname", "-r"]);
        assert_eq!(
            released.trim(),
            kernel_release(project_kernel()).expect("kernelrelease= in build-info")
        );

        // Its tap is on the managed network's bridge, and dnsmasq hands it the static
        // address (the hosts file names the VM's MAC).
        let on_bridge = cove_tests::container::ip(&["-o", "link", "show", "master", "covebr0"]);
        assert!(
            on_bridge.contains("covevm"),
            "the tap is on covebr0: {on_bridge}"
        );
        let (code, stdout, stderr) = coved.exec(
            name,
            &[
                "sh",
                "-c",
                "cat > /udhcpc.script && chmod 755 /udhcpc.script",
            ],
            UDHCPC_SCRIPT.as_bytes(),
        );
        assert_eq!(code, 0, "{stdout}{stderr}");
        let (code, stdout, stderr) = coved.exec(
            name,
            &[
                "sh",
                "-c",
                &format!(
                    "ip link set eth0 up && udhcpc -i eth0 -q -n -t 20 -T 2 -s /udhcpc.script \
                     && ping -c 1 -W 10 {gateway} >/dev/null && echo reached"
                ),
            ],
            b"",
        );
        assert_eq!(code, 0, "{stdout}{stderr}\n{}", coved.log());
        assert!(
            stdout.contains("reached"),
            "the VM reaches the gateway: {stdout}"
        );
        assert_eq!(address(&coved, name), Some(wanted));
        let listed = coved.lxc_ok(&["list", name, "--format", "csv", "-c", "ns4t"]);
        assert!(
            listed.contains("RUNNING")
                && listed.contains(&wanted.to_string())
                && listed.contains("VIRTUAL-MACHINE"),
            "lxc list shows the VM and its address: {listed}"
        );
        let leases = coved.get("/1.0/networks/covebr0/leases");
        assert!(
            leases.as_array().is_some_and(|leases| leases
                .iter()
                .any(|lease| lease["hostname"] == name && lease["address"] == wanted.to_string())),
            "{leases}"
        );

        coved.lxc_ok(&["stop", name]);
        assert_eq!(coved.status(name), "Stopped");
        coved.lxc_ok(&["delete", name]);
        assert_eq!(coved.get("/1.0/instances"), json!([]));
        assert!(
            processes_mentioning(&path(&coved.directory))
                .iter()
                .all(|(_, line)| !line
                    .split('\0')
                    .next()
                    .is_some_and(|program| program.ends_with("cove-vmm"))),
            "no cove-vmm runs"
        );
        assert!(
            !cove_tests::container::ip(&["-o", "link"]).contains("covevm"),
            "no tap remains"
        );
    });
}
