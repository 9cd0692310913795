//! Protection rules of SPEC §3 steps 3-4: banned networks, User-Agent and
//! Referer block lists, and a per-client-IP rate limit.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderMap;
use http::header;
use ipnet::IpNet;
use regex::{RegexSet, RegexSetBuilder};

use crate::config::{Config, ConfigError};

/// What a protection rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the request through.
    Allow,
    /// Client network is banned (403 banned page).
    Banned,
    /// No User-Agent (403 text).
    NoUserAgent,
    /// User-Agent or Referer on a block list (403).
    Blocked,
    /// Rate limit exceeded (429 rate-limit page).
    RateLimited,
}

/// The compiled rules.
pub struct Protection {
    banned: Vec<IpNet>,
    user_agents: Option<RegexSet>,
    referers: Option<RegexSet>,
    require_user_agent: bool,
    limiter: Option<RateLimiter>,
}

impl Protection {
    /// Compiles the rules of `config`; errors name the key and the value.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mut banned = Vec::with_capacity(config.banned_cidrs.len());
        for entry in &config.banned_cidrs {
            let net = entry.parse::<IpNet>().or_else(|_| entry.parse::<IpAddr>().map(IpNet::from)).map_err(|_| {
                ConfigError {
                    key: "banned_cidrs",
                    value: format!("{entry:?}"),
                    reason: "not an IPv4/IPv6 address or CIDR".into(),
                }
            })?;
            banned.push(net.trunc());
        }
        let regexes = |key: &'static str, list: &[String]| -> Result<Option<RegexSet>, ConfigError> {
            if list.is_empty() {
                return Ok(None);
            }
            for pattern in list {
                if let Err(e) = regex::RegexBuilder::new(pattern).case_insensitive(true).build() {
                    return Err(ConfigError { key, value: format!("{pattern:?}"), reason: e.to_string() });
                }
            }
            RegexSetBuilder::new(list).case_insensitive(true).build().map(Some).map_err(|e| ConfigError {
                key,
                value: format!("{list:?}"),
                reason: e.to_string(),
            })
        };
        Ok(Protection {
            banned,
            user_agents: regexes("blocked_user_agents", &config.blocked_user_agents)?,
            referers: regexes("blocked_referers", &config.blocked_referers)?,
            require_user_agent: config.require_user_agent,
            limiter: (config.rate_limit_per_second > 0)
                .then(|| RateLimiter::new(config.rate_limit_per_second, config.rate_limit_burst)),
        })
    }

    /// Applies the rules in SPEC order to one request.
    pub fn check(&self, client: IpAddr, headers: &HeaderMap) -> Verdict {
        let client = canonical_ip(client);
        if self.banned.iter().any(|net| net.contains(&client)) {
            return Verdict::Banned;
        }
        let user_agent = headers.get(header::USER_AGENT).map(|v| v.as_bytes()).unwrap_or_default();
        if self.require_user_agent && user_agent.iter().all(|b| b.is_ascii_whitespace()) {
            return Verdict::NoUserAgent;
        }
        if let Some(set) = &self.user_agents
            && set.is_match(&String::from_utf8_lossy(user_agent))
        {
            return Verdict::Blocked;
        }
        if let Some(set) = &self.referers
            && let Some(referer) = headers.get(header::REFERER)
            && set.is_match(&String::from_utf8_lossy(referer.as_bytes()))
        {
            return Verdict::Blocked;
        }
        if let Some(limiter) = &self.limiter
            && !limiter.allow(client, crate::clock::now())
        {
            return Verdict::RateLimited;
        }
        Verdict::Allow
    }

    /// Forgets rate-limit state of clients that are back under their limit.
    pub fn sweep(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.sweep(Instant::now());
        }
    }
}

/// IPv4-mapped IPv6 clients (dual-stack sockets) are matched as IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

const SHARDS: usize = 32;

