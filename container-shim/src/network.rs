//! The container's network: its own network namespace with loopback up, and optionally LXD's
//! bridged nic — a veth pair whose host end (`veth<random>`) joins a host bridge and whose
//! other end is the container's `eth0` with the configured MAC address.
//!
//! The host side works over rtnetlink (`netlink`), no `ip` command: before anything is
//! created, [`NicPlan::prepare`] checks that the bridge exists (in the network namespace of
//! the calling thread) and picks the host end's name; once init is cloned (and waits),
//! [`NicPlan::attach`] creates the pair in one `RTM_NEWLINK`: the host end up and enslaved to
//! the bridge with the bridge's MTU, the peer created straight inside init's network namespace
//! under its final name, with its MAC address and MTU. Init then brings its interfaces up
//! ([`raise_interfaces`], allocation-free). [`HostInterface::remove`] deletes the pair when
//! the container stops or its start fails: deleting one end deletes both, and the kernel
//! would also delete them with the namespace, but only asynchronously.
//!
//! [`addresses_of`] reads the addresses inside a container for its state: a short-lived
//! thread enters init's network namespace (a thread may change its own network namespace
//! without touching the others) and dumps links and addresses over rtnetlink there.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use serde::{Deserialize, Serialize};

use crate::config::{fill_random, BridgedNic};
use crate::netlink::{
    self, LinkHeader, LinkReply, Message, NetlinkError, RouteSocket, IFA_ADDRESS, IFA_LOCAL,
    IFLA_ADDRESS, IFLA_IFNAME, IFLA_INFO_DATA, IFLA_INFO_KIND, IFLA_LINKINFO, IFLA_MASTER,
    IFLA_MTU, IFLA_NET_NS_FD, NLM_F_CREATE_EXCLUSIVE, NLM_F_DUMP, RTM_DELLINK, RTM_GETADDR,
    RTM_GETLINK, RTM_NEWLINK, VETH_INFO_PEER,
};

/// `IFNAMSIZ`: an interface name and its NUL.
pub const INTERFACE_NAME_SIZE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "the bridge \"{0}\" does not exist: create it first, or name an existing bridge in the \
         nic's parent="
    )]
    NoBridge(String),
    #[error(
        "\"{name}\" is not a bridge (it is a {kind} device): name a bridge in the nic's parent="
    )]
    NotABridge { name: String, kind: String },
    #[error("cannot look up the bridge \"{name}\": {source}")]
    Lookup {
        name: String,
        #[source]
        source: NetlinkError,
    },
    #[error("cannot open the container's network namespace {path}: {source}")]
    Namespace {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot create the veth pair {host_name} (on bridge {bridge}) / {name} (in the \
         container): {source}"
    )]
    Create {
        host_name: String,
        bridge: String,
        name: String,
        #[source]
        source: NetlinkError,
    },
    #[error("cannot remove the container's host interface {name}: {source}")]
    Remove {
        name: String,
        #[source]
        source: NetlinkError,
    },
    #[error("cannot read the container's network addresses: {0}")]
    Addresses(#[source] NetlinkError),
}

/// An address family as `ip` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressFamily {
    Inet,
    Inet6,
}

/// One address of an interface inside a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceAddress {
    /// The interface's name inside the container (`lo`, `eth0`).
    pub interface: String,
    pub family: AddressFamily,
    pub address: IpAddr,
    /// The prefix length (`/24`).
    pub prefix: u8,
}

/// `struct ifaddrmsg`.
const ADDRESS_HEADER_LENGTH: usize = 8;
/// The most a state reader's thread needs: two netlink dumps.
const ADDRESS_THREAD_STACK: usize = 256 * 1024;

