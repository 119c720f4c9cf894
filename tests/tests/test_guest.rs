//! The bare-metal test guest under cove-vmm on real KVM: it prints what the VMM handed it (the
//! PVH start info's command line and memory map, the MP table), starts its other vCPUs, writes
//! the boot timer and resets. Each test checks those facts against the VM's configuration.

use std::path::Path;
use std::time::Duration;

use cove_tests::{require_kvm, run_vmm, test_guest, test_guest_linux64, Finished, Vmm};

const TIMEOUT: Duration = Duration::from_secs(60);

fn boot(cpus: u32, memory: &str, cmdline: &str) -> Finished {
    boot_guest(test_guest(), cpus, memory, cmdline, &[])
}

/// Boots `guest` (either build of the test guest) with `extra` arguments after the usual ones.
fn boot_guest(guest: &Path, cpus: u32, memory: &str, cmdline: &str, extra: &[&str]) -> Finished {
    require_kvm();
    let guest = guest.to_str().expect("UTF-8 path").to_string();
    let cpus = format!("boot={cpus}");
    let memory = format!("size={memory}");
    let mut arguments = vec![
        "--kernel",
        &guest,
        "--cpus",
        &cpus,
        "--memory",
        &memory,
        "--cmdline",
        cmdline,
    ];
    arguments.extend_from_slice(extra);
    run_vmm(&arguments, TIMEOUT)
}

/// Conventional memory, the reserved ACPI and MP tables' area, then RAM from 1 MiB to 128 MiB.
fn assert_128_mib_map(finished: &Finished) {
    assert_eq!(
        memory_map(finished),
        vec![
            (0, 0x9fc00, 1),
            (0xe_0000, 0x2_0000, 2),
            (0x10_0000, (128 << 20) - 0x10_0000, 1)
        ]
    );
}

/// RAM stops at 3 GiB and the last GiB continues above 4 GiB; the ACPI and MP tables' area is
/// reserved.
fn assert_four_gib_map_with_the_hole(finished: &Finished) {
    assert_eq!(
        memory_map(finished),
        vec![
            (0, 0x9fc00, 1),
            (0xe_0000, 0x2_0000, 2),
            (0x10_0000, 0xc000_0000 - 0x10_0000, 1),
            (0x1_0000_0000, 0x4000_0000, 1)
        ]
    );
    let total = 0x9fc00u64 + (0xc000_0000 - 0x10_0000) + 0x4000_0000;
    assert_eq!(finished.value("memory-ram: "), total.to_string());
}

/// A 12345-byte `--initramfs` reaches `guest` as one module, page-aligned at the top of 64 MiB
/// of RAM.
fn assert_initramfs_handed_over(guest: &Path, scratch: &str) {
    let dir = cove_tests::scratch_dir(scratch);
    let initramfs = dir.join("initramfs.bin");
    std::fs::write(&initramfs, vec![0x5a; 12345]).expect("write the initramfs");
    let finished = boot_guest(
        guest,
        1,
        "64M",
        "exit=reset",
        &["--initramfs", initramfs.to_str().expect("UTF-8")],
    );
    assert_eq!(
        finished.status.code(),
        Some(0),
        "stderr:\n{}",
        finished.stderr
    );
    assert_eq!(finished.value("modules: "), "1");
    let start = ((64u64 << 20) - 12345) & !0xfff;
    assert_eq!(
        finished.value("module: "),
        format!("start={start:#x} size=0x3039")
    );
    std::fs::remove_dir_all(dir).expect("clean up");
}

/// The guest's memory map as (start, size, type).
fn memory_map(finished: &Finished) -> Vec<(u64, u64, u32)> {
    finished
        .values("memory: ")
        .iter()
        .map(|line| {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|part| part.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                    .to_string()
            };
            let hex =
                |text: String| u64::from_str_radix(text.trim_start_matches("0x"), 16).expect("hex");
            (
                hex(field("start=")),
                hex(field("size=")),
                field("type=").parse().expect("type"),
            )
        })
        .collect()
}

fn assert_booted(finished: &Finished, cpus: u32, cmdline: &str) {
    assert_eq!(
        finished.status.code(),
        Some(0),
        "stderr:\n{}",
        finished.stderr
    );
    assert_eq!(
        finished.values("cove-test-guest: "),
        ["hello", "done", "reset"],
        "console:\n{}",
        finished.stdout
    );
    assert_eq!(finished.value("cmdline: "), cmdline);
    assert_eq!(finished.value("mptable: "), format!("cpus={cpus} bsp=0"));
    assert_eq!(finished.value("cpus-online: "), cpus.to_string());
    let mut online: Vec<u32> = finished
        .values("cpu-online: apic=")
        .iter()
        .map(|id| id.parse().expect("APIC ID"))
        .collect();
    online.sort_unstable();
    assert_eq!(
        online,
        (1..cpus).collect::<Vec<_>>(),
        "every AP announces itself once"
    );
    assert_eq!(finished.value("boot-timer: "), "written");
    assert!(
        finished.stderr.contains("guest boot time: "),
        "stderr:\n{}",
        finished.stderr
    );
    assert!(finished
        .stderr
        .contains("VM stopped: the guest reset the machine"));
}

