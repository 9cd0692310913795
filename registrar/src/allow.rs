//! The optional allow-list of destinations a route may point to.
//!
//! Host names are not resolved: an address destination must fall in a
//! listed network, a named destination must be under a listed domain.
//! Resolving would let whoever controls DNS decide what is allowed.

use std::net::IpAddr;

use ipnet::IpNet;

/// One entry of `allowed_destinations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowRule {
    /// An IPv4/IPv6 network; a single address is a /32 or /128.
    Network(IpNet),
    /// A domain: the name itself and every name under it (lower-case, no leading dot).
    Domain(String),
}

impl AllowRule {
    /// Reads `10.0.0.0/8`, `2001:db8::1`, `eqiad1.wikimedia.cloud` or `.wmflabs`;
    /// `None` for anything else.
    pub fn parse(entry: &str) -> Option<Self> {
        let entry = entry.trim();
        if let Ok(net) = entry.parse::<IpNet>() {
            return Some(AllowRule::Network(net.trunc()));
        }
        if let Ok(addr) = entry.parse::<IpAddr>() {
            return Some(AllowRule::Network(IpNet::from(addr)));
        }
        let domain = entry.strip_prefix('.').unwrap_or(entry).to_ascii_lowercase();
        let valid = !domain.is_empty()
            && domain.split('.').all(|label| {
                !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            // Something like 10.0.0.0/33 must not silently become a domain.
            && !domain.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        valid.then_some(AllowRule::Domain(domain))
    }

    fn allows(&self, host: &Host<'_>) -> bool {
        match (self, host) {
            (AllowRule::Network(net), Host::Addr(addr)) => net.contains(addr),
            (AllowRule::Domain(domain), Host::Name(name)) => {
                name.strip_suffix(domain.as_str()).is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
            }
            _ => false,
        }
    }
}

/// The compiled allow-list; empty allows everything.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    rules: Vec<AllowRule>,
}

enum Host<'a> {
    Addr(IpAddr),
    Name(&'a str),
}

impl AllowList {
    /// A list of rules; an empty list allows every destination.
    pub fn new(rules: Vec<AllowRule>) -> Self {
        AllowList { rules }
    }

    /// True when a destination host (as [`dynamicproxy_redis::BackendUrl::host`]
    /// gives it: lower-case, IPv6 in brackets) may be registered.
    pub fn allows(&self, host: &str) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let host = match bare.parse::<IpAddr>() {
            Ok(addr) => Host::Addr(addr.to_canonical()),
            Err(_) => Host::Name(bare),
        };
        self.rules.iter().any(|rule| rule.allows(&host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::new(entries.iter().map(|e| AllowRule::parse(e).unwrap()).collect())
    }

    #[test]
    fn empty_allows_all() {
        assert!(AllowList::default().allows("anything.example"));
    }

    #[test]
    fn networks_and_domains() {
        let list = list(&["172.16.0.0/21", "2001:db8::/32", "10.1.2.3", ".eqiad1.wikimedia.cloud"]);
        assert!(list.allows("172.16.7.255"));
        assert!(!list.allows("172.16.8.0"));
        assert!(list.allows("10.1.2.3"));
        assert!(!list.allows("10.1.2.4"));
        assert!(list.allows("[2001:db8::5]"));
        assert!(!list.allows("[2001:db9::5]"));
        assert!(list.allows("tools-webgrid-1.tools.eqiad1.wikimedia.cloud"));
        assert!(list.allows("eqiad1.wikimedia.cloud"));
        assert!(!list.allows("evil-eqiad1.wikimedia.cloud"));
        assert!(!list.allows("eqiad1.wikimedia.cloud.evil.example"));
        assert!(!list.allows("localhost"));
    }

    #[test]
    fn refuses_bad_entries() {
        for bad in ["", "10.0.0.0/33", "1.2.3.4.5", "a..b", "a b", "*.example"] {
            assert_eq!(AllowRule::parse(bad), None, "{bad}");
        }
    }
}
