//! When each routed backend last had a request, so the prober checks only
//! backends nobody uses (a used one is watched by its own traffic).
//!
//! The request path pays one shard read lock and, at most once a second per
//! backend, one relaxed atomic store: times are whole seconds since the
//! proxy started, and an unchanged second is not written again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dynamicproxy_redis::BackendUrl;
use foldhash::fast::RandomState;

use crate::clock;

/// Last request per backend; cloning gives another handle on the same map.
#[derive(Clone, Debug)]
pub struct LastUse {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Reference point for the seconds below: the proxy's start.
    epoch: Instant,
    /// Seconds after `epoch` of the last request to each backend.
    /// foldhash over the backend's own keyed hash: SipHash cost several
    /// times as much on every request.
    backends: DashMap<BackendUrl, AtomicU64, RandomState>,
}

impl Default for LastUse {
    fn default() -> Self {
        Self::new()
    }
}

impl LastUse {
    /// An empty map: every backend counts as unused since now.
    pub fn new() -> Self {
        LastUse {
            inner: Arc::new(Inner { epoch: Instant::now(), backends: DashMap::with_hasher(RandomState::default()) }),
        }
    }

    /// Records a request to `backend` now.
    #[inline]
    pub fn touch(&self, backend: &BackendUrl) {
        let now = clock::now().saturating_duration_since(self.inner.epoch).as_secs();
        if let Some(seen) = self.inner.backends.get(backend) {
            if seen.load(Ordering::Relaxed) != now {
                seen.store(now, Ordering::Relaxed);
            }
            return;
        }
        self.inner.backends.insert(backend.clone(), AtomicU64::new(now));
    }

    /// How long `backend` has gone without a request; a backend never used
    /// counts from the proxy's start.
    pub fn idle_for(&self, backend: &BackendUrl) -> Duration {
        let now = self.inner.epoch.elapsed();
        let last = self.inner.backends.get(backend).map_or(0, |seen| seen.load(Ordering::Relaxed));
        now.saturating_sub(Duration::from_secs(last))
    }

    /// Forgets backends `keep` rejects (no route names them any more), so the
    /// map stays as large as the route table.
    pub fn retain(&self, keep: impl Fn(&BackendUrl) -> bool) {
        self.inner.backends.retain(|backend, _| keep(backend));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_used_backend_is_not_idle() {
        let uses = LastUse::new();
        let a = BackendUrl::parse("http://10.0.0.1:80").unwrap();
        let b = BackendUrl::parse("http://10.0.0.2:80").unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        uses.touch(&a);
        assert!(uses.idle_for(&a) < Duration::from_secs(1));
        assert!(uses.idle_for(&b) >= Duration::from_secs(1));
        uses.retain(|backend| backend != &a);
        assert!(uses.idle_for(&a) >= Duration::from_secs(1));
    }
}
