//! A lock in Redis with an expiry, so that one process among several sharing
//! Redis does a job at a time (the proxies' prober): `SET key token NX PX ttl`
//! takes it, a compare-and-`PEXPIRE` script renews it, a compare-and-`DEL`
//! script releases it. The token is random per holder, so a process never
//! renews or releases a lock that expired and was taken by another. A holder
//! that dies simply stops renewing: the lock expires and another takes it.
//!
//! Redis's own clock decides expiry; the holder must stop acting before its
//! last successful renewal plus the TTL (see [`RedisLock::valid_until`]),
//! because while Redis is unreachable it cannot know whether it still holds it.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::error::RouteTableError;
use crate::keys::PROBER_LOCK;
use crate::store::RouteStore;

/// `PEXPIRE KEYS[1] ARGV[2]` only while it holds `ARGV[1]`; 1 renewed, 0 not ours.
const RENEW_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// `DEL KEYS[1]` only while it holds `ARGV[1]`; 1 released, 0 not ours.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// One process's claim on a named lock in Redis.
pub struct RedisLock {
    store: Arc<RouteStore>,
    key: &'static str,
    token: String,
    ttl: Duration,
    /// Local time before which the lock is surely still ours: the start of
    /// the last successful take or renewal plus the TTL.
    valid_until: Mutex<Option<Instant>>,
}

impl RedisLock {
    /// The lock that lets one proxy's prober act, expiring `ttl` after its
    /// last renewal. Does not touch Redis yet.
    pub fn prober(store: Arc<RouteStore>, ttl: Duration) -> Self {
        let token = format!("{}-{:016x}", std::process::id(), rand::rng().random::<u64>());
        RedisLock { store, key: PROBER_LOCK, token, ttl, valid_until: Mutex::new(None) }
    }

    /// This holder's token (the value stored under the key while it holds the lock).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Takes the lock if it is free, or renews it if it is already ours.
    /// Returns whether this process holds it now.
    pub async fn acquire_or_renew(&self) -> Result<bool, RouteTableError> {
        let started = Instant::now();
        let result = match self.renew().await? {
            true => true,
            false => self.try_acquire().await?,
        };
        self.set_valid(result.then_some(started + self.ttl));
        Ok(result)
    }

    /// `SET key token NX PX ttl`: true when this call took the lock.
    pub async fn try_acquire(&self) -> Result<bool, RouteTableError> {
        let (key, token, ttl) = (self.key, self.token.as_str(), self.ttl_ms());
        let reply: Option<String> = self
            .store
            .run(|mut c| async move {
                redis::cmd("SET").arg(key).arg(token).arg("NX").arg("PX").arg(ttl).query_async(&mut c).await
            })
            .await?;
        Ok(reply.is_some())
    }

    /// Extends the lock's expiry to `ttl` from now, only if it is still ours.
    pub async fn renew(&self) -> Result<bool, RouteTableError> {
        let script = redis::Script::new(RENEW_SCRIPT);
        let (key, token, ttl) = (self.key, self.token.as_str(), self.ttl_ms());
        let renewed: i64 = self
            .store
            .run(|mut c| async move { script.key(key).arg(token).arg(ttl).invoke_async(&mut c).await })
            .await?;
        Ok(renewed == 1)
    }

    /// Gives the lock up, only if it is still ours, so another process may
    /// take it at once instead of after the expiry.
    pub async fn release(&self) -> Result<bool, RouteTableError> {
        self.set_valid(None);
        let script = redis::Script::new(RELEASE_SCRIPT);
        let (key, token) = (self.key, self.token.as_str());
        let released: i64 =
            self.store.run(|mut c| async move { script.key(key).arg(token).invoke_async(&mut c).await }).await?;
        Ok(released == 1)
    }

    /// True while the lock is surely held: taken or renewed less than `ttl` ago.
    pub fn is_held(&self) -> bool {
        self.valid_until().is_some_and(|until| Instant::now() < until)
    }

    /// Until when the lock is surely ours, if it is.
    pub fn valid_until(&self) -> Option<Instant> {
        *self.valid_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_valid(&self, until: Option<Instant>) {
        *self.valid_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = until;
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX).max(1)
    }
}
