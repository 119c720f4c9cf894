//! One vsock stream between a guest port and a host Unix socket: its handshake state, both
//! directions' credit, the bytes waiting for the host socket to drain, and how each side shut
//! down. A connection knows nothing of queues or epoll; the muxer asks it what it wants
//! ([`Connection::wants_host_read`], [`Connection::wants_host_write`]) and tells it what
//! happened.
//!
//! Credit (virtio 1.2, 5.10.6.3): each side advertises `buf_alloc`, the size of its receive
//! buffer, and `fwd_cnt`, how many bytes it has consumed from it. A sender may have at most
//! `buf_alloc - (tx_cnt - fwd_cnt)` bytes outstanding. The device's receive buffer is
//! [`BUFFER_SIZE`]: bytes from the guest go straight to the host socket and are counted as
//! forwarded; what the socket does not take waits in `pending`, which the guest's credit keeps
//! within that size.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{SHUTDOWN_BOTH, SHUTDOWN_RECEIVE, SHUTDOWN_SEND};
use super::socket::send_nonblocking;

/// The receive buffer the device advertises to the guest for each connection (`buf_alloc`).
pub const BUFFER_SIZE: u32 = 256 * 1024;
/// The longest CONNECT line a host process may send, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

/// A connection's identity: the host-side port and the guest-side port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST queued or sent, no answer yet. The deadline runs from when the
    /// REQUEST reached the guest.
    AwaitingResponse {
        deadline: Option<Instant>,
    },
    Established,
}

/// Control packets a connection has queued for the guest, as bits.
pub mod control {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const CREDIT_UPDATE: u8 = 4;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectionError {
    #[error("the guest sent {len} bytes with only {credit} bytes of credit left")]
    CreditExceeded { len: usize, credit: u32 },
    #[error("the guest sent data after shutting down its sending side")]
    SendAfterShutdown,
    #[error("the host socket failed: {kind}")]
    Host { kind: io::ErrorKind },
}

/// What a read from the host socket gave.
#[derive(Debug, PartialEq, Eq)]
pub enum HostRead {
    Data(usize),
    EndOfStream,
    WouldBlock,
    Failed,
}

pub struct Connection {
    pub stream: UnixStream,
    pub key: Key,
    pub state: State,
    /// Which control packets are waiting to go to the guest ([`control`] bits), and whether
    /// the connection sits in the muxer's control queue.
    pub control: u8,
    pub queued: bool,
    /// Whether its socket is in the host-read set and in the device's set for EPOLLOUT.
    pub watching_read: bool,
    pub watching_write: bool,

    // Host to guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    /// The host socket reached end of stream (a SHUTDOWN went to the guest).
    host_eof: bool,

    // Guest to host.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last received; its credit is computed from this.
    advertised_fwd_cnt: Wrapping<u32>,
    pending: VecDeque<u8>,
    /// SHUTDOWN flags the guest has sent.
    guest_shutdown: u32,
    host_write_shut: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: Key, state: State) -> Self {
        Self {
            stream,
            key,
            state,
            control: 0,
            queued: false,
            watching_read: false,
            watching_write: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            host_eof: false,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            advertised_fwd_cnt: Wrapping(0),
            pending: VecDeque::new(),
            guest_shutdown: 0,
            host_write_shut: false,
        }
    }

    /// A host process asked for guest port `key.peer_port`; a REQUEST is to go out.
    pub fn host_initiated(stream: UnixStream, key: Key) -> Self {
        let mut connection = Self::new(stream, key, State::AwaitingResponse { deadline: None });
        connection.control = control::REQUEST;
        connection
    }

    /// The guest connected to host port `key.local_port`; a RESPONSE is to go out.
    pub fn guest_initiated(stream: UnixStream, key: Key) -> Self {
        let mut connection = Self::new(stream, key, State::Established);
        connection.control = control::RESPONSE;
        connection
    }

    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Takes the guest's view of its receive buffer, which every packet carries.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many more bytes the guest can take. A guest reporting more consumed than it was
    /// sent gets nothing: the difference wraps past its buffer size.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether bytes should be read from the host socket for the guest.
    pub fn wants_host_read(&self) -> bool {
        self.is_established()
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RECEIVE == 0
            && self.peer_credit() > 0
    }

