//! Networks a route's destination may not be in: the proxy never connects
//! there (`[proxy] denied_backend_networks`), the registrar refuses to write
//! them (`[registrar] denied_destination_networks`) and `routes set` warns.
//!
//! Addresses are compared in canonical form, so `::ffff:127.0.0.1` is
//! 127.0.0.1: an IPv4-mapped address must not slip past an IPv4 entry.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// The default denied networks: loopback, link-local (the cloud metadata
/// service at 169.254.169.254 among them) and unspecified. A tool's route to
/// any of these would reach the edge host itself rather than a tool.
pub const DEFAULT_DENIED_NETWORKS: &[&str] =
    &["127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8", "::/128"];

/// A configured entry that is neither a CIDR nor an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not a network (expected a CIDR such as 10.0.0.0/8, or an address)")]
pub struct InvalidNetwork {
    /// The entry as configured.
    pub entry: String,
}

/// A set of IPv4/IPv6 networks; empty contains nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkList {
    networks: Vec<IpNet>,
}

impl NetworkList {
    /// Parses CIDRs (`10.0.0.0/8`, `fe80::/10`) and single addresses; the
    /// first bad entry is named in the error.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, InvalidNetwork> {
        let networks = entries
            .iter()
            .map(|entry| {
                let entry = entry.as_ref().trim();
                entry
                    .parse::<IpNet>()
                    .map(|net| net.trunc())
                    .or_else(|_| entry.parse::<IpAddr>().map(|addr| IpNet::from(addr.to_canonical())))
                    .map_err(|_| InvalidNetwork { entry: entry.to_string() })
            })
            .collect::<Result<_, _>>()?;
        Ok(NetworkList { networks })
    }

    /// [`DEFAULT_DENIED_NETWORKS`], as a list.
    pub fn default_denied() -> Self {
        Self::parse(DEFAULT_DENIED_NETWORKS).unwrap_or_default()
    }

    /// [`DEFAULT_DENIED_NETWORKS`] as configuration strings, for config defaults.
    pub fn default_denied_strings() -> Vec<String> {
        DEFAULT_DENIED_NETWORKS.iter().map(|s| s.to_string()).collect()
    }

    /// True when `addr` (in canonical form) falls in one of the networks.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.networks.iter().any(|net| net.contains(&addr))
    }

    /// The network `addr` falls in, to name it in a refusal.
    pub fn matching(&self, addr: IpAddr) -> Option<IpNet> {
        let addr = addr.to_canonical();
        self.networks.iter().copied().find(|net| net.contains(&addr))
    }

    /// True when no network is listed (everything is allowed).
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }
}

impl fmt::Display for NetworkList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, net) in self.networks.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{net}")?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_denies_loopback_link_local_and_unspecified() {
        let denied = NetworkList::default_denied();
        for addr in ["127.0.0.1", "127.1.2.3", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "::", "::ffff:127.0.0.1"]
        {
            assert!(denied.contains(ip(addr)), "{addr}");
        }
        for addr in ["10.0.0.1", "172.16.0.5", "2001:db8::1", "::ffff:10.0.0.1", "8.8.8.8"] {
            assert!(!denied.contains(ip(addr)), "{addr}");
        }
        assert_eq!(denied.matching(ip("169.254.169.254")), Some("169.254.0.0/16".parse().unwrap()));
    }

    #[test]
    fn empty_denies_nothing() {
        let none = NetworkList::parse::<&str>(&[]).unwrap();
        assert!(none.is_empty());
        assert!(!none.contains(ip("127.0.0.1")));
    }

    #[test]
    fn single_addresses_and_bad_entries() {
        let list = NetworkList::parse(&["10.1.2.3", " 192.168.0.0/16 "]).unwrap();
        assert!(list.contains(ip("10.1.2.3")));
        assert!(!list.contains(ip("10.1.2.4")));
        assert!(list.contains(ip("192.168.255.1")));
        for bad in ["", "10.0.0.0/33", "localhost", "1.2.3.4.5", "fe80::/129"] {
            assert_eq!(NetworkList::parse(&[bad]), Err(InvalidNetwork { entry: bad.trim().to_string() }), "{bad}");
        }
    }

    #[test]
    fn displays_as_a_list() {
        assert_eq!(NetworkList::parse(&["10.0.0.0/8", "::1"]).unwrap().to_string(), "[10.0.0.0/8, ::1/128]");
    }
}
