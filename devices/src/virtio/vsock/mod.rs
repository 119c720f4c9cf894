//! virtio-vsock (virtio 1.2, section 5.10) with its host side on Unix sockets, as Firecracker
//! users know it.
//!
//! Stream sockets only. Three queues: receive (0), transmit (1) and event (2); the configuration
//! space holds the guest's context id. The host is context id 2.
//!
//! - Host to guest: a host process connects to the device's Unix socket and writes
//!   `CONNECT <port>\n`; the device sends the guest a REQUEST for that port from a host port of
//!   its own, and on the guest's RESPONSE writes `OK <host port>\n` to the process. From then
//!   on the Unix stream carries the bytes both ways.
//! - Guest to host: a guest connecting to host port P is connected to the Unix socket
//!   `<socket>_P`; RESPONSE if someone listens there, RST otherwise.
//!
//! What lives here: the device and its queues. The packet format is in `packet`, one stream's
//! state and credit in `connection`, the host sockets and their epoll sets in `muxer`, the
//! receive ring in `rx`, and the few socket calls std lacks in `socket`. The device never
//! blocks: every host socket is non-blocking and the VMM learns of host-side work through
//! [`VirtioDevice::backend_fd`]. It removes nothing from the file system: the socket file stays
//! after the device is dropped, for whoever created the path to remove.

mod connection;
mod muxer;
mod packet;
mod rx;
mod socket;
#[cfg(test)]
mod tests;

use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use self::muxer::Muxer;
use self::packet::Segment;
use self::rx::{RxQueue, RX_QUEUE_INDEX};
use super::{check_queues, serve_queue, Activation, InterruptLine, VirtioDevice, VirtioError};

pub use self::connection::{BUFFER_SIZE, MAX_CONNECT_LINE};
pub use self::muxer::{Timeouts, FIRST_HOST_PORT, MAX_CONNECTIONS, MAX_HANDSHAKES};
pub use self::packet::{HOST_CID, MAX_PAYLOAD};

/// The size of each of the device's queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
const TX_QUEUE_INDEX: usize = 1;
const EVENT_QUEUE_INDEX: usize = 2;
/// The smallest context id a guest may have: 0 and 1 belong to the hypervisor, 2 to the host.
pub const MIN_GUEST_CID: u64 = 3;
/// `sockaddr_un.sun_path` holds 108 bytes with its terminating NUL; the device's socket path
/// leaves room for `_<port>` (up to 11 bytes) so that guest-initiated connections can be
/// routed.
pub const MAX_SOCKET_PATH: usize = 107 - 11;

/// How a vsock device is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id: 3 or more, fitting in 32 bits, not 0xffff_ffff.
    pub guest_cid: u64,
    /// Where the device listens for host processes; must not exist yet.
    pub socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error(
        "vsock guest cid {0} is reserved or out of range: use a value from 3 to 4294967294 \
         (0 and 1 belong to the hypervisor, 2 to the host, 4294967295 means any)"
    )]
    InvalidCid(u64),
    #[error(
        "vsock socket path {path} is {len} bytes long; use at most {MAX_SOCKET_PATH} bytes so \
         that `<path>_<port>` still fits a Unix socket address"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error(
        "vsock socket path {path} already exists; remove it (a socket left by an earlier VM) or \
         choose another path"
    )]
    SocketExists { path: PathBuf },
    #[error(
        "cannot listen on vsock socket {path}; check that its directory exists and is writable"
    )]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the vsock device's event polling")]
    HostSide(#[source] std::io::Error),
}

/// Counters of what the device has done, for the VMM's API and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockCounters {
    /// Transmit chains served, good or bad.
    pub tx_packets: u64,
    /// Packets written into receive buffers.
    pub rx_packets: u64,
    /// Transmit packets dropped as malformed or misaddressed.
    pub dropped_packets: u64,
    /// RSTs dropped because too many were waiting for receive buffers.
    pub dropped_resets: u64,
    /// Receive chains returned unused because they were malformed.
    pub bad_rx_chains: u64,
    /// Host processes closed before their stream reached the guest: a bad or late CONNECT
    /// line, or too many streams.
    pub refused_host_connections: u64,
    pub open_connections: usize,
}

struct Active {
    memory: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    /// Kept with the driver's buffers in it: the device sends no events (see `activate`).
    _event: Queue,
    interrupt: Arc<dyn InterruptLine>,
}

/// A virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    active: Option<Active>,
    /// The chain being served; kept to avoid allocating per packet.
    segments: Vec<Segment>,
}