/// The addresses of every interface in the network namespace of the process `pid` (a
/// container's init), in the kernel's order.
pub fn addresses_of(pid: u32) -> Result<Vec<InterfaceAddress>, NetworkError> {
    let path = format!("/proc/{pid}/ns/net");
    let namespace = File::open(&path).map_err(|source| NetworkError::Namespace { path, source })?;
    let reader = std::thread::Builder::new()
        .name("cove-addresses".into())
        .stack_size(ADDRESS_THREAD_STACK)
        .spawn(move || {
            // SAFETY: an open network namespace fd; setns changes this thread's network
            // namespace only, and the thread ends right after.
            if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(NetlinkError::Socket(io::Error::last_os_error()));
            }
            // Opened here, so the socket belongs to the container's namespace.
            let socket = RouteSocket::open()?;
            let mut links = Message::new(RTM_GETLINK, NLM_F_DUMP);
            links.link_header(LinkHeader::default());
            let links = socket.request(&links)?;
            let mut addresses = Message::new(RTM_GETADDR, NLM_F_DUMP);
            addresses.fixed_header(&[0; ADDRESS_HEADER_LENGTH]);
            let addresses = socket.request_payloads(&addresses)?;
            Ok(parse_addresses(&links, &addresses))
        })
        .map_err(|error| NetworkError::Addresses(NetlinkError::Socket(error)))?;
    reader
        .join()
        .unwrap_or(Err(NetlinkError::Malformed))
        .map_err(NetworkError::Addresses)
}

/// Addresses from `RTM_NEWADDR` payloads, named by the links of a link dump. Malformed and
/// unknown entries are skipped.
fn parse_addresses(links: &[LinkReply], payloads: &[Vec<u8>]) -> Vec<InterfaceAddress> {
    let name_of = |index: i32| {
        links
            .iter()
            .find(|link| link.index == index)
            .and_then(|link| netlink::find_attribute(&link.attributes, IFLA_IFNAME))
            .map(netlink::attribute_string)
            .unwrap_or_else(|| format!("if{index}"))
    };
    let mut found = Vec::new();
    for payload in payloads {
        let Some(header) = payload.get(..ADDRESS_HEADER_LENGTH) else {
            continue;
        };
        let (family, prefix) = (header[0], header[1]);
        let index = i32::from_ne_bytes([header[4], header[5], header[6], header[7]]);
        let attributes = &payload[ADDRESS_HEADER_LENGTH..];
        // IPv4's local address is IFA_LOCAL (IFA_ADDRESS is the peer's on point-to-point
        // links); IPv6 has only IFA_ADDRESS.
        let value = netlink::find_attribute(attributes, IFA_LOCAL)
            .or_else(|| netlink::find_attribute(attributes, IFA_ADDRESS));
        let parsed = match (i32::from(family), value) {
            (libc::AF_INET, Some(bytes)) => <[u8; 4]>::try_from(bytes)
                .ok()
                .map(|bytes| (AddressFamily::Inet, IpAddr::from(Ipv4Addr::from(bytes)))),
            (libc::AF_INET6, Some(bytes)) => <[u8; 16]>::try_from(bytes)
                .ok()
                .map(|bytes| (AddressFamily::Inet6, IpAddr::from(Ipv6Addr::from(bytes)))),
            _ => None,
        };
        if let Some((family, address)) = parsed {
            found.push(InterfaceAddress {
                interface: name_of(index),
                family,
                address,
                prefix,
            });
        }
    }
    found
}

/// A host bridge, found before anything is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    pub index: i32,
    pub mtu: u32,
}

impl Bridge {
    /// Looks `name` up over `socket`: it must exist and be a bridge.
    pub fn find(socket: &RouteSocket, name: &str) -> Result<Self, NetworkError> {
        let mut request = Message::new(RTM_GETLINK, 0);
        request
            .link_header(LinkHeader::default())
            .string_attribute(IFLA_IFNAME, name);
        let replies = match socket.request(&request) {
            Err(error) if error.errno() == Some(libc::ENODEV) => {
                return Err(NetworkError::NoBridge(name.to_string()))
            }
            result => result.map_err(|source| NetworkError::Lookup {
                name: name.to_string(),
                source,
            })?,
        };
        let reply = replies.first().ok_or_else(|| NetworkError::Lookup {
            name: name.to_string(),
            source: NetlinkError::Malformed,
        })?;
        let kind = netlink::find_attribute(&reply.attributes, IFLA_LINKINFO)
            .and_then(|info| netlink::find_attribute(info, IFLA_INFO_KIND))
            .map(netlink::attribute_string)
            .unwrap_or_else(|| "plain".to_string());
        if kind != "bridge" {
            return Err(NetworkError::NotABridge {
                name: name.to_string(),
                kind,
            });
        }
        let mtu = netlink::find_attribute(&reply.attributes, IFLA_MTU)
            .and_then(netlink::attribute_u32)
            .unwrap_or(1500);
        Ok(Self {
            name: name.to_string(),
            index: reply.index,
            mtu,
        })
    }
}

