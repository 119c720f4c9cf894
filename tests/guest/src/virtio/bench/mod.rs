//! Benchmarks of a virtio device's data path, for `tools/bench io`: with `bench=<case>` on the
//! command line (see `command_line.rs`), the guest skips its report and drives the first
//! device of the case's kind as hard as its driver can for `bench-seconds`, then prints what
//! moved.
//!
//! How it drives the device, the same way under every VMM:
//!
//! - queues as large as the device allows, up to [`LARGEST_QUEUE_SIZE`] entries, and as many
//!   requests in flight as they hold (`bench-depth=` lowers it): a block request takes three
//!   descriptors (header, data, status), a frame one;
//! - every completed request is replaced at once by a new one, and the device is notified once
//!   per batch, and only when its used ring asks for notifications (NO_NOTIFY clear);
//! - interrupts are suppressed (the available ring's NO_INTERRUPT flag) while the guest is
//!   taking completions back, and asked for again only before it halts; the guest halts until
//!   an interrupt whenever no completion is waiting, as an idle Linux guest would, rather than
//!   spinning on the used ring.
//!
//! Timing is the host's job: the guest has no calibrated clock, so it prints a line when the
//! measured interval starts and one when it ends, and the host reads the time between the two
//! lines off its own clock as they arrive on the console. The guest only decides roughly when
//! to stop: before the device is set up, it counts time stamp counter ticks across
//! [`CALIBRATION_TIMER_TICKS`] ticks of the 10 ms local APIC timer it runs for its halts (KVM's
//! APIC timer counts at 1 GHz), and stops after `bench-seconds` worth of them. (The timer's
//! own ticks cannot end the run: a guest that always finds a completion waiting never halts,
//! and interrupts are taken only in the halt.) It reports the time stamp counter ticks between
//! the two lines too, which the host can hold against its own interval. Everything counted
//! completes inside the interval: block and transmit requests are submitted after the start
//! line, and the end line waits until every request in flight is back. The receive benchmark
//! starts at the first frame the host sends after `bench: ready`, takes that first batch back
//! uncounted, and stops counting at the end line (the host stops sending when it sees it).
//!
//! Output, after `cove-test-guest: hello` (and followed by `cove-test-guest: done` and the exit
//! action):
//!
//! ```text
//! bench: case=<case> device=<slot> base=0x<hex> irq=<GSI> type=<device id> tsc-hz=<measured>
//! bench: queue-size=<entries> in-flight=<requests> size=<bytes per request or frame>
//! bench: ready                   the device is set up (net-rx: its receive buffers posted)
//! bench: start                   the measured interval begins
//! bench: end requests=<n> bytes=<n> tsc=<ticks> interrupts=<n> notifications=<n> [<case's own>]
//! ```
//!
//! `requests` counts completed requests (frames for the network cases) and `bytes` their
//! payload: data bytes for block requests, Ethernet frames without the virtio-net header for
//! the network. `interrupts` counts the device's interrupts with a non-zero InterruptStatus,
//! and `notifications` the queue notifications the guest wrote, both inside the interval.
//! Failures are `error: bench: <what>` lines, and then no `bench: end` line.

mod block;
mod net;

use super::memory::RamArea;
use super::mmio::Transport;
use super::queue::{Queue, Segment, LARGEST_QUEUE_SIZE};
use super::{Completions, Device, DriverError, DEVICE_BASES, DEVICE_ID_BLOCK, DEVICE_ID_NET};
use crate::boot_information::MemoryMapEntry;
use crate::command_line::{BenchCase, BenchOptions, VirtioOptions};
use crate::cpu;
use crate::interrupts;
use crate::serial::{println, Console};
use crate::user_mode;
use core::sync::atomic::Ordering;

/// The local APIC timer's ticks per second (see `interrupts.rs`: 10 ms apart).
const TIMER_TICKS_PER_SECOND: u64 = 100;
/// Timer ticks over which the time stamp counter's rate is measured: 100 ms.
const CALIBRATION_TIMER_TICKS: u64 = 10;
/// How long the guest waits for any completion before it gives up on the device.
const COMPLETION_TIMEOUT_MICROSECONDS: u64 = 10_000_000;
/// How long the receive benchmark waits for the host's first frame after `bench: ready`.
const FIRST_FRAME_TIMEOUT_MICROSECONDS: u64 = 30_000_000;
/// The most descriptors one request takes (a block request: header, data, status).
const MAX_SEGMENTS: usize = 3;

