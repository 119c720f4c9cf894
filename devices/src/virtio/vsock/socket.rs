//! The three Unix-socket calls the device needs that std does not offer: accepting and
//! connecting without ever blocking the event loop, and sending without raising SIGPIPE.
//!
//! std's `UnixStream::connect` blocks while the listener's backlog is full, and its
//! `set_nonblocking` costs an extra `ioctl` per socket; these create every socket non-blocking
//! from the start.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Accepts one connection as a non-blocking, close-on-exec socket.
pub fn accept_nonblocking(listener: &UnixListener) -> io::Result<UnixStream> {
    // SAFETY: `listener` is a live socket for the duration of the call; null address pointers
    // ask the kernel not to report the peer's address, so no memory is written.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 just returned this descriptor and nothing else owns it.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Connects to the Unix socket at `path` without blocking: a listener whose backlog is full
/// fails with `WouldBlock` instead of holding the caller.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) address.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // The path needs a terminating NUL inside sun_path.
    if bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path does not fit a Unix socket address",
        ));
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    let len = offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;

    // SAFETY: plain system call with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket just returned this descriptor and nothing else owns it; from here on it
    // is closed on every path.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    debug_assert!(len <= size_of::<libc::sockaddr_un>());
    // SAFETY: `address` is a valid sockaddr_un that outlives the call and `len` does not
    // exceed its size (checked above); the kernel only reads it.
    let result = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

/// Sends what it can of `bytes` without blocking; a peer that has gone away yields `EPIPE`
/// rather than a SIGPIPE that would kill the VMM.
pub fn send_nonblocking(stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length describe `bytes`, which outlives the call; the kernel
        // only reads it.
        let sent = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn connects_accepts_and_sends_without_blocking() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("listener");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        assert_eq!(
            accept_nonblocking(&listener).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let client = connect_nonblocking(&path).unwrap();
        let mut server = accept_nonblocking(&listener).unwrap();
        assert_eq!(send_nonblocking(&client, b"ping").unwrap(), 4);
        let mut bytes = [0u8; 4];
        server.read_exact(&mut bytes).unwrap();
        assert_eq!(&bytes, b"ping");
        drop(server);
        assert_eq!(
            send_nonblocking(&client, b"x").unwrap_err().raw_os_error(),
            Some(libc::EPIPE)
        );

        let missing = directory.path().join("nobody");
        assert!(connect_nonblocking(&missing).is_err());
        let long = directory.path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