#[test]
fn one_vcpu_and_128_mib() {
    let finished = boot(1, "128M", "exit=reset hello=world");
    assert_booted(&finished, 1, "exit=reset hello=world");
    assert_128_mib_map(&finished);
    assert_eq!(
        finished.value("memory-ram: "),
        ((128 << 20) - 0x10_0000 + 0x9fc00u64).to_string()
    );
    assert_eq!(finished.value("modules: "), "0");
}

#[test]
fn two_vcpus_start_and_announce_themselves() {
    let finished = boot(2, "128M", "exit=reset");
    assert_booted(&finished, 2, "exit=reset");
}

#[test]
fn four_vcpus_and_4_gib_with_the_mmio_hole() {
    let finished = boot(4, "4G", "exit=reset");
    assert_booted(&finished, 4, "exit=reset");
    assert_four_gib_map_with_the_hole(&finished);
}

#[test]
fn an_initramfs_is_handed_over_as_a_pvh_module() {
    assert_initramfs_handed_over(test_guest(), "module");
}

#[test]
fn a_triple_fault_ends_the_vmm_with_a_failure() {
    let finished = boot(1, "64M", "exit=triple-fault");
    assert_eq!(
        finished.status.code(),
        Some(2),
        "stderr:\n{}",
        finished.stderr
    );
    assert!(finished.stdout.contains("cove-test-guest: done"));
    assert!(
        finished
            .stderr
            .contains("the guest triple-faulted on vCPU 0 at RIP 0x"),
        "stderr:\n{}",
        finished.stderr
    );
}

#[test]
fn an_instruction_the_host_cannot_emulate_is_reported_not_hung() {
    let finished = boot(1, "64M", "exit=cmpxchg16b");
    if cove_tests::host_is_kvm_pvm() {
        // kvm-pvm emulates guest kernel code and has no cmpxchg16b: cove-vmm must say so.
        eprintln!("kvm-pvm host: expecting the internal-error report");
        assert_eq!(
            finished.status.code(),
            Some(2),
            "stderr:\n{}",
            finished.stderr
        );
        assert!(
            finished.stderr.contains("KVM internal error on vCPU 0"),
            "{}",
            finished.stderr
        );
        assert!(
            finished
                .stderr
                .contains("instruction emulation failed (suberror 1)"),
            "{}",
            finished.stderr
        );
        // lock cmpxchg16b: F0 48 0F C7 /1
        assert!(
            finished.stderr.contains("instruction bytes [f0 48 0f c7"),
            "{}",
            finished.stderr
        );
    } else {
        eprintln!("hardware-virtualised host: expecting the guest to run the instruction");
        assert_eq!(
            finished.status.code(),
            Some(0),
            "stderr:\n{}",
            finished.stderr
        );
        assert_eq!(finished.value("cmpxchg16b: "), "ok");
    }
}

#[test]
fn sigterm_stops_a_running_guest() {
    require_kvm();
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    let vmm = Vmm::start(&["--kernel", &guest, "--cmdline", "exit=tick", "--cpus", "2"]);
    vmm.wait_for_console("tick 2", TIMEOUT);
    vmm.signal(libc::SIGTERM);
    let finished = vmm.wait(TIMEOUT);
    assert_eq!(
        finished.status.code(),
        Some(0),
        "stderr:\n{}",
        finished.stderr
    );
    assert!(
        finished.stderr.contains("VM stopped: stopped by signal 15"),
        "{}",
        finished.stderr
    );
}

#[test]
fn serial_output_can_go_to_a_file_or_nowhere() {
    require_kvm();
    let dir = cove_tests::scratch_dir("serial");
    let console = dir.join("console.log");
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    let serial = format!("file={}", console.display());
    let to_file = run_vmm(&["--kernel", &guest, "--serial", &serial], TIMEOUT);
    assert_eq!(
        to_file.status.code(),
        Some(0),
        "stderr:\n{}",
        to_file.stderr
    );
    assert_eq!(to_file.stdout, "");
    let written = std::fs::read_to_string(&console).expect("read the console file");
    assert!(written.contains("cove-test-guest: done"), "{written}");

    let silent = run_vmm(&["--kernel", &guest, "--serial", "off"], TIMEOUT);
    assert_eq!(silent.status.code(), Some(0), "stderr:\n{}", silent.stderr);
    assert_eq!(silent.stdout, "");
    assert!(silent.stderr.contains("guest boot time: "));
    std::fs::remove_dir_all(dir).expect("clean up");
}

