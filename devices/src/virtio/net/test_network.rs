//! The host side of the virtio-net tests: a fresh network namespace per test, made on a thread
//! of its own (network namespaces belong to threads), a tap created there by [`Tap::create`]
//! with 192.0.2.1/24, and the sockets a test needs to make and see traffic on it. Also the
//! frame builders and checksum arithmetic the tests share.
//!
//! Nothing here touches the host's own network: the namespace is checked to hold nothing but
//! `lo` before anything is created or configured in it, and sockets for later use are made by
//! threads that join that namespace first.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::tap::Tap;

pub const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The EtherType IEEE 802 reserves for local experiments: no host protocol answers it.
pub const EXPERIMENTAL_ETHERTYPE: u16 = 0x88b5;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// How long a test waits for the kernel before it gives up.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The namespace's end of the tap: what a test uses to send frames into the tap and to see
/// the frames the driver sent.
pub struct HostSide {
    namespace: OwnedFd,
    pub tap_name: String,
    /// The tap's own MAC address, the one the host kernel answers from.
    pub tap_mac: [u8; 6],
    ifindex: libc::c_int,
    /// AF_PACKET, bound to the tap: sees every frame the driver sends, and injects frames that
    /// the tap hands to the device.
    packet: OwnedFd,
}

fn check(result: libc::c_int, what: &str) -> libc::c_int {
    assert!(result >= 0, "{what}: {}", io::Error::last_os_error());
    result
}

fn require_root() {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the virtio-net tests need root: each one makes a network namespace with a tap in it; \
         run them as root (for example sudo -E cargo test -p cove-devices net)"
    );
}

/// A tap made by [`Tap::create`] (192.0.2.1/24, up, IPv6 off) in a network namespace of its
/// own, and the host side of it.
pub fn tap_in_new_namespace() -> (Tap, HostSide) {
    require_root();
    std::thread::spawn(|| {
        // SAFETY: unshare takes no pointers; it moves this thread alone into a new namespace.
        check(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            "unshare(CLONE_NEWNET)",
        );
        let mut configurations: Vec<String> = std::fs::read_dir("/proc/sys/net/ipv6/conf")
            .map(|entries| {
                entries
                    .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        configurations.sort();
        let interfaces = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        let interfaces: Vec<&str> = interfaces
            .lines()
            .skip(2)
            .filter_map(|line| line.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(
            interfaces,
            ["lo"],
            "this thread is not in a fresh network namespace; refusing to configure anything"
        );
        // IPv6 would send router and neighbour solicitations into the receive queue. (No
        // IPv6 in this kernel: nothing to switch off.)
        if !configurations.is_empty() {
            assert_eq!(configurations, ["all", "default", "lo"]);
            for scope in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"), "1")
                    .unwrap();
            }
        }
        let namespace = OwnedFd::from(File::open("/proc/thread-self/ns/net").unwrap());
        let tap = Tap::create(None, HOST_ADDRESS, NETMASK).unwrap();
        let tap_name = tap.name().to_owned();
        let ifindex = interface_index(&tap_name);
        let packet = packet_socket(ifindex);
        let tap_mac = hardware_address(&tap_name);
        let host = HostSide {
            namespace,
            tap_name,
            tap_mac,
            ifindex,
            packet,
        };
        (tap, host)
    })
    .join()
    .unwrap()
}

fn interface_index(name: &str) -> libc::c_int {
    let name = CString::new(name).unwrap();
    // SAFETY: `name` is a NUL-terminated string alive for the call, which only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "{name:?} has no index");
    index as libc::c_int
}

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> OwnedFd {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = check(
        unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) },
        "socket",
    );
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn set_receive_timeout(fd: &OwnedFd, timeout: Duration) {
    let timeout = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the option value points to `timeout`, a live timeval of the length given.
    check(
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        },
        "SO_RCVTIMEO",
    );
}

fn packet_socket(ifindex: libc::c_int) -> OwnedFd {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    let packet = socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(protocol));
    // SAFETY: sockaddr_ll is plain integers and bytes; all zeroes is valid.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as libc::c_ushort;
    address.sll_protocol = protocol;
    address.sll_ifindex = ifindex;
    // SAFETY: the address points to `address`, a live sockaddr_ll of the length given.
    check(
        unsafe {
            libc::bind(
                packet.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        },
        "bind the packet socket to the tap",
    );
    set_receive_timeout(&packet, TIMEOUT);
    packet
}

