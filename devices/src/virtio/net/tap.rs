//! The host end of a virtio-net card: a tap device, opened through `/dev/net/tun`.
//!
//! Every frame crossing the tap carries a 12-byte `struct virtio_net_hdr_v1` in front
//! (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`), the same header the guest driver reads and writes, so
//! checksum and segmentation offloads pass through untouched. The descriptor is non-blocking:
//! an empty tap reads as `WouldBlock`.
//!
//! Two ways to get one: [`Tap::open`] attaches to a tap the administrator made (`ip tuntap add
//! NAME mode tap user USER`); [`Tap::create`] makes a new one (the kernel names it from
//! `cove%d` unless a name is given), gives it a host IPv4 address and brings it up, which needs
//! CAP_NET_ADMIN. A created tap disappears when the descriptor closes.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The name template the kernel fills in for taps created without a name.
pub const NAME_TEMPLATE: &str = "cove%d";
/// `struct virtio_net_hdr_v1`: what precedes every frame on the tap and in the queues.
pub const VNET_HEADER_SIZE: usize = 12;
/// Interface names hold at most 15 bytes and a terminating NUL.
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "tap name {name:?} is {len} bytes long; network interface names hold at most \
         {MAX_NAME_LEN} bytes"
    )]
    NameTooLong { name: String, len: usize },
    #[error(
        "{name:?} is not a valid network interface name; use a non-empty name without '/', \
         ':', whitespace or NUL, like tap0"
    )]
    InvalidName { name: String },
    #[error(
        "cannot open {TUN_PATH}; load the tun module (modprobe tun) and check that the device \
         node exists and that cove may open it"
    )]
    OpenTun(#[source] io::Error),
    #[error(
        "tap {name:?} does not exist; create it first (ip tuntap add {name} mode tap user \
         $USER) or let cove create one with --net ip=ADDR,mask=MASK"
    )]
    NotFound { name: String },
    #[error(
        "network interface {name:?} is not a single-queue tap device; pass the name of a tap \
         made with ip tuntap add {name} mode tap"
    )]
    NotATap { name: String },
    #[error(
        "tap {name:?} is in use by another process; a tap serves one virtual machine at a time"
    )]
    Busy { name: String },
    #[error(
        "no permission to use tap {name:?}; give it to this user (ip tuntap add {name} mode tap \
         user $USER) or run cove with CAP_NET_ADMIN"
    )]
    PermissionDenied { name: String },
    #[error(
        "no permission to create a tap; run cove with CAP_NET_ADMIN, or create one beforehand \
         (ip tuntap add NAME mode tap user $USER) and pass --net tap=NAME"
    )]
    CreatePermissionDenied,
    #[error(
        "a network interface named {name:?} already exists; choose another name, or pass \
         --net tap={name} to use it as it is"
    )]
    Exists { name: String },
    #[error("cannot attach to tap {name:?}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name:?} refuses the 12-byte virtio-net header; the host kernel is too old")]
    VnetHeader {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("netmask {netmask} is not a run of leading ones; use a mask like 255.255.255.0")]
    Netmask { netmask: Ipv4Addr },
    #[error("cannot {what} of tap {name:?}; configuring a tap needs CAP_NET_ADMIN")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        if !interface_exists(name) {
            return Err(TapError::NotFound {
                name: name.to_owned(),
            });
        }
        let file = open_tun()?;
        let name = attach(&file, name, 0).map_err(|source| match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied {
                name: name.to_owned(),
            },
            Some(libc::EBUSY) => TapError::Busy {
                name: name.to_owned(),
            },
            // The name belongs to something else: an interface that is no tap, a tun, or a
            // multi-queue tap (whose flags must match).
            Some(libc::EINVAL) => TapError::NotATap {
                name: name.to_owned(),
            },
            _ => TapError::Attach {
                name: name.to_owned(),
                source,
            },
        })?;
        Self::finish(file, name)
    }

    /// Creates a tap (named `name`, or by the kernel from [`NAME_TEMPLATE`]), gives it the host
    /// address `address` with `netmask` and brings it up. Needs CAP_NET_ADMIN.
    pub fn create(
        name: Option<&str>,
        address: Ipv4Addr,
        netmask: Ipv4Addr,
    ) -> Result<Self, TapError> {
        let mask = u32::from(netmask);
        if mask == 0 || mask.leading_ones() + mask.trailing_zeros() != 32 {
            return Err(TapError::Netmask { netmask });
        }
        let requested = name.unwrap_or(NAME_TEMPLATE);
        check_name(requested)?;
        let file = open_tun()?;
        // IFF_TUN_EXCL: fail instead of attaching to an interface that already has the name.
        let name = attach(&file, requested, libc::IFF_TUN_EXCL).map_err(|source| {
            match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::CreatePermissionDenied,
                Some(libc::EBUSY) | Some(libc::EEXIST) => TapError::Exists {
                    name: requested.to_owned(),
                },
                _ => TapError::Attach {
                    name: requested.to_owned(),
                    source,
                },
            }
        })?;
        let tap = Self::finish(file, name)?;
        tap.configure(address, netmask)?;
        Ok(tap)
    }

    fn finish(file: File, name: String) -> Result<Self, TapError> {
        let header_size = VNET_HEADER_SIZE as libc::c_int;
        // SAFETY: `file` is an open tun descriptor attached to a tap; TUNSETVNETHDRSZ reads one
        // int through the pointer, which points to `header_size`, alive for the call.
        let result = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_size) };
        if result < 0 {
            return Err(TapError::VnetHeader {
                name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self { file, name })
    }

    /// Sets the address and netmask through an AF_INET socket, then brings the tap up.
    fn configure(&self, address: Ipv4Addr, netmask: Ipv4Addr) -> Result<(), TapError> {
        let configure_error = |what: &'static str| {
            let source = io::Error::last_os_error();
            TapError::Configure {
                name: self.name.clone(),
                what,
                source,
            }
        };
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let socket =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if socket < 0 {
            return Err(configure_error("open a socket to set the address"));
        }
        // SAFETY: `socket` is a descriptor just returned by socket(2) and owned by nothing else.
        let socket = unsafe { OwnedFd::from_raw_fd(socket) };

        let mut request = interface_request(&self.name);
        request.ifr_ifru.ifru_addr = ipv4_sockaddr(address);
        // SAFETY: SIOCSIFADDR reads a struct ifreq through the pointer, which points to
        // `request`, a live ifreq with a NUL-terminated name.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFADDR, &request) } < 0 {
            return Err(configure_error("set the address"));
        }
        request.ifr_ifru.ifru_netmask = ipv4_sockaddr(netmask);
        // SAFETY: as for SIOCSIFADDR: a live ifreq, read by the kernel.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFNETMASK, &request) } < 0 {
            return Err(configure_error("set the netmask"));
        }
        // SAFETY: SIOCGIFFLAGS writes the flags into the ifreq the pointer points to, `request`,
        // live and writable for the call.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
            return Err(configure_error("read the flags"));
        }
        // SAFETY: SIOCGIFFLAGS just filled `ifru_flags`; every bit pattern is a valid c_short.
        let flags = unsafe { request.ifr_ifru.ifru_flags };
        request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: as for SIOCSIFADDR: a live ifreq, read by the kernel.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
            return Err(configure_error("bring up"));
        }
        Ok(())
    }

    /// The interface name, as the kernel reports it (the template filled in).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads the reader accepts on frames it hands over (TUN_F_*).
    pub(crate) fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: `file` is an open tun descriptor attached to a tap; TUNSETOFFLOAD takes its
        // argument by value, no pointer.
        let result = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame, header first; `WouldBlock` when the tap is empty.
    pub(crate) fn read_frame(&self, buffer: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buffer)
    }

    /// Writes one frame, header first, in one system call.
    pub(crate) fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The kernel's rules for interface names (`dev_valid_name`); a template may hold one `%d`.