/// Clients tracked per shard (about 260,000 in all, a few tens of MB at
/// most). Each entry lives `burst + 1` intervals after its client's last
/// request, up to the next sweep. When a shard is full even after dropping
/// its expired entries, clients it does not know share the shard's overflow
/// bucket: newcomers are limited together (as one client per shard) rather
/// than not at all, and tracked clients keep their own buckets. Evicting the
/// stalest entry instead would hand a flooding client a fresh burst each
/// time the table turns over, and finding it costs a scan per request.
const MAX_CLIENTS_PER_SHARD: usize = 8192;

/// A full shard drops its expired entries at most this often: under a flood
/// of newcomers the scan must not run for every request.
const PURGE_EVERY: Duration = Duration::from_secs(1);

/// What the limiter counts as one client: an IPv4 address, or an IPv6 /64
/// (the smallest network an end site gets; one host can use all of it).
/// IPv4-mapped IPv6 addresses count as their IPv4 address.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match canonical_ip(ip) {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// One shard: tracked clients, and the bucket of the clients that did not fit.
struct Shard {
    clients: HashMap<IpAddr, Duration>,
    overflow: Duration,
    last_purge: Duration,
}

/// GCRA (a token bucket without a refill task): each client has a
/// "theoretical arrival time"; a request is allowed while that time is less
/// than `burst` intervals ahead of now.
pub struct RateLimiter {
    interval: Duration,
    tolerance: Duration,
    epoch: Instant,
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<Shard>>,
    max_per_shard: usize,
}