/// A bridged nic checked against the host and ready to create once init exists.
#[derive(Debug)]
pub struct NicPlan {
    socket: RouteSocket,
    bridge: Bridge,
    nic: BridgedNic,
    host_name: String,
}

impl NicPlan {
    /// Checks the nic's bridge in the calling thread's network namespace and picks the host
    /// end's name. Creates nothing.
    pub fn prepare(nic: &BridgedNic) -> Result<Self, NetworkError> {
        let socket = RouteSocket::open().map_err(|source| NetworkError::Lookup {
            name: nic.parent.clone(),
            source,
        })?;
        let bridge = Bridge::find(&socket, &nic.parent)?;
        let host_name = nic.host_name.clone().unwrap_or_else(random_veth_name);
        Ok(Self {
            socket,
            bridge,
            nic: nic.clone(),
            host_name,
        })
    }

    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// The nic's name inside the container.
    pub fn container_name(&self) -> &str {
        &self.nic.name
    }

    /// The request that creates the pair with its peer inside the namespace open as
    /// `namespace_fd`.
    fn create_request(&self, namespace_fd: i32) -> Message {
        let up = libc::IFF_UP as u32;
        let mut request = Message::new(RTM_NEWLINK, NLM_F_CREATE_EXCLUSIVE);
        request
            .link_header(LinkHeader {
                index: 0,
                flags: up,
                change: up,
            })
            .string_attribute(IFLA_IFNAME, &self.host_name)
            .u32_attribute(IFLA_MTU, self.bridge.mtu)
            .u32_attribute(IFLA_MASTER, self.bridge.index as u32)
            .begin_nested(IFLA_LINKINFO)
            .string_attribute(IFLA_INFO_KIND, "veth")
            .begin_nested(IFLA_INFO_DATA)
            .begin_nested(VETH_INFO_PEER)
            .link_header(LinkHeader::default())
            .string_attribute(IFLA_IFNAME, &self.nic.name)
            .attribute(IFLA_ADDRESS, &self.nic.hwaddr)
            .u32_attribute(IFLA_MTU, self.nic.mtu.unwrap_or(self.bridge.mtu))
            .u32_attribute(IFLA_NET_NS_FD, namespace_fd as u32)
            .end_nested()
            .end_nested()
            .end_nested();
        request
    }

    /// Creates the pair for the init process `pid` (cloned into its network namespace and
    /// not yet released).
    pub fn attach(self, pid: libc::pid_t) -> Result<HostInterface, NetworkError> {
        let path = format!("/proc/{pid}/ns/net");
        let namespace =
            File::open(&path).map_err(|source| NetworkError::Namespace { path, source })?;
        let request = self.create_request(namespace.as_raw_fd());
        self.socket
            .request(&request)
            .map_err(|source| NetworkError::Create {
                host_name: self.host_name.clone(),
                bridge: self.bridge.name.clone(),
                name: self.nic.name.clone(),
                source,
            })?;
        Ok(HostInterface {
            socket: self.socket,
            name: self.host_name,
        })
    }
}

/// The host end of a container's veth pair, in the network namespace it was created in.
#[derive(Debug)]
pub struct HostInterface {
    socket: RouteSocket,
    name: String,
}

impl HostInterface {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the pair (both ends). One already gone, with the container's namespace, is
    /// fine.
    pub fn remove(&self) -> Result<(), NetworkError> {
        let mut request = Message::new(RTM_DELLINK, 0);
        request
            .link_header(LinkHeader::default())
            .string_attribute(IFLA_IFNAME, &self.name);
        match self.socket.request(&request) {
            Err(error) if error.errno() == Some(libc::ENODEV) => Ok(()),
            result => result.map(drop).map_err(|source| NetworkError::Remove {
                name: self.name.clone(),
                source,
            }),
        }
    }
}

