//! The command line words the guest understands; everything else on the line is ignored.
//!
//! - `exit=reset|triple-fault|halt|cmpxchg16b|tick|poweroff` picks what happens after the
//!   report (default `reset`);
//! - `tick-loops=<decimal>` spaces `tick` lines by that many busy-loop iterations instead of
//!   the default of about 100 ms measured with the time stamp counter;
//! - `brief` skips the report, the other vCPUs and the virtio devices: `hello`, the boot
//!   timer, `done`, then the exit action. Benchmarks use it, so that they time the VMM rather
//!   than console output.
//!
//! The virtio devices (see `virtio/mod.rs` for what the guest does with them):
//!
//! - `virtio_mmio.device=<size>@<base>:<irq>[:<ignored>]`, Linux's syntax, written by the VMM
//!   once per device: a virtio-mmio register window of `<size>` bytes (a number with an
//!   optional `K`, `M` or `G` suffix) at `<base>` (`0x` hexadecimal or decimal), raising GSI
//!   `<irq>` (an IOAPIC pin). Up to [`MAX_VIRTIO_DEVICES`], exercised in command-line order;
//! - `blk-write=<sector>`: each block device writes the guest's pattern to that sector, reads
//!   it back and flushes (without it, block devices are only read);
//! - `net-ip=<a.b.c.d>` and `net-peer=<a.b.c.d>`: the guest's IPv4 address and the host's on
//!   every network device; with both, the guest resolves the host with ARP and pings it
//!   (without them, network devices are only identified);
//! - `vsock-port=<port>`: the vsock device connects to the host (CID 2) on that port and has
//!   `vsock-bytes=<decimal>` bytes (default 1 MiB) echoed (without it, only the guest's CID is
//!   read).
//!
//! Benchmarks (see `virtio/bench/mod.rs`), for `tools/bench io`:
//!
//! - `bench=<case>` skips the report, the other vCPUs and the exercises, like `brief`, and
//!   instead drives the first device of the case's kind as fast as it can: `blk-seq-read`,
//!   `blk-seq-write`, `blk-rand-read`, `blk-rand-write` (block), `net-tx`, `net-rx` (network);
//! - `bench-seconds=<decimal>`: how long (default 5);
//! - `bench-size=<decimal>`: bytes per block request (a multiple of 512; default 65536 for the
//!   sequential cases, 4096 for the random ones) or per Ethernet frame (60 to 1514, without
//!   the frame check sequence; default 1514);
//! - `bench-depth=<decimal>`: at most this many requests in flight (default: as many as the
//!   queue holds);
//! - `bench-driver=poll|interrupt`: the driver polls the used ring at CPL 3 (default), or halts
//!   at CPL 0 until the device interrupts;
//! - `net-ip=` and `net-peer=` (above) give the guest's and the host's IPv4 addresses, and
//!   `bench-peer-mac=<aa:bb:cc:dd:ee:ff>` the host's MAC, to which `net-tx` sends its UDP
//!   datagrams (port [`BENCH_UDP_PORT`] to port [`BENCH_UDP_PORT`]).

use crate::serial::Console;

/// The most `virtio_mmio.device=` entries the guest takes; later ones are reported and
/// ignored. Each gets an interrupt vector of its own.
pub const MAX_VIRTIO_DEVICES: usize = 16;

/// Bytes the vsock device has echoed when `vsock-bytes=` does not say.
const DEFAULT_VSOCK_BYTES: u64 = 1 << 20;

/// How long a benchmark runs when `bench-seconds=` does not say.
const DEFAULT_BENCH_SECONDS: u64 = 5;

/// The UDP port the `net-tx` benchmark sends from and to.
pub const BENCH_UDP_PORT: u16 = 9999;

/// What a benchmark measures (`bench=`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BenchCase {
    BlockSequentialRead,
    BlockSequentialWrite,
    BlockRandomRead,
    BlockRandomWrite,
    NetTransmit,
    NetReceive,
}

impl BenchCase {
    /// The name `bench=` takes.
    pub fn name(self) -> &'static str {
        match self {
            BenchCase::BlockSequentialRead => "blk-seq-read",
            BenchCase::BlockSequentialWrite => "blk-seq-write",
            BenchCase::BlockRandomRead => "blk-rand-read",
            BenchCase::BlockRandomWrite => "blk-rand-write",
            BenchCase::NetTransmit => "net-tx",
            BenchCase::NetReceive => "net-rx",
        }
    }

    fn parse(value: &[u8]) -> Option<Self> {
        [
            BenchCase::BlockSequentialRead,
            BenchCase::BlockSequentialWrite,
            BenchCase::BlockRandomRead,
            BenchCase::BlockRandomWrite,
            BenchCase::NetTransmit,
            BenchCase::NetReceive,
        ]
        .into_iter()
        .find(|case| case.name().as_bytes() == value)
    }
}

