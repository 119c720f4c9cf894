//! The guest's state, as the agent sees it from inside: memory (/proc/meminfo), the file
//! system of `/` (statvfs), network interfaces with their addresses (getifaddrs, so it is the
//! agent's own network namespace), processes (/proc), uptime and load.
//!
//! A figure that cannot be read is reported as zero (or empty) rather than failing the whole
//! request: the state of a half-broken guest is exactly what a user wants to see.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::protocol::{DiskState, GuestState, InterfaceAddress, InterfaceState, MemoryState};

pub(crate) fn collect() -> GuestState {
    GuestState {
        memory: memory(),
        disk: disk(c"/"),
        interfaces: interfaces(),
        processes: processes(),
        uptime_seconds: uptime_seconds().unwrap_or(0.0),
        load_average: load_average(),
        cpus: cpus(),
        hostname: hostname(),
        kernel: kernel_release(),
    }
}

fn memory() -> MemoryState {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let total = field("MemTotal");
    let available = field("MemAvailable");
    MemoryState {
        total_bytes: total,
        used_bytes: total.saturating_sub(available),
        available_bytes: available,
    }
}

fn disk(path: &CStr) -> DiskState {
    // SAFETY: an all-zero statvfs is a valid output buffer.
    let mut figures: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `figures` is valid for writes during the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut figures) } != 0 {
        return DiskState {
            total_bytes: 0,
            used_bytes: 0,
            available_bytes: 0,
        };
    }
    let block = figures.f_frsize as u64;
    DiskState {
        total_bytes: figures.f_blocks as u64 * block,
        used_bytes: (figures.f_blocks as u64).saturating_sub(figures.f_bfree as u64) * block,
        available_bytes: figures.f_bavail as u64 * block,
    }
}

fn processes() -> u32 {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| {
                    let name = entry.file_name();
                    let name = name.as_encoded_bytes();
                    !name.is_empty() && name.iter().all(u8::is_ascii_digit)
                })
                .count() as u32
        })
        .unwrap_or(0)
}

pub(crate) fn uptime_seconds() -> Option<f64> {
    std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut values = text
        .split_whitespace()
        .map(|value| value.parse().unwrap_or(0.0));
    [
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
    ]
}

fn cpus() -> u32 {
    // SAFETY: sysconf() takes no pointers.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    online.max(0) as u32
}

fn uname() -> Option<libc::utsname> {
    // SAFETY: an all-zero utsname is a valid output buffer.
    let mut names: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `names` is valid for writes during the call.
    if unsafe { libc::uname(&mut names) } != 0 {
        return None;
    }
    Some(names)
}