/// What one benchmark puts in each request slot and makes of its completion.
trait Workload {
    /// Writes the chain of a new request for `slot` into `segments`; returns how many it took.
    fn request(&mut self, slot: usize, segments: &mut [Segment; MAX_SEGMENTS]) -> usize;

    /// Checks the completed request of `slot`, into which the device wrote `length` bytes;
    /// returns the payload bytes it moved.
    fn completed(&mut self, slot: usize, length: u32) -> Result<u64, DriverError>;

    /// Adds the workload's own counts to the end line.
    fn report(&self, line: Console) -> Console {
        line
    }
}

/// When the measured interval starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// At once; every request is submitted inside the interval, and the interval ends when the
    /// last one is back.
    Immediately,
    /// At the first completion, for receive buffers the host fills at its own pace; the
    /// interval ends without waiting for the buffers still posted.
    AtFirstCompletion,
}

/// Runs the benchmark `bench` on the first device of its kind among `options`' devices.
pub fn run(
    bench: &BenchOptions,
    options: &VirtioOptions,
    memory_map: impl Iterator<Item = MemoryMapEntry>,
    ioapic_address: u32,
) {
    let (wanted, kind) = match bench.case {
        BenchCase::NetTransmit | BenchCase::NetReceive => (DEVICE_ID_NET, "virtio-net"),
        _ => (DEVICE_ID_BLOCK, "virtio-blk"),
    };
    let found =
        options
            .devices()
            .iter()
            .enumerate()
            .find_map(
                |(slot, entry)| match Transport::probe(entry.base, entry.size) {
                    Ok((transport, device_id)) if device_id == wanted => {
                        Some((slot, entry, transport))
                    }
                    _ => None,
                },
            );
    let Some((slot, entry, transport)) = found else {
        println!(
            "error: bench: no {kind} device among the {} virtio_mmio.device= entries",
            options.devices().len()
        );
        return;
    };
    interrupts::install();
    let time_stamp_counter_hz = time_stamp_counter_hz();
    Console::lock()
        .text("bench: case=")
        .text(bench.case.name())
        .text(" device=")
        .decimal(slot as u64)
        .text(" base=")
        .hex(entry.base)
        .text(" irq=")
        .decimal(u64::from(entry.irq))
        .text(" type=")
        .decimal(u64::from(wanted))
        .text(" tsc-hz=")
        .decimal(time_stamp_counter_hz)
        .end_line();
    if let Err(error) = interrupts::route_device(ioapic_address, entry.irq, slot) {
        println!("error: bench: {error}");
        interrupts::uninstall(ioapic_address, core::iter::empty());
        return;
    }
    DEVICE_BASES[slot].store(entry.base as usize, Ordering::Relaxed);
    let mut device = Device {
        slot,
        kind,
        transport,
        completions: Completions::new(slot),
    };
    let timing = Timing {
        hz: time_stamp_counter_hz,
        duration: bench.seconds.saturating_mul(time_stamp_counter_hz),
        polling: bench.polling,
    };
    if timing.polling {
        user_mode::prepare();
    }
    let outcome = match bench.case {
        BenchCase::NetTransmit | BenchCase::NetReceive => {
            net::run(&mut device, bench, options, memory_map, &timing)
        }
        _ => block::run(&mut device, bench, memory_map, &timing),
    };
    // The device must stop using the guest's memory before anything else happens.
    device.transport.reset();
    interrupts::uninstall(ioapic_address, core::iter::once(entry.irq));
    if let Err(error) = outcome {
        println!("error: bench: {error}");
    }
}

/// The time stamp counter's rate, measured against the local APIC timer (which must be
/// running, with no device interrupts routed yet, so that every halt ends at a timer tick).
fn time_stamp_counter_hz() -> u64 {
    let ticks = || interrupts::counts().0;
    let first = ticks();
    while ticks() == first {
        interrupts::halt_until_interrupt();
    }
    let start_ticks = ticks();
    let start = cpu::time_stamp_counter();
    while ticks().wrapping_sub(start_ticks) < CALIBRATION_TIMER_TICKS {
        interrupts::halt_until_interrupt();
    }
    let elapsed = cpu::time_stamp_counter().wrapping_sub(start);
    let counted = ticks().wrapping_sub(start_ticks);
    elapsed.saturating_mul(TIMER_TICKS_PER_SECOND) / counted.max(1)
}

