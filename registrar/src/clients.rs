//! `allowed_clients`: which client addresses may connect at all. Checked as
//! soon as a connection is accepted, before ident, so an outsider can
//! neither register nor make the registrar query its ident port.

use std::net::IpAddr;

use dynamicproxy_redis::NetworkList;

/// The compiled `allowed_clients`; empty allows every client.
#[derive(Debug, Clone, Default)]
pub struct AllowedClients {
    networks: NetworkList,
}

impl AllowedClients {
    /// Allows clients in `networks`, or everyone when it is empty.
    pub fn new(networks: NetworkList) -> Self {
        AllowedClients { networks }
    }

    /// True when `client` may connect. IPv4-mapped IPv6 peers (a dual-stack
    /// listener) are compared as the IPv4 address they are.
    pub fn allows(&self, client: IpAddr) -> bool {
        self.networks.is_empty() || self.networks.contains(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_allows_everyone() {
        let any = AllowedClients::default();
        assert!(any.allows(ip("127.0.0.1")));
        assert!(any.allows(ip("2001:db8::1")));
    }

    #[test]
    fn listed_networks_only() {
        let grid = AllowedClients::new(NetworkList::parse(&["172.16.0.0/21", "2001:db8::/32"]).unwrap());
        assert!(grid.allows(ip("172.16.7.255")));
        assert!(grid.allows(ip("::ffff:172.16.0.1")));
        assert!(grid.allows(ip("2001:db8::5")));
        assert!(!grid.allows(ip("172.16.8.0")));
        assert!(!grid.allows(ip("127.0.0.1")));
        assert!(!grid.allows(ip("::ffff:127.0.0.1")));
    }
}
