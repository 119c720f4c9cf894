//! vsock-probe: a test program, not part of cove. cove's Linux virtio test puts it, built
//! static, into the guest's root filesystem (`resources/build-virtio-rootfs`), where the guest's
//! init runs it to check the virtio-vsock device from both ends:
//!
//! ```text
//! vsock-probe connect PORT TEXT [TIMEOUT_S]   connect to the host (CID 2) at PORT, send
//!                                             TEXT and a newline, read the reply up to EOF or
//!                                             a newline and print `vsock-probe: reply <text>`
//! vsock-probe serve PORT [TIMEOUT_S]          listen on PORT of any CID, accept one
//!                                             connection, read a line, answer
//!                                             `echo: <line>` and print
//!                                             `vsock-probe: served <line>`
//! ```
//!
//! Each wait (for the connection to serve, for a reply, for a line) gives up after TIMEOUT_S
//! seconds (300 unless given), so a guest whose host side never comes does not hang its test.
//! Failures print one `vsock-probe: error: ...` line to stderr and exit with status 1; bad
//! usage exits with status 2.
//!
//! It makes few system calls on purpose: in the kvm-pvm guest each one costs milliseconds.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long each wait lasts unless the command line says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest line read; a longer one is an error, not a reason to grow without bound.
const MAX_LINE_BYTES: usize = 4096;

const USAGE: &str =
    "usage: vsock-probe connect PORT TEXT [TIMEOUT_S]\n       vsock-probe serve PORT [TIMEOUT_S]";

/// What the command line asks for.
enum Mode {
    Connect { port: u32, text: String },
    Serve { port: u32 },
}

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let (mode, timeout) = match parse(&arguments) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("vsock-probe: error: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match mode {
        Mode::Connect { port, text } => {
            connect(port, &text, timeout).map(|reply| println!("vsock-probe: reply {reply}"))
        }
        Mode::Serve { port } => {
            serve(port, timeout).map(|line| println!("vsock-probe: served {line}"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("vsock-probe: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn parse(arguments: &[String]) -> Result<(Mode, Duration), String> {
    let port = |text: Option<&String>| -> Result<u32, String> {
        let text = text.ok_or("PORT is missing")?;
        text.parse()
            .map_err(|_| format!("port \"{text}\" is not a number from 0 to 4294967295"))
    };
    let timeout = |text: Option<&String>| -> Result<Duration, String> {
        text.map_or(Ok(DEFAULT_TIMEOUT), |text| {
            text.parse()
                .map(Duration::from_secs)
                .map_err(|_| format!("timeout \"{text}\" is not a number of seconds"))
        })
    };
    let (mode, rest) = match arguments.first().map(String::as_str) {
        Some("connect") => {
            let text = arguments.get(2).ok_or("TEXT is missing")?;
            if text.contains('\n') {
                return Err("TEXT must be one line".to_string());
            }
            let mode = Mode::Connect {
                port: port(arguments.get(1))?,
                text: text.clone(),
            };
            (mode, &arguments[3..])
        }
        Some("serve") => {
            let mode = Mode::Serve {
                port: port(arguments.get(1))?,
            };
            (mode, arguments.get(2..).unwrap_or_default())
        }
        Some(other) => return Err(format!("unknown mode \"{other}\"")),
        None => return Err("no mode given".to_string()),
    };
    if rest.len() > 1 {
        return Err(format!("unexpected argument \"{}\"", rest[1]));
    }
    Ok((mode, timeout(rest.first())?))
}

/// Connects to the host's `port`, sends `text` and a newline, and returns the reply.
fn connect(port: u32, text: &str, timeout: Duration) -> Result<String, String> {
    let socket = vsock_socket()?;
    let address = vsock_address(libc::VMADDR_CID_HOST, port);
    // SAFETY: `address` is a valid sockaddr_vm that outlives the call, and its size is given.
    let connected = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_vm).cast(),
            size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if connected != 0 {
        return Err(format!(
            "cannot connect to the host (CID 2) port {port}: {}",
            io::Error::last_os_error()
        ));
    }
    let mut stream = File::from(socket);
    stream
        .write_all(format!("{text}\n").as_bytes())
        .map_err(|error| format!("cannot send to the host port {port}: {error}"))?;
    read_line(&mut stream, Instant::now() + timeout)
        .map_err(|error| format!("no reply from the host port {port}: {error}"))
}

/// Accepts one connection on `port`, answers its first line, and returns that line.
fn serve(port: u32, timeout: Duration) -> Result<String, String> {
    let listener = vsock_socket()?;
    let address = vsock_address(libc::VMADDR_CID_ANY, port);
    // SAFETY: `address` is a valid sockaddr_vm that outlives the call, and its size is given.
    let bound = unsafe {
        libc::bind(
            listener.as_raw_fd(),
            (&address as *const libc::sockaddr_vm).cast(),
            size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(format!(
            "cannot bind port {port}: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: listen() on a socket this function owns.
    if unsafe { libc::listen(listener.as_raw_fd(), 1) } != 0 {
        return Err(format!(
            "cannot listen on port {port}: {}",
            io::Error::last_os_error()
        ));
    }
    let deadline = Instant::now() + timeout;
    wait_readable(&listener, deadline)
        .map_err(|error| format!("no connection to port {port}: {error}"))?;
    // SAFETY: accept() on a listening socket this function owns; the peer address is not
    // asked for, so both pointers are null.
    let accepted = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if accepted < 0 {
        return Err(format!(
            "cannot accept a connection on port {port}: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: accept4() just returned this descriptor, and nothing else owns it.
    let mut stream = File::from(unsafe { OwnedFd::from_raw_fd(accepted) });
    let line = read_line(&mut stream, deadline)
        .map_err(|error| format!("no line from the connection to port {port}: {error}"))?;
    stream
        .write_all(format!("echo: {line}\n").as_bytes())
        .map_err(|error| format!("cannot answer on port {port}: {error}"))?;
    Ok(line)
}

fn vsock_socket() -> Result<OwnedFd, String> {
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!(
            "cannot create a vsock socket (is there a virtio-vsock device?): {}",
            io::Error::last_os_error()
        ));
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

/// Reads up to a newline (not returned) or EOF, waiting no later than `deadline`.
fn read_line(stream: &mut File, deadline: Instant) -> io::Result<String> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        wait_readable(stream, deadline)?;
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        line.extend_from_slice(&chunk[..read]);
        if let Some(end) = line.iter().position(|&byte| byte == b'\n') {
            line.truncate(end);
            break;
        }
        if line.len() > MAX_LINE_BYTES {
            return Err(io::Error::other(format!(
                "the line is longer than {MAX_LINE_BYTES} bytes"
            )));
        }
    }
    String::from_utf8(line).map_err(|_| io::Error::other("the line is not UTF-8"))
}

/// Waits until `fd` is readable (or a connection is waiting on a listener).
fn wait_readable(fd: &impl AsRawFd, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        let mut poll_fd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = left.as_millis().clamp(1, libc::c_int::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd, which outlives the call.
        match unsafe { libc::poll(&mut poll_fd, 1, millis) } {
            ready if ready > 0 => return Ok(()),
            0 => continue,
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}
