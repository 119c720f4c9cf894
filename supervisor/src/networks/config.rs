//! A managed network's configuration as LXD spells it (`ipv4.address`, `ipv4.nat`,
//! `ipv4.dhcp`, `ipv4.dhcp.ranges`, `dns.domain`, `ipv6.address`), read once into a typed
//! [`NetworkConfig`]; the IPv4 subnet arithmetic; and the choice of a free /24 for
//! `ipv4.address=auto`.
//!
//! Nothing here touches the host: what is in use is handed in, so the rules are unit-tested.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::NetworkError;

/// The keys a managed network takes.
pub const KNOWN_KEYS: &[&str] = &[
    "ipv4.address",
    "ipv4.nat",
    "ipv4.dhcp",
    "ipv4.dhcp.ranges",
    "dns.domain",
    "ipv6.address",
];

/// The DNS domain of a network without `dns.domain`.
pub const DEFAULT_DOMAIN: &str = "cove";

/// An IPv4 network: its first address and its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// The subnet holding `address` with `prefix` bits of network (0 to 32).
    pub fn of(address: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        Self {
            base: Ipv4Addr::from(u32::from(address) & mask(prefix)),
            prefix,
        }
    }

    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & mask(self.prefix) == u32::from(self.base)
    }

    /// True if the two subnets share an address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let shorter = self.prefix.min(other.prefix);
        u32::from(self.base) & mask(shorter) == u32::from(other.base) & mask(shorter)
    }

    /// The last address (the broadcast address).
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) | !mask(self.prefix))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.base, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

/// `ADDRESS/PREFIX`, such as `10.0.3.1/24`.
pub fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (address, prefix) = text.trim().split_once('/')?;
    let address: Ipv4Addr = address.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some((address, prefix))
}

/// A managed network's configuration, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The bridge's own address (the gateway and DNS server of the instances).
    pub gateway: Ipv4Addr,
    pub subnet: Subnet,
    pub nat: bool,
    pub dhcp: bool,
    /// The dynamic ranges dnsmasq hands out (first, last), in order.
    pub ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
    pub domain: String,
}

fn boolean(key: &str, value: &str) -> Result<bool, NetworkError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(NetworkError::Value {
            key: key.to_string(),
            value: value.to_string(),
            expected: "expected true or false",
        }),
    }
}

/// Checks a network's keys and values; `ipv4.address` must already be an address (not
/// `auto`, which [`choose_subnet`] resolves first).
pub fn parse(config: &BTreeMap<String, String>) -> Result<NetworkConfig, NetworkError> {
    for key in config.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) && !key.starts_with("user.") {
            return Err(NetworkError::UnknownKey(key.clone()));
        }
    }
    let value_error = |key: &str, expected| NetworkError::Value {
        key: key.to_string(),
        value: config.get(key).cloned().unwrap_or_default(),
        expected,
    };
    let address = config
        .get("ipv4.address")
        .ok_or_else(|| value_error("ipv4.address", "a managed network needs an address"))?;
    let (gateway, prefix) = parse_cidr(address).ok_or_else(|| {
        value_error(
            "ipv4.address",
            "expected the bridge's address and prefix, such as 10.0.3.1/24, or auto",
        )
    })?;
    if !(8..=30).contains(&prefix) {
        return Err(value_error(
            "ipv4.address",
            "the prefix must be between /8 and /30",
        ));
    }
    let subnet = Subnet::of(gateway, prefix);
    if gateway == subnet.base || gateway == subnet.last() {
        return Err(value_error(
            "ipv4.address",
            "the bridge's address cannot be the subnet's first or last address",
        ));
    }
    if gateway.is_loopback() || gateway.is_multicast() || gateway.is_unspecified() {
        return Err(value_error(
            "ipv4.address",
            "expected a unicast address, such as 10.0.3.1/24",
        ));
    }
    match config.get("ipv6.address").map(String::as_str) {
        None | Some("none") | Some("") => {}
        Some(_) => {
            return Err(value_error(
                "ipv6.address",
                "only \"none\" is supported: cove's networks are IPv4 only",
            ))
        }
    }
    let nat = match config.get("ipv4.nat") {
        Some(value) => boolean("ipv4.nat", value)?,
        None => true,
    };
    let dhcp = match config.get("ipv4.dhcp") {
        Some(value) => boolean("ipv4.dhcp", value)?,
        None => true,
    };
    let ranges = match config.get("ipv4.dhcp.ranges") {
        Some(text) if !text.trim().is_empty() => {
            parse_ranges(text, &subnet, gateway).ok_or_else(|| {
                value_error(
                    "ipv4.dhcp.ranges",
                    "expected FIRST-LAST[,FIRST-LAST...] inside the subnet, not covering the \
                     bridge's address",
                )
            })?
        }
        _ => vec![default_range(&subnet, gateway)],
    };
    let domain = config
        .get("dns.domain")
        .map(|domain| domain.trim().to_string())
        .unwrap_or_else(|| DEFAULT_DOMAIN.to_string());
    let label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if domain.len() > 253 || !domain.split('.').all(label) {
        return Err(value_error(
            "dns.domain",
            "expected a DNS domain such as cove or lab.example",
        ));
    }
    Ok(NetworkConfig {
        gateway,
        subnet,
        nat,
        dhcp,
        ranges,
        domain,
    })
}

