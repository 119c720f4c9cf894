//! cove's bare-metal test guest: a kernel that reports on COM1 what the VMM gave it (command
//! line, memory map, modules, processors, ACPI tables), starts every processor, records the
//! boot time, and then ends the way the command line asks.
//!
//! It is built for one of two boot protocols: PVH by default, or Linux's 64-bit boot protocol
//! with the `linux64` feature (`build --linux64`), which leaves out the PVH note and enters
//! at a 64-bit entry point with the zero page instead of `hvm_start_info`. Only the entry
//! (`boot.rs`) and the reader of the boot information differ; the output is the same.
//!
//! The output is a contract with the VMM's integration tests, which parse it line by line:
//!
//! ```text
//! cove-test-guest: hello
//! cmdline: <command line>
//! memory: start=0x<hex> size=0x<hex> type=<decimal>     one per memory map entry
//! memory-ram: <total bytes of type 1>
//! module: start=0x<hex> size=0x<hex>                    one per module
//! modules: <count>
//! mptable: cpus=<processor entries> bsp=<APIC id>
//! acpi: cpus=<enabled local APICs> ioapic=<id>@0x<hex> sleep-control=0x<port hex>
//! cpu-online: apic=<APIC id>                            printed by each application processor
//! cpus-online: <count, bootstrap processor included>
//! boot-timer: written
//! virtio...                                             only with virtio devices, see below
//! cove-test-guest: done
//! ```
//!
//! When the command line announces virtio-mmio devices (`virtio_mmio.device=`), the guest
//! drives each of them after the boot timer, waiting for completions by interrupt: the
//! `virtio:` and `virtio-<kind>:` lines are specified in `virtio/mod.rs` and in each driver
//! (`virtio/block.rs`, `net.rs`, `vsock.rs`, `rng.rs`), the options in `command_line.rs`.
//!
//! With `bench=` on the command line, the guest prints `hello`, runs one benchmark of a virtio
//! device instead of the report (its `bench:` lines are specified in `virtio/bench/mod.rs`)
//! and prints `cove-test-guest: done`.
//!
//! followed by what `exit=` asks for (see `command_line.rs`): `exit=poweroff` prints
//! `cove-test-guest: poweroff` and powers off through ACPI. Problems are reported on lines
//! starting with `error:`, and a panic prints `cove-test-guest: panic: <message>` and resets.
//!
//! The crate is built for x86_64-unknown-linux-gnu as a freestanding static ELF with SSE and
//! x87 disabled (see `.cargo/config.toml` and `build`): the guest must run on a software
//! hypervisor that cannot emulate those instructions in guest kernel mode.

#![no_std]
#![no_main]

mod acpi;
mod boot;
mod boot_information;
mod command_line;
mod cpu;
mod exit;
mod interrupts;
mod memory_builtins;
mod mptable;
mod serial;
mod smp;
#[cfg(not(feature = "linux64"))]
mod start_info;
mod trampoline;
mod user_mode;
mod virtio;
#[cfg(feature = "linux64")]
mod zero_page;

use acpi::Acpi;
use boot_information::{BootInformation, MEMORY_TYPE_RAM};
use command_line::{BenchOptions, Options};
use mptable::{MpTable, MpTableError};
use serial::{println, Console};

/// The IOAPIC's architectural address, for when the ACPI tables are unusable.
const DEFAULT_IOAPIC_ADDRESS: u32 = 0xfec0_0000;

/// A one-byte write of [`BOOT_TIME_MARKER`] here makes cove's boot-timer device record the
/// time the guest took to boot.
const BOOT_TIMER_ADDRESS: usize = 0xc000_0000;
const BOOT_TIME_MARKER: u8 = 123;

/// The bootstrap processor's entry from `boot.rs`, in 64-bit mode on the boot stack, with the
/// address of the boot protocol's structure (`hvm_start_info` or the zero page).
extern "C" fn guest_main(boot_information_address: u64) -> ! {
    Console::lock().text("cove-test-guest: hello").end_line();
    let boot_information =
        BootInformation::read(boot_information_address).unwrap_or_else(|error| {
            panic!("cannot read the boot information at {boot_information_address:#x}: {error}")
        });
    let command_line = boot_information.command_line().unwrap_or_else(|error| {
        println!("error: {error}");
        &[]
    });
    let options = Options::parse(command_line);
    if let Some(bench) = &options.bench {
        let acpi = run_bench(bench, &options, &boot_information);
        Console::lock().text("cove-test-guest: done").end_line();
        exit::perform(options.exit_action, options.tick_loops, acpi.as_ref())
    }
    if options.brief {
        write_boot_timer();
        Console::lock().text("cove-test-guest: done").end_line();
        exit::perform(options.exit_action, options.tick_loops, None)
    }
    Console::lock()
        .text("cmdline: ")
        .bytes(command_line)
        .end_line();

    report_memory_map(&boot_information);
    report_modules(&boot_information);
    let mptable = mptable::find();
    report_mptable(&mptable);
    let acpi = report_acpi(boot_information.rsdp_address());
    // Without an MP table, only this processor runs.
    smp::start_application_processors(mptable.as_ref().map_or(&[], MpTable::processors));

    write_boot_timer();
    Console::lock().text("boot-timer: written").end_line();
    let ioapic_address = acpi
        .as_ref()
        .map_or(DEFAULT_IOAPIC_ADDRESS, |acpi| acpi.ioapic.address);
    virtio::run(&options.virtio, ioapic_address);
    Console::lock().text("cove-test-guest: done").end_line();
    exit::perform(options.exit_action, options.tick_loops, acpi.as_ref())
}

