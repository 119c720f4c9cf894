//! The byte streams the protocol runs over: a connected stream socket of any family (vsock in
//! a guest, Unix anywhere), listeners for both, and the host's way into a guest port through
//! cove-vmm's vsock socket (Firecracker's `CONNECT <port>` handshake).
//!
//! std has no vsock sockets, so `Stream` and `Listener` own their descriptors and make the few
//! calls a stream needs themselves: read, send (without SIGPIPE), shutdown, dup.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where to serve, or where to announce to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A vsock port: on the listening side any CID, on the connecting side the host (CID 2).
    Vsock {
        port: u32,
    },
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Vsock { port } => write!(formatter, "vsock:{port}"),
            Address::Unix(path) => write!(formatter, "unix:{}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot create a vsock socket (does the guest have a virtio-vsock device?)")]
    VsockSocket(#[source] io::Error),
    #[error("cannot listen on {address}")]
    Listen {
        address: Address,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {address}")]
    Connect {
        address: Address,
        #[source]
        source: io::Error,
    },
    #[error("cannot accept a connection")]
    Accept(#[source] io::Error),
}

/// A connected stream socket.
#[derive(Debug)]
pub struct Stream {
    fd: OwnedFd,
}

impl Stream {
    /// Another handle on the same connection (for a reader and a writer in two threads).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(Stream {
            fd: self.fd.try_clone()?,
        })
    }

    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        let how = match how {
            std::net::Shutdown::Read => libc::SHUT_RD,
            std::net::Shutdown::Write => libc::SHUT_WR,
            std::net::Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown() on a descriptor this value owns; no pointers.
        if unsafe { libc::shutdown(self.fd.as_raw_fd(), how) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A read that waits longer than `timeout` fails with `WouldBlock`; `None` waits forever.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let timeout = timeout.unwrap_or_default();
        let value = libc::timeval {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `value` is a valid timeval that outlives the call, and its size is given.
        let result = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&value as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Connects to `address` (a vsock address means the host, CID 2).
    pub fn connect(address: &Address) -> Result<Stream, TransportError> {
        let error = |source| TransportError::Connect {
            address: address.clone(),
            source,
        };
        match address {
            Address::Unix(path) => Ok(Stream::from(UnixStream::connect(path).map_err(error)?)),
            Address::Vsock { port } => {
                let fd = vsock_socket()?;
                let peer = vsock_address(libc::VMADDR_CID_HOST, *port);
                // SAFETY: `peer` is a valid sockaddr_vm that outlives the call, and its size
                // is given.
                let connected = unsafe {
                    libc::connect(
                        fd.as_raw_fd(),
                        (&peer as *const libc::sockaddr_vm).cast(),
                        size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                    )
                };
                if connected != 0 {
                    return Err(error(io::Error::last_os_error()));
                }
                Ok(Stream { fd })
            }
        }
    }
}

impl From<UnixStream> for Stream {
    fn from(stream: UnixStream) -> Self {
        Stream {
            fd: OwnedFd::from(stream),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Read for &Stream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buffer` is valid for writes of its length for the whole call.
        let read = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        if read < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(read as usize)
    }
}

impl Write for &Stream {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        // SAFETY: `buffer` is valid for reads of its length for the whole call.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buffer.as_ptr().cast(),
                buffer.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }

    fn write_vectored(&mut self, buffers: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is guaranteed ABI-compatible with iovec on Unix.
        message.msg_iov = buffers.as_ptr() as *mut libc::iovec;
        message.msg_iovlen = buffers.len().min(libc::UIO_MAXIOV as usize) as _;
        // SAFETY: `message` points at `buffers`, which stay valid and unchanged for the call.
        let sent = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &message, libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buffer)
    }
}

impl Write for Stream {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        (&*self).write(buffer)
    }

    fn write_vectored(&mut self, buffers: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(buffers)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Listens on `address`: a vsock port of any CID, or a Unix socket path (a stale socket
    /// file there is replaced).
    pub fn bind(address: &Address) -> Result<Listener, TransportError> {
        let error = |source| TransportError::Listen {
            address: address.clone(),
            source,
        };
        match address {
            Address::Unix(path) => {
                remove_stale_socket(path);
                let listener = UnixListener::bind(path).map_err(error)?;
                Ok(Listener {
                    fd: OwnedFd::from(listener),
                })
            }
            Address::Vsock { port } => {
                let fd = vsock_socket()?;
                let local = vsock_address(libc::VMADDR_CID_ANY, *port);
                // SAFETY: `local` is a valid sockaddr_vm that outlives the call, and its size
                // is given.
                let bound = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&local as *const libc::sockaddr_vm).cast(),
                        size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                    )
                };
                if bound != 0 {
                    return Err(error(io::Error::last_os_error()));
                }
                // SAFETY: listen() on a socket this function owns; no pointers.
                if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
                    return Err(error(io::Error::last_os_error()));
                }
                Ok(Listener { fd })
            }
        }
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<Stream, TransportError> {
        loop {
            // SAFETY: accept4() on a listening socket this value owns; the peer address is
            // not asked for, so both pointers are null.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4() just returned this descriptor, and nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                return Ok(Stream { fd });
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(TransportError::Accept(error));
            }
        }
    }
}

/// Removes `path` if it is a socket nobody answers on (left by an agent that is gone).
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path)
        .map(|metadata| metadata.file_type().is_socket())
        .unwrap_or(false);
    if is_socket && UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

fn vsock_socket() -> Result<OwnedFd, TransportError> {
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(TransportError::VsockSocket(io::Error::last_os_error()));
    }
    // SAFETY: socket() just returned this descriptor, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_address(cid: u32, port: u32) -> libc::sockaddr_vm {
    libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: cid,
        svm_zero: [0; 4],
    }
}
