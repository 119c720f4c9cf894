//! Starting the application processors with INIT and startup IPIs through the xAPIC, and
//! the code each of them runs once it reaches 64-bit mode.
//!
//! The bootstrap processor copies the trampoline below 1 MiB, sends INIT to every
//! application processor the MP table lists, then two startup IPIs each, and waits (bounded)
//! for them to check in. Each application processor prints its own `cpu-online` line, marks
//! itself online and halts. All shared state is integer atomics.

use crate::boot::MAX_APPLICATION_PROCESSORS;
use crate::cpu;
use crate::mptable::{Processor, MAX_PROCESSORS};
use crate::serial::{println, Console};
use crate::trampoline::{self, STARTUP_VECTOR};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The xAPIC registers, memory-mapped at their architectural default address. The boot page
/// tables map this gigabyte uncached.
const LOCAL_APIC_BASE: usize = 0xfee0_0000;
const REGISTER_ID: usize = 0x20;
const REGISTER_SPURIOUS_VECTOR: usize = 0xf0;
const REGISTER_COMMAND_LOW: usize = 0x300;
const REGISTER_COMMAND_HIGH: usize = 0x310;

const SPURIOUS_VECTOR_APIC_ENABLE: u32 = 1 << 8;
const SPURIOUS_VECTOR: u32 = 0xff;
const COMMAND_DELIVERY_PENDING: u32 = 1 << 12;
/// Delivery mode INIT, level assert.
const COMMAND_INIT: u32 = 0x0000_4500;
/// Delivery mode start-up, level assert; the vector goes in the low byte.
const COMMAND_STARTUP: u32 = 0x0000_4600;

/// The MP specification waits 10 ms after INIT and 200 us after each startup IPI. Under a
/// hypervisor INIT takes effect before a later startup IPI without any wait (as Linux also
/// assumes), so the 10 ms is only spent on bare metal; it would dominate the boot time.
const INIT_DELAY_MICROSECONDS: u64 = 10_000;
const STARTUP_DELAY_MICROSECONDS: u64 = 200;
/// CPUID leaf 1, ECX bit 31: running under a hypervisor.
const CPUID_FEATURES: u32 = 1;
const CPUID_FEATURES_ECX_HYPERVISOR: u32 = 1 << 31;
/// How long to wait for all application processors to check in before reporting the missing
/// ones. Generous, because emulators without hardware acceleration start processors slowly.
const ONLINE_TIMEOUT_MICROSECONDS: u64 = 2_000_000;

/// Application processors that have printed their line, and which APIC ids they were.
static ONLINE_COUNT: AtomicU32 = AtomicU32::new(0);
static ONLINE_BY_APIC_ID: [AtomicBool; MAX_PROCESSORS] =
    [const { AtomicBool::new(false) }; MAX_PROCESSORS];

pub fn read_local_apic(register: usize) -> u32 {
    // SAFETY: the xAPIC page is identity-mapped uncached by the boot page tables, and the
    // register offsets used are architectural, 16-byte aligned 32-bit registers.
    unsafe { core::ptr::read_volatile((LOCAL_APIC_BASE + register) as *const u32) }
}

pub fn write_local_apic(register: usize, value: u32) {
    // SAFETY: as for `read_local_apic`; writes to these registers only configure this
    // processor's APIC, send IPIs or signal the end of an interrupt.
    unsafe { core::ptr::write_volatile((LOCAL_APIC_BASE + register) as *mut u32, value) }
}

/// The APIC id of the processor this runs on.
pub fn current_apic_id() -> u8 {
    (read_local_apic(REGISTER_ID) >> 24) as u8
}

