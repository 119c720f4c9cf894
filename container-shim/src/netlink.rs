//! A minimal rtnetlink client: a raw `NETLINK_ROUTE` socket and the few messages the
//! container network needs (look a link up by name, create a veth pair, delete a link, dump
//! links and addresses), encoded by hand on `libc`.
//!
//! What lives here is only the wire format (headers, attributes, nesting, acknowledgements and
//! the kernel's extended error messages); what the messages mean for a container is
//! `network`'s business. Netlink speaks the host's byte order.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_GETADDR: u16 = 22;

/// Every object of the kind, not one.
pub const NLM_F_DUMP: u16 = 0x100 | 0x200;

/// In an address message: the address (the peer's, on a point-to-point link).
pub const IFA_ADDRESS: u16 = 1;
/// In an address message: the local address (IPv4).
pub const IFA_LOCAL: u16 = 2;

/// Create the object, and fail if it exists already.
pub const NLM_F_CREATE_EXCLUSIVE: u16 = 0x400 | 0x200;

pub const IFLA_ADDRESS: u16 = 1;
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_MTU: u16 = 4;
pub const IFLA_MASTER: u16 = 10;
pub const IFLA_LINKINFO: u16 = 18;
pub const IFLA_NET_NS_FD: u16 = 28;
pub const IFLA_INFO_KIND: u16 = 1;
pub const IFLA_INFO_DATA: u16 = 2;
pub const VETH_INFO_PEER: u16 = 1;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// In an error reply: the request was not echoed back (only its header).
const NLM_F_CAPPED: u16 = 0x100;
/// In an error reply: attributes (such as the kernel's message) follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

/// `struct nlmsghdr`.
const HEADER_LENGTH: usize = 16;
/// `struct ifinfomsg`.
const LINK_HEADER_LENGTH: usize = 16;
/// How long a request may wait for the kernel's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

fn align(length: usize) -> usize {
    (length + 3) & !3
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot talk to the kernel over rtnetlink: {0}")]
    Socket(#[source] io::Error),
    #[error("{}", describe_refusal(*errno, message.as_deref()))]
    Refused { errno: i32, message: Option<String> },
    #[error("the kernel's rtnetlink reply was malformed")]
    Malformed,
}

impl NetlinkError {
    /// The errno the kernel refused the request with.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Refused { errno, .. } => Some(*errno),
            NetlinkError::Socket(error) => error.raw_os_error(),
            NetlinkError::Malformed => None,
        }
    }
}

fn describe_refusal(errno: i32, message: Option<&str>) -> String {
    let error = io::Error::from_raw_os_error(errno);
    match message {
        Some(message) => format!("{error} (the kernel says: {message})"),
        None => error.to_string(),
    }
}

/// The fixed part of a link message (`struct ifinfomsg`), family `AF_UNSPEC`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkHeader {
    pub index: i32,
    /// `IFF_*` flags to set, among those named in `change`.
    pub flags: u32,
    pub change: u32,
}

