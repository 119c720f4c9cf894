//! The MAC address of a virtio-net card: parsed from the user's `52:54:00:12:34:56`, printed the
//! same way, or drawn at random (locally administered, unicast) when the user gave none.

use std::fmt;
use std::str::FromStr;

use crate::virtio::rng::getrandom;

/// A unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress([u8; 6]);

#[derive(Debug, thiserror::Error)]
pub enum MacAddressError {
    #[error(
        "{input:?} is not a MAC address; write six pairs of hex digits separated by colons, \
         like 52:54:00:12:34:56"
    )]
    Format { input: String },
    #[error(
        "{address} is a multicast MAC address; a network card needs a unicast one (the lowest \
         bit of the first byte clear, as in 52:54:00:12:34:56)"
    )]
    Multicast { address: MacAddress },
    #[error(
        "00:00:00:00:00:00 cannot address a network card; pick another MAC address or leave it \
         out to get a random one"
    )]
    Zero,
    #[error("cannot draw a random MAC address from getrandom(2)")]
    Random(#[source] std::io::Error),
}

impl MacAddress {
    /// The address as it goes on the wire.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// A random locally administered unicast address (bit 1 of the first byte set, bit 0
    /// clear), so it cannot collide with a vendor-assigned one.
    pub fn random() -> Result<Self, MacAddressError> {
        let mut bytes = [0u8; 6];
        getrandom(&mut bytes).map_err(MacAddressError::Random)?;
        bytes[0] = (bytes[0] & !0x01) | 0x02;
        Ok(Self(bytes))
    }

    /// Whether this address names a group rather than one card.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Whether the address was assigned locally rather than by a vendor.
    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl TryFrom<[u8; 6]> for MacAddress {
    type Error = MacAddressError;

    /// Refuses addresses a card cannot have: multicast ones and all zeroes.
    fn try_from(bytes: [u8; 6]) -> Result<Self, Self::Error> {
        let address = Self(bytes);
        if bytes == [0; 6] {
            Err(MacAddressError::Zero)
        } else if address.is_multicast() {
            Err(MacAddressError::Multicast { address })
        } else {
            Ok(address)
        }
    }
}

impl FromStr for MacAddress {
    type Err = MacAddressError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let format = || MacAddressError::Format {
            input: input.to_owned(),
        };
        let mut bytes = [0u8; 6];
        let mut pairs = input.split(':');
        for byte in &mut bytes {
            let pair = pairs.next().ok_or_else(format)?;
            if pair.len() != 2 || !pair.bytes().all(|digit| digit.is_ascii_hexdigit()) {
                return Err(format());
            }
            *byte = u8::from_str_radix(pair, 16).map_err(|_| format())?;
        }
        if pairs.next().is_some() {
            return Err(format());
        }
        Self::try_from(bytes)
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, f] = self.0;
        write!(formatter, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_colon_separated_hex_pairs() {
        let address: MacAddress = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(address.bytes(), [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(address.to_string(), "52:54:00:12:34:56");
        let upper: MacAddress = "02:AB:cd:EF:00:ff".parse().unwrap();
        assert_eq!(upper.bytes(), [0x02, 0xab, 0xcd, 0xef, 0x00, 0xff]);
        assert_eq!(upper.to_string(), "02:ab:cd:ef:00:ff");
        // 52:54:00 (QEMU's prefix) is locally administered; a vendor's prefix is not.
        assert!(address.is_locally_administered());
        assert!(upper.is_locally_administered());
        let vendor: MacAddress = "00:1b:21:0a:0b:0c".parse().unwrap();
        assert!(!vendor.is_locally_administered());
    }

    #[test]
    fn anything_but_six_hex_pairs_is_refused_with_an_example() {
        for input in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:56:",
            "52-54-00-12-34-56",
            "525400123456",
            "5:54:00:12:34:56",
            "52:54:00:12:34:567",
            "52:54:00:12:34:zz",
            "52:54:00:12:34:+5",
            " 52:54:00:12:34:56",
            "52:54::00:12:34",
        ] {
            let error = input.parse::<MacAddress>().unwrap_err();
            assert!(
                matches!(&error, MacAddressError::Format { input: got } if got == input),
                "{input:?}: {error:?}"
            );
            let message = error.to_string();
            assert!(message.contains("six pairs of hex digits"), "{message}");
            assert!(message.contains("52:54:00:12:34:56"), "{message}");
        }
    }

    #[test]
    fn multicast_and_zero_addresses_are_refused() {
        let error = "01:00:5e:00:00:01".parse::<MacAddress>().unwrap_err();
        assert!(matches!(error, MacAddressError::Multicast { .. }));
        assert!(error
            .to_string()
            .contains("01:00:5e:00:00:01 is a multicast"));
        assert!(matches!(
            "ff:ff:ff:ff:ff:ff".parse::<MacAddress>(),
            Err(MacAddressError::Multicast { .. })
        ));
        assert!(matches!(
            "00:00:00:00:00:00".parse::<MacAddress>(),
            Err(MacAddressError::Zero)
        ));
    }

    #[test]
    fn random_addresses_are_local_unicast_and_differ() {
        let first = MacAddress::random().unwrap();
        let second = MacAddress::random().unwrap();
        for address in [first, second] {
            assert!(address.is_locally_administered());
            assert!(!address.is_multicast());
            assert_eq!(address.to_string().parse::<MacAddress>().unwrap(), address);
        }
        assert_ne!(first, second);
    }
}
