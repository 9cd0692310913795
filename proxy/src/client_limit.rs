//! Per-client connection counting (`max_connections_per_client`): one count
//! per IPv4 address or IPv6 /64, because one host's IPv6 clients usually get a
//! whole /64 and could otherwise open a connection from each of its addresses.
//! An entry lives only while its count is above zero, so the table is bounded
//! by the number of open connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// What connections are counted by: an IPv4 address or an IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An IPv4 address (IPv4-mapped IPv6 addresses included).
    V4(u32),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl ClientKey {
    /// The key `ip` is counted under.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(u32::from(v4)),
                None => ClientKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// The counts of open connections per client; cheap to clone.
#[derive(Clone, Debug)]
pub struct ClientLimit {
    max: usize,
    counts: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

impl ClientLimit {
    /// Allows `max` connections per client; 0 turns the limit off.
    pub fn new(max: usize) -> Self {
        ClientLimit { max, counts: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// A place for one more connection from `ip`, held until the guard is
    /// dropped; `None` when the client already has `max` open. Always a
    /// place when the limit is off (the guard then counts nothing).
    pub fn try_acquire(&self, ip: IpAddr) -> Option<ClientGuard> {
        if self.max == 0 {
            return Some(ClientGuard { limit: None, key: ClientKey::of(ip) });
        }
        let key = ClientKey::of(ip);
        // A poisoned lock only means a panic elsewhere; the counts are still whole.
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ClientGuard { limit: Some(self.clone()), key })
    }

    /// Clients with at least one open connection (the table's size).
    pub fn clients(&self) -> usize {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn release(&self, key: ClientKey) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&key);
            }
        }
    }
}

/// One connection's place in its client's count.
#[derive(Debug)]
pub struct ClientGuard {
    limit: Option<ClientLimit>,
    key: ClientKey,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if let Some(limit) = &self.limit {
            limit.release(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(ClientKey::of(ip("2001:db8:1:2::1")), ClientKey::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(ClientKey::of(ip("2001:db8:1:2::1")), ClientKey::of(ip("2001:db8:1:3::1")));
        assert_eq!(ClientKey::of(ip("::ffff:192.0.2.7")), ClientKey::of(ip("192.0.2.7")));
        assert_ne!(ClientKey::of(ip("192.0.2.7")), ClientKey::of(ip("192.0.2.8")));
    }

    #[test]
    fn counts_up_to_max_and_forgets_clients_at_zero() {
        let limit = ClientLimit::new(2);
        let a = limit.try_acquire(ip("2001:db8::1")).unwrap();
        let b = limit.try_acquire(ip("2001:db8::2")).unwrap();
        assert!(limit.try_acquire(ip("2001:db8::3")).is_none());
        let other = limit.try_acquire(ip("192.0.2.1")).unwrap();
        assert_eq!(limit.clients(), 2);
        drop(a);
        let c = limit.try_acquire(ip("2001:db8::3")).unwrap();
        drop((b, c, other));
        assert_eq!(limit.clients(), 0);
    }

    #[test]
    fn zero_is_off() {
        let limit = ClientLimit::new(0);
        let guards: Vec<_> = (0..1000).map(|_| limit.try_acquire(ip("192.0.2.1")).unwrap()).collect();
        assert_eq!(limit.clients(), 0);
        drop(guards);
    }
}
