//! The virtio devices a VM is given: disks, network interfaces, a vsock device and an entropy
//! source, as the command line (`--disk`, `--net`, `--vsock`, `--rng`) and the JSON config
//! describe them. Parsing and the checks that need no host live here; opening files, taps and
//! sockets is the VM's job.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use cove_devices::virtio::net::MacAddress;
use serde::{Deserialize, Serialize};

/// The largest id a disk can have: what virtio-blk's GET_ID returns (20 bytes).
pub const MAX_DISK_ID_BYTES: usize = 20;
/// The host is CID 2; 0 and 1 are reserved; the top value means "any".
pub const MIN_GUEST_CID: u64 = 3;
/// Linux keeps interface names below 16 bytes (IFNAMSIZ, with the NUL).
pub const MAX_TAP_NAME_BYTES: usize = 15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceConfigError {
    #[error("two disks have the id \"{0}\": give each --disk its own id=NAME")]
    DuplicateDiskId(String),
    #[error("disk id \"{id}\" is {len} bytes long; a virtio-blk id holds at most 20 bytes")]
    DiskIdTooLong { id: String, len: usize },
    #[error("a disk needs path=FILE")]
    DiskPathEmpty,
    #[error(
        "tap name \"{0}\" is not usable: give 1 to 15 characters without '/', ':', spaces or NUL"
    )]
    TapName(String),
    #[error(
        "a --net device needs tap=NAME (an existing tap) or ip=ADDR (cove-vmm creates the tap)"
    )]
    NetWithoutTapOrIp,
    #[error("--net mask={0} needs ip=ADDR beside it")]
    MaskWithoutIp(Ipv4Addr),
    #[error("netmask {0} is not a netmask: its one bits must come first, as in 255.255.255.0")]
    Netmask(Ipv4Addr),
    #[error("two --net devices have the MAC address {0}")]
    DuplicateMac(String),
    #[error("two --net devices use the tap \"{0}\"")]
    DuplicateTap(String),
    #[error(
        "vsock cid {0} is reserved (0 and 1 for the hypervisor, 2 for the host, 4294967295 for \
         any): give the guest a cid of 3 or more"
    )]
    ReservedCid(u64),
    #[error("vsock cid {0} does not fit in 32 bits, as Linux's vsock addresses require")]
    CidTooLarge(u64),
    #[error("--vsock needs socket=PATH, the Unix socket the host connects to")]
    VsockSocketEmpty,
}

/// One virtio-blk disk backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// What the guest reads as the disk's serial; `disk<N>` (its position) when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Bypass the host's page cache (O_DIRECT).
    #[serde(default)]
    pub direct: bool,
}

impl DiskConfig {
    /// The id the guest sees for the disk at `index` in the list.
    pub fn id_or_default(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("disk{index}"))
    }
}

/// One virtio-net interface on a tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing tap (without `ip`), or the name of the tap to create (with `ip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The host's address on a tap that cove-vmm creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The netmask of `ip`; 255.255.255.0 when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Ipv4Addr>,
    /// The guest's MAC address; a random locally administered one when not given.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "mac_text")]
    pub mac: Option<MacAddress>,
}

impl NetConfig {
    pub const DEFAULT_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);

    /// The netmask a created tap gets.
    pub fn mask_or_default(&self) -> Ipv4Addr {
        self.mask.unwrap_or(Self::DEFAULT_MASK)
    }
}

