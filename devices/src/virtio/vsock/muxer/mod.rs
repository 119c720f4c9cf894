//! The device's host side: the Unix listener host processes connect to, every stream's host
//! socket, and the epoll set the VMM watches ([`Muxer::backend_fd`]).
//!
//! Two epoll sets keep the VMM's level-triggered watch from spinning:
//!
//! - the *device set* (the backend fd) holds the listener, the timeout timer, each handshake
//!   still sending its CONNECT line, each host socket with bytes waiting to be written
//!   (EPOLLOUT, only while some wait), and the *host-read set* itself, but only while the
//!   driver has given receive buffers;
//! - the *host-read set* holds each established stream's socket for EPOLLIN while the guest
//!   has credit for it and wants data.
//!
//! So when the receive ring runs dry one `epoll_ctl` silences every stream, and the driver's
//! next receive notification brings them all back.
//!
//! Packets the device owes the guest that carry no data (REQUEST, RESPONSE, CREDIT_UPDATE, RST)
//! wait in a bounded control queue and go out, before any data, as receive buffers allow.
//!
//! This file routes packets between the guest and established streams; `listener` holds the
//! host-initiated half (accepting, CONNECT lines, timeouts).

mod listener;

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use self::listener::write_ok_line;
use super::connection::{control, Connection, Handshake, HostRead, Key, State};
use super::packet::{
    self, Header, Op, Segment, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RECEIVE, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::rx::RxQueue;
use super::socket::connect_nonblocking;
use super::{VsockCounters, VsockError};
use crate::virtio::VirtioError;

/// The most streams at once, in any state; beyond it new ones are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// The most host processes still sending their CONNECT line.
pub const MAX_HANDSHAKES: usize = 64;
/// The most RSTs waiting for receive buffers; beyond it they are dropped (the guest's own
/// timeouts end those streams).
pub const MAX_QUEUED_RESETS: usize = 1024;
/// Where the ports of host-initiated streams start (the host side's "ephemeral" range).
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// Packets read from host sockets per `process_backend`, so one busy device cannot hold the
/// event loop; the backend fd stays readable while more wait.
const READ_BUDGET: usize = 256;
const EVENT_BATCH: usize = 64;
/// How long the listener rests when accepting fails for want of descriptors or memory.
const LISTENER_PAUSE: Duration = Duration::from_millis(100);

/// How long the device waits for each step of a host-initiated connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From accepting a host process to its complete CONNECT line.
    pub connect_line: Duration,
    /// From the REQUEST reaching the guest to its RESPONSE or RST.
    pub response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_line: Duration::from_secs(5),
            response: Duration::from_secs(2),
        }
    }
}

/// An entry of the control queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ControlPacket {
    /// The connection's own control bits say what to send.
    Connection(Key),
    /// An RST for a stream the device does not (or no longer) keep.
    Reset(Key),
}

fn backend_error(what: &'static str) -> impl FnOnce(io::Error) -> VirtioError {
    move |source| VirtioError::Backend { what, source }
}

/// A header from the host to the guest for stream `key`; credit fields left to the caller.
fn header_to_guest(guest_cid: u64, key: Key, op: Op) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: key.local_port,
        dst_port: key.peer_port,
        kind: TYPE_STREAM,
        op: op as u16,
        ..Header::default()
    }
}

