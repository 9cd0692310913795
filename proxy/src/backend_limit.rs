//! Caps on requests in flight to backends: per backend address, shared by
//! every event loop (each loop has its own pool, so no pool can enforce it),
//! and per client connection (one HTTP/2 connection must not fan out into
//! hundreds of backend connections).
//!
//! A request takes its connection's slot first (waiting as long as it must:
//! the connection only queues behind itself), then its backend's slot,
//! waiting at most `backend_queue_timeout` before `over-capacity`. The permit
//! lives as long as the response body or tunnel, because the backend
//! connection is busy until then.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynamicproxy_redis::BackendUrl;
use foldhash::fast::RandomState;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProxyError;

/// Shards of the per-backend map: requests to different backends rarely
/// contend on one lock.
const SHARDS: usize = 16;

/// Backend requests one client connection may have in flight at once.
///
/// An HTTP/1 connection has at most one; an HTTP/2 connection may open 100
/// streams, and without this cap each stream took its own backend
/// connection. 32 is five times what a browser spends on one HTTP/1 host
/// (6 connections), so a page load over HTTP/2 is not slowed; further
/// streams wait for a slot instead of opening more backend connections.
pub const PER_CONNECTION: usize = 32;

/// Settings of the per-backend cap.
#[derive(Debug, Clone, Copy)]
pub struct BackendLimitSettings {
    /// Requests in flight to one backend address at once; 0 = off.
    pub max_per_backend: usize,
    /// How long a request waits for a slot before `over-capacity`.
    pub queue_timeout: Duration,
}

/// The per-backend caps, shared by all event loops.
pub struct BackendLimits {
    settings: BackendLimitSettings,
    /// Seeded at random per process: backends are named by tools, so their
    /// names are hostile input, and foldhash costs a tenth of SipHash.
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<BackendUrl, Arc<Semaphore>, RandomState>>>,
}

/// A request's place under both caps; dropping it frees both.
pub struct BackendPermit {
    // Field order matters: the slot is released before the idle check.
    backend: Option<OwnedSemaphorePermit>,
    _connection: Option<OwnedSemaphorePermit>,
    entry: Option<(Arc<BackendLimits>, BackendUrl, Arc<Semaphore>)>,
}

impl std::fmt::Debug for BackendPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendPermit").field("backend", &self.entry.as_ref().map(|e| &e.1)).finish()
    }
}

/// A fresh per-connection semaphore of [`PER_CONNECTION`] slots.
pub fn connection_slots() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(PER_CONNECTION))
}