/// Takes `length` bytes of RAM for a benchmark's buffers.
fn ram_area(
    memory_map: impl Iterator<Item = MemoryMapEntry>,
    length: usize,
) -> Result<RamArea, DriverError> {
    RamArea::find(memory_map, length).ok_or(DriverError::Unexpected {
        what: "no RAM entry of the memory map has room above the image for the benchmark's \
               buffers, bytes",
        value: length as u64,
    })
}

/// Prints the benchmark's shape.
fn describe(queue: &Queue, slots: usize, size: u64) {
    Console::lock()
        .text("bench: queue-size=")
        .decimal(u64::from(queue.size()))
        .text(" in-flight=")
        .decimal(slots as u64)
        .text(" size=")
        .decimal(size)
        .end_line();
}

/// One queue being kept full: which slot each chain carries, and how many are out.
struct Pump<'a> {
    queue: &'a mut Queue,
    transport: Transport,
    slot_of_head: [u16; LARGEST_QUEUE_SIZE as usize],
    in_flight: usize,
    notifications: u64,
}

impl Pump<'_> {
    fn submit(&mut self, work: &mut impl Workload, slot: usize) -> Result<(), DriverError> {
        let mut segments = [Segment::readable(0, 0); MAX_SEGMENTS];
        let count = work.request(slot, &mut segments);
        let head = self
            .queue
            .push(&segments[..count])
            .ok_or(DriverError::Unexpected {
                what: "no free descriptors for a request, free",
                value: self.queue.free_descriptors() as u64,
            })?;
        self.slot_of_head[usize::from(head)] = slot as u16;
        self.in_flight += 1;
        Ok(())
    }

    /// Tells the device about new requests, if it asks to be told.
    fn notify(&mut self) {
        if self.queue.device_wants_notification() {
            self.transport.notify(self.queue.index());
            self.notifications += 1;
        }
    }

    /// The next completed request's slot and the bytes the device wrote into it.
    fn take_used(&mut self) -> Option<(usize, u32)> {
        let used = self.queue.pop_used()?;
        self.in_flight -= 1;
        Some((
            usize::from(self.slot_of_head[usize::from(used.head)]),
            used.length,
        ))
    }

    /// Halts until the device has returned a request, for at most `timeout_microseconds`.
    /// Interrupts are asked for only while halting (see the module documentation).
    fn wait(&mut self, timeout_microseconds: u64) -> Result<(), DriverError> {
        if self.queue.has_used() {
            return Ok(());
        }
        self.queue.set_interrupts_wanted(true);
        let start = cpu::time_stamp_counter();
        let limit = cpu::microseconds_to_ticks(timeout_microseconds);
        let mut outcome = Ok(());
        while !self.queue.has_used() {
            if cpu::time_stamp_counter().wrapping_sub(start) > limit {
                outcome = Err(DriverError::TimedOut {
                    what: "the device to complete a request",
                });
                break;
            }
            interrupts::halt_until_interrupt();
        }
        self.queue.set_interrupts_wanted(false);
        outcome
    }
}

/// Counts since the start line.
#[derive(Default)]
struct Tally {
    requests: u64,
    bytes: u64,
}

/// How long the measured interval lasts and how the guest waits in it.
pub struct Timing {
    /// Time stamp counter ticks per second, measured by [`time_stamp_counter_hz`].
    pub hz: u64,
    /// The interval's length in time stamp counter ticks.
    pub duration: u64,
    /// Poll the used ring at CPL 3 (`bench-driver=poll`) rather than halt for interrupts.
    pub polling: bool,
}

/// The measured interval's state, handed to the CPL 3 loop by pointer.
struct Interval<'a, 'b, W: Workload> {
    pump: Pump<'a>,
    work: &'b mut W,
    /// Slots to submit first (none when they were submitted before the start line).
    submit_first: usize,
    /// Wait for every request in flight before the end line.
    drain: bool,
    start_tsc: u64,
    duration: u64,
    timeout: u64,
    polling: bool,
    tally: Tally,
    outcome: Result<(), DriverError>,
}