impl Vsock {
    /// Checks the configuration and starts listening on its socket; host processes may connect
    /// from now on, and their streams reach the guest once its driver is up.
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        let cid = config.guest_cid;
        if cid < MIN_GUEST_CID || cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cid));
        }
        check_socket_path(&config.socket)?;
        Ok(Self {
            guest_cid: cid,
            muxer: Muxer::new(cid, &config.socket)?,
            active: None,
            segments: Vec::with_capacity(usize::from(QUEUE_SIZE)),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn counters(&self) -> VsockCounters {
        self.muxer.counters()
    }

    /// Changes how long host-initiated connections may take (tests use short ones).
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.muxer.set_timeouts(timeouts);
    }

    /// Delivers what the guest is owed (and reads host sockets when `read_host` is set) as far
    /// as receive buffers allow, then raises the receive interrupt if needed.
    fn serve_host(&mut self, read_host: bool) -> Result<(), VirtioError> {
        let Self {
            muxer,
            active,
            segments,
            ..
        } = self;
        let Some(active) = active else {
            return if read_host {
                muxer.process_host_events(None)
            } else {
                Ok(())
            };
        };
        let mut rx = RxQueue::new(&active.memory, &mut active.rx, segments);
        let result = if read_host {
            muxer.process_host_events(Some(&mut rx))
        } else {
            muxer
                .deliver_control(&mut rx)
                .and_then(|()| muxer.rx_done(&rx))
        };
        // Buffers already used must reach the driver even if something failed after them.
        let finished = rx.finish(active.interrupt.as_ref());
        result.and(finished)
    }
}

fn check_socket_path(path: &Path) -> Result<(), VsockError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(VsockError::SocketPathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    if path.symlink_metadata().is_ok() {
        return Err(VsockError::SocketExists {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    /// No feature bits: stream sockets are implied when VIRTIO_VSOCK_F_NO_IMPLIED_STREAM is not
    /// offered, and SEQPACKET is not supported.
    fn features(&self) -> u64 {
        0
    }

    /// `struct virtio_vsock_config`: the guest's context id, 64 bits little-endian.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (position, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(position as u64)
                .and_then(|at| config.get(usize::try_from(at).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// No TRANSPORT_RESET event is sent: a Linux driver that resets the device has already
    /// reset its own sockets, and a fresh driver has none. The event is for a device that lost
    /// its streams behind the driver's back (a snapshot restored elsewhere), which cove does
    /// not do.
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        check_queues(&activation.queues, &activation.memory, QUEUE_SIZES.len())?;
        let Activation {
            memory,
            queues,
            interrupt,
            ..
        } = activation;
        let [rx, tx, event]: [Queue; 3] =
            queues
                .try_into()
                .map_err(|queues: Vec<Queue>| VirtioError::QueueCount {
                    expected: QUEUE_SIZES.len(),
                    got: queues.len(),
                })?;
        self.active = Some(Active {
            memory,
            rx,
            tx,
            _event: event,
            interrupt,
        });
        self.muxer.activate()
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, queue_index: usize) -> Result<(), VirtioError> {
        match queue_index {
            RX_QUEUE_INDEX => {
                if self.active.is_some() {
                    self.muxer.rx_available();
                }
                self.serve_host(false)
            }
            TX_QUEUE_INDEX => {
                let Self {
                    muxer,
                    active,
                    segments,
                    ..
                } = self;
                let Some(active) = active else {
                    return Ok(());
                };
                let Active {
                    memory,
                    tx,
                    interrupt,
                    ..
                } = active;
                serve_queue(tx, TX_QUEUE_INDEX, memory, interrupt.as_ref(), |chain| {
                    segments.clear();
                    let mut complete = true;
                    for descriptor in chain {
                        // virtio-queue ends a chain early on a bad link or a loop; the
                        // last descriptor then still says "next".
                        complete = !descriptor.has_next();
                        segments.push(Segment {
                            address: descriptor.addr(),
                            len: descriptor.len(),
                            device_writable: descriptor.is_write_only(),
                        });
                    }
                    muxer.handle_tx(memory, segments, complete && !segments.is_empty());
                    // The device writes nothing into transmit buffers.
                    0
                })?;
                // Answers (RESPONSE, RST, credit) go out at once if buffers allow.
                self.serve_host(false)
            }
            EVENT_QUEUE_INDEX => Ok(()),
            _ => Err(VirtioError::NoSuchQueue { queue_index }),
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.backend_fd())
    }

    fn process_backend(&mut self) -> Result<(), VirtioError> {
        self.serve_host(true)
    }
}
