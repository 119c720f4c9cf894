//! The host-initiated half of the muxer: accepting host processes on the device's socket,
//! reading their `CONNECT <port>\n` lines, and the timeouts that close handshakes and REQUESTs
//! left unanswered. One timer covers every deadline; re-arming or disarming it also clears its
//! readiness, so it is never read.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::{
    backend_error, Muxer, FIRST_HOST_PORT, LISTENER_PAUSE, MAX_CONNECTIONS, MAX_HANDSHAKES,
};
use crate::virtio::vsock::connection::{
    control, Connection, Handshake, HandshakeProgress, Key, State,
};
use crate::virtio::vsock::socket::{accept_nonblocking, send_nonblocking};
use crate::virtio::VirtioError;

impl Muxer {
    pub(super) fn accept_all(&mut self) -> Result<(), VirtioError> {
        loop {
            match accept_nonblocking(&self.listener) {
                Ok(stream) => self.start_handshake(stream)?,
                Err(error) => match error.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(()),
                    Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => {}
                    // Out of descriptors or memory: the pending connection would keep the
                    // listener readable, so rest it a moment instead of spinning.
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        return self.pause_listener();
                    }
                    _ => return Err(backend_error("accept host connections")(error)),
                },
            }
        }
    }

    fn pause_listener(&mut self) -> Result<(), VirtioError> {
        let fd = self.listener.as_raw_fd();
        self.device_events
            .ctl(
                ControlOperation::Delete,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
            .map_err(backend_error("pause the listener"))?;
        let until = Instant::now() + LISTENER_PAUSE;
        self.listener_paused_until = Some(until);
        self.arm_timer(until)
    }

    fn start_handshake(&mut self, stream: UnixStream) -> Result<(), VirtioError> {
        let full = self.handshakes.len() >= MAX_HANDSHAKES
            || self.handshakes.len() + self.connections.len() >= MAX_CONNECTIONS;
        let fd = stream.as_raw_fd();
        if full
            || self
                .device_events
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .is_err()
        {
            // Dropping the stream closes it: the host process reads end of stream.
            self.counters.refused_host_connections += 1;
            return Ok(());
        }
        let deadline = Instant::now() + self.timeouts.connect_line;
        self.handshakes.insert(fd, Handshake::new(stream, deadline));
        self.arm_timer(deadline)
    }

    pub(super) fn advance_handshake(&mut self, fd: RawFd) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        match handshake.advance() {
            HandshakeProgress::Incomplete => {}
            HandshakeProgress::Failed => {
                self.handshakes.remove(&fd);
                self.counters.refused_host_connections += 1;
            }
            HandshakeProgress::Connect(port) => {
                let Some(handshake) = self.handshakes.remove(&fd) else {
                    return;
                };
                // The socket stays open, so it must leave the set by hand.
                let removed = self.device_events.ctl(
                    ControlOperation::Delete,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                );
                if removed.is_ok() && self.connections.len() < MAX_CONNECTIONS {
                    self.host_connect(handshake.stream, port);
                } else {
                    self.counters.refused_host_connections += 1;
                }
            }
        }
    }

    /// A host process asked for guest port `peer_port`: pick a host port and queue a REQUEST.
    fn host_connect(&mut self, stream: UnixStream, peer_port: u32) {
        let local_port = loop {
            let port = self.next_host_port;
            // u32::MAX is VMADDR_PORT_ANY, never a real port.
            self.next_host_port = if port >= u32::MAX - 1 {
                FIRST_HOST_PORT
            } else {
                port + 1
            };
            let taken = self.connections.keys().any(|key| key.local_port == port);
            // Fewer than MAX_CONNECTIONS ports are taken, so this ends soon.
            if !taken {
                break port;
            }
        };
        let key = Key {
            local_port,
            peer_port,
        };
        self.insert(Connection::host_initiated(stream, key));
        self.queue_control(key, control::REQUEST);
    }

    // ---- Timeouts ----

    pub(super) fn arm_timer(&mut self, deadline: Instant) -> Result<(), VirtioError> {
        if self.timer_deadline.is_some_and(|armed| armed <= deadline) {
            return Ok(());
        }
        let delay = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        self.timer
            .reset(delay, None)
            .map_err(|error| backend_error("arm the timeout timer")(error.into()))?;
        self.timer_deadline = Some(deadline);
        Ok(())
    }

    /// The timer fired: close handshakes and unanswered REQUESTs past their deadline, and let
    /// a resting listener accept again. Re-arming (or disarming) the timer also clears its
    /// readiness, so it is never read.
    pub(super) fn expire(&mut self) -> Result<(), VirtioError> {
        let now = Instant::now();
        self.timer_deadline = None;
        let before = self.handshakes.len();
        self.handshakes
            .retain(|_, handshake| handshake.deadline > now);
        self.counters.refused_host_connections += (before - self.handshakes.len()) as u64;
        let unanswered: Vec<Key> = self
            .connections
            .values()
            .filter(|connection| {
                matches!(connection.state,
                    State::AwaitingResponse { deadline: Some(deadline) } if deadline <= now)
            })
            .map(|connection| connection.key)
            .collect();
        for key in unanswered {
            self.reset_stream(key);
        }
        if self.listener_paused_until.is_some_and(|until| until <= now) {
            let fd = self.listener.as_raw_fd();
            self.device_events
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .map_err(backend_error("resume the listener"))?;
            self.listener_paused_until = None;
        }
        let next = self
            .handshakes
            .values()
            .map(|handshake| handshake.deadline)
            .chain(
                self.connections
                    .values()
                    .filter_map(|connection| match connection.state {
                        State::AwaitingResponse { deadline } => deadline,
                        State::Established => None,
                    }),
            )
            .chain(self.listener_paused_until)
            .min();
        match next {
            Some(deadline) => self.arm_timer(deadline),
            None => self
                .timer
                .clear()
                .map_err(|error| backend_error("disarm the timeout timer")(error.into())),
        }
    }
}

/// Tells the host process its stream is connected: `OK <host port>\n`. The socket is fresh and
/// the line short, so it always fits; if it does not, the stream is reset.
pub(super) fn write_ok_line(connection: &Connection) -> bool {
    let line = format!("OK {}\n", connection.key.local_port);
    matches!(send_nonblocking(&connection.stream, line.as_bytes()), Ok(sent) if sent == line.len())
}