    /// Whether bytes from the guest wait for the host socket to become writable.
    pub fn wants_host_write(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Reads up to `buffer.len()` bytes from the host socket.
    pub fn read_from_host(&mut self, buffer: &mut [u8]) -> HostRead {
        loop {
            return match (&self.stream).read(buffer) {
                Ok(0) => {
                    self.host_eof = true;
                    HostRead::EndOfStream
                }
                Ok(read) => HostRead::Data(read),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => HostRead::WouldBlock,
                Err(_) => HostRead::Failed,
            };
        }
    }

    /// Counts `len` bytes as sent to the guest.
    pub fn sent_to_guest(&mut self, len: usize) {
        self.tx_cnt += Wrapping(len as u32);
    }

    /// The guest's credit toward the device: what is left of [`BUFFER_SIZE`] after the bytes it
    /// sent since the last `fwd_cnt` it was told.
    fn guest_credit(&self) -> u32 {
        BUFFER_SIZE.saturating_sub((self.rx_cnt - self.advertised_fwd_cnt).0)
    }

    /// Takes bytes the guest sent: written to the host socket at once if nothing waits before
    /// them, the rest kept until it drains.
    pub fn receive_from_guest(&mut self, payload: &[u8]) -> Result<(), ConnectionError> {
        if self.guest_shutdown & SHUTDOWN_SEND != 0 {
            return Err(ConnectionError::SendAfterShutdown);
        }
        let credit = self.guest_credit();
        if payload.len() > credit as usize {
            return Err(ConnectionError::CreditExceeded {
                len: payload.len(),
                credit,
            });
        }
        self.rx_cnt += Wrapping(payload.len() as u32);
        let mut written = 0;
        if self.pending.is_empty() {
            written = self.send(payload)?;
        }
        self.pending.extend(&payload[written..]);
        Ok(())
    }

    /// Writes what it can of `bytes` to the host socket; counts it as forwarded.
    fn send(&mut self, bytes: &[u8]) -> Result<usize, ConnectionError> {
        let mut written = 0;
        while written < bytes.len() {
            match send_nonblocking(&self.stream, &bytes[written..]) {
                Ok(0) => break,
                Ok(sent) => written += sent,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    return Err(ConnectionError::Host { kind: error.kind() });
                }
            }
        }
        self.fwd_cnt += Wrapping(written as u32);
        Ok(written)
    }

    /// Writes waiting bytes to the host socket, then carries out a send shutdown the guest asked
    /// for once nothing is left.
    pub fn flush(&mut self) -> Result<(), ConnectionError> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let front_len = front.len();
            let sent = match send_nonblocking(&self.stream, front) {
                Ok(sent) => sent,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
                Err(error) => return Err(ConnectionError::Host { kind: error.kind() }),
            };
            self.pending.drain(..sent);
            self.fwd_cnt += Wrapping(sent as u32);
            if sent < front_len {
                break;
            }
        }
        if self.pending.is_empty() {
            self.pending.shrink_to(0);
        }
        self.shut_host_write_when_drained();
        Ok(())
    }

    fn shut_host_write_when_drained(&mut self) {
        if self.guest_shutdown & SHUTDOWN_SEND != 0
            && self.pending.is_empty()
            && !self.host_write_shut
        {
            // The peer may be gone already; the guest asked for nothing more than this.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
    }

    /// Takes a SHUTDOWN from the guest. Its receiving side closes the host socket's reading
    /// side at once; its sending side closes the host's writing side once the bytes already
    /// received have been written.
    pub fn guest_shut_down(&mut self, flags: u32) {
        let new = flags & SHUTDOWN_BOTH & !self.guest_shutdown;
        self.guest_shutdown |= new;
        if new & SHUTDOWN_RECEIVE != 0 {
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        self.shut_host_write_when_drained();
    }

    /// The guest shut down both directions and every byte it sent reached the host socket: the
    /// connection is over (the device answers with RST).
    pub fn is_finished(&self) -> bool {
        self.guest_shutdown == SHUTDOWN_BOTH && self.pending.is_empty()
    }

    /// Whether to tell the guest about consumed bytes now: its view of the free buffer fell
    /// below half and at least an eighth of the buffer has been consumed since it last heard.
    /// Once every received byte is forwarded the second holds whenever the first does, so a
    /// guest waiting for credit always gets it.
    pub fn credit_update_due(&self) -> bool {
        let unadvertised = (self.fwd_cnt - self.advertised_fwd_cnt).0;
        self.guest_credit() < BUFFER_SIZE / 2 && unadvertised >= BUFFER_SIZE / 8
    }

    /// The credit fields of a packet about to reach the guest: `buf_alloc` and `fwd_cnt`, now
    /// counted as advertised.
    pub fn advertise_credit(&mut self) -> (u32, u32) {
        self.advertised_fwd_cnt = self.fwd_cnt;
        (BUFFER_SIZE, self.fwd_cnt.0)
    }

    /// Takes the next control packet to send, highest priority first.
    pub fn take_control(&mut self) -> Option<u8> {
        for bit in [control::REQUEST, control::RESPONSE, control::CREDIT_UPDATE] {
            if self.control & bit != 0 {
                self.control &= !bit;
                return Some(bit);
            }
        }
        None
    }
}

/// A host process that connected to the device's socket and has not yet finished its
/// `CONNECT <port>\n` line.
pub struct Handshake {
    pub stream: UnixStream,
    line: Vec<u8>,
    pub deadline: Instant,
}

/// How far a handshake got.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeProgress {
    /// Waiting for more bytes.
    Incomplete,
    /// A well-formed line asking for this guest port.
    Connect(u32),
    /// Malformed, too long, or the host hung up: close the connection.
    Failed,
}