/// A benchmark to run instead of the report (`bench=` and its `bench-*=` options).
pub struct BenchOptions {
    pub case: BenchCase,
    pub seconds: u64,
    /// Bytes per request or frame; `None` for the case's default.
    pub size: Option<u64>,
    /// The most requests in flight; `None` for as many as the queue holds.
    pub depth: Option<u64>,
    pub peer_mac: Option<[u8; 6]>,
    /// Poll at CPL 3 (`bench-driver=poll`, the default) rather than wait for interrupts.
    pub polling: bool,
}

/// What the guest does once it has printed `cove-test-guest: done`.
#[derive(Clone, Copy)]
pub enum ExitAction {
    Reset,
    TripleFault,
    Halt,
    Cmpxchg16b,
    Tick,
    PowerOff,
}

/// One `virtio_mmio.device=` entry.
#[derive(Clone, Copy)]
pub struct VirtioMmioDevice {
    pub base: u64,
    pub size: u64,
    /// The GSI, which is the pin of the (only) IOAPIC.
    pub irq: u32,
}

/// The virtio devices and what to do with each kind.
pub struct VirtioOptions {
    devices: [VirtioMmioDevice; MAX_VIRTIO_DEVICES],
    device_count: usize,
    pub block_write_sector: Option<u64>,
    pub net_address: Option<[u8; 4]>,
    pub net_peer: Option<[u8; 4]>,
    pub vsock_port: Option<u32>,
    pub vsock_bytes: u64,
}

impl VirtioOptions {
    /// The devices in command-line order.
    pub fn devices(&self) -> &[VirtioMmioDevice] {
        &self.devices[..self.device_count]
    }
}

/// The options read from the command line.
pub struct Options {
    pub exit_action: ExitAction,
    /// Busy-loop iterations between two `tick` lines; `None` for the time-based default.
    pub tick_loops: Option<u64>,
    /// Skip the report, the application processors and the virtio devices.
    pub brief: bool,
    pub virtio: VirtioOptions,
    /// Run this benchmark instead of the report (`bench=`).
    pub bench: Option<BenchOptions>,
}

impl Options {
    /// Reads the options from the command line. A recognised word with a bad value is
    /// reported on the console with an `error:` line and the default is kept.
    pub fn parse(command_line: &[u8]) -> Self {
        let mut options = Options {
            exit_action: ExitAction::Reset,
            tick_loops: None,
            brief: false,
            virtio: VirtioOptions {
                devices: [VirtioMmioDevice {
                    base: 0,
                    size: 0,
                    irq: 0,
                }; MAX_VIRTIO_DEVICES],
                device_count: 0,
                block_write_sector: None,
                net_address: None,
                net_peer: None,
                vsock_port: None,
                vsock_bytes: DEFAULT_VSOCK_BYTES,
            },
            bench: None,
        };
        let mut bench_seconds = DEFAULT_BENCH_SECONDS;
        let mut bench_size = None;
        let mut bench_depth = None;
        let mut bench_peer_mac = None;
        let mut bench_polling = true;
        let words = command_line
            .split(|byte| byte.is_ascii_whitespace())
            .filter(|word| !word.is_empty());
        for word in words {
            if word == b"brief" {
                options.brief = true;
            } else if let Some(value) = word.strip_prefix(b"exit=") {
                match parse_exit_action(value) {
                    Some(action) => options.exit_action = action,
                    None => Console::lock()
                        .text("error: unknown exit=")
                        .bytes(value)
                        .text(", using exit=reset")
                        .end_line(),
                }
            } else if let Some(value) = word.strip_prefix(b"tick-loops=") {
                if let Some(loops) = parse_or_report(word, parse_decimal(value)) {
                    options.tick_loops = Some(loops);
                }
            } else if let Some(value) = word.strip_prefix(b"virtio_mmio.device=") {
                options.virtio.add_device(word, value);
            } else if let Some(value) = word.strip_prefix(b"blk-write=") {
                options.virtio.block_write_sector = parse_or_report(word, parse_decimal(value));
            } else if let Some(value) = word.strip_prefix(b"net-ip=") {
                options.virtio.net_address = parse_or_report(word, parse_ipv4(value));
            } else if let Some(value) = word.strip_prefix(b"net-peer=") {
                options.virtio.net_peer = parse_or_report(word, parse_ipv4(value));
            } else if let Some(value) = word.strip_prefix(b"vsock-port=") {
                let port = parse_decimal(value).and_then(|port| u32::try_from(port).ok());
                options.virtio.vsock_port = parse_or_report(word, port);
            } else if let Some(value) = word.strip_prefix(b"vsock-bytes=") {
                if let Some(bytes) = parse_or_report(word, parse_decimal(value)) {
                    options.virtio.vsock_bytes = bytes;
                }
            } else if let Some(value) = word.strip_prefix(b"bench=") {
                options.bench =
                    parse_or_report(word, BenchCase::parse(value)).map(|case| BenchOptions {
                        case,
                        seconds: DEFAULT_BENCH_SECONDS,
                        size: None,
                        depth: None,
                        peer_mac: None,
                        polling: true,
                    });
            } else if let Some(value) = word.strip_prefix(b"bench-seconds=") {
                if let Some(seconds) = parse_or_report(word, parse_decimal(value)) {
                    bench_seconds = seconds;
                }
            } else if let Some(value) = word.strip_prefix(b"bench-size=") {
                bench_size = parse_or_report(word, parse_decimal(value));
            } else if let Some(value) = word.strip_prefix(b"bench-depth=") {
                bench_depth = parse_or_report(word, parse_decimal(value));
            } else if let Some(value) = word.strip_prefix(b"bench-peer-mac=") {
                bench_peer_mac = parse_or_report(word, parse_mac(value));
            } else if let Some(value) = word.strip_prefix(b"bench-driver=") {
                let polling = match value {
                    b"poll" => Some(true),
                    b"interrupt" => Some(false),
                    _ => None,
                };
                if let Some(polling) = parse_or_report(word, polling) {
                    bench_polling = polling;
                }
            }
        }
        // The bench-* options may come before or after bench= itself.
        if let Some(bench) = &mut options.bench {
            bench.seconds = bench_seconds;
            bench.size = bench_size;
            bench.depth = bench_depth;
            bench.peer_mac = bench_peer_mac;
            bench.polling = bench_polling;
        }
        options
    }
}