impl BackendLimits {
    /// Empty caps with `settings`.
    pub fn new(settings: BackendLimitSettings) -> Arc<Self> {
        Arc::new(BackendLimits {
            settings,
            hasher: Default::default(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
        })
    }

    /// Backends with a request in flight or waiting (entries are removed when idle).
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map_or(0, |m| m.len())).sum()
    }

    /// Waits for a slot on `connection` (an HTTP/2 connection's; an HTTP/1
    /// connection has none, serving one request at a time), then on `backend`.
    pub async fn acquire(
        self: &Arc<Self>,
        connection: Option<&Arc<Semaphore>>,
        backend: &BackendUrl,
    ) -> Result<BackendPermit, ProxyError> {
        // The connection's semaphore is never closed; a closed one would mean
        // the connection is gone, and the request with it.
        let connection = match connection {
            Some(slots) => Some(match slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => slots.clone().acquire_owned().await.map_err(|_| ProxyError::OverCapacity)?,
            }),
            None => None,
        };
        if self.settings.max_per_backend == 0 {
            return Ok(BackendPermit { backend: None, _connection: connection, entry: None });
        }
        // Keyed by the backend itself, whose clone shares its host: a
        // request allocates nothing here.
        let semaphore = self.semaphore(backend);
        // Built before waiting, so a cancelled request (client gone, stream
        // reset) still removes an entry it was the last user of.
        let mut permit = BackendPermit {
            backend: None,
            _connection: connection,
            entry: Some((self.clone(), backend.clone(), semaphore.clone())),
        };
        // From the poll's time (`clock`): `timeout` would read the clock.
        // A free slot is taken at once: a timeout costs a timer entry (and
        // the runtime handle it clones) even when it is never polled.
        if let Ok(slot) = semaphore.clone().try_acquire_owned() {
            permit.backend = Some(slot);
            return Ok(permit);
        }
        let deadline = crate::clock::tokio_now() + self.settings.queue_timeout;
        match tokio::time::timeout_at(deadline, semaphore.acquire_owned()).await {
            Ok(Ok(slot)) => {
                permit.backend = Some(slot);
                Ok(permit)
            }
            _ => Err(ProxyError::OverCapacity),
        }
    }

    fn shard(&self, backend: &BackendUrl) -> &Mutex<HashMap<BackendUrl, Arc<Semaphore>, RandomState>> {
        &self.shards[self.hasher.hash_one(backend) as usize % SHARDS]
    }

    fn semaphore(&self, backend: &BackendUrl) -> Arc<Semaphore> {
        let Ok(mut map) = self.shard(backend).lock() else {
            // A poisoned shard still caps: this request gets its own full
            // semaphore, so the cap is at worst per request, never absent.
            return Arc::new(Semaphore::new(self.settings.max_per_backend));
        };
        if let Some(semaphore) = map.get(backend) {
            return semaphore.clone();
        }
        let semaphore = Arc::new(Semaphore::new(self.settings.max_per_backend));
        map.insert(backend.clone(), semaphore.clone());
        semaphore
    }

    /// Removes `backend`'s entry when nobody holds or waits for it. Clones
    /// are only made under the shard lock, so the count read here is exact.
    fn release(&self, backend: &BackendUrl, semaphore: Arc<Semaphore>) {
        let Ok(mut map) = self.shard(backend).lock() else { return };
        let idle = map.get(backend).is_some_and(|s| Arc::ptr_eq(s, &semaphore))
            && Arc::strong_count(&semaphore) == 2
            && semaphore.available_permits() == self.settings.max_per_backend;
        if idle {
            map.remove(backend);
        }
    }
}

impl Drop for BackendPermit {
    fn drop(&mut self) {
        drop(self.backend.take());
        if let Some((limits, backend, semaphore)) = self.entry.take() {
            limits.release(&backend, semaphore);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(host: &str) -> BackendUrl {
        BackendUrl::parse(&format!("http://{host}:1")).unwrap()
    }

    fn limits(max: usize) -> Arc<BackendLimits> {
        BackendLimits::new(BackendLimitSettings { max_per_backend: max, queue_timeout: Duration::from_millis(50) })
    }

    #[tokio::test]
    async fn caps_per_backend_and_forgets_idle_backends() {
        let limits = limits(2);
        let conn = Arc::new(Semaphore::new(100));
        let a = limits.acquire(Some(&conn), &url("a")).await.unwrap();
        let b = limits.acquire(Some(&conn), &url("a")).await.unwrap();
        assert!(matches!(limits.acquire(Some(&conn), &url("a")).await, Err(ProxyError::OverCapacity)));
        let other = limits.acquire(Some(&conn), &url("b")).await.unwrap();
        assert_eq!(limits.tracked(), 2);
        drop(a);
        let c = limits.acquire(Some(&conn), &url("a")).await.unwrap();
        drop((b, c, other));
        assert_eq!(limits.tracked(), 0);
    }

    #[tokio::test]
    async fn cancelled_waiters_leave_no_entry() {
        let limits = limits(1);
        let conn = Arc::new(Semaphore::new(100));
        let a = url("a");
        let held = limits.acquire(Some(&conn), &a).await.unwrap();
        let waiting = limits.acquire(Some(&conn), &a);
        assert!(tokio::time::timeout(Duration::from_millis(5), waiting).await.is_err());
        drop(held);
        assert_eq!(limits.tracked(), 0);
    }

    #[tokio::test]
    async fn connection_slots_queue_instead_of_failing() {
        let limits = limits(0);
        let conn = Arc::new(Semaphore::new(1));
        let a = url("a");
        let first = limits.acquire(Some(&conn), &a).await.unwrap();
        let second = limits.acquire(Some(&conn), &a);
        tokio::pin!(second);
        assert!(tokio::time::timeout(Duration::from_millis(20), second.as_mut()).await.is_err());
        drop(first);
        second.await.unwrap();
    }
}