/// `bench=`: no report, no other processors; the ACPI tables only for the IOAPIC's address
/// (the architectural one without them, as under QEMU's microvm with `acpi=off`), the memory
/// map for the benchmark's buffers. Returns the ACPI tables for the exit.
fn run_bench(
    bench: &BenchOptions,
    options: &Options,
    boot_information: &BootInformation,
) -> Option<Acpi> {
    let acpi = Acpi::find(boot_information.rsdp_address()).ok();
    let ioapic_address = acpi
        .as_ref()
        .map_or(DEFAULT_IOAPIC_ADDRESS, |acpi| acpi.ioapic.address);
    match boot_information.memory_map() {
        Ok(entries) => virtio::bench::run(bench, &options.virtio, entries, ioapic_address),
        Err(error) => println!("error: bench: {error}"),
    }
    acpi
}

/// Tells the VMM the guest has booted.
fn write_boot_timer() {
    // SAFETY: the boot-timer device is a VMM MMIO register at this address, inside the
    // uncached 3..4 GiB gigabyte of the identity mapping; a volatile byte store is exactly
    // the access it expects and touches no guest memory.
    unsafe { core::ptr::write_volatile(BOOT_TIMER_ADDRESS as *mut u8, BOOT_TIME_MARKER) };
}

fn report_memory_map(boot_information: &BootInformation) {
    let mut ram_bytes: u64 = 0;
    match boot_information.memory_map() {
        Ok(entries) => {
            for entry in entries {
                Console::lock()
                    .text("memory: start=")
                    .hex(entry.address)
                    .text(" size=")
                    .hex(entry.size)
                    .text(" type=")
                    .decimal(u64::from(entry.entry_type))
                    .end_line();
                if entry.entry_type == MEMORY_TYPE_RAM {
                    ram_bytes = ram_bytes.wrapping_add(entry.size);
                }
            }
        }
        Err(error) => println!("error: {error}"),
    }
    Console::lock()
        .text("memory-ram: ")
        .decimal(ram_bytes)
        .end_line();
}

fn report_modules(boot_information: &BootInformation) {
    let mut count = 0;
    match boot_information.modules() {
        Ok(modules) => {
            for module in modules {
                Console::lock()
                    .text("module: start=")
                    .hex(module.address)
                    .text(" size=")
                    .hex(module.size)
                    .end_line();
                count += 1;
            }
        }
        Err(error) => println!("error: {error}"),
    }
    Console::lock().text("modules: ").decimal(count).end_line();
}

/// Reports the MP table, which lists the processors to start. It is read in `guest_main` and
/// borrowed here: the table is large, and a copy would cost a millisecond where the hypervisor
/// emulates the guest.
fn report_mptable(mptable: &Result<MpTable, MpTableError>) {
    match mptable {
        Ok(table) => {
            let bootstrap_apic_id = table.bootstrap_apic_id().unwrap_or_else(|| {
                println!("error: mptable: no processor entry has the bootstrap flag");
                smp::current_apic_id()
            });
            Console::lock()
                .text("mptable: cpus=")
                .decimal(table.processors().len() as u64)
                .text(" bsp=")
                .decimal(u64::from(bootstrap_apic_id))
                .end_line();
        }
        Err(error) => println!("error: mptable: {error}"),
    }
}

/// Reads the ACPI tables, which `exit=poweroff` needs; the RSDP is searched for when the boot
/// information gives no address.
fn report_acpi(rsdp_address: u64) -> Option<Acpi> {
    match Acpi::find(rsdp_address) {
        Ok(acpi) => {
            Console::lock()
                .text("acpi: cpus=")
                .decimal(acpi.enabled_processors)
                .text(" ioapic=")
                .decimal(u64::from(acpi.ioapic.id))
                .text("@")
                .hex(u64::from(acpi.ioapic.address))
                .text(" sleep-control=")
                .hex(u64::from(acpi.sleep_control_port))
                .end_line();
            Some(acpi)
        }
        Err(error) => {
            println!("error: acpi: {error}");
            None
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    let mut console = Console::lock_for_panic();
    let _ = writeln!(console, "cove-test-guest: panic: {}", info.message());
    drop(console);
    exit::reset()
}
