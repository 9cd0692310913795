//! Where the route cache's content comes from: which Redis server the sync
//! task reads, the master changes (failovers) it has followed, a problem that
//! keeps it from syncing at all, and whether the table still is a snapshot
//! read from disk at start. Written by the sync task, read by health
//! endpoints (`/ready`, `/server_info`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Shared, cheap to clone; every clone sees the same state.
#[derive(Clone, Default)]
pub struct CacheOrigin {
    inner: Arc<Mutex<OriginState>>,
}

/// A copy of the origin's state at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginState {
    /// `host:port` of the server the cache last loaded from.
    pub server: Option<String>,
    /// Times the server changed from one load to the next (a Sentinel
    /// failover followed, or a switch between master and replica).
    pub server_changes: u64,
    /// When the server last changed, with the server it changed from.
    pub last_change: Option<(SystemTime, String)>,
    /// Why the cache cannot sync at all, when retrying will not help by
    /// itself (e.g. a Redis older than 6.0); cleared by a successful load.
    pub problem: Option<String>,
    /// The table in the cache came from a snapshot file written at this
    /// time, and no load from Redis has replaced it yet.
    pub snapshot_written_at: Option<SystemTime>,
}

impl OriginState {
    /// Age of the snapshot being served, if the cache is serving one.
    pub fn snapshot_age(&self) -> Option<Duration> {
        self.snapshot_written_at.map(|at| SystemTime::now().duration_since(at).unwrap_or_default())
    }
}

impl CacheOrigin {
    /// The current state.
    pub fn state(&self) -> OriginState {
        self.lock().clone()
    }

    /// Records a successful full load from `server`; returns the previous
    /// server when this is a change of server.
    pub(crate) fn loaded_from(&self, server: &str) -> Option<String> {
        let mut state = self.lock();
        state.problem = None;
        state.snapshot_written_at = None;
        let previous = state.server.replace(server.to_string());
        match previous {
            Some(previous) if previous != server => {
                state.server_changes += 1;
                state.last_change = Some((SystemTime::now(), previous.clone()));
                Some(previous)
            }
            _ => None,
        }
    }

    /// Records (or clears) a problem that blocks syncing.
    pub(crate) fn set_problem(&self, problem: Option<String>) {
        self.lock().problem = problem;
    }

    /// Records that the cache now serves a snapshot written at `written_at`.
    pub(crate) fn serving_snapshot(&self, written_at: SystemTime) {
        self.lock().snapshot_written_at = Some(written_at);
    }

    fn lock(&self) -> MutexGuard<'_, OriginState> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