/// `<socket>_<port>`: where a guest connecting to host port `port` is sent.
pub fn port_socket_path(socket: &Path, port: u32) -> PathBuf {
    let mut path = OsString::from(socket.as_os_str());
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

pub struct Muxer {
    guest_cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    device_events: Epoll,
    host_reads: Epoll,
    watching_host_reads: bool,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    listener_paused_until: Option<Instant>,
    connections: HashMap<Key, Connection>,
    keys_by_fd: HashMap<RawFd, Key>,
    handshakes: HashMap<RawFd, Handshake>,
    control: VecDeque<ControlPacket>,
    queued_resets: usize,
    next_host_port: u32,
    /// The driver is up: packets may go to the guest.
    active: bool,
    /// The receive ring may hold buffers: set by a receive notification, cleared when it
    /// ran dry.
    rx_ready: bool,
    /// One packet's payload, either way.
    buffer: Vec<u8>,
    timeouts: Timeouts,
    counters: VsockCounters,
}

impl Muxer {
    /// Binds the listener at `socket` (which the caller checked) and builds the epoll sets.
    pub fn new(guest_cid: u64, socket: &Path) -> Result<Self, VsockError> {
        let listener = UnixListener::bind(socket).map_err(|source| VsockError::Bind {
            path: socket.to_path_buf(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(VsockError::HostSide)?;
        let device_events = Epoll::new().map_err(VsockError::HostSide)?;
        let host_reads = Epoll::new().map_err(VsockError::HostSide)?;
        let timer = TimerFd::new().map_err(|error| VsockError::HostSide(error.into()))?;
        for fd in [listener.as_raw_fd(), timer.as_raw_fd()] {
            device_events
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .map_err(VsockError::HostSide)?;
        }
        Ok(Self {
            guest_cid,
            socket: socket.to_path_buf(),
            listener,
            device_events,
            host_reads,
            watching_host_reads: false,
            timer,
            timer_deadline: None,
            listener_paused_until: None,
            connections: HashMap::new(),
            keys_by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            queued_resets: 0,
            next_host_port: FIRST_HOST_PORT,
            active: false,
            rx_ready: false,
            buffer: vec![0; MAX_PAYLOAD],
            timeouts: Timeouts::default(),
            counters: VsockCounters::default(),
        })
    }

    pub fn backend_fd(&self) -> RawFd {
        self.device_events.as_raw_fd()
    }

    pub fn counters(&self) -> VsockCounters {
        VsockCounters {
            open_connections: self.connections.len(),
            ..self.counters
        }
    }

    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
    }

    /// The driver set DRIVER_OK.
    pub fn activate(&mut self) -> Result<(), VirtioError> {
        self.active = true;
        self.rx_ready = true;
        self.update_host_reads_watch()
    }

    /// The driver reset the device: every stream the guest knows of ends and its host socket
    /// closes. Host-initiated streams whose REQUEST never reached the guest, and host processes
    /// still sending their CONNECT line, stay for the next driver.
    pub fn reset(&mut self) {
        self.connections
            .retain(|_, connection| connection.state == State::AwaitingResponse { deadline: None });
        let connections = &self.connections;
        self.keys_by_fd
            .retain(|_, key| connections.contains_key(key));
        self.control = self
            .connections
            .keys()
            .map(|key| ControlPacket::Connection(*key))
            .collect();
        self.queued_resets = 0;
        self.active = false;
        self.rx_ready = false;
        // Only fails if the kernel is out of memory; the watch is retried on activation.
        let _ = self.update_host_reads_watch();
    }

    /// The driver made receive buffers available.
    pub fn rx_available(&mut self) {
        self.rx_ready = true;
    }

    /// Records what the receive queue showed, and watches host reads accordingly.
    pub fn rx_done(&mut self, rx: &RxQueue) -> Result<(), VirtioError> {
        if rx.is_starved() {
            self.rx_ready = false;
        }
        self.counters.rx_packets += rx.delivered;
        self.counters.bad_rx_chains += rx.bad_chains;
        self.update_host_reads_watch()
    }

    fn update_host_reads_watch(&mut self) -> Result<(), VirtioError> {
        let wanted = self.active && self.rx_ready;
        if wanted != self.watching_host_reads {
            let fd = self.host_reads.as_raw_fd();
            let operation = if wanted {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            self.device_events
                .ctl(operation, fd, EpollEvent::new(EventSet::IN, fd as u64))
                .map_err(backend_error("watch the host sockets"))?;
            self.watching_host_reads = wanted;
        }
        Ok(())
    }

    // ---- Guest to host ----

    fn drop_packet(&mut self) {
        self.counters.dropped_packets += 1;
    }

    /// Serves one transmit chain. A packet that is malformed, not addressed from the guest to
    /// the host, or of an unknown type or operation is dropped; if it names a live stream, that
    /// stream is reset. Never fails the device.
    pub fn handle_tx(&mut self, memory: &GuestMemoryMmap, segments: &[Segment], complete: bool) {
        self.counters.tx_packets += 1;
        let Ok(header) = packet::read_header(memory, segments) else {
            return self.drop_packet();
        };
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            return self.drop_packet();
        }
        let key = Key {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        let known = self.connections.contains_key(&key);
        let payload = packet::read_payload(memory, segments, complete, &header, &mut self.buffer);
        let op = Op::try_from(header.op);
        let (Ok(len), Ok(op), TYPE_STREAM) = (payload, op, header.kind) else {
            self.drop_packet();
            if known {
                self.reset_stream(key);
            }
            return;
        };
        if !known {
            match op {
                Op::Request => self.guest_connect(key, &header),
                Op::Reset => {}
                _ => self.queue_reset(key),
            }
            return;
        }
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        connection.update_peer_credit(header.buf_alloc, header.fwd_cnt);
        let keep = match op {
            // A second request on a live stream.
            Op::Request => false,
            // Only an answer to a REQUEST that reached the guest.
            Op::Response => {
                matches!(
                    connection.state,
                    State::AwaitingResponse { deadline: Some(_) }
                ) && {
                    connection.state = State::Established;
                    write_ok_line(connection)
                }
            }
            Op::Reset => return self.forget(key),
            Op::Shutdown => {
                connection.is_established() && {
                    connection.guest_shut_down(header.flags);
                    true
                }
            }
            Op::ReadWrite => {
                connection.is_established()
                    && connection.receive_from_guest(&self.buffer[..len]).is_ok()
            }
            Op::CreditUpdate => true,
            Op::CreditRequest => {
                self.queue_control(key, control::CREDIT_UPDATE);
                true
            }
        };
        if keep {
            self.settle(key);
        } else {
            self.reset_stream(key);
        }
    }

    /// The guest asked for host port `key.local_port`: connect to `<socket>_<port>`.
    fn guest_connect(&mut self, key: Key, header: &Header) {
        if self.connections.len() >= MAX_CONNECTIONS {
            return self.queue_reset(key);
        }
        match connect_nonblocking(&port_socket_path(&self.socket, key.local_port)) {
            Ok(stream) => {
                let mut connection = Connection::guest_initiated(stream, key);
                connection.update_peer_credit(header.buf_alloc, header.fwd_cnt);
                self.insert(connection);
                self.queue_control(key, control::RESPONSE);
                self.settle(key);
            }
            Err(_) => self.queue_reset(key),
        }
    }

    // ---- Connection bookkeeping ----

    fn insert(&mut self, connection: Connection) {
        self.keys_by_fd
            .insert(connection.stream.as_raw_fd(), connection.key);
        self.connections.insert(connection.key, connection);
    }

    /// Ends a stream without telling the guest (it sent the RST, or one is already on its
    /// way); the host socket closes, which also takes it out of both epoll sets.
    fn forget(&mut self, key: Key) {
        if let Some(connection) = self.connections.remove(&key) {
            self.keys_by_fd.remove(&connection.stream.as_raw_fd());
            if connection.queued {
                self.control
                    .retain(|entry| *entry != ControlPacket::Connection(key));
            }
        }
    }

    /// Ends a stream and tells the guest with an RST.
    fn reset_stream(&mut self, key: Key) {
        self.forget(key);
        self.queue_reset(key);
    }

    fn queue_reset(&mut self, key: Key) {
        if self.queued_resets < MAX_QUEUED_RESETS {
            self.control.push_back(ControlPacket::Reset(key));
            self.queued_resets += 1;
        } else {
            self.counters.dropped_resets += 1;
        }
    }

    fn queue_control(&mut self, key: Key, bit: u8) {
        if let Some(connection) = self.connections.get_mut(&key) {
            connection.control |= bit;
            if !connection.queued {
                connection.queued = true;
                self.control.push_back(ControlPacket::Connection(key));
            }
        }
    }

    /// After anything happened to a stream: end it if both sides are done, offer credit if
    /// due, and watch its socket for what it now wants.
    fn settle(&mut self, key: Key) {
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        if connection.is_finished() {
            return self.reset_stream(key);
        }
        if connection.credit_update_due() {
            self.queue_control(key, control::CREDIT_UPDATE);
        }
        if self.watch(key).is_err() {
            self.reset_stream(key);
        }
    }

    fn watch(&mut self, key: Key) -> io::Result<()> {
        let Some(connection) = self.connections.get_mut(&key) else {
            return Ok(());
        };
        let fd = connection.stream.as_raw_fd();
        let wants_read = connection.wants_host_read();
        let wants_write = connection.wants_host_write();
        let sets = [
            (
                wants_read,
                &mut connection.watching_read,
                &self.host_reads,
                EventSet::IN,
            ),
            (
                wants_write,
                &mut connection.watching_write,
                &self.device_events,
                EventSet::OUT,
            ),
        ];
        for (wanted, watching, set, events) in sets {
            if wanted != *watching {
                let operation = if wanted {
                    ControlOperation::Add
                } else {
                    ControlOperation::Delete
                };
                set.ctl(operation, fd, EpollEvent::new(events, fd as u64))?;
                *watching = wanted;
            }
        }
        Ok(())
    }

    // ---- Host events ----

    /// Serves what the device set reports, then delivers what the guest is owed as far as
    /// `rx` (absent before activation) allows.
    pub fn process_host_events(&mut self, rx: Option<&mut RxQueue>) -> Result<(), VirtioError> {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let count = self
            .device_events
            .wait(0, &mut events)
            .map_err(backend_error("wait for host sockets"))?;
        let mut host_reads_ready = false;
        for event in &events[..count] {
            let fd = event.fd();
            if fd == self.listener.as_raw_fd() {
                self.accept_all()?;
            } else if fd == self.timer.as_raw_fd() {
                self.expire()?;
            } else if fd == self.host_reads.as_raw_fd() {
                host_reads_ready = true;
            } else if self.handshakes.contains_key(&fd) {
                self.advance_handshake(fd);
            } else if let Some(&key) = self.keys_by_fd.get(&fd) {
                self.flush(key);
            }
        }
        if let Some(rx) = rx {
            self.deliver_control(rx)?;
            if host_reads_ready {
                self.serve_host_reads(rx)?;
                self.deliver_control(rx)?;
            }
            self.rx_done(rx)?;
        }
        Ok(())
    }

    fn flush(&mut self, key: Key) {
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        if connection.flush().is_ok() {
            self.settle(key);
        } else {
            self.reset_stream(key);
        }
    }

    // ---- Host to guest ----

    /// Sends queued control packets while receive buffers last.
    pub fn deliver_control(&mut self, rx: &mut RxQueue) -> Result<(), VirtioError> {
        while let Some(&entry) = self.control.front() {
            match entry {
                ControlPacket::Reset(key) => {
                    let Some(chain) = rx.reserve()? else {
                        return Ok(());
                    };
                    let header = header_to_guest(self.guest_cid, key, Op::Reset);
                    rx.complete(chain, &header, &[])?;
                    self.control.pop_front();
                    self.queued_resets -= 1;
                }
                ControlPacket::Connection(key) => {
                    let Some(connection) = self.connections.get_mut(&key) else {
                        self.control.pop_front();
                        continue;
                    };
                    if connection.control == 0 {
                        connection.queued = false;
                        self.control.pop_front();
                        continue;
                    }
                    let Some(chain) = rx.reserve()? else {
                        return Ok(());
                    };
                    let op = match connection.take_control() {
                        Some(control::REQUEST) => Op::Request,
                        Some(control::RESPONSE) => Op::Response,
                        _ => Op::CreditUpdate,
                    };
                    let mut header = header_to_guest(self.guest_cid, key, op);
                    (header.buf_alloc, header.fwd_cnt) = connection.advertise_credit();
                    rx.complete(chain, &header, &[])?;
                    if op == Op::Request {
                        let deadline = Instant::now() + self.timeouts.response;
                        connection.state = State::AwaitingResponse {
                            deadline: Some(deadline),
                        };
                        self.arm_timer(deadline)?;
                    }
                    self.settle(key);
                }
            }
        }
        Ok(())
    }

    /// Reads host sockets the host-read set reports, one packet per stream in turn, while
    /// receive buffers and the budget last.
    fn serve_host_reads(&mut self, rx: &mut RxQueue) -> Result<(), VirtioError> {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let mut budget = READ_BUDGET;
        while budget > 0 {
            let count = self
                .host_reads
                .wait(0, &mut events)
                .map_err(backend_error("wait for host sockets"))?;
            if count == 0 {
                return Ok(());
            }
            for event in &events[..count] {
                let Some(&key) = self.keys_by_fd.get(&event.fd()) else {
                    continue;
                };
                let hung_up = event.event_set().contains(EventSet::HANG_UP);
                if !self.read_one_packet(key, hung_up, rx)? {
                    return Ok(());
                }
                budget = budget.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Moves one packet's worth from stream `key`'s host socket to the guest; false when the
    /// receive ring is empty.
    fn read_one_packet(
        &mut self,
        key: Key,
        hung_up: bool,
        rx: &mut RxQueue,
    ) -> Result<bool, VirtioError> {
        let Some(connection) = self.connections.get_mut(&key) else {
            return Ok(true);
        };
        if !connection.wants_host_read() {
            self.settle(key);
            return Ok(true);
        }
        let Some(chain) = rx.reserve()? else {
            return Ok(false);
        };
        let mut header = header_to_guest(self.guest_cid, key, Op::CreditUpdate);
        let wanted = chain
            .capacity()
            .min(connection.peer_credit() as usize)
            .min(MAX_PAYLOAD);
        // A buffer with room for a header only carries no data; it still tells the guest
        // about credit.
        let outcome = if wanted == 0 {
            HostRead::Data(0)
        } else {
            connection.read_from_host(&mut self.buffer[..wanted])
        };
        let len = match outcome {
            HostRead::Data(0) => 0,
            HostRead::Data(len) => {
                header.op = Op::ReadWrite as u16;
                header.len = len as u32;
                len
            }
            HostRead::EndOfStream => {
                // The host process closed (or half-closed) its end after everything it sent
                // was read. A full hang-up means it will not read either.
                header.op = Op::Shutdown as u16;
                header.flags = SHUTDOWN_SEND | if hung_up { SHUTDOWN_RECEIVE } else { 0 };
                0
            }
            HostRead::WouldBlock => {
                rx.unreserve(chain);
                return Ok(true);
            }
            HostRead::Failed => {
                header.op = Op::Reset as u16;
                rx.complete(chain, &header, &[])?;
                self.forget(key);
                return Ok(true);
            }
        };
        (header.buf_alloc, header.fwd_cnt) = connection.advertise_credit();
        connection.sent_to_guest(len);
        if rx.complete(chain, &header, &self.buffer[..len])? {
            self.settle(key);
        } else {
            self.reset_stream(key);
        }
        Ok(true)
    }
}