/// MAC addresses in JSON as text ("52:54:00:12:34:56").
mod mac_text {
    use cove_devices::virtio::net::MacAddress;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        mac: &Option<MacAddress>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match mac {
            Some(mac) => serializer.collect_str(mac),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<MacAddress>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The virtio-vsock device and the Unix socket its host side listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

/// Checks the devices' names, ids, addresses and numbers; nothing on the host is looked at.
pub fn validate(
    disks: &[DiskConfig],
    nets: &[NetConfig],
    vsock: Option<&VsockConfig>,
) -> Result<(), DeviceConfigError> {
    validate_disks(disks)?;
    validate_nets(nets)?;
    vsock.map_or(Ok(()), validate_vsock)
}

fn validate_disks(disks: &[DiskConfig]) -> Result<(), DeviceConfigError> {
    let mut ids = HashSet::new();
    for (index, disk) in disks.iter().enumerate() {
        if disk.path.as_os_str().is_empty() {
            return Err(DeviceConfigError::DiskPathEmpty);
        }
        let id = disk.id_or_default(index);
        if id.len() > MAX_DISK_ID_BYTES {
            return Err(DeviceConfigError::DiskIdTooLong { len: id.len(), id });
        }
        if !ids.insert(id.clone()) {
            return Err(DeviceConfigError::DuplicateDiskId(id));
        }
    }
    Ok(())
}

fn validate_nets(nets: &[NetConfig]) -> Result<(), DeviceConfigError> {
    let mut macs = HashSet::new();
    let mut taps = HashSet::new();
    for net in nets {
        match (&net.tap, net.ip, net.mask) {
            (None, None, _) => return Err(DeviceConfigError::NetWithoutTapOrIp),
            (_, None, Some(mask)) => return Err(DeviceConfigError::MaskWithoutIp(mask)),
            _ => {}
        }
        if let Some(tap) = &net.tap {
            check_tap_name(tap)?;
            if !taps.insert(tap.clone()) {
                return Err(DeviceConfigError::DuplicateTap(tap.clone()));
            }
        }
        let mask = u32::from(net.mask_or_default());
        if mask.leading_ones() + mask.trailing_zeros() != 32 {
            return Err(DeviceConfigError::Netmask(net.mask_or_default()));
        }
        if let Some(mac) = &net.mac {
            if !macs.insert(mac.to_string()) {
                return Err(DeviceConfigError::DuplicateMac(mac.to_string()));
            }
        }
    }
    Ok(())
}

fn validate_vsock(vsock: &VsockConfig) -> Result<(), DeviceConfigError> {
    if vsock.cid < MIN_GUEST_CID || vsock.cid == u64::from(u32::MAX) {
        return Err(DeviceConfigError::ReservedCid(vsock.cid));
    }
    if vsock.cid > u64::from(u32::MAX) {
        return Err(DeviceConfigError::CidTooLarge(vsock.cid));
    }
    if vsock.socket.as_os_str().is_empty() {
        return Err(DeviceConfigError::VsockSocketEmpty);
    }
    Ok(())
}

fn check_tap_name(name: &str) -> Result<(), DeviceConfigError> {
    let usable = !name.is_empty()
        && name.len() <= MAX_TAP_NAME_BYTES
        && !name.contains(['/', ':', ' ', '\0'])
        && name != "."
        && name != "..";
    if usable {
        Ok(())
    } else {
        Err(DeviceConfigError::TapName(name.to_string()))
    }
}

/// One `key=value` option list as the device flags take it (`path=/a.img,readonly=on`).
pub struct OptionList<'a> {
    flag: &'static str,
    text: &'a str,
}

/// Why a device flag's value could not be read.
#[derive(Debug, PartialEq, Eq)]
pub struct OptionError {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "invalid {} value \"{}\": {}",
            self.flag, self.value, self.reason
        )
    }
}

impl<'a> OptionList<'a> {
    pub fn new(flag: &'static str, text: &'a str) -> Self {
        Self { flag, text }
    }

    fn error(&self, reason: impl Into<String>) -> OptionError {
        OptionError {
            flag: self.flag,
            value: self.text.to_string(),
            reason: reason.into(),
        }
    }