fn interface_request(name: &str) -> libc::ifreq {
    // SAFETY: struct ifreq is a byte array and a union of plain data and a pointer; all zeroes
    // is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request
}

fn hardware_address(name: &str) -> [u8; 6] {
    let control = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
    let mut request = interface_request(name);
    // SAFETY: SIOCGIFHWADDR writes into the ifreq `request`, live and writable for the call.
    check(
        unsafe { libc::ioctl(control.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request) },
        "SIOCGIFHWADDR",
    );
    // SAFETY: SIOCGIFHWADDR filled `ifru_hwaddr`; it is plain data.
    let data = unsafe { request.ifr_ifru.ifru_hwaddr.sa_data };
    std::array::from_fn(|index| data[index] as u8)
}

impl HostSide {
    /// Runs `make` on a thread inside the test's namespace; what it creates lives there.
    pub fn within<T: Send>(&self, make: impl FnOnce() -> T + Send) -> T {
        let namespace = self.namespace.as_raw_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns takes a namespace descriptor, which the HostSide keeps open
                    // for the call; it moves only this thread.
                    check(
                        unsafe { libc::setns(namespace, libc::CLONE_NEWNET) },
                        "setns",
                    );
                    make()
                })
                .join()
                .unwrap()
        })
    }

    /// A UDP socket on the host's address inside the namespace.
    pub fn udp_socket(&self, port: u16) -> UdpSocket {
        self.within(|| {
            let socket = UdpSocket::bind((HOST_ADDRESS, port)).unwrap();
            socket.set_read_timeout(Some(TIMEOUT)).unwrap();
            socket
        })
    }

    /// Makes the host kernel send to `address` at `mac` without asking by ARP first.
    pub fn add_neighbour(&self, address: Ipv4Addr, mac: [u8; 6]) {
        const ATF_COM: libc::c_int = 0x02;
        const ATF_PERM: libc::c_int = 0x04;
        let name = self.tap_name.clone();
        self.within(move || {
            let control = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            // SAFETY: struct arpreq is socket addresses, an int and a byte array; all zeroes is
            // valid.
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
            for (slot, byte) in request.arp_dev.iter_mut().zip(name.bytes()) {
                *slot = byte as libc::c_char;
            }
            // SAFETY: SIOCSARP reads the arpreq `request`, live for the call.
            check(
                unsafe { libc::ioctl(control.as_raw_fd(), libc::SIOCSARP, &request) },
                "SIOCSARP",
            );
        });
    }

    /// Sends `frame` (Ethernet header first) out of the host's end of the tap: the device
    /// reads it from the tap as a received frame.
    pub fn inject(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain integers and bytes; all zeroes is valid.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as libc::c_ushort;
        address.sll_ifindex = self.ifindex;
        address.sll_halen = 6;
        address.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer is `frame`, live and readable for its length; the address points
        // to `address`, a live sockaddr_ll of the length given.
        let sent = unsafe {
            libc::sendto(
                self.packet.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&address as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            frame.len() as isize,
            "inject: {}",
            io::Error::last_os_error()
        );
    }

    /// The next frame on the tap that `wanted` accepts, in either direction; panics after
    /// [`TIMEOUT`] without one.
    pub fn capture(&self, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let mut buffer = vec![0u8; 70_000];
        loop {
            // SAFETY: the buffer is `buffer`, live and writable for its length.
            let len = unsafe {
                libc::recv(
                    self.packet.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            assert!(
                len >= 0,
                "no frame on the tap within {TIMEOUT:?}: {}",
                io::Error::last_os_error()
            );
            let frame = &buffer[..len as usize];
            if wanted(frame) {
                return frame.to_vec();
            }
        }
    }
}

/// An Ethernet frame.
pub fn ethernet(destination: [u8; 6], source: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&source);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A frame of the experimental EtherType for the guest, `len` bytes long in all, its payload
/// starting with `tag` and then counting bytes.
pub fn tagged_frame(tag: u32, len: usize) -> Vec<u8> {
    let mut payload: Vec<u8> = (0..len - 14).map(|index| index as u8).collect();
    payload[..4].copy_from_slice(&tag.to_be_bytes());
    ethernet(
        GUEST_MAC,
        [0x02, 0, 0, 0, 0, 1],
        EXPERIMENTAL_ETHERTYPE,
        &payload,
    )
}

/// The tag of a frame [`tagged_frame`] made, if it is one.
pub fn frame_tag(frame: &[u8]) -> Option<u32> {
    if frame.len() < 18 || frame[12..14] != EXPERIMENTAL_ETHERTYPE.to_be_bytes() {
        return None;
    }
    Some(u32::from_be_bytes(frame[14..18].try_into().unwrap()))
}

/// An ARP request from the guest asking who has `target`.
pub fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut arp = Vec::new();
    arp.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    arp.extend_from_slice(&[6, 4]);
    arp.extend_from_slice(&1u16.to_be_bytes()); // request
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_ADDRESS.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target.octets());
    ethernet([0xff; 6], GUEST_MAC, ETHERTYPE_ARP, &arp)
}