fn check_name(name: &str) -> Result<(), TapError> {
    if name.len() > MAX_NAME_LEN {
        return Err(TapError::NameTooLong {
            name: name.to_owned(),
            len: name.len(),
        });
    }
    let forbidden =
        |character: char| matches!(character, '/' | ':' | '\0') || character.is_whitespace();
    if name.is_empty() || name == "." || name == ".." || name.contains(forbidden) {
        return Err(TapError::InvalidName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn open_tun() -> Result<File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(TUN_PATH)
        .map_err(TapError::OpenTun)
}

/// TUNSETIFF: attaches `file` to the tap `name` (creating it if allowed and `name` is free)
/// with the virtio-net header and no packet information; returns the name the kernel used.
fn attach(file: &File, name: &str, extra_flags: libc::c_int) -> io::Result<String> {
    let mut request = interface_request(name);
    request.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | extra_flags) as libc::c_short;
    // SAFETY: `file` is an open /dev/net/tun descriptor; TUNSETIFF reads the struct ifreq the
    // pointer points to and writes the chosen name back into it; `request` is live and writable.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes: Vec<u8> = request
        .ifr_name
        .iter()
        .take_while(|&&byte| byte != 0)
        .map(|&byte| byte as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A zeroed `struct ifreq` naming `name`, which [`check_name`] accepted (at most 15 bytes, so
/// the last byte stays NUL).
fn interface_request(name: &str) -> libc::ifreq {
    // SAFETY: struct ifreq holds a byte array and a union of integers, byte arrays, socket
    // addresses and a pointer: all zeroes is a valid value of each (a null pointer included).
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(MAX_NAME_LEN))
    {
        *slot = byte as libc::c_char;
    }
    request
}

/// `struct sockaddr_in` for `address`, laid out in a `struct sockaddr`: family, a zero port,
/// then the address in network order.
fn ipv4_sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    for (slot, byte) in data[2..6].iter_mut().zip(address.octets()) {
        *slot = byte as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

/// Whether an interface called `name` exists in this thread's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is a NUL-terminated string alive for the call, which only reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::test_network::{tap_in_new_namespace, GUEST_MAC};
    use crate::virtio::net::{MacAddress, Net};

    #[test]
    fn names_the_kernel_would_refuse_are_refused_before_any_system_call() {
        let long = "a-very-long-tap0";
        assert!(matches!(
            Tap::open(long),
            Err(TapError::NameTooLong { len: 16, .. })
        ));
        let message = Tap::open(long).unwrap_err().to_string();
        assert!(message.contains("at most 15 bytes"), "{message}");
        for name in ["", "tap/0", "tap:0", "tap 0", "..", "tap\0"] {
            assert!(
                matches!(Tap::open(name), Err(TapError::InvalidName { .. })),
                "{name:?}"
            );
        }
        assert!(matches!(
            Tap::create(
                Some("long-tap-name-16"),
                Ipv4Addr::new(10, 0, 0, 1),
                Ipv4Addr::new(255, 0, 0, 0)
            ),
            Err(TapError::NameTooLong { .. })
        ));
    }

    #[test]
    fn netmasks_must_be_leading_ones() {
        for mask in [
            Ipv4Addr::new(255, 0, 255, 0),
            Ipv4Addr::new(0, 0, 0, 255),
            Ipv4Addr::UNSPECIFIED,
        ] {
            let error = Tap::create(None, Ipv4Addr::new(10, 0, 0, 1), mask).unwrap_err();
            assert!(
                matches!(error, TapError::Netmask { .. }),
                "{mask}: {error:?}"
            );
            assert!(error.to_string().contains("255.255.255.0"));
        }
    }

    #[test]
    fn addresses_are_laid_out_as_sockaddr_in() {
        let address = ipv4_sockaddr(Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(address.sa_family, libc::AF_INET as libc::sa_family_t);
        let data: Vec<u8> = address.sa_data.iter().map(|&byte| byte as u8).collect();
        assert_eq!(&data[..6], &[0, 0, 192, 0, 2, 1]);
        let request = interface_request("cove%d");
        assert_eq!(
            request.ifr_name[..7]
                .iter()
                .map(|&b| b as u8)
                .collect::<Vec<_>>(),
            b"cove%d\0"
        );
    }

    #[test]
    fn opening_a_tap_by_name_says_what_is_wrong() {
        let (created, host) = tap_in_new_namespace();
        let address = Ipv4Addr::new(198, 51, 100, 1);
        let netmask = Ipv4Addr::new(255, 255, 255, 0);
        host.within(|| {
            let missing = Tap::open("nosuch0").unwrap_err();
            assert!(matches!(missing, TapError::NotFound { .. }), "{missing:?}");
            assert!(missing
                .to_string()
                .contains("ip tuntap add nosuch0 mode tap"));
            assert!(matches!(Tap::open("lo"), Err(TapError::NotATap { .. })));
            assert!(matches!(
                Tap::open(created.name()),
                Err(TapError::Busy { .. })
            ));
            assert!(matches!(
                Tap::create(Some(created.name()), address, netmask),
                Err(TapError::Exists { .. })
            ));
            let named = Tap::create(Some("covenamed0"), address, netmask).unwrap();
            assert_eq!(named.name(), "covenamed0");

            // A tap the administrator made and left, as `ip tuntap add` does.
            set_persistent(&make_tap("covekept0"), true);
            let kept = Tap::open("covekept0").unwrap();
            assert_eq!(kept.name(), "covekept0");
            set_persistent(&kept, false);
            let net = Net::new(kept, MacAddress::try_from(GUEST_MAC).unwrap()).unwrap();
            assert_eq!(net.tap_name(), "covekept0");
        });
    }

    /// A tap made with plain TUNSETIFF, as tools other than cove make them.
    fn make_tap(name: &str) -> std::fs::File {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        // SAFETY: struct ifreq is a byte array and a union of plain data and a pointer; all zeroes
        // is valid.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *slot = byte as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes the ifreq `request`, live and writable for the call.
        let result = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        assert!(
            result >= 0,
            "TUNSETIFF: {}",
            std::io::Error::last_os_error()
        );
        file
    }

    fn set_persistent(tap: &impl AsRawFd, persistent: bool) {
        // SAFETY: TUNSETPERSIST takes its argument by value, no pointer.
        let result = unsafe {
            libc::ioctl(
                tap.as_raw_fd(),
                libc::TUNSETPERSIST,
                libc::c_ulong::from(persistent),
            )
        };
        assert!(
            result >= 0,
            "TUNSETPERSIST: {}",
            std::io::Error::last_os_error()
        );
    }
}