impl LinkHeader {
    fn encode(&self) -> [u8; LINK_HEADER_LENGTH] {
        let mut bytes = [0u8; LINK_HEADER_LENGTH];
        // Bytes 0..4: family (AF_UNSPEC), padding and device type, all zero.
        bytes[4..8].copy_from_slice(&self.index.to_ne_bytes());
        bytes[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        bytes[12..16].copy_from_slice(&self.change.to_ne_bytes());
        bytes
    }
}

/// A request being built: a header, then a link header, then attributes (some nested).
#[derive(Debug, Clone)]
pub struct Message {
    bytes: Vec<u8>,
    open: Vec<usize>,
}

impl Message {
    /// A request of `kind` (`RTM_*`) with `flags` beyond request-and-acknowledge.
    pub fn new(kind: u16, flags: u16) -> Self {
        let mut bytes = vec![0u8; HEADER_LENGTH];
        bytes[4..6].copy_from_slice(&kind.to_ne_bytes());
        bytes[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        Self {
            bytes,
            open: Vec::new(),
        }
    }

    fn pad(&mut self) {
        self.bytes.resize(align(self.bytes.len()), 0);
    }

    pub fn link_header(&mut self, header: LinkHeader) -> &mut Self {
        self.fixed_header(&header.encode())
    }

    /// A message kind's fixed part as bytes (such as an all-zero `struct ifaddrmsg`).
    pub fn fixed_header(&mut self, header: &[u8]) -> &mut Self {
        self.pad();
        self.bytes.extend_from_slice(header);
        self
    }

    pub fn attribute(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        self.pad();
        let length = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.bytes.extend_from_slice(&length.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        self
    }

    pub fn u32_attribute(&mut self, kind: u16, value: u32) -> &mut Self {
        self.attribute(kind, &value.to_ne_bytes())
    }

    /// A string attribute, NUL-terminated as the kernel expects.
    pub fn string_attribute(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut payload = Vec::with_capacity(value.len() + 1);
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
        self.attribute(kind, &payload)
    }

    /// Opens a nested attribute: what follows, up to the matching `end_nested`, is inside it.
    pub fn begin_nested(&mut self, kind: u16) -> &mut Self {
        self.pad();
        self.open.push(self.bytes.len());
        self.bytes.extend_from_slice(&0u16.to_ne_bytes());
        self.bytes
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end_nested(&mut self) -> &mut Self {
        // As the kernel's own nests: the length covers the last member's padding.
        self.pad();
        if let Some(start) = self.open.pop() {
            let length = u16::try_from(self.bytes.len() - start).unwrap_or(u16::MAX);
            self.bytes[start..start + 2].copy_from_slice(&length.to_ne_bytes());
        }
        self
    }

    /// The bytes to send, with the total length and `sequence` filled in.
    pub fn finish(&self, sequence: u32) -> Vec<u8> {
        let mut bytes = self.bytes.clone();
        bytes.resize(align(bytes.len()), 0);
        let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        bytes[0..4].copy_from_slice(&length.to_ne_bytes());
        bytes[8..12].copy_from_slice(&sequence.to_ne_bytes());
        bytes
    }
}

/// The attributes in `bytes`: (type without the nested/byte-order flags, payload). Stops at the
/// first malformed one.
pub fn attributes(bytes: &[u8]) -> Attributes<'_> {
    Attributes { rest: bytes }
}

pub struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attributes<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let header = self.rest.get(..4)?;
        let length = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        if length < 4 || length > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let payload = &self.rest[4..length];
        self.rest = self.rest.get(align(length)..).unwrap_or(&[]);
        Some((kind, payload))
    }
}

/// The first attribute of `kind` in `bytes`.
pub fn find_attribute(bytes: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(bytes)
        .find(|(found, _)| *found == kind)
        .map(|(_, payload)| payload)
}

/// A string attribute's value without its terminating NUL.
pub fn attribute_string(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

pub fn attribute_u32(payload: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

/// A reply to a link request: its link header and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkReply {
    pub index: i32,
    pub attributes: Vec<u8>,
}

/// One message of a datagram the kernel sent: (type, flags, sequence, payload).
fn messages(bytes: &[u8]) -> impl Iterator<Item = (u16, u16, u32, &[u8])> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        let header = rest.get(..HEADER_LENGTH)?;
        let length = u32::from_ne_bytes(header[0..4].try_into().ok()?) as usize;
        if length < HEADER_LENGTH || length > rest.len() {
            rest = &[];
            return None;
        }
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        let flags = u16::from_ne_bytes([header[6], header[7]]);
        let sequence = u32::from_ne_bytes(header[8..12].try_into().ok()?);
        let payload = &rest[HEADER_LENGTH..length];
        rest = rest.get(align(length)..).unwrap_or(&[]);
        Some((kind, flags, sequence, payload))
    })
}

