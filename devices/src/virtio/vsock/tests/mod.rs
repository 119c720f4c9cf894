//! virtio-vsock driven as a guest driver would, through its MMIO registers and split queues in
//! real guest memory, against real Unix sockets in a temporary directory. The test plays both
//! the guest (packets on the queues) and the VMM's event loop (polling the backend fd, calling
//! `process_backend`); host processes are plain `UnixStream`s.
//!
//! This module is the harness; the stories are in `streams` (connecting and closing), `data`
//! (bytes and credit) and `hostile` (bad packets, limits, reset).

mod data;
mod hostile;
mod streams;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::muxer::port_socket_path;
use super::packet::{Header, Op, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use super::{Timeouts, Vsock, VsockConfig};
use crate::bus::lock;
use crate::virtio::test_driver::{Buffer, TestDriver, DATA_START};
use crate::virtio::{VirtioDevice, COMMON_FEATURES};

pub const GUEST_CID: u64 = 42;
/// How long any single expected event may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

const QUEUE_SIZE: u16 = 256;
const RX_BUFFERS: u64 = 32;
/// The payload room of each receive buffer, as Linux gives (4 KiB after the header).
pub const RX_PAYLOAD: u32 = 4096;
const RX_STRIDE: u64 = 0x1100;
const TX_HEADER: u64 = 0x8_0000;
const TX_PAYLOAD: u64 = 0x8_0100;

/// A packet the guest received.
#[derive(Debug, Clone)]
pub struct Packet {
    pub header: Header,
    pub payload: Vec<u8>,
}

impl Packet {
    pub fn op(&self) -> Option<Op> {
        Op::try_from(self.header.op).ok()
    }
}

/// The guest's side of one stream.
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    pub guest_port: u32,
    pub host_port: u32,
    /// The guest's receive buffer and how much of it the guest has consumed.
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Stream {
    pub fn new(guest_port: u32, host_port: u32) -> Self {
        Self {
            guest_port,
            host_port,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        }
    }

    /// A packet header from the guest on this stream.
    pub fn header(&self, op: Op, len: usize) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: self.guest_port,
            dst_port: self.host_port,
            len: len as u32,
            kind: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// A SHUTDOWN from the guest with `flags`.
    pub fn shutdown(&self, flags: u32) -> Header {
        Header {
            flags,
            ..self.header(Op::Shutdown, 0)
        }
    }

    /// Whether `packet` belongs to this stream, addressed as the device must.
    pub fn owns(&self, packet: &Packet) -> bool {
        let header = &packet.header;
        header.src_cid == HOST_CID
            && header.dst_cid == GUEST_CID
            && header.src_port == self.host_port
            && header.dst_port == self.guest_port
            && header.kind == TYPE_STREAM
    }
}

/// A guest driver and the event loop of one vsock device.
pub struct Guest {
    pub driver: TestDriver,
    pub vsock: Arc<Mutex<Vsock>>,
    pub socket: PathBuf,
    _directory: TempDir,
    poller: Epoll,
    rx_free: Vec<u64>,
    rx_given: HashMap<u32, u64>,
    /// Whether used receive buffers go straight back to the device, as Linux does.
    pub refill: bool,
    /// Whether the driver has initialised the device (its queues exist).
    started: bool,
    pub received: VecDeque<Packet>,
    /// Used receive chains the harness did not give (hostile tests push their own).
    pub stray_used: Vec<(u32, u32)>,
}

impl Guest {
    /// A running device with receive buffers given.
    pub fn new() -> Self {
        Self::with_timeouts(Timeouts::default())
    }

    pub fn with_timeouts(timeouts: Timeouts) -> Self {
        let mut guest = Self::stopped(timeouts);
        guest.start_driver();
        guest.give_rx();
        guest
    }

    /// A device whose driver has not started.
    pub fn stopped(timeouts: Timeouts) -> Self {
        let directory = tempfile::tempdir().unwrap();
        let socket = directory.path().join("vsock");
        let mut vsock = Vsock::new(&VsockConfig {
            guest_cid: GUEST_CID,
            socket: socket.clone(),
        })
        .unwrap();
        vsock.set_timeouts(timeouts);
        let backend = vsock.backend_fd().unwrap();
        let vsock = Arc::new(Mutex::new(vsock));
        let driver = TestDriver::new(vsock.clone());
        let poller = Epoll::new().unwrap();
        poller
            .ctl(
                ControlOperation::Add,
                backend,
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        Self {
            driver,
            vsock,
            socket,
            _directory: directory,
            poller,
            rx_free: (0..RX_BUFFERS)
                .map(|index| DATA_START + index * RX_STRIDE)
                .collect(),
            rx_given: HashMap::new(),
            refill: true,
            started: false,
            received: VecDeque::new(),
            stray_used: Vec::new(),
        }
    }

    /// Initialises the driver (a reset first); receive buffers are all the guest's again.
    pub fn start_driver(&mut self) {
        self.driver.initialise(COMMON_FEATURES, QUEUE_SIZE);
        self.started = true;
        self.rx_free
            .extend(self.rx_given.drain().map(|(_, address)| address));
    }

    /// Makes every free receive buffer available and notifies the device.
    pub fn give_rx(&mut self) {
        self.give_some_rx(usize::MAX);
    }

    /// Makes up to `count` free receive buffers available and notifies the device.
    pub fn give_some_rx(&mut self, count: usize) {
        let take = count.min(self.rx_free.len());
        let given: Vec<u64> = self.rx_free.drain(..take).collect();
        for address in given {
            let head = self.driver.push_chain(
                0,
                &[Buffer::writable(address, HEADER_SIZE as u32 + RX_PAYLOAD)],
            );
            self.rx_given.insert(u32::from(head), address);
        }
        self.driver.kick(0);
    }

    /// Takes every used receive buffer; refills if `refill` is set.
    pub fn collect(&mut self) {
        if !self.started {
            return;
        }
        loop {
            let used = self.driver.take_used(0);
            if used.is_empty() {
                return;
            }
            for (head, len) in used {
                let Some(address) = self.rx_given.remove(&head) else {
                    self.stray_used.push((head, len));
                    continue;
                };
                self.rx_free.push(address);
                let len = len as usize;
                assert!(len >= HEADER_SIZE, "a used receive buffer of {len} bytes");
                let mut header = [0u8; HEADER_SIZE];
                header.copy_from_slice(&self.driver.read_bytes(address, HEADER_SIZE));
                let header = Header::from_bytes(&header);
                assert_eq!(
                    header.len as usize,
                    len - HEADER_SIZE,
                    "the used length must cover exactly the header and payload"
                );
                let payload = self
                    .driver
                    .read_bytes(address + HEADER_SIZE as u64, len - HEADER_SIZE);
                self.received.push_back(Packet { header, payload });
            }
            if self.refill {
                self.give_rx();
            }
        }
    }

    pub fn backend_ready(&self, timeout: Duration) -> bool {
        let mut events = [EpollEvent::default(); 1];
        let timeout = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        self.poller.wait(timeout, &mut events).unwrap() > 0
    }

    /// One turn of the event loop: waits up to `timeout` for the backend fd, serves it, and
    /// takes what the device delivered. Returns whether the fd was readable.
    pub fn run_backend(&mut self, timeout: Duration) -> bool {
        let ready = self.backend_ready(timeout);
        if ready {
            lock(&self.vsock).process_backend().unwrap();
        }
        self.collect();
        ready
    }

    /// The next packet, waiting for it as long as `within`.
    pub fn packet_within(&mut self, within: Duration) -> Option<Packet> {
        let deadline = Instant::now() + within;
        loop {
            self.collect();
            if let Some(packet) = self.received.pop_front() {
                return Some(packet);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.run_backend(left.min(Duration::from_millis(50)));
        }
    }

    pub fn next_packet(&mut self) -> Packet {
        self.packet_within(PATIENCE)
            .expect("no packet reached the guest")
    }

    /// Runs the event loop for a while and asserts that nothing reached the guest.
    pub fn expect_silence(&mut self, during: Duration) {
        if let Some(packet) = self.packet_within(during) {
            panic!("unexpected packet {packet:?}");
        }
    }

    /// Puts a transmit chain of `buffers` on the queue and has the device serve it.
    pub fn send_chain(&mut self, buffers: &[Buffer]) {
        let head = self.driver.push_chain(1, buffers);
        self.driver.kick(1);
        let used = self.driver.take_used(1);
        assert_eq!(used, vec![(u32::from(head), 0)]);
        self.collect();
    }

    /// Sends one packet: the header in one buffer, the payload (if any) in another.
    pub fn send(&mut self, header: &Header, payload: &[u8]) {
        self.driver.write_bytes(TX_HEADER, &header.to_bytes());
        self.driver.write_bytes(TX_PAYLOAD, payload);
        let mut buffers = vec![Buffer::readable(TX_HEADER, HEADER_SIZE as u32)];
        if !payload.is_empty() {
            buffers.push(Buffer::readable(TX_PAYLOAD, payload.len() as u32));
        }
        self.send_chain(&buffers);
    }

    /// Sends data on `stream`, in packets of at most 4 KiB.
    pub fn send_data(&mut self, stream: &Stream, bytes: &[u8]) {
        for chunk in bytes.chunks(4096) {
            self.send(&stream.header(Op::ReadWrite, chunk.len()), chunk);
        }
    }

    /// A host listener for guest connections to `port`.
    pub fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(port_socket_path(&self.socket, port)).unwrap()
    }

    /// The guest connects from `guest_port` to host `port`, where `listener` accepts.
    pub fn connect_to_host(
        &mut self,
        listener: &UnixListener,
        guest_port: u32,
        port: u32,
    ) -> (Stream, UnixStream) {
        let stream = Stream::new(guest_port, port);
        self.send(&stream.header(Op::Request, 0), &[]);
        let response = self.next_packet();
        assert!(stream.owns(&response), "{response:?}");
        assert_eq!(response.op(), Some(Op::Response));
        let (host, _) = listener.accept().unwrap();
        host.set_read_timeout(Some(PATIENCE)).unwrap();
        (stream, host)
    }

    /// A host process connects to guest port `port`; the guest accepts. Returns the stream
    /// with the host port the device chose.
    pub fn accept_from_host(&mut self, guest_port: u32) -> (Stream, UnixStream) {
        let mut host = host_connect(&self.socket, guest_port);
        let request = self.next_packet();
        assert_eq!(request.op(), Some(Op::Request), "{request:?}");
        assert_eq!(request.header.dst_port, guest_port);
        let stream = Stream::new(guest_port, request.header.src_port);
        assert!(stream.owns(&request));
        self.send(&stream.header(Op::Response, 0), &[]);
        assert_eq!(read_line(&mut host), format!("OK {}\n", stream.host_port));
        (stream, host)
    }
}

/// A host process connecting to the device and asking for guest port `port`.
pub fn host_connect(socket: &Path, port: u32) -> UnixStream {
    let mut host = UnixStream::connect(socket).unwrap();
    host.set_read_timeout(Some(PATIENCE)).unwrap();
    host.write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    host
}

pub fn read_line(host: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert_eq!(
            host.read(&mut byte).unwrap(),
            1,
            "end of stream in {line:?}"
        );
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

pub fn read_exactly(host: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    host.read_exact(&mut bytes).unwrap();
    bytes
}

/// Asserts that the host socket reached end of stream (without data before it).
pub fn assert_end_of_stream(host: &mut UnixStream) {
    let mut byte = [0u8; 1];
    match host.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("data instead of end of stream: {byte:?}"),
        Err(error) if error.kind() == ErrorKind::ConnectionReset => {}
        Err(error) => panic!("no end of stream: {error}"),
    }
}

/// Runs the guest's event loop until the host socket reaches end of stream.
pub fn wait_for_end_of_stream(guest: &mut Guest, host: &mut UnixStream) {
    host.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut byte = [0u8; 1];
    loop {
        match host.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => panic!("data instead of end of stream"),
            Err(error) if error.kind() == ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == ErrorKind::ConnectionReset => break,
            Err(error) => panic!("{error}"),
        }
        assert!(Instant::now() < deadline, "the host socket stayed open");
        guest.run_backend(Duration::from_millis(20));
    }
    host.set_nonblocking(false).unwrap();
}

/// `len` bytes that do not repeat with any short period.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