impl VirtioOptions {
    fn add_device(&mut self, word: &[u8], value: &[u8]) {
        let Some(device) = parse_or_report(word, parse_virtio_mmio_device(value)) else {
            return;
        };
        if self.device_count == MAX_VIRTIO_DEVICES {
            Console::lock()
                .text("error: ")
                .bytes(word)
                .text(" ignored: the guest takes at most ")
                .decimal(MAX_VIRTIO_DEVICES as u64)
                .text(" virtio devices")
                .end_line();
            return;
        }
        self.devices[self.device_count] = device;
        self.device_count += 1;
    }
}

/// Passes a parsed value through, or reports the word it came from as malformed.
fn parse_or_report<T>(word: &[u8], value: Option<T>) -> Option<T> {
    if value.is_none() {
        Console::lock()
            .text("error: cannot parse ")
            .bytes(word)
            .end_line();
    }
    value
}

fn parse_exit_action(value: &[u8]) -> Option<ExitAction> {
    match value {
        b"reset" => Some(ExitAction::Reset),
        b"triple-fault" => Some(ExitAction::TripleFault),
        b"halt" => Some(ExitAction::Halt),
        b"cmpxchg16b" => Some(ExitAction::Cmpxchg16b),
        b"tick" => Some(ExitAction::Tick),
        b"poweroff" => Some(ExitAction::PowerOff),
        _ => None,
    }
}

fn parse_decimal(value: &[u8]) -> Option<u64> {
    core::str::from_utf8(value).ok()?.parse().ok()
}

/// A number in `0x` hexadecimal or in decimal.
fn parse_number(value: &[u8]) -> Option<u64> {
    match value
        .strip_prefix(b"0x")
        .or_else(|| value.strip_prefix(b"0X"))
    {
        Some(digits) => u64::from_str_radix(core::str::from_utf8(digits).ok()?, 16).ok(),
        None => parse_decimal(value),
    }
}

/// A number with an optional binary suffix: `4K`, `1M`, `4096`.
fn parse_size(value: &[u8]) -> Option<u64> {
    let (digits, shift) = match value.last()? {
        b'k' | b'K' => (&value[..value.len() - 1], 10),
        b'm' | b'M' => (&value[..value.len() - 1], 20),
        b'g' | b'G' => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    parse_number(digits)?.checked_mul(1 << shift)
}

/// `<size>@<base>:<irq>`, optionally followed by `:<platform device id>`, which is ignored.
fn parse_virtio_mmio_device(value: &[u8]) -> Option<VirtioMmioDevice> {
    let at = value.iter().position(|&byte| byte == b'@')?;
    let (size, rest) = (&value[..at], &value[at + 1..]);
    let mut fields = rest.split(|&byte| byte == b':');
    let base = parse_number(fields.next()?)?;
    let irq = u32::try_from(parse_decimal(fields.next()?)?).ok()?;
    if fields.count() > 1 {
        return None;
    }
    Some(VirtioMmioDevice {
        base,
        size: parse_size(size)?,
        irq,
    })
}

/// A dotted-quad IPv4 address.
fn parse_ipv4(value: &[u8]) -> Option<[u8; 4]> {
    let mut address = [0u8; 4];
    let mut parts = value.split(|&byte| byte == b'.');
    for octet in &mut address {
        *octet = u8::try_from(parse_decimal(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then_some(address)
}

/// A MAC address as six colon-separated pairs of hexadecimal digits.
fn parse_mac(value: &[u8]) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = value.split(|&byte| byte == b':');
    for octet in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *octet = u8::from_str_radix(core::str::from_utf8(part).ok()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}