/// Reads an error (or acknowledgement) message: `Ok` for an acknowledgement.
fn parse_error(flags: u16, payload: &[u8]) -> Result<(), NetlinkError> {
    let error = i32::from_ne_bytes(
        payload
            .get(..4)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(NetlinkError::Malformed)?,
    );
    if error == 0 {
        return Ok(());
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // The failed request's header follows the errno, then (unless capped) its payload.
        let echoed = payload
            .get(4..4 + HEADER_LENGTH)
            .map_or(HEADER_LENGTH, |header| {
                u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize
            });
        let skip = 4 + if flags & NLM_F_CAPPED != 0 {
            HEADER_LENGTH
        } else {
            align(echoed)
        };
        message = payload
            .get(skip..)
            .and_then(|tail| find_attribute(tail, NLMSGERR_ATTR_MSG))
            .map(attribute_string)
            .filter(|text| !text.is_empty());
    }
    Err(NetlinkError::Refused {
        errno: error.saturating_neg(),
        message,
    })
}

/// A `NETLINK_ROUTE` socket in the network namespace of the thread that opened it: it stays
/// bound to that namespace, whichever thread uses it later. One request at a time: the lock
/// keeps one thread's replies from being read by another.
#[derive(Debug)]
pub struct RouteSocket {
    fd: OwnedFd,
    sequence: Mutex<u32>,
}