/// Sends one IPI to `apic_id` and waits (bounded) until the APIC has delivered it.
fn send_ipi(apic_id: u8, command: u32) {
    write_local_apic(REGISTER_COMMAND_HIGH, u32::from(apic_id) << 24);
    write_local_apic(REGISTER_COMMAND_LOW, command);
    let start = cpu::time_stamp_counter();
    while read_local_apic(REGISTER_COMMAND_LOW) & COMMAND_DELIVERY_PENDING != 0
        && cpu::time_stamp_counter().wrapping_sub(start) < cpu::microseconds_to_ticks(1_000)
    {
        core::hint::spin_loop();
    }
}

/// Starts every enabled application processor in `processors`, waits for them, and prints
/// `cpus-online` (counting this processor) plus an error line for each one that never
/// checked in.
pub fn start_application_processors(processors: &[Processor]) {
    let bootstrap_apic_id = current_apic_id();
    let mut targets = processors
        .iter()
        .filter(|processor| processor.enabled && processor.apic_id != bootstrap_apic_id)
        .map(|processor| processor.apic_id);
    let mut started = [0u8; MAX_APPLICATION_PROCESSORS];
    let mut started_count = 0;
    for apic_id in targets.by_ref().take(MAX_APPLICATION_PROCESSORS) {
        started[started_count] = apic_id;
        started_count += 1;
    }
    for apic_id in targets {
        println!("error: cpu apic={apic_id} not started: the guest supports {MAX_APPLICATION_PROCESSORS} application processors");
    }
    let started = &started[..started_count];

    if !started.is_empty() {
        trampoline::install();
        // The APIC must be software-enabled for some implementations to send IPIs; the
        // spurious vector never fires because interrupts stay disabled.
        let spurious = read_local_apic(REGISTER_SPURIOUS_VECTOR);
        write_local_apic(
            REGISTER_SPURIOUS_VECTOR,
            spurious | SPURIOUS_VECTOR_APIC_ENABLE | SPURIOUS_VECTOR,
        );
        // INIT all of them first and wait once, rather than 10 ms per processor.
        for &apic_id in started {
            send_ipi(apic_id, COMMAND_INIT);
        }
        if cpu::cpuid(CPUID_FEATURES).ecx & CPUID_FEATURES_ECX_HYPERVISOR == 0 {
            cpu::delay_microseconds(INIT_DELAY_MICROSECONDS);
        }
        for _ in 0..2 {
            for &apic_id in started {
                if !ONLINE_BY_APIC_ID[usize::from(apic_id)].load(Ordering::Acquire) {
                    send_ipi(apic_id, COMMAND_STARTUP | u32::from(STARTUP_VECTOR));
                }
            }
            cpu::delay_microseconds(STARTUP_DELAY_MICROSECONDS);
        }
    }

    let expected = started.len() as u32;
    let start = cpu::time_stamp_counter();
    let timeout = cpu::microseconds_to_ticks(ONLINE_TIMEOUT_MICROSECONDS);
    while ONLINE_COUNT.load(Ordering::Acquire) < expected
        && cpu::time_stamp_counter().wrapping_sub(start) < timeout
    {
        core::hint::spin_loop();
    }

    let online = 1 + ONLINE_COUNT.load(Ordering::Acquire);
    Console::lock()
        .text("cpus-online: ")
        .decimal(u64::from(online))
        .end_line();
    for &apic_id in started {
        if !ONLINE_BY_APIC_ID[usize::from(apic_id)].load(Ordering::Acquire) {
            Console::lock()
                .text("error: cpu apic=")
                .decimal(u64::from(apic_id))
                .text(" did not start")
                .end_line();
        }
    }
}

/// Where each application processor lands in 64-bit mode, on its own stack (see `boot.rs`).
pub extern "C" fn application_processor_main() -> ! {
    let apic_id = current_apic_id();
    Console::lock()
        .text("cpu-online: apic=")
        .decimal(u64::from(apic_id))
        .end_line();
    ONLINE_BY_APIC_ID[usize::from(apic_id)].store(true, Ordering::Release);
    ONLINE_COUNT.fetch_add(1, Ordering::Release);
    cpu::halt_forever()
}