impl Handshake {
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            line: Vec::with_capacity(MAX_CONNECT_LINE),
            deadline,
        }
    }

    /// Reads the line one byte at a time, so that bytes the host sends after it stay in the
    /// socket for the guest.
    pub fn advance(&mut self) -> HandshakeProgress {
        let mut byte = [0u8; 1];
        loop {
            match (&self.stream).read(&mut byte) {
                Ok(0) => return HandshakeProgress::Failed,
                Ok(_) => {
                    self.line.push(byte[0]);
                    if byte[0] == b'\n' {
                        return parse_connect_line(&self.line)
                            .map_or(HandshakeProgress::Failed, HandshakeProgress::Connect);
                    }
                    if self.line.len() >= MAX_CONNECT_LINE {
                        return HandshakeProgress::Failed;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return HandshakeProgress::Incomplete;
                }
                Err(_) => return HandshakeProgress::Failed,
            }
        }
    }
}

/// `CONNECT <port>\n`, with an optional `\r` before the newline; the port is decimal.
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let port = line.strip_prefix(b"CONNECT ")?;
    if port.is_empty() || !port.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(port).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (device_side, host_side) = UnixStream::pair().unwrap();
        device_side.set_nonblocking(true).unwrap();
        let key = Key {
            local_port: 1024,
            peer_port: 5000,
        };
        (Connection::guest_initiated(device_side, key), host_side)
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52\n"), Some(52));
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967295\r\n"),
            Some(u32::MAX)
        );
        for bad in [
            &b"CONNECT 52"[..],
            b"CONNECT\n",
            b"CONNECT \n",
            b"connect 52\n",
            b"CONNECT 4294967296\n",
            b"CONNECT -1\n",
            b"CONNECT +1\n",
            b"CONNECT 5 2\n",
            b"LISTEN 52\n",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn credit_toward_the_guest_follows_its_buffer_and_counter() {
        let (mut connection, _host) = pair();
        assert_eq!(connection.peer_credit(), 0);
        connection.update_peer_credit(1000, 0);
        assert_eq!(connection.peer_credit(), 1000);
        connection.sent_to_guest(600);
        assert_eq!(connection.peer_credit(), 400);
        connection.update_peer_credit(1000, 500);
        assert_eq!(connection.peer_credit(), 900);
        // A guest claiming to have consumed more than it got is owed nothing.
        connection.update_peer_credit(1000, 700);
        assert_eq!(connection.peer_credit(), 0);
        assert!(!connection.wants_host_read());
    }

    #[test]
    fn the_guest_cannot_send_past_the_credit_it_was_given() {
        let (mut connection, host) = pair();
        // The host reads nothing: what its socket does not take waits in the connection.
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..4 {
            connection.receive_from_guest(&chunk).unwrap();
        }
        assert_eq!(
            connection.receive_from_guest(&[1]),
            Err(ConnectionError::CreditExceeded { len: 1, credit: 0 })
        );
        // The socket took some of it; telling the guest restores that much credit.
        assert!(connection.credit_update_due());
        let (buf_alloc, fwd_cnt) = connection.advertise_credit();
        assert_eq!(buf_alloc, BUFFER_SIZE);
        assert!(fwd_cnt > 0);
        assert_eq!(connection.guest_credit(), fwd_cnt);
        drop(host);
    }

    #[test]
    fn a_send_shutdown_waits_for_pending_bytes() {
        let (mut connection, mut host) = pair();
        connection.guest_shut_down(SHUTDOWN_SEND);
        assert!(connection.host_write_shut);
        assert_eq!(
            connection.receive_from_guest(b"late"),
            Err(ConnectionError::SendAfterShutdown)
        );
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        connection.guest_shut_down(SHUTDOWN_RECEIVE);
        assert!(connection.is_finished());
    }
}