/// The whole subnet but its first and last addresses and the bridge's.
fn default_range(subnet: &Subnet, gateway: Ipv4Addr) -> (Ipv4Addr, Ipv4Addr) {
    let first = u32::from(subnet.base) + 1;
    let last = u32::from(subnet.last()) - 1;
    if u32::from(gateway) == first {
        (Ipv4Addr::from(first + 1), Ipv4Addr::from(last))
    } else if u32::from(gateway) == last {
        (Ipv4Addr::from(first), Ipv4Addr::from(last - 1))
    } else {
        (Ipv4Addr::from(first), Ipv4Addr::from(last))
    }
}

fn parse_ranges(
    text: &str,
    subnet: &Subnet,
    gateway: Ipv4Addr,
) -> Option<Vec<(Ipv4Addr, Ipv4Addr)>> {
    text.split(',')
        .map(|range| {
            let (first, last) = range.trim().split_once('-')?;
            let first: Ipv4Addr = first.trim().parse().ok()?;
            let last: Ipv4Addr = last.trim().parse().ok()?;
            let inside = |address: Ipv4Addr| {
                subnet.contains(address) && address != subnet.base && address != subnet.last()
            };
            let covers_gateway = (first..=last).contains(&gateway);
            (inside(first) && inside(last) && first <= last && !covers_gateway)
                .then_some((first, last))
        })
        .collect()
}

/// A random /24 inside 10.0.0.0/8 that overlaps nothing in `used`, as LXD picks one for
/// `ipv4.address=auto`; the bridge gets its first host address (`10.x.y.1/24`). `random`
/// gives 16 random bits per call; after 1000 tries that all collide there is none.
pub fn choose_subnet(used: &[Subnet], mut random: impl FnMut() -> u16) -> Option<Subnet> {
    for _ in 0..1000 {
        let [second, third] = random().to_be_bytes();
        let candidate = Subnet {
            base: Ipv4Addr::new(10, second, third, 0),
            prefix: 24,
        };
        if !used.iter().any(|subnet| subnet.overlaps(&candidate)) {
            return Some(candidate);
        }
    }
    None
}

