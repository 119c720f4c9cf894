//! The host side of the fuzzed devices: a directory for disk images and Unix sockets, a network
//! namespace of the fuzzer's own with one tap and the sockets that put traffic on it, and the
//! Unix-socket peers of a vsock device.
//!
//! The host's own network is never touched: the calling thread moves into a fresh network
//! namespace before anything is created, and nothing is configured unless that namespace holds
//! only `lo`. Without the namespace or the tap (not root, no /dev/net/tun), net inputs are skipped.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::mem::size_of;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cove_devices::virtio::net::{MacAddress, Net, Tap};
use cove_devices::virtio::vsock::FIRST_HOST_PORT;

pub const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

pub struct Environment {
    /// Disk images and vsock sockets, removed when the process exits.
    pub directory: PathBuf,
    pub network: Option<Network>,
}

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();
static DIRECTORY: OnceLock<PathBuf> = OnceLock::new();

/// Set up on first use: the network namespace first of all, then the rest.
pub fn environment() -> &'static Environment {
    ENVIRONMENT.get_or_init(|| {
        let network = Network::new()
            .map_err(|reason| eprintln!("virtio_devices: skipping net inputs: {reason}"))
            .ok();
        // A peer that went away must not kill the fuzzer, as it does not kill the VMM (Rust
        // programs ignore SIGPIPE; this one has no Rust `main` to do it).
        // SAFETY: installing SIG_IGN for SIGPIPE involves no handler code.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let directory = make_directory();
        DIRECTORY.set(directory.clone()).expect("set once");
        // SAFETY: `remove_directory` is a plain function that stays valid until exit.
        unsafe { libc::atexit(remove_directory) };
        Environment { directory, network }
    })
}