#[test]
fn a_json_config_file_gives_the_same_vm() {
    require_kvm();
    let dir = cove_tests::scratch_dir("config");
    let config = dir.join("vm.json");
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    let json = serde_json::json!({
        "kernel": { "path": guest, "cmdline": "exit=reset from=json" },
        "cpus": { "boot": 2 },
        "memory": { "size": "96M" },
    });
    std::fs::write(&config, json.to_string()).expect("write the config");
    let finished = run_vmm(&["--config", config.to_str().expect("UTF-8")], TIMEOUT);
    assert_booted(&finished, 2, "exit=reset from=json");
    assert_eq!(
        memory_map(&finished)[2],
        (0x10_0000, (96 << 20) - 0x10_0000, 1)
    );
    std::fs::remove_dir_all(dir).expect("clean up");
}

/// Boots the test guest built for Linux's 64-bit boot protocol: its ELF has no PVH note, so
/// cove-vmm enters it in long mode with `rsi` at the zero page. That build reads only the zero
/// page (its setup header must say "HdrS"), so a guest entered through PVH would panic rather
/// than pass these tests.
fn boot_linux64(cpus: u32, memory: &str, cmdline: &str) -> Finished {
    boot_guest(test_guest_linux64(), cpus, memory, cmdline, &[])
}

#[test]
fn linux64_two_vcpus_read_the_zero_page() {
    let finished = boot_linux64(2, "128M", "exit=reset from=zero-page");
    assert_booted(&finished, 2, "exit=reset from=zero-page");
    assert_128_mib_map(&finished);
    assert_eq!(finished.value("modules: "), "0");
}

#[test]
fn linux64_four_vcpus_and_4_gib_with_the_mmio_hole() {
    let finished = boot_linux64(4, "4G", "exit=reset");
    assert_booted(&finished, 4, "exit=reset");
    // The loader's page tables map only the first GiB: the guest got this far, and wrote the
    // boot timer at 3 GiB, on its own.
    assert_four_gib_map_with_the_hole(&finished);
}

#[test]
fn linux64_an_initramfs_is_handed_over_in_the_zero_page() {
    // ramdisk_image and ramdisk_size in the zero page.
    assert_initramfs_handed_over(test_guest_linux64(), "linux64-initramfs");
}

/// Fails with the console when the guest reported a problem.
fn assert_no_error_lines(finished: &Finished) {
    assert!(
        finished.values("error:").is_empty(),
        "console:\n{}",
        finished.stdout
    );
}

#[test]
fn acpi_tables_list_every_vcpu_the_ioapic_and_the_sleep_control_port() {
    let finished = boot(3, "128M", "exit=reset");
    assert_booted(&finished, 3, "exit=reset");
    // The RSDP comes from the PVH start info; the MADT agrees with the MP table.
    assert_eq!(
        finished.value("acpi: "),
        "cpus=3 ioapic=3@0xfec00000 sleep-control=0x600"
    );
    assert_no_error_lines(&finished);
}

#[test]
fn linux64_two_vcpus_read_the_acpi_tables() {
    let finished = boot_linux64(2, "128M", "exit=reset");
    assert_booted(&finished, 2, "exit=reset");
    assert_eq!(
        finished.value("acpi: "),
        "cpus=2 ioapic=2@0xfec00000 sleep-control=0x600"
    );
    assert_no_error_lines(&finished);
}

#[test]
fn the_guest_powers_off_through_acpi_soft_off() {
    let finished = boot(2, "64M", "exit=poweroff");
    assert_eq!(
        finished.status.code(),
        Some(0),
        "stderr:\n{}",
        finished.stderr
    );
    assert_eq!(
        finished.values("cove-test-guest: "),
        ["hello", "done", "poweroff"],
        "console:\n{}",
        finished.stdout
    );
    // The guest falls back to a reset, with an error line, if the soft-off write returns.
    assert_no_error_lines(&finished);
    assert!(
        finished
            .stderr
            .contains("VM stopped: the guest powered off"),
        "stderr:\n{}",
        finished.stderr
    );
}

#[test]
fn brief_mode_boots_straight_to_its_exit() {
    let finished = boot(2, "64M", "brief exit=reset");
    assert_eq!(
        finished.status.code(),
        Some(0),
        "stderr:\n{}",
        finished.stderr
    );
    let lines: Vec<&str> = finished.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "cove-test-guest: hello",
            "cove-test-guest: done",
            "cove-test-guest: reset"
        ]
    );
    assert!(
        finished.stderr.contains("guest boot time: "),
        "{}",
        finished.stderr
    );
}