/// 16 random bits from the kernel.
pub fn random_bits() -> u16 {
    let mut bytes = [0u8; 2];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let written = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if written != bytes.len() as isize {
        // Not random, but still a valid pick: the caller checks it against what is in use.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return (now.subsec_nanos() >> 8) as u16;
    }
    u16::from_ne_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn subnet(text: &str) -> Subnet {
        let (address, prefix) = parse_cidr(text).unwrap();
        Subnet::of(address, prefix)
    }

    #[test]
    fn subnets_overlap_when_they_share_an_address() {
        assert!(subnet("10.1.2.0/24").overlaps(&subnet("10.0.0.0/8")));
        assert!(subnet("10.0.0.0/8").overlaps(&subnet("10.1.2.7/32")));
        assert!(!subnet("10.1.2.0/24").overlaps(&subnet("10.1.3.0/24")));
        assert!(!subnet("192.168.0.0/16").overlaps(&subnet("10.0.0.0/8")));
        assert_eq!(subnet("10.1.2.77/24").to_string(), "10.1.2.0/24");
        assert_eq!(subnet("10.1.2.0/24").last(), Ipv4Addr::new(10, 1, 2, 255));
    }

    #[test]
    fn a_full_config_is_read_with_lxd_defaults() {
        let config = parse(&keys(&[("ipv4.address", "10.7.8.1/24")])).unwrap();
        assert_eq!(config.gateway, Ipv4Addr::new(10, 7, 8, 1));
        assert_eq!(config.subnet.to_string(), "10.7.8.0/24");
        assert!(config.nat && config.dhcp);
        assert_eq!(
            config.ranges,
            [(Ipv4Addr::new(10, 7, 8, 2), Ipv4Addr::new(10, 7, 8, 254))]
        );
        assert_eq!(config.domain, "cove");
        let config = parse(&keys(&[
            ("ipv4.address", "192.168.50.254/24"),
            ("ipv4.nat", "false"),
            ("ipv4.dhcp.ranges", "192.168.50.100-192.168.50.199"),
            ("dns.domain", "lab.example"),
            ("ipv6.address", "none"),
        ]))
        .unwrap();
        assert!(!config.nat);
        assert_eq!(config.ranges[0].0, Ipv4Addr::new(192, 168, 50, 100));
        assert_eq!(config.domain, "lab.example");
    }

    #[test]
    fn bad_values_are_refused_by_key() {
        for (key, value) in [
            ("ipv4.address", "10.0.0.1"),
            ("ipv4.address", "10.0.0.0/24"),
            ("ipv4.address", "10.0.0.255/24"),
            ("ipv4.address", "10.0.0.1/31"),
            ("ipv4.address", "nonsense"),
            ("ipv4.nat", "maybe"),
            ("ipv6.address", "fd00::1/64"),
            ("dns.domain", "bad domain"),
            ("ipv4.dhcp.ranges", "10.0.0.0-10.0.0.9"),
            ("ipv4.dhcp.ranges", "10.0.0.1-10.0.0.9"),
            ("ipv4.dhcp.ranges", "10.0.1.2-10.0.1.9"),
        ] {
            let mut config = keys(&[("ipv4.address", "10.0.0.1/24")]);
            config.insert(key.to_string(), value.to_string());
            let error = parse(&config).unwrap_err().to_string();
            assert!(error.contains(key), "{key}={value}: {error}");
        }
        let error = parse(&keys(&[
            ("ipv4.address", "10.0.0.1/24"),
            ("bridge.mtu", "9000"),
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("bridge.mtu"));
    }

    #[test]
    fn auto_picks_a_free_slash_24_in_ten_slash_eight() {
        let used = [subnet("10.0.0.0/16"), subnet("10.1.2.0/24")];
        let mut picks = [0x0001u16, 0x0102, 0x0203].into_iter();
        let chosen = choose_subnet(&used, || picks.next().unwrap_or(0)).unwrap();
        assert_eq!(chosen.to_string(), "10.2.3.0/24");
        assert!(choose_subnet(&[subnet("10.0.0.0/8")], || 7).is_none());
        let random = choose_subnet(&used, random_bits).unwrap();
        assert!(subnet("10.0.0.0/8").overlaps(&random));
        assert!(!used.iter().any(|subnet| subnet.overlaps(&random)));
    }
}