/// The one's-complement sum of `data` as 16-bit big-endian words, added to `initial`, not
/// folded.
pub fn ones_complement_sum(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The sum of the UDP pseudo-header.
pub fn pseudo_header_sum(source: Ipv4Addr, destination: Ipv4Addr, udp_len: usize) -> u32 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&source.octets());
    pseudo.extend_from_slice(&destination.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_UDP as u8]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    ones_complement_sum(&pseudo, 0)
}

/// How a test fills in the UDP checksum.
#[derive(Debug, Clone, Copy)]
pub enum UdpChecksum {
    /// The full, correct checksum.
    Complete,
    /// The pseudo-header sum only, for a device to finish (VIRTIO_NET_HDR_F_NEEDS_CSUM).
    Partial,
    /// A value that is wrong.
    Wrong,
}

/// Offsets of the UDP header in frames [`udp_frame`] makes.
pub const UDP_HEADER_START: usize = 14 + 20;
pub const UDP_CHECKSUM_OFFSET: usize = 6;

/// An IPv4 UDP frame from the guest's address and port `source_port` to the host's.
pub fn udp_frame(
    destination_mac: [u8; 6],
    source_port: u16,
    destination_port: u16,
    payload: &[u8],
    checksum: UdpChecksum,
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&source_port.to_be_bytes());
    udp.extend_from_slice(&destination_port.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo = pseudo_header_sum(GUEST_ADDRESS, HOST_ADDRESS, udp_len);
    let value = match checksum {
        UdpChecksum::Complete => match !fold(ones_complement_sum(&udp, pseudo)) {
            0 => 0xffff,
            value => value,
        },
        UdpChecksum::Partial => fold(pseudo),
        UdpChecksum::Wrong => !fold(ones_complement_sum(&udp, pseudo)) ^ 0x5a5a,
    };
    udp[6..8].copy_from_slice(&value.to_be_bytes());

    let mut ip = Vec::with_capacity(20 + udp_len);
    ip.extend_from_slice(&[0x45, 0]);
    ip.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0]); // identification, don't fragment
    ip.extend_from_slice(&[64, libc::IPPROTO_UDP as u8, 0, 0]);
    ip.extend_from_slice(&GUEST_ADDRESS.octets());
    ip.extend_from_slice(&HOST_ADDRESS.octets());
    let header_checksum = !fold(ones_complement_sum(&ip, 0));
    ip[10..12].copy_from_slice(&header_checksum.to_be_bytes());
    ip.extend_from_slice(&udp);
    ethernet(destination_mac, GUEST_MAC, ETHERTYPE_IPV4, &ip)
}

/// A virtio-net header: `flags`, no segmentation, the checksum offsets.
pub fn vnet_header(flags: u8, checksum_start: u16, checksum_offset: u16) -> [u8; 12] {
    let mut header = [0u8; 12];
    header[0] = flags;
    header[6..8].copy_from_slice(&checksum_start.to_le_bytes());
    header[8..10].copy_from_slice(&checksum_offset.to_le_bytes());
    header
}
