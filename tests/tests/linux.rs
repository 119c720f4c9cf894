//! Linux guests under cove-vmm: the project's own kernel with its busybox initramfs reaching
//! userspace, and Debian's stock cloud kernel (a bzImage) showing what cove-vmm gave it.
//!
//! On a host with VT-x/AMD-V both reach their init in seconds. On kvm-pvm, where guest kernel
//! code is emulated, the project kernel's kvm-pvm flavour needs minutes (this is the suite's one
//! long test), and the stock kernel cannot boot at all: it gets as far as reporting its command
//! line, memory map and CPUs, then cove-vmm ends it with an emulation-failure report. Each test
//! says which case it saw.

use std::time::Duration;

use cove_tests::{built_by, host_is_kvm_pvm, require_kvm, run_vmm};

/// Generous: on kvm-pvm a boot takes minutes, and CI machines are shared.
const LINUX_TIMEOUT: Duration = Duration::from_secs(20 * 60);

fn path(path: &std::path::Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}

/// Boots `kernel` with the project's initramfs, 2 vCPUs and 512 MiB.
fn boot_with_initramfs(kernel: &std::path::Path, cmdline: &str) -> cove_tests::Finished {
    let initramfs = built_by("resources/build-initramfs", &[]);
    run_vmm(
        &[
            "--kernel",
            &path(kernel),
            "--initramfs",
            &path(&initramfs),
            "--cpus",
            "boot=2",
            "--memory",
            "size=512M",
            "--cmdline",
            cmdline,
        ],
        LINUX_TIMEOUT,
    )
}

#[test]
fn project_kernel_reaches_its_init_with_two_vcpus_and_512_mib() {
    require_kvm();
    let kernel = built_by("resources/build-kernel", &[]);
    let cmdline = "console=ttyS0 reboot=k panic=-1 rodata=off cove.test=project-kernel";
    let finished = boot_with_initramfs(&kernel, cmdline);
    eprintln!(
        "{} host: the project kernel ({})",
        if host_is_kvm_pvm() {
            "kvm-pvm"
        } else {
            "hardware-virtualised"
        },
        kernel.display()
    );
    assert_eq!(
        finished.status.code(),
        Some(0),
        "console:\n{}\nstderr:\n{}",
        finished.stdout,
        finished.stderr
    );
    let ready = finished.value("cove-init: ready ");
    let mut fields = ready.split(' ');
    assert_eq!(
        fields.next(),
        Some("cpus=2"),
        "init sees both vCPUs: {ready}"
    );
    let memory_kib: u64 = fields
        .next()
        .and_then(|field| field.strip_prefix("memtotal_kb="))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no memtotal_kb in {ready:?}"));
    // MemTotal is the RAM the kernel manages: the 512 MiB minus the kernel's own image and
    // reservations.
    assert!(
        (400 * 1024..512 * 1024).contains(&memory_kib),
        "MemTotal {memory_kib} kB for 512 MiB"
    );
    assert!(
        finished.stdout.contains(cmdline),
        "the kernel echoes its command line"
    );
    assert!(
        finished.stderr.contains("guest boot time: "),
        "init wrote the boot timer:\n{}",
        finished.stderr
    );
    assert!(
        finished
            .stderr
            .contains("VM stopped: the guest reset the machine"),
        "{}",
        finished.stderr
    );
}

#[test]
fn debian_cloud_kernel_bzimage_sees_the_command_line_memory_and_vcpus() {
    require_kvm();
    let kernel = built_by("resources/fetch-debian-kernel", &[]);
    let cmdline =
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 cove.test=bzimage";
    let finished = boot_with_initramfs(&kernel, cmdline);
    let console = &finished.stdout;
    let context = format!("console:\n{console}\nstderr:\n{}", finished.stderr);
    // The kernel's own early output: what the bzImage was handed through the zero page.
    assert!(
        console.contains(&format!("Command line: {cmdline}")),
        "{context}"
    );
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "{context}"
    );
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"),
        "{context}"
    );
    assert!(
        console.contains("smpboot: Allowing 2 CPUs"),
        "the ACPI MADT lists both vCPUs\n{context}"
    );
    if host_is_kvm_pvm() {
        eprintln!("kvm-pvm host: the stock kernel cannot boot here; expecting cove-vmm's emulation-failure report");
        assert_eq!(finished.status.code(), Some(2), "{context}");
        assert!(
            finished.stderr.contains("KVM internal error on vCPU"),
            "{context}"
        );
        assert!(finished.stderr.contains("instruction bytes ["), "{context}");
    } else {
        eprintln!("hardware-virtualised host: expecting the stock kernel to reach the initramfs");
        assert_eq!(finished.status.code(), Some(0), "{context}");
        assert!(
            finished.value("cove-init: ready ").starts_with("cpus=2 "),
            "{context}"
        );
    }
}
