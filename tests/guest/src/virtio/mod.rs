//! Small virtio drivers that exercise each device the VMM announces with
//! `virtio_mmio.device=` on the command line, for the VMM's black-box tests: block, network,
//! vsock and entropy devices over the virtio-mmio transport (version 2, modern devices only).
//!
//! For each device, in command-line order (its position is its `slot`), the guest routes the
//! device's GSI through the IOAPIC to a vector of its own, identifies the device, negotiates
//! VIRTIO_F_VERSION_1, sets up split queues in the static virtio memory and runs the
//! device's exercise (see each driver's module). Every wait for the device halts until an
//! interrupt and is bounded in time; each one that ends with the device's work done counts as
//! a completion, announced by an interrupt when the device's handler ran for it, or `polled`
//! when the work was visible but no interrupt came within a grace period. A VMM whose irqfd
//! and ioeventfd wiring works shows `polled=0`.
//!
//! Output, after the report and before `cove-test-guest: done` (`<slot>` is the device's
//! position on the command line, from 0; `<kind>` is `blk`, `net`, `vsock` or `rng`):
//!
//! ```text
//! virtio: devices=<count>
//! virtio: device=<slot> base=0x<hex> irq=<GSI> type=<virtio device id>
//! virtio-<kind>: device=<slot> ...                  the driver's own lines, see its module
//! virtio-<kind>: device=<slot> completions=<n> interrupts=<n> polled=<n>
//! virtio: done unexpected-interrupts=<n>
//! ```
//!
//! `interrupts` counts the device's interrupts whose InterruptStatus was not 0. Failures are
//! `error: virtio-<kind>: device=<slot> <what>` lines; the counts line follows regardless.
//!
//! With `bench=` on the command line, none of this runs: `bench` drives one device as fast as
//! it can instead (see `bench/mod.rs`).

pub mod bench;
mod block;
mod memory;
mod mmio;
mod net;
mod queue;
mod rng;
mod vsock;

use crate::command_line::{VirtioMmioDevice, VirtioOptions, MAX_VIRTIO_DEVICES};
use crate::cpu;
use crate::interrupts;
use crate::serial::{println, Console};
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use memory::OutOfMemory;
use mmio::{Transport, TransportError};

const DEVICE_ID_NET: u32 = 1;
const DEVICE_ID_BLOCK: u32 = 2;
const DEVICE_ID_ENTROPY: u32 = 4;
const DEVICE_ID_VSOCK: u32 = 19;

/// How long a wait whose work is visible gives the device's interrupt to arrive before
/// counting the completion as polled.
const INTERRUPT_GRACE_MICROSECONDS: u64 = 2_000_000;

/// Each slot's register window, for its interrupt handler (0: none).
static DEVICE_BASES: [AtomicUsize; MAX_VIRTIO_DEVICES] =
    [const { AtomicUsize::new(0) }; MAX_VIRTIO_DEVICES];
/// Each slot's interrupts with a non-zero InterruptStatus. One that reads 0 is not counted:
/// an edge raised while the handler of the previous one runs finds the status already
/// acknowledged, which is normal.
static DEVICE_INTERRUPTS: [AtomicU32; MAX_VIRTIO_DEVICES] =
    [const { AtomicU32::new(0) }; MAX_VIRTIO_DEVICES];

/// Why a driver gave up on its device.
pub enum DriverError {
    Transport(TransportError),
    OutOfMemory(OutOfMemory),
    /// No completion within the time allowed for `what`.
    TimedOut {
        what: &'static str,
    },
    /// The device answered something the driver cannot accept: `what`, and the value.
    Unexpected {
        what: &'static str,
        value: u64,
    },
    /// The command line does not give the driver what it needs.
    Options(&'static str),
}

impl From<TransportError> for DriverError {
    fn from(error: TransportError) -> Self {
        DriverError::Transport(error)
    }
}

impl From<OutOfMemory> for DriverError {
    fn from(error: OutOfMemory) -> Self {
        DriverError::OutOfMemory(error)
    }
}

impl fmt::Display for DriverError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::Transport(error) => write!(formatter, "{error}"),
            DriverError::OutOfMemory(error) => write!(formatter, "{error}"),
            DriverError::TimedOut { what } => write!(formatter, "timed out waiting for {what}"),
            DriverError::Unexpected { what, value } => write!(formatter, "{what} ({value:#x})"),
            DriverError::Options(what) => write!(formatter, "{what}"),
        }
    }
}

/// Waiting for a device, and how its completions arrived.
pub struct Completions {
    slot: usize,
    /// The device's interrupt count up to which completions have been credited.
    consumed: u32,
    pub by_interrupt: u32,
    pub polled: u32,
}

impl Completions {
    fn new(slot: usize) -> Self {
        Completions {
            slot,
            consumed: DEVICE_INTERRUPTS[slot].load(Ordering::Relaxed),
            by_interrupt: 0,
            polled: 0,
        }
    }

    fn interrupts(&self) -> u32 {
        DEVICE_INTERRUPTS[self.slot].load(Ordering::Relaxed)
    }