    /// The pairs in order; a part without `=` or a key given twice is an error, and so is a key
    /// not in `known`.
    fn pairs(&self, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>, OptionError> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for part in self.text.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(self.error(format!("\"{part}\" is not key=value")));
            };
            if !known.contains(&key) {
                return Err(self.error(format!(
                    "unknown option \"{key}\": expected {}",
                    known.join(", ")
                )));
            }
            if pairs.iter().any(|(seen, _)| *seen == key) {
                return Err(self.error(format!("{key} is given twice")));
            }
            pairs.push((key, value));
        }
        Ok(pairs)
    }

    fn switch(&self, key: &str, value: &str) -> Result<bool, OptionError> {
        match value {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(self.error(format!("{key} takes on or off"))),
        }
    }

    fn address(&self, key: &str, value: &str) -> Result<Ipv4Addr, OptionError> {
        value
            .parse()
            .map_err(|_| self.error(format!("{key}={value} is not an IPv4 address")))
    }

    /// `path=FILE[,readonly=on][,id=NAME][,direct=on]`
    pub fn disk(&self) -> Result<DiskConfig, OptionError> {
        let mut disk = DiskConfig {
            path: PathBuf::new(),
            readonly: false,
            id: None,
            direct: false,
        };
        for (key, value) in self.pairs(&["path", "readonly", "id", "direct"])? {
            match key {
                "path" => disk.path = value.into(),
                "readonly" => disk.readonly = self.switch(key, value)?,
                "id" => disk.id = Some(value.to_string()),
                _ => disk.direct = self.switch(key, value)?,
            }
        }
        if disk.path.as_os_str().is_empty() {
            return Err(self.error("path=FILE is required"));
        }
        Ok(disk)
    }

    /// `tap=NAME[,mac=MAC]` or `ip=ADDR[,mask=MASK][,tap=NAME][,mac=MAC]`
    pub fn net(&self) -> Result<NetConfig, OptionError> {
        let mut net = NetConfig {
            tap: None,
            ip: None,
            mask: None,
            mac: None,
        };
        for (key, value) in self.pairs(&["tap", "ip", "mask", "mac"])? {
            match key {
                "tap" => net.tap = Some(value.to_string()),
                "ip" => net.ip = Some(self.address(key, value)?),
                "mask" => net.mask = Some(self.address(key, value)?),
                _ => {
                    net.mac = Some(
                        value
                            .parse()
                            .map_err(|error| self.error(format!("mac={value}: {error}")))?,
                    )
                }
            }
        }
        Ok(net)
    }

    /// `cid=N,socket=PATH`
    pub fn vsock(&self) -> Result<VsockConfig, OptionError> {
        let mut cid = None;
        let mut socket = None;
        for (key, value) in self.pairs(&["cid", "socket"])? {
            match key {
                "cid" => {
                    cid =
                        Some(value.parse::<u64>().map_err(|_| {
                            self.error(format!("cid={value} is not a whole number"))
                        })?)
                }
                _ => socket = Some(PathBuf::from(value)),
            }
        }
        match (cid, socket) {
            (Some(cid), Some(socket)) => Ok(VsockConfig { cid, socket }),
            _ => Err(self.error("both cid=N and socket=PATH are required")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(text: &str) -> Result<DiskConfig, String> {
        OptionList::new("--disk", text)
            .disk()
            .map_err(|e| e.to_string())
    }

    fn net(text: &str) -> Result<NetConfig, String> {
        OptionList::new("--net", text)
            .net()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn disk_options_parse_and_bad_ones_are_named() {
        let parsed = disk("path=/a.img,readonly=on,id=root,direct=on").unwrap();
        assert_eq!(parsed.path, PathBuf::from("/a.img"));
        assert!(parsed.readonly && parsed.direct);
        assert_eq!(parsed.id.as_deref(), Some("root"));
        assert_eq!(parsed.id_or_default(3), "root");
        assert!(!disk("path=/a.img").unwrap().readonly);
        assert!(disk("readonly=on")
            .unwrap_err()
            .contains("path=FILE is required"));
        assert!(disk("path=/a,readonly=maybe")
            .unwrap_err()
            .contains("takes on or off"));
        assert!(disk("path=/a,size=1")
            .unwrap_err()
            .contains("unknown option \"size\""));
        assert!(disk("/a.img").unwrap_err().contains("is not key=value"));
        assert!(disk("path=/a,path=/b").unwrap_err().contains("given twice"));
    }

    #[test]
    fn net_options_parse_and_bad_ones_are_named() {
        let parsed = net("tap=tap0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(parsed.tap.as_deref(), Some("tap0"));
        assert_eq!(parsed.mac.unwrap().to_string(), "52:54:00:12:34:56");
        let created = net("ip=192.0.2.1,mask=255.255.255.252").unwrap();
        assert_eq!(created.ip, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(created.mask_or_default(), Ipv4Addr::new(255, 255, 255, 252));
        assert!(net("mac=52:54:00:12:34")
            .unwrap_err()
            .contains("mac=52:54:00:12:34"));
        assert!(net("ip=300.1.1.1")
            .unwrap_err()
            .contains("is not an IPv4 address"));
    }

    #[test]
    fn vsock_options_parse() {
        let parsed = OptionList::new("--vsock", "cid=3,socket=/tmp/v.sock")
            .vsock()
            .unwrap();
        assert_eq!(parsed.cid, 3);
        assert_eq!(parsed.socket, PathBuf::from("/tmp/v.sock"));
        let missing = OptionList::new("--vsock", "cid=3").vsock().unwrap_err();
        assert!(missing.to_string().contains("both cid=N and socket=PATH"));
        let words = OptionList::new("--vsock", "cid=three,socket=/s")
            .vsock()
            .unwrap_err();
        assert!(words.to_string().contains("not a whole number"));
    }

    #[test]
    fn validation_refuses_what_cannot_work() {
        let mut disks = vec![disk("path=/a").unwrap(), disk("path=/b,id=disk0").unwrap()];
        assert_eq!(
            validate(&disks, &[], None),
            Err(DeviceConfigError::DuplicateDiskId("disk0".into()))
        );
        disks[1].id = Some("x".repeat(21));
        assert!(matches!(
            validate(&disks, &[], None),
            Err(DeviceConfigError::DiskIdTooLong { len: 21, .. })
        ));
        disks.pop();
        assert_eq!(validate(&disks, &[], None), Ok(()));

        let nets = |texts: &[&str]| -> Result<(), DeviceConfigError> {
            let nets: Vec<NetConfig> = texts.iter().map(|text| net(text).unwrap()).collect();
            validate(&[], &nets, None)
        };
        assert_eq!(
            nets(&["mac=52:54:00:00:00:01"]),
            Err(DeviceConfigError::NetWithoutTapOrIp)
        );
        assert!(matches!(
            nets(&["tap=tap0,mask=255.0.0.0"]),
            Err(DeviceConfigError::MaskWithoutIp(_))
        ));
        assert!(matches!(
            nets(&["ip=10.0.0.1,mask=255.0.255.0"]),
            Err(DeviceConfigError::Netmask(_))
        ));
        assert!(matches!(
            nets(&["tap=a/b"]),
            Err(DeviceConfigError::TapName(_))
        ));
        assert!(matches!(
            nets(&["tap=t0", "tap=t0"]),
            Err(DeviceConfigError::DuplicateTap(_))
        ));
        assert!(matches!(
            nets(&[
                "tap=t0,mac=52:54:00:00:00:01",
                "tap=t1,mac=52:54:00:00:00:01"
            ]),
            Err(DeviceConfigError::DuplicateMac(_))
        ));
        assert_eq!(nets(&["tap=t0", "ip=192.0.2.1"]), Ok(()));

        let vsock = |cid| {
            validate(
                &[],
                &[],
                Some(&VsockConfig {
                    cid,
                    socket: "/tmp/v".into(),
                }),
            )
        };
        for cid in [0, 1, 2, u64::from(u32::MAX)] {
            assert_eq!(vsock(cid), Err(DeviceConfigError::ReservedCid(cid)));
        }
        assert_eq!(vsock(1 << 33), Err(DeviceConfigError::CidTooLarge(1 << 33)));
        assert_eq!(vsock(3), Ok(()));
    }
}