/// Keeps `slots` requests of `work` in flight on `queue` for `timing.duration`, between the
/// start and end lines.
fn pump<W: Workload>(
    device: &mut Device,
    queue: &mut Queue,
    work: &mut W,
    slots: usize,
    start: Start,
    timing: &Timing,
) -> Result<(), DriverError> {
    let mut pump = Pump {
        queue,
        transport: device.transport,
        slot_of_head: [0; LARGEST_QUEUE_SIZE as usize],
        in_flight: 0,
        notifications: 0,
    };
    pump.queue.set_interrupts_wanted(false);
    let submit_first = match start {
        Start::Immediately => {
            Console::lock().text("bench: ready").end_line();
            slots
        }
        Start::AtFirstCompletion => {
            for slot in 0..slots {
                pump.submit(work, slot)?;
            }
            pump.notify();
            Console::lock().text("bench: ready").end_line();
            pump.wait(FIRST_FRAME_TIMEOUT_MICROSECONDS)?;
            while let Some((slot, length)) = pump.take_used() {
                work.completed(slot, length)?;
                pump.submit(work, slot)?;
            }
            pump.notify();
            0
        }
    };
    let start_interrupts = device.completions.interrupts();
    let start_notifications = pump.notifications;
    Console::lock().text("bench: start").end_line();
    let mut interval = Interval {
        pump,
        work,
        submit_first,
        drain: start == Start::Immediately,
        start_tsc: cpu::time_stamp_counter(),
        duration: timing.duration,
        timeout: timing.hz.saturating_mul(COMPLETION_TIMEOUT_MICROSECONDS) / 1_000_000,
        polling: timing.polling,
        tally: Tally::default(),
        outcome: Ok(()),
    };
    if timing.polling {
        user_mode::run(measure_at_user_level::<W>, (&raw mut interval).cast::<u8>());
    } else {
        interval.outcome = measure(&mut interval);
    }
    interval.outcome?;
    let tsc = cpu::time_stamp_counter().wrapping_sub(interval.start_tsc);
    let line = Console::lock()
        .text("bench: end requests=")
        .decimal(interval.tally.requests)
        .text(" bytes=")
        .decimal(interval.tally.bytes)
        .text(" tsc=")
        .decimal(tsc)
        .text(" interrupts=")
        .decimal(u64::from(
            device
                .completions
                .interrupts()
                .wrapping_sub(start_interrupts),
        ))
        .text(" notifications=")
        .decimal(interval.pump.notifications - start_notifications);
    interval.work.report(line).end_line();
    Ok(())
}

/// [`measure`] at CPL 3, where `argument` points at the [`Interval`]; the outcome goes into
/// it.
extern "C" fn measure_at_user_level<W: Workload>(argument: *mut u8) {
    // SAFETY: `pump` passes a pointer to its own `Interval<W>`, live and not otherwise used
    // until `user_mode::run` returns, which is after this function has.
    let interval = unsafe { &mut *argument.cast::<Interval<W>>() };
    interval.outcome = measure(interval);
}

/// The measured loop: takes completions back and replaces them until the interval is over,
/// then drains. Polling, it spins on the used ring (at CPL 3: no halting, no printing there);
/// otherwise it halts for the device's interrupt.
fn measure<W: Workload>(interval: &mut Interval<W>) -> Result<(), DriverError> {
    let Interval { pump, work, .. } = interval;
    for slot in 0..interval.submit_first {
        pump.submit(*work, slot)?;
    }
    pump.notify();
    let mut stopping = false;
    let mut last_progress = cpu::time_stamp_counter();
    loop {
        if stopping && (pump.in_flight == 0 || !interval.drain) {
            return Ok(());
        }
        if !pump.queue.has_used() {
            if interval.polling {
                let now = cpu::time_stamp_counter();
                if now.wrapping_sub(last_progress) > interval.timeout {
                    return Err(DriverError::TimedOut {
                        what: "the device to complete a request",
                    });
                }
                core::hint::spin_loop();
            } else {
                pump.wait(COMPLETION_TIMEOUT_MICROSECONDS)?;
            }
        }
        let mut submitted = false;
        while let Some((slot, length)) = pump.take_used() {
            interval.tally.requests += 1;
            interval.tally.bytes += work.completed(slot, length)?;
            if !stopping {
                pump.submit(*work, slot)?;
                submitted = true;
            }
        }
        let now = cpu::time_stamp_counter();
        if submitted {
            pump.notify();
            last_progress = now;
        }
        if now.wrapping_sub(interval.start_tsc) >= interval.duration {
            stopping = true;
        }
    }
}