    /// Halts until `ready()` holds, for at most `timeout_microseconds`; false on time-out.
    /// Then gives the interrupt that must follow any used buffer a grace period, and counts
    /// the completion as announced by it or as polled.
    ///
    /// A device raises its interrupt after it has published used buffers, and the callers
    /// take back every used buffer of the device after each wait; interrupts are only taken
    /// inside the halt. So an interrupt counted here never belongs to a buffer an earlier
    /// wait already took, and a working VMM never shows a polled completion.
    pub fn wait(&mut self, timeout_microseconds: u64, mut ready: impl FnMut() -> bool) -> bool {
        let start = cpu::time_stamp_counter();
        let timeout = cpu::microseconds_to_ticks(timeout_microseconds);
        while !ready() {
            if cpu::time_stamp_counter().wrapping_sub(start) > timeout {
                return false;
            }
            interrupts::halt_until_interrupt();
        }
        let grace_start = cpu::time_stamp_counter();
        let grace = cpu::microseconds_to_ticks(INTERRUPT_GRACE_MICROSECONDS);
        loop {
            let interrupts = self.interrupts();
            if interrupts != self.consumed {
                self.consumed = interrupts;
                self.by_interrupt += 1;
                return true;
            }
            if cpu::time_stamp_counter().wrapping_sub(grace_start) > grace {
                self.polled += 1;
                return true;
            }
            interrupts::halt_until_interrupt();
        }
    }
}

/// One device being exercised.
pub struct Device {
    slot: usize,
    kind: &'static str,
    transport: Transport,
    completions: Completions,
}

impl Device {
    /// A console line that starts with the device's kind and slot.
    fn line(&self) -> Console {
        Console::lock()
            .text(self.kind)
            .text(": device=")
            .decimal(self.slot as u64)
            .text(" ")
    }

    /// Sets up queues `0..count`, then DRIVER_OK.
    fn start<const COUNT: usize>(&self) -> Result<[queue::Queue; COUNT], DriverError> {
        self.start_with_limit(queue::MAX_QUEUE_SIZE)
    }

    /// Sets up queues `0..count` of up to `limit` entries each, then DRIVER_OK.
    fn start_with_limit<const COUNT: usize>(
        &self,
        limit: u16,
    ) -> Result<[queue::Queue; COUNT], DriverError> {
        let mut queues = [const { None }; COUNT];
        for (index, queue) in queues.iter_mut().enumerate() {
            *queue = Some(queue::Queue::set_up(&self.transport, index as u16, limit)?);
        }
        self.transport.set_driver_ok()?;
        Ok(queues.map(|queue| queue.expect("every queue was set up")))
    }
}

/// Exercises every device on the command line; prints nothing when there are none.
pub fn run(options: &VirtioOptions, ioapic_address: u32) {
    let devices = options.devices();
    if devices.is_empty() {
        return;
    }
    Console::lock()
        .text("virtio: devices=")
        .decimal(devices.len() as u64)
        .end_line();
    interrupts::install();
    for (slot, entry) in devices.iter().enumerate() {
        exercise(slot, entry, options, ioapic_address);
    }
    interrupts::uninstall(ioapic_address, devices.iter().map(|entry| entry.irq));
    let (_, unexpected) = interrupts::counts();
    Console::lock()
        .text("virtio: done unexpected-interrupts=")
        .decimal(unexpected)
        .end_line();
}

fn exercise(slot: usize, entry: &VirtioMmioDevice, options: &VirtioOptions, ioapic_address: u32) {
    let announce = || {
        Console::lock()
            .text("virtio: device=")
            .decimal(slot as u64)
            .text(" base=")
            .hex(entry.base)
            .text(" irq=")
            .decimal(u64::from(entry.irq))
    };
    let (transport, device_id) = match Transport::probe(entry.base, entry.size) {
        Ok(found) => found,
        Err(error) => {
            announce().text(" type=none").end_line();
            println!("error: virtio: device={slot}: {error}");
            return;
        }
    };
    announce()
        .text(" type=")
        .decimal(u64::from(device_id))
        .end_line();
    let kind = match device_id {
        DEVICE_ID_BLOCK => "virtio-blk",
        DEVICE_ID_NET => "virtio-net",
        DEVICE_ID_VSOCK => "virtio-vsock",
        DEVICE_ID_ENTROPY => "virtio-rng",
        _ => {
            println!("error: virtio: device={slot}: type {device_id} is not one the guest drives");
            return;
        }
    };
    if let Err(error) = interrupts::route_device(ioapic_address, entry.irq, slot) {
        println!("error: {kind}: device={slot} {error}");
        return;
    }
    DEVICE_BASES[slot].store(entry.base as usize, Ordering::Relaxed);
    let mut device = Device {
        slot,
        kind,
        transport,
        completions: Completions::new(slot),
    };
    let outcome = match device_id {
        DEVICE_ID_BLOCK => block::exercise(&mut device, options.block_write_sector),
        DEVICE_ID_NET => net::exercise(&mut device, options.net_address, options.net_peer),
        DEVICE_ID_VSOCK => vsock::exercise(&mut device, options.vsock_port, options.vsock_bytes),
        _ => rng::exercise(&mut device),
    };
    // The device must stop using the driver's memory before anything else happens.
    device.transport.reset();
    if let Err(error) = outcome {
        println!("error: {kind}: device={slot} {error}");
    }
    let completions = &device.completions;
    device
        .line()
        .text("completions=")
        .decimal(u64::from(completions.by_interrupt + completions.polled))
        .text(" interrupts=")
        .decimal(u64::from(completions.interrupts()))
        .text(" polled=")
        .decimal(u64::from(completions.polled))
        .end_line();
}

/// The interrupt handler of device slot `slot`, called from `interrupts` with interrupts
/// disabled: reads and acknowledges InterruptStatus and counts the interrupt.
pub fn handle_interrupt(slot: usize) {
    let base = DEVICE_BASES[slot].load(Ordering::Relaxed);
    if base == 0 {
        return;
    }
    if Transport::at(base).acknowledge_interrupt() != 0 {
        DEVICE_INTERRUPTS[slot].fetch_add(1, Ordering::Relaxed);
    }
}