impl RateLimiter {
    /// `per_second` sustained, `burst` more at once.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let interval = Duration::from_secs(1) / per_second.max(1);
        RateLimiter {
            interval,
            tolerance: interval * burst,
            epoch: Instant::now(),
            hasher: Default::default(),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard { clients: HashMap::new(), overflow: Duration::ZERO, last_purge: Duration::ZERO })
                })
                .collect(),
            max_per_shard: MAX_CLIENTS_PER_SHARD,
        }
    }

    /// Clients currently tracked.
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().map_or(0, |s| s.clients.len())).sum()
    }

    /// Records a request from `client` at `now`; false when over the limit.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        let client = client_key(client);
        let t = now.saturating_duration_since(self.epoch);
        let shard = &self.shards[self.hasher.hash_one(client) as usize % SHARDS];
        // A poisoned lock only means another request panicked mid-update;
        // the table is still usable and must keep limiting.
        let mut shard = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let shard = &mut *shard;
        if shard.clients.len() >= self.max_per_shard
            && !shard.clients.contains_key(&client)
            && t.saturating_sub(shard.last_purge) >= PURGE_EVERY
        {
            shard.last_purge = t;
            shard.clients.retain(|_, tat| *tat > t);
        }
        let tat = if shard.clients.len() < self.max_per_shard || shard.clients.contains_key(&client) {
            shard.clients.entry(client).or_insert(t)
        } else {
            &mut shard.overflow
        };
        let next = (*tat).max(t);
        if next - t > self.tolerance {
            return false;
        }
        *tat = next + self.interval;
        true
    }

    fn sweep(&self, now: Instant) {
        let t = now.saturating_duration_since(self.epoch);
        for shard in &self.shards {
            if let Ok(mut shard) = shard.lock() {
                shard.clients.retain(|_, tat| *tat > t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ua: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::USER_AGENT, ua.parse().unwrap());
        h
    }

    #[test]
    fn bans_v4_v6_and_mapped() {
        let config = Config {
            banned_cidrs: vec!["192.0.2.0/24".into(), "2001:db8::/32".into(), "198.51.100.7".into()],
            ..Config::default()
        };
        let p = Protection::from_config(&config).unwrap();
        let h = headers("ua");
        assert_eq!(p.check("192.0.2.9".parse().unwrap(), &h), Verdict::Banned);
        assert_eq!(p.check("::ffff:192.0.2.9".parse().unwrap(), &h), Verdict::Banned);
        assert_eq!(p.check("2001:db8::1".parse().unwrap(), &h), Verdict::Banned);
        assert_eq!(p.check("198.51.100.7".parse().unwrap(), &h), Verdict::Banned);
        assert_eq!(p.check("198.51.100.8".parse().unwrap(), &h), Verdict::Allow);
    }

    #[test]
    fn user_agent_rules() {
        let config = Config { blocked_user_agents: vec!["badbot".into()], ..Config::default() };
        let p = Protection::from_config(&config).unwrap();
        let ip = "127.0.0.1".parse().unwrap();
        assert_eq!(p.check(ip, &HeaderMap::new()), Verdict::NoUserAgent);
        assert_eq!(p.check(ip, &headers(" ")), Verdict::NoUserAgent);
        assert_eq!(p.check(ip, &headers("Mozilla BadBot/1.0")), Verdict::Blocked);
        assert_eq!(p.check(ip, &headers("curl/8")), Verdict::Allow);
    }

    #[test]
    fn client_table_is_bounded_and_newcomers_are_still_limited() {
        let mut limiter = RateLimiter::new(1, 100);
        limiter.max_per_shard = 4;
        let t0 = Instant::now();
        // 10,000 clients in distinct /64s: the table stops growing.
        for i in 0..10_000u32 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::from((u128::from(i) << 64) + (0x2001_0db8u128 << 96)));
            limiter.allow(ip, t0);
        }
        assert_eq!(limiter.tracked(), 4 * SHARDS);
        // Clients already tracked are still limited.
        let known = limiter.shards.iter().find_map(|s| s.lock().unwrap().clients.keys().next().copied()).unwrap();
        assert_eq!((0..200).filter(|_| limiter.allow(known, t0)).count(), 100);
        // A newcomer, with the table full, is limited too (main let it pass).
        let newcomer: IpAddr = "2001:db8:ffff:ffff::1".parse().unwrap();
        assert!((0..200).filter(|_| limiter.allow(newcomer, t0)).count() <= 101);
        // Expired entries make room again.
        let later = t0 + Duration::from_secs(200);
        let fresh: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!((0..200).filter(|_| limiter.allow(fresh, later)).count(), 101);
        limiter.sweep(later + Duration::from_secs(200));
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn one_ipv6_slash_64_is_one_client() {
        let limiter = RateLimiter::new(1, 10);
        let t0 = Instant::now();
        let base = u128::from("2001:db8:1:2::".parse::<std::net::Ipv6Addr>().unwrap());
        let allowed = (0..100_000u128)
            .filter(|i| limiter.allow(IpAddr::V6(std::net::Ipv6Addr::from(base + i * 0x1_0001_0001)), t0))
            .count();
        assert_eq!(allowed, 11, "100,000 addresses of one /64 share one bucket");
        assert_eq!(limiter.tracked(), 1);
        // The next /64 is another client.
        assert!(limiter.allow("2001:db8:1:3::1".parse().unwrap(), t0));
    }

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4_client() {
        let limiter = RateLimiter::new(1, 0);
        let t0 = Instant::now();
        assert!(limiter.allow("192.0.2.7".parse().unwrap(), t0));
        assert!(!limiter.allow("::ffff:192.0.2.7".parse().unwrap(), t0));
        assert_eq!(client_key("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn gcra_allows_burst_then_rate() {
        let limiter = RateLimiter::new(10, 3);
        let ip = "127.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let allowed = (0..10).filter(|_| limiter.allow(ip, t0)).count();
        assert_eq!(allowed, 4);
        assert!(limiter.allow(ip, t0 + Duration::from_millis(100)));
        assert!(!limiter.allow(ip, t0 + Duration::from_millis(100)));
        assert!(limiter.allow("127.0.0.2".parse().unwrap(), t0));
    }
}