/// `veth` and eight random hex digits, as LXD names host ends.
pub fn random_veth_name() -> String {
    let mut bytes = [0u8; 4];
    fill_random(&mut bytes);
    let digits: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("veth{digits}")
}

/// An interface name as the kernel's `struct ifreq` holds it, prepared for a cloned child.
pub fn interface_name(name: &str) -> [u8; INTERFACE_NAME_SIZE] {
    let mut bytes = [0u8; INTERFACE_NAME_SIZE];
    for (slot, byte) in bytes
        .iter_mut()
        .zip(name.bytes().take(INTERFACE_NAME_SIZE - 1))
    {
        *slot = byte;
    }
    bytes
}

/// Brings each named interface up in the caller's network namespace (SIOCSIFFLAGS on a
/// throwaway socket). Allocation-free, for init between clone and execve; returns the errno of
/// the first failure.
pub fn raise_interfaces(names: &[[u8; INTERFACE_NAME_SIZE]]) -> Result<(), i32> {
    // SAFETY: socket(2) takes plain integers.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(crate::kernel::last_errno());
    }
    let mut result = Ok(());
    for name in names {
        // SAFETY: an all-zero ifreq is valid (an empty name and zero flags).
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
            *slot = *byte as libc::c_char;
        }
        // SAFETY: `request` is a live ifreq with a NUL-terminated name; the kernel reads and
        // writes only inside it.
        let raised = unsafe {
            if libc::ioctl(socket, libc::SIOCGIFFLAGS, &mut request) < 0 {
                -1
            } else {
                request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                libc::ioctl(socket, libc::SIOCSIFFLAGS, &request)
            }
        };
        if raised < 0 {
            result = Err(crate::kernel::last_errno());
            break;
        }
    }
    // SAFETY: `socket` was opened above and is closed once.
    unsafe { libc::close(socket) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ends_are_named_like_lxd() {
        let name = random_veth_name();
        assert_eq!(name.len(), 12, "{name}");
        assert!(name.starts_with("veth"));
        assert!(name[4..].bytes().all(|byte| byte.is_ascii_hexdigit()));
        assert_ne!(random_veth_name(), random_veth_name());
    }

    #[test]
    fn interface_names_fit_ifreq() {
        assert_eq!(&interface_name("lo")[..3], b"lo\0");
        let long = interface_name("abcdefghijklmnopqrstuvwxyz");
        assert_eq!(&long[..15], b"abcdefghijklmno");
        assert_eq!(long[15], 0, "always NUL-terminated");
    }

    #[test]
    fn the_create_request_puts_the_peer_in_the_container() {
        let Ok(socket) = RouteSocket::open() else {
            return;
        };
        let mut nic = BridgedNic::new("br0");
        nic.hwaddr = [0x00, 0x16, 0x3e, 1, 2, 3];
        let plan = NicPlan {
            socket,
            bridge: Bridge {
                name: "br0".into(),
                index: 7,
                mtu: 9000,
            },
            nic,
            host_name: "veth01234567".into(),
        };
        let bytes = plan.create_request(42).finish(1);
        let body = &bytes[32..];
        let attribute = |bytes: &[u8], kind| {
            netlink::find_attribute(bytes, kind)
                .unwrap_or_else(|| panic!("no attribute {kind}"))
                .to_vec()
        };
        assert_eq!(
            netlink::attribute_string(&attribute(body, IFLA_IFNAME)),
            "veth01234567"
        );
        assert_eq!(
            netlink::attribute_u32(&attribute(body, IFLA_MASTER)),
            Some(7)
        );
        assert_eq!(
            netlink::attribute_u32(&attribute(body, IFLA_MTU)),
            Some(9000)
        );
        let info = attribute(body, IFLA_LINKINFO);
        let peer = attribute(&attribute(&info, IFLA_INFO_DATA), VETH_INFO_PEER);
        let peer_attributes = &peer[16..];
        assert_eq!(
            netlink::attribute_string(&attribute(peer_attributes, IFLA_IFNAME)),
            "eth0"
        );
        assert_eq!(
            attribute(peer_attributes, IFLA_ADDRESS),
            [0, 0x16, 0x3e, 1, 2, 3]
        );
        assert_eq!(
            netlink::attribute_u32(&attribute(peer_attributes, IFLA_MTU)),
            Some(9000),
            "the peer takes the bridge's MTU when none is configured"
        );
        assert_eq!(
            netlink::attribute_u32(&attribute(peer_attributes, IFLA_NET_NS_FD)),
            Some(42)
        );
    }

    /// An `RTM_NEWADDR` payload: ifaddrmsg, then the attributes given.
    fn address_payload(family: u8, prefix: u8, index: i32, attributes: &[(u16, &[u8])]) -> Vec<u8> {
        let mut message = Message::new(0, 0);
        let mut header = vec![family, prefix, 0, 0];
        header.extend_from_slice(&index.to_ne_bytes());
        message.fixed_header(&header);
        for (kind, payload) in attributes {
            message.attribute(*kind, payload);
        }
        message.finish(1)[16..].to_vec()
    }

    #[test]
    fn addresses_are_read_from_dumps_and_named_by_link() {
        let link = |index: i32, interface: &str| {
            let mut message = Message::new(0, 0);
            message
                .link_header(LinkHeader {
                    index,
                    ..LinkHeader::default()
                })
                .string_attribute(IFLA_IFNAME, interface);
            let bytes = message.finish(1);
            LinkReply {
                index,
                attributes: bytes[32..].to_vec(),
            }
        };
        let links = [link(1, "lo"), link(2, "eth0")];
        let loopback6 = Ipv6Addr::LOCALHOST.octets();
        let payloads = vec![
            address_payload(libc::AF_INET as u8, 8, 1, &[(IFA_LOCAL, &[127, 0, 0, 1])]),
            // Point to point: IFA_ADDRESS is the peer, IFA_LOCAL ours.
            address_payload(
                libc::AF_INET as u8,
                24,
                2,
                &[(IFA_ADDRESS, &[192, 0, 2, 9]), (IFA_LOCAL, &[192, 0, 2, 2])],
            ),
            address_payload(libc::AF_INET6 as u8, 128, 1, &[(IFA_ADDRESS, &loopback6)]),
            // Skipped: an unknown family, a truncated address, a truncated header, an
            // address without attributes.
            address_payload(17, 0, 1, &[(IFA_ADDRESS, &[1, 2, 3, 4])]),
            address_payload(libc::AF_INET as u8, 8, 1, &[(IFA_LOCAL, &[127, 0])]),
            vec![2, 8, 0],
            address_payload(libc::AF_INET as u8, 8, 1, &[]),
            // An interface missing from the link dump is named by its index.
            address_payload(libc::AF_INET as u8, 32, 7, &[(IFA_LOCAL, &[10, 0, 0, 1])]),
        ];
        let found = parse_addresses(&links, &payloads);
        let summary: Vec<String> = found
            .iter()
            .map(|entry| {
                format!(
                    "{} {:?} {}/{}",
                    entry.interface, entry.family, entry.address, entry.prefix
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                "lo Inet 127.0.0.1/8",
                "eth0 Inet 192.0.2.2/24",
                "lo Inet6 ::1/128",
                "if7 Inet 10.0.0.1/32"
            ]
        );
        assert_eq!(
            serde_json::to_string(&found[0]).expect("serializes"),
            "{\"interface\":\"lo\",\"family\":\"inet\",\"address\":\"127.0.0.1\",\"prefix\":8}"
        );
    }

    #[test]
    fn this_process_has_loopback_addresses() {
        // Our own namespace through the same thread-and-setns path as a container's.
        let Ok(found) = addresses_of(std::process::id()) else {
            return; // no permission to enter it (not root): nothing to check here
        };
        assert!(
            found
                .iter()
                .any(|entry| entry.interface == "lo" && entry.address.is_loopback()),
            "{found:?}"
        );
    }

    #[test]
    fn a_missing_bridge_is_named() {
        let Ok(socket) = RouteSocket::open() else {
            return;
        };
        let error = Bridge::find(&socket, "nosuchbridge0").expect_err("no such bridge");
        assert!(
            matches!(error, NetworkError::NoBridge(ref name) if name == "nosuchbridge0"),
            "{error}"
        );
        let error = Bridge::find(&socket, "lo").expect_err("loopback is no bridge");
        assert!(error.to_string().contains("not a bridge"), "{error}");
    }
}