fn field_text(field: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = field
        .iter()
        .take_while(|&&byte| byte != 0)
        .map(|&byte| byte as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub(crate) fn kernel_release() -> String {
    uname()
        .map(|names| field_text(&names.release))
        .unwrap_or_default()
}

pub(crate) fn hostname() -> String {
    uname()
        .map(|names| field_text(&names.nodename))
        .unwrap_or_default()
}

fn interfaces() -> Vec<InterfaceState> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is valid for writes; on success it points at a list freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut interfaces: BTreeMap<String, InterfaceState> = BTreeMap::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let node = unsafe { &*entry };
        entry = node.ifa_next;
        if node.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(node.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let interface = interfaces
            .entry(name.clone())
            .or_insert_with(|| InterfaceState {
                mtu: mtu(&name),
                name,
                up: false,
                mac: None,
                addresses: Vec::new(),
                rx_bytes: 0,
                tx_bytes: 0,
                rx_packets: 0,
                tx_packets: 0,
            });
        interface.up = node.ifa_flags & libc::IFF_UP as u32 != 0;
        if node.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr of the list; sa_family is in every sockaddr.
        let family = i32::from(unsafe { (*node.ifa_addr).sa_family });
        match family {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let address = unsafe { &*(node.ifa_addr as *const libc::sockaddr_in) };
                let prefix = if node.ifa_netmask.is_null() {
                    32
                } else {
                    // SAFETY: the netmask of an AF_INET address is a sockaddr_in too.
                    let mask = unsafe { &*(node.ifa_netmask as *const libc::sockaddr_in) };
                    u32::from_be(mask.sin_addr.s_addr).count_ones() as u8
                };
                interface.addresses.push(InterfaceAddress {
                    family: "inet".into(),
                    address: Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)).to_string(),
                    prefix_length: prefix,
                });
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let address = unsafe { &*(node.ifa_addr as *const libc::sockaddr_in6) };
                let prefix = if node.ifa_netmask.is_null() {
                    128
                } else {
                    // SAFETY: the netmask of an AF_INET6 address is a sockaddr_in6 too.
                    let mask = unsafe { &*(node.ifa_netmask as *const libc::sockaddr_in6) };
                    mask.sin6_addr
                        .s6_addr
                        .iter()
                        .map(|byte| byte.count_ones())
                        .sum::<u32>() as u8
                };
                interface.addresses.push(InterfaceAddress {
                    family: "inet6".into(),
                    address: Ipv6Addr::from(address.sin6_addr.s6_addr).to_string(),
                    prefix_length: prefix,
                });
            }
            libc::AF_PACKET => {
                // SAFETY: an AF_PACKET address is a sockaddr_ll.
                let link = unsafe { &*(node.ifa_addr as *const libc::sockaddr_ll) };
                let length = usize::from(link.sll_halen).min(link.sll_addr.len());
                if length > 0 && link.sll_addr[..length].iter().any(|&byte| byte != 0) {
                    interface.mac = Some(
                        link.sll_addr[..length]
                            .iter()
                            .map(|byte| format!("{byte:02x}"))
                            .collect::<Vec<_>>()
                            .join(":"),
                    );
                }
                if !node.ifa_data.is_null() {
                    // SAFETY: for AF_PACKET entries glibc points ifa_data at the link's
                    // rtnl_link_stats.
                    let stats = unsafe { &*(node.ifa_data as *const LinkStatistics) };
                    interface.rx_bytes = u64::from(stats.rx_bytes);
                    interface.tx_bytes = u64::from(stats.tx_bytes);
                    interface.rx_packets = u64::from(stats.rx_packets);
                    interface.tx_packets = u64::from(stats.tx_packets);
                }
            }
            _ => {}
        }
    }
    // SAFETY: `list` came from getifaddrs and no reference into it outlives this call.
    unsafe { libc::freeifaddrs(list) };
    interfaces.into_values().collect()
}

/// The head of Linux's `struct rtnl_link_stats` (linux/if_link.h), which glibc's getifaddrs
/// points `ifa_data` at for AF_PACKET entries; the libc crate does not define it.
#[repr(C)]
struct LinkStatistics {
    rx_packets: u32,
    tx_packets: u32,
    rx_bytes: u32,
    tx_bytes: u32,
}

fn mtu(name: &str) -> u32 {
    let Some(request) = interface_request(name) else {
        return 0;
    };
    // SAFETY: socket() takes no pointers.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return 0;
    }
    let mut request = request;
    // SAFETY: `request` is a valid ifreq that outlives the call.
    let result = unsafe { libc::ioctl(socket, libc::SIOCGIFMTU, &mut request) };
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(socket) };
    if result != 0 {
        return 0;
    }
    // SAFETY: SIOCGIFMTU filled the union's ifru_mtu member.
    unsafe { request.ifr_ifru.ifru_mtu }.max(0) as u32
}

/// An ifreq naming `name`, or `None` when the name does not fit.
pub(crate) fn interface_request(name: &str) -> Option<libc::ifreq> {
    // SAFETY: an all-zero ifreq is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() || name.contains('\0') {
        return None;
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    Some(request)
}