/// `cove-fuzz-<pid>`, memory-backed where possible (FLUSH then costs no disk writes). A process
/// that crashed left its directory behind: those of processes gone are removed first.
fn make_directory() -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|name| name.strip_prefix("cove-fuzz-"));
        if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let directory = base.join(format!("cove-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir(&directory).expect("create the fuzzer's temporary directory");
    directory
}

extern "C" fn remove_directory() {
    if let Some(directory) = DIRECTORY.get() {
        let _ = std::fs::remove_dir_all(directory);
    }
}

/// One tap in the fuzzer's own network namespace, the net device on it (kept for the whole
/// process: making a tap per input would cost more than the input), and the sockets that put
/// host traffic on the tap.
pub struct Network {
    pub device: Arc<Mutex<Net>>,
    /// The tap's descriptor, duplicated: empties the tap between inputs.
    tap: File,
    /// AF_PACKET, protocol 0 (receives nothing): sends raw frames out of the host's end.
    packet: OwnedFd,
    ifindex: libc::c_int,
    udp: UdpSocket,
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn owned(fd: RawFd, what: &str) -> Result<OwnedFd, String> {
    if fd < 0 {
        return Err(os_error(what));
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Network {
    fn new() -> Result<Self, String> {
        // SAFETY: unshare takes no pointers; it moves this thread alone into a new namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(os_error(
                "cannot make a network namespace (unshare(CLONE_NEWNET))",
            ));
        }
        let interfaces = std::fs::read_to_string("/proc/thread-self/net/dev")
            .map_err(|error| error.to_string())?;
        let interfaces: Vec<&str> = interfaces
            .lines()
            .skip(2)
            .filter_map(|line| line.split(':').next())
            .map(str::trim)
            .collect();
        if interfaces != ["lo"] {
            return Err(format!(
                "the new namespace holds {interfaces:?}, not just lo; configuring nothing"
            ));
        }
        // IPv6 would send router and neighbour solicitations of its own into the tap.
        if Path::new("/proc/sys/net/ipv6/conf").exists() {
            for scope in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"), "1")
                    .map_err(|error| format!("cannot disable IPv6: {error}"))?;
            }
        }
        let tap = Tap::create(None, HOST_ADDRESS, NETMASK).map_err(|error| error.to_string())?;
        // SAFETY: dup takes no pointers; the tap's descriptor is open.
        let copy = owned(unsafe { libc::dup(tap.as_raw_fd()) }, "dup the tap")?;
        let name = CString::new(tap.name()).map_err(|error| error.to_string())?;
        // SAFETY: `name` is a NUL-terminated string alive for the call, which only reads it.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as libc::c_int;
        add_neighbour(tap.name(), GUEST_ADDRESS, GUEST_MAC)?;
        // SAFETY: socket(2) takes no pointers.
        let packet = owned(
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) },
            "AF_PACKET socket",
        )?;
        let udp = UdpSocket::bind((HOST_ADDRESS, 0)).map_err(|error| error.to_string())?;
        udp.set_nonblocking(true)
            .map_err(|error| error.to_string())?;
        let mac = MacAddress::try_from(GUEST_MAC).map_err(|error| error.to_string())?;
        let device = Net::new(tap, mac).map_err(|error| error.to_string())?;
        Ok(Self {
            device: Arc::new(Mutex::new(device)),
            tap: File::from(copy),
            packet,
            ifindex,
            udp,
        })
    }

    /// Forgets what earlier inputs left on the tap and the UDP socket.
    pub fn drain(&self) {
        let mut buffer = vec![0u8; 70_000];
        // Both are non-blocking: an empty queue reads as WouldBlock.
        while (&self.tap).read(&mut buffer).is_ok_and(|len| len > 0) {}
        while self.udp.recv(&mut buffer).is_ok() {}
    }

    /// Sends `frame` (Ethernet header first) out of the host's end of the tap: the device reads
    /// it as a received frame. Frames the kernel refuses (too short) are not sent.
    pub fn inject(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain integers and bytes; all zeroes is valid.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as libc::c_ushort;
        address.sll_ifindex = self.ifindex;
        address.sll_halen = 6;
        for (slot, byte) in address.sll_addr.iter_mut().zip(frame.iter().take(6)) {
            *slot = *byte;
        }
        // SAFETY: the buffer is `frame`, live for its length; the address points to `address`,
        // a live sockaddr_ll of the length given.
        unsafe {
            libc::sendto(
                self.packet.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
                (&address as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
    }

    /// A datagram from the host to the guest's address: the kernel builds the frame (with a
    /// partial checksum when the driver accepted checksum offload).
    pub fn send_udp(&self, port: u16, payload: &[u8]) {
        let _ = self.udp.send_to(payload, (GUEST_ADDRESS, port.max(1)));
    }
}

/// A permanent ARP entry: the kernel sends to the guest at once, never asking first (which would
/// put timed retries on the tap).
fn add_neighbour(tap: &str, address: Ipv4Addr, mac: [u8; 6]) -> Result<(), String> {
    const ATF_COM: libc::c_int = 0x02;
    const ATF_PERM: libc::c_int = 0x04;
    // SAFETY: socket(2) takes no pointers.
    let control = owned(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
        "socket",
    )?;
    // SAFETY: struct arpreq is socket addresses, an int and a byte array; all zeroes is valid.
    let mut request: libc::arpreq = unsafe { std::mem::zeroed() };
    request.arp_pa.sa_family = libc::AF_INET as libc::sa_family_t;
    for (slot, byte) in request.arp_pa.sa_data[2..6]
        .iter_mut()
        .zip(address.octets())
    {
        *slot = byte as libc::c_char;
    }
    request.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (slot, byte) in request.arp_ha.sa_data.iter_mut().zip(mac) {
        *slot = byte as libc::c_char;
    }
    request.arp_flags = ATF_COM | ATF_PERM;
    for (slot, byte) in request.arp_dev.iter_mut().zip(tap.bytes()) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: SIOCSARP reads the arpreq `request`, live for the call.
    if unsafe { libc::ioctl(control.as_raw_fd(), libc::SIOCSARP, &request) } < 0 {
        return Err(os_error("cannot add the guest's ARP entry"));
    }
    Ok(())
}

/// Sends without blocking and without SIGPIPE; what the peer does not take is dropped.
fn send(stream: &UnixStream, bytes: &[u8]) {
    // SAFETY: the buffer is `bytes`, live and readable for its length.
    unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
}

/// Reads what is there without blocking; `None` at end of stream.
fn receive(mut stream: &UnixStream) -> Option<Vec<u8>> {
    let mut buffer = [0u8; 4096];
    match stream.read(&mut buffer) {
        Ok(0) => None,
        Ok(len) => Some(buffer[..len].to_vec()),
        Err(_) => Some(Vec::new()),
    }
}

/// A host process that connected to the device's socket.
struct Client {
    stream: UnixStream,
    /// What it read before the first newline: must be `OK <host port>`.
    greeting: Vec<u8>,
    greeted: bool,
}

impl Client {
    /// Reads what arrived and checks the greeting, as far as it got.
    fn read(&mut self) {
        let Some(bytes) = receive(&self.stream) else {
            return;
        };
        for byte in bytes {
            if self.greeted {
                break;
            }
            self.greeting.push(byte);
            self.greeted = byte == b'\n';
        }
        check_greeting(&self.greeting, self.greeted);
    }
}

/// `OK <port>\n` with a host port from [`FIRST_HOST_PORT`] on, or a prefix of one.
fn check_greeting(line: &[u8], complete: bool) {
    let valid_prefix = line
        .iter()
        .enumerate()
        .all(|(position, &byte)| match position {
            0..=2 => byte == b"OK "[position],
            _ => byte.is_ascii_digit() || (byte == b'\n' && position + 1 == line.len()),
        });
    assert!(
        valid_prefix && line.len() <= 14,
        "vsock: a host process read {line:?} before its OK line"
    );
    if complete {
        let port: u64 = std::str::from_utf8(&line[3..line.len() - 1])
            .ok()
            .and_then(|digits| digits.parse().ok())
            .unwrap_or_else(|| panic!("vsock: OK line {line:?} names no port"));
        assert!(
            (u64::from(FIRST_HOST_PORT)..u64::from(u32::MAX)).contains(&port),
            "vsock: OK line names host port {port}, outside the device's range"
        );
    }
}

/// The host processes around one vsock device: clients of its socket, listeners at
/// `<socket>_<port>` for guest-initiated connections, and the streams those accepted.
pub struct VsockPeers {
    socket: PathBuf,
    listeners: Vec<(PathBuf, UnixListener)>,
    clients: Vec<Client>,
    accepted: Vec<UnixStream>,
}

/// The host ports the guest can connect to.
pub const LISTENING_PORTS: [u32; 3] = [1, 2, 1024];
const MAX_PEERS: usize = 8;

impl VsockPeers {
    pub fn new(socket: &Path) -> Self {
        let listeners = LISTENING_PORTS
            .iter()
            .map(|port| {
                let mut path = socket.as_os_str().to_owned();
                path.push(format!("_{port}"));
                let path = PathBuf::from(path);
                let _ = std::fs::remove_file(&path);
                let listener = UnixListener::bind(&path).expect("bind a port listener");
                listener
                    .set_nonblocking(true)
                    .expect("non-blocking listener");
                (path, listener)
            })
            .collect();
        Self {
            socket: socket.to_path_buf(),
            listeners,
            clients: Vec::new(),
            accepted: Vec::new(),
        }
    }

    /// A host process connects and sends `line` (with `CONNECT <port>\n` usually in it).
    pub fn connect(&mut self, line: &[u8]) {
        if self.clients.len() >= MAX_PEERS {
            return;
        }
        let Ok(stream) = UnixStream::connect(&self.socket) else {
            return;
        };
        stream.set_nonblocking(true).expect("non-blocking client");
        send(&stream, line);
        self.clients.push(Client {
            stream,
            greeting: Vec::new(),
            greeted: false,
        });
    }

    pub fn client_write(&mut self, which: u8, bytes: &[u8]) {
        if let Some(client) = pick(&mut self.clients, which) {
            send(&client.stream, bytes);
        }
    }

    pub fn client_read(&mut self, which: u8) {
        if let Some(client) = pick(&mut self.clients, which) {
            client.read();
        }
    }

    /// Closes a client, or shuts down one direction of it.
    pub fn client_close(&mut self, which: u8, how: u8) {
        if self.clients.is_empty() {
            return;
        }
        let index = usize::from(which) % self.clients.len();
        match how % 3 {
            0 => drop(self.clients.remove(index)),
            1 => drop(
                self.clients[index]
                    .stream
                    .shutdown(std::net::Shutdown::Write),
            ),
            _ => drop(
                self.clients[index]
                    .stream
                    .shutdown(std::net::Shutdown::Read),
            ),
        }
    }

    /// Accepts what the guest's connections left on the listeners; done before anything is
    /// done with accepted streams, as a server would.
    pub fn accept(&mut self) {
        for (_, listener) in &self.listeners {
            while self.accepted.len() < MAX_PEERS {
                let Ok((stream, _)) = listener.accept() else {
                    break;
                };
                stream.set_nonblocking(true).expect("non-blocking stream");
                self.accepted.push(stream);
            }
        }
    }

    pub fn accepted_write(&mut self, which: u8, bytes: &[u8]) {
        self.accept();
        if let Some(stream) = pick(&mut self.accepted, which) {
            send(stream, bytes);
        }
    }

    pub fn accepted_read(&mut self, which: u8) {
        self.accept();
        if let Some(stream) = pick(&mut self.accepted, which) {
            let _ = receive(stream);
        }
    }

    pub fn accepted_close(&mut self, which: u8, how: u8) {
        self.accept();
        if self.accepted.is_empty() {
            return;
        }
        let index = usize::from(which) % self.accepted.len();
        match how % 3 {
            0 => drop(self.accepted.remove(index)),
            1 => drop(self.accepted[index].shutdown(std::net::Shutdown::Write)),
            _ => drop(self.accepted[index].shutdown(std::net::Shutdown::Read)),
        }
    }

    /// Reads whatever the clients still have, checking their greetings.
    pub fn finish(&mut self) {
        for client in &mut self.clients {
            client.read();
        }
    }
}

impl Drop for VsockPeers {
    fn drop(&mut self) {
        for (path, _) in &self.listeners {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn pick<T>(items: &mut [T], which: u8) -> Option<&mut T> {
    if items.is_empty() {
        return None;
    }
    let len = items.len();
    items.get_mut(usize::from(which) % len)
}