impl RouteSocket {
    pub fn open() -> Result<Self, NetlinkError> {
        // SAFETY: socket(2) takes plain integers.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: socket returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let on: libc::c_int = 1;
        for option in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            // SAFETY: `on` is a live c_int of the size passed. Older kernels lack these
            // options: errors then just come without the kernel's message.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    option,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        let timeout = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a live timeval of the size passed.
        let result = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if result < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            sequence: Mutex::new(1),
        })
    }

    /// Sends `message` and waits for the kernel's acknowledgement; returns the link messages
    /// that came before it (the answer to a `RTM_GETLINK`).
    pub fn request(&self, message: &Message) -> Result<Vec<LinkReply>, NetlinkError> {
        self.request_payloads(message)?
            .into_iter()
            .map(|payload| {
                let index = payload
                    .get(4..8)
                    .and_then(|bytes| bytes.try_into().ok())
                    .map(i32::from_ne_bytes)
                    .ok_or(NetlinkError::Malformed)?;
                Ok(LinkReply {
                    index,
                    attributes: payload
                        .get(LINK_HEADER_LENGTH..)
                        .ok_or(NetlinkError::Malformed)?
                        .to_vec(),
                })
            })
            .collect()
    }

    /// Sends `message` and waits for the kernel's acknowledgement (or the end of a dump);
    /// returns the payloads of the messages that came before it.
    pub fn request_payloads(&self, message: &Message) -> Result<Vec<Vec<u8>>, NetlinkError> {
        let mut next = self
            .sequence
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sequence = *next;
        *next = sequence.wrapping_add(1);
        let bytes = message.finish(sequence);
        // SAFETY: an all-zero sockaddr_nl is valid; it names the kernel (pid 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `bytes` and `kernel` are live for the call, with the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        let mut replies = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buffer` is live and writable for its whole length.
            let received = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if received < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::Socket(error));
            }
            for (kind, flags, reply_sequence, payload) in messages(&buffer[..received as usize]) {
                if reply_sequence != sequence {
                    continue;
                }
                match kind {
                    NLMSG_ERROR => {
                        parse_error(flags, payload)?;
                        return Ok(replies);
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(payload.to_vec()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_ne_bytes([bytes[offset], bytes[offset + 1]])
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_ne_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    #[test]
    fn a_link_request_is_laid_out_as_the_kernel_reads_it() {
        let mut message = Message::new(RTM_NEWLINK, NLM_F_CREATE_EXCLUSIVE);
        message
            .link_header(LinkHeader {
                index: 0,
                flags: libc::IFF_UP as u32,
                change: libc::IFF_UP as u32,
            })
            .string_attribute(IFLA_IFNAME, "veth1")
            .u32_attribute(IFLA_MTU, 1500);
        let bytes = message.finish(7);
        // 16 header + 16 ifinfomsg + (4 + 6 -> 12) name + 8 mtu.
        assert_eq!(bytes.len(), 52);
        assert_eq!(u32_at(&bytes, 0), 52);
        assert_eq!(u16_at(&bytes, 4), RTM_NEWLINK);
        assert_eq!(u16_at(&bytes, 6), 0x1 | 0x4 | 0x200 | 0x400);
        assert_eq!(u32_at(&bytes, 8), 7);
        assert_eq!(u32_at(&bytes, 16 + 8), 1, "IFF_UP in ifi_flags");
        assert_eq!(u32_at(&bytes, 16 + 12), 1, "IFF_UP in ifi_change");
        assert_eq!(
            u16_at(&bytes, 32),
            10,
            "name attribute length without padding"
        );
        assert_eq!(u16_at(&bytes, 34), IFLA_IFNAME);
        assert_eq!(&bytes[36..42], b"veth1\0");
        assert_eq!(&bytes[42..44], [0, 0], "padding");
        assert_eq!((u16_at(&bytes, 44), u16_at(&bytes, 46)), (8, IFLA_MTU));
        assert_eq!(u32_at(&bytes, 48), 1500);
    }

    #[test]
    fn nested_attributes_carry_their_whole_length() {
        let mut message = Message::new(RTM_NEWLINK, 0);
        message
            .link_header(LinkHeader::default())
            .begin_nested(IFLA_LINKINFO)
            .string_attribute(IFLA_INFO_KIND, "veth")
            .begin_nested(IFLA_INFO_DATA)
            .begin_nested(VETH_INFO_PEER)
            .link_header(LinkHeader::default())
            .string_attribute(IFLA_IFNAME, "eth0")
            .end_nested()
            .end_nested()
            .end_nested();
        let bytes = message.finish(1);
        let body = &bytes[32..];
        let (kind, link_info) = attributes(body).next().expect("IFLA_LINKINFO");
        assert_eq!(kind, IFLA_LINKINFO);
        assert_eq!(u16_at(body, 2), IFLA_LINKINFO | 0x8000, "marked nested");
        assert_eq!(link_info.len() + 4, body.len(), "the nest spans the rest");
        let kind_payload = find_attribute(link_info, IFLA_INFO_KIND).expect("kind");
        assert_eq!(attribute_string(kind_payload), "veth");
        let data = find_attribute(link_info, IFLA_INFO_DATA).expect("data");
        let peer = find_attribute(data, VETH_INFO_PEER).expect("peer");
        // The peer starts with its own ifinfomsg, then its attributes.
        let name = find_attribute(&peer[16..], IFLA_IFNAME).expect("peer name");
        assert_eq!(attribute_string(name), "eth0");
    }

    #[test]
    fn malformed_attributes_end_the_walk_without_panicking() {
        assert_eq!(attributes(&[]).count(), 0);
        assert_eq!(attributes(&[8, 0, 3]).count(), 0);
        // A length beyond the buffer.
        assert_eq!(attributes(&[200, 0, 3, 0, 1, 2]).count(), 0);
        // A length below the header's own size.
        assert_eq!(attributes(&[2, 0, 3, 0, 1, 2, 3, 4]).count(), 0);
        assert_eq!(attribute_u32(&[1, 2]), None);
        assert_eq!(messages(&[1, 2, 3]).count(), 0);
    }

    #[test]
    fn errors_carry_the_kernel_message() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&(-libc::ENODEV).to_ne_bytes());
        payload.extend_from_slice(&[0u8; HEADER_LENGTH]);
        let text = b"Unknown device\0";
        payload.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        let error =
            parse_error(NLM_F_CAPPED | NLM_F_ACK_TLVS, &payload).expect_err("an error reply");
        assert_eq!(error.errno(), Some(libc::ENODEV));
        assert!(error.to_string().contains("Unknown device"), "{error}");
        let acknowledged = 0i32.to_ne_bytes();
        assert!(parse_error(0, &acknowledged).is_ok());
        assert!(matches!(parse_error(0, &[1]), Err(NetlinkError::Malformed)));
    }
}
