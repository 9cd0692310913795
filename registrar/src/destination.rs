//! `denied_destination_networks`: the networks no route may point into
//! (the edge host's loopback, link-local and the cloud metadata service,
//! by default). A literal address is checked as written; a host name is
//! resolved, with a short timeout, and refused when any of its addresses
//! is denied.
//!
//! A name that does not resolve in time is accepted: a grid host's name
//! may be briefly unresolvable, and refusing would break its webservice,
//! while the proxy checks the addresses again on every connection
//! (`[proxy] denied_backend_networks`), so such a route can still never
//! reach a denied network.

use std::net::IpAddr;
use std::time::Duration;

use dynamicproxy_redis::{BackendUrl, NetworkList};
use ipnet::IpNet;

/// How long resolving a destination's name may take. Short: it is spent
/// inside a client's exchange, and a failure only means "accepted".
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the check found out about a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No address of the destination is in a denied network.
    Allowed,
    /// This address of the destination is in this denied network.
    Denied {
        /// The offending address (canonical form).
        address: IpAddr,
        /// The denied network it falls in.
        network: IpNet,
    },
    /// The name could not be resolved (why); accepted, see the module docs.
    Unresolved(String),
}

/// The compiled `denied_destination_networks`; empty denies nothing.
#[derive(Debug, Clone, Default)]
pub struct DeniedDestinations {
    networks: NetworkList,
}

impl DeniedDestinations {
    /// Denies destinations in `networks`.
    pub fn new(networks: NetworkList) -> Self {
        DeniedDestinations { networks }
    }

    /// The address a destination host names literally (`10.0.0.1`, `[::1]`,
    /// `[::ffff:127.0.0.1]`), in canonical form; `None` for a host name.
    pub fn literal(host: &str) -> Option<IpAddr> {
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        bare.parse::<IpAddr>().ok().map(|addr| addr.to_canonical())
    }

    /// Checks addresses without resolving anything: denied when any is.
    pub fn check_addresses(&self, addresses: impl IntoIterator<Item = IpAddr>) -> Verdict {
        addresses
            .into_iter()
            .find_map(|address| {
                let address = address.to_canonical();
                self.networks.matching(address).map(|network| Verdict::Denied { address, network })
            })
            .unwrap_or(Verdict::Allowed)
    }

    /// Checks a destination: its literal address, or every address its
    /// name resolves to within [`RESOLVE_TIMEOUT`].
    pub async fn check(&self, backend: &BackendUrl) -> Verdict {
        if self.networks.is_empty() {
            return Verdict::Allowed;
        }
        if let Some(address) = Self::literal(backend.host()) {
            return self.check_addresses([address]);
        }
        let lookup = tokio::net::lookup_host((backend.host(), backend.port()));
        match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
            Ok(Ok(addresses)) => {
                let addresses: Vec<IpAddr> = addresses.map(|a| a.ip()).collect();
                if addresses.is_empty() {
                    return Verdict::Unresolved("no addresses".into());
                }
                self.check_addresses(addresses)
            }
            Ok(Err(e)) => Verdict::Unresolved(e.to_string()),
            Err(_) => Verdict::Unresolved(format!("no answer within {RESOLVE_TIMEOUT:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied() -> DeniedDestinations {
        DeniedDestinations::new(NetworkList::default_denied())
    }

    fn backend(url: &str) -> BackendUrl {
        BackendUrl::parse_strict(url).unwrap()
    }

    #[test]
    fn literals() {
        assert_eq!(DeniedDestinations::literal("10.0.0.1"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(DeniedDestinations::literal("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(DeniedDestinations::literal("[::ffff:127.0.0.1]"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(DeniedDestinations::literal("localhost"), None);
        assert_eq!(DeniedDestinations::literal("::1"), Some("::1".parse().unwrap()));
    }

    #[tokio::test]
    async fn literal_addresses_are_checked_as_written() {
        let denied = denied();
        for url in ["http://127.0.0.1:1", "http://[::1]:1", "http://[::ffff:127.0.0.1]:1", "http://169.254.169.254:80"]
        {
            assert!(matches!(denied.check(&backend(url)).await, Verdict::Denied { .. }), "{url}");
        }
        for url in ["http://10.0.0.1:1", "http://[2001:db8::1]:1", "http://172.16.0.5:8000"] {
            assert_eq!(denied.check(&backend(url)).await, Verdict::Allowed, "{url}");
        }
    }

    #[tokio::test]
    async fn names_are_resolved() {
        let verdict = denied().check(&backend("http://localhost:8000")).await;
        assert!(matches!(verdict, Verdict::Denied { .. }), "{verdict:?}");
    }

    #[tokio::test]
    async fn empty_denies_nothing() {
        let none = DeniedDestinations::default();
        assert_eq!(none.check(&backend("http://127.0.0.1:1")).await, Verdict::Allowed);
        assert_eq!(none.check(&backend("http://localhost:1")).await, Verdict::Allowed);
    }
}
