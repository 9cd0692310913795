//! The in-memory route table the proxy serves from, shared between the
//! request path (reads) and the sync task (writes), with its freshness.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use foldhash::fast::RandomState;

use crate::origin::CacheOrigin;
use crate::table::ToolRoutes;
use crate::types::ToolName;

/// The shared route cache. Cloning gives another handle on the same table.
#[derive(Clone)]
pub struct RouteCache {
    inner: Arc<CacheInner>,
}

struct CacheInner {
    /// foldhash, seeded per process: every request looks a name up, and
    /// SipHash cost more than the rest of the lookup.
    tools: DashMap<ToolName, Arc<ToolRoutes>, RandomState>,
    /// Reference point for the millisecond timestamps below.
    epoch: Instant,
    /// Milliseconds after `epoch` when the cache was last known to match
    /// Redis, plus one; zero means never.
    confirmed_at_ms: AtomicU64,
    /// The sync task holds a live, tracked connection to Redis.
    connected: AtomicBool,
    /// Full loads completed since start.
    full_loads: AtomicU64,
    /// Called after a tool's entry really changed (see [`RouteCache::on_change`]).
    hooks: RwLock<Vec<ChangeHook>>,
    /// Which server (or snapshot) the table comes from.
    origin: CacheOrigin,
}

/// Told the tool, its entry before and its entry after (`None` = absent),
/// once the new entry is visible to readers.
pub type ChangeHook = Arc<dyn Fn(&str, Option<&ToolRoutes>, Option<&ToolRoutes>) + Send + Sync>;

/// A snapshot of the cache's freshness, for health endpoints, metrics and `/list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStatus {
    /// True while the sync task holds a live, tracked connection to Redis.
    pub redis_connected: bool,
    /// Time since the cache last confirmed it matches Redis; `None` before the first load.
    pub age: Option<Duration>,
    /// Full loads completed since start (the first, resyncs and reconnects).
    pub full_loads: u64,
    /// Tools in the cache (with routes or a redirect).
    pub tools: usize,
}

impl Default for RouteCache {
    fn default() -> Self {
        Self::new()
    }
}

impl RouteCache {
    /// An empty cache, not yet loaded.
    pub fn new() -> Self {
        RouteCache {
            inner: Arc::new(CacheInner {
                tools: DashMap::default(),
                epoch: Instant::now(),
                confirmed_at_ms: AtomicU64::new(0),
                connected: AtomicBool::new(false),
                full_loads: AtomicU64::new(0),
                hooks: RwLock::new(Vec::new()),
                origin: CacheOrigin::default(),
            }),
        }
    }

    /// The routes of `tool`, if Redis has any key for it. Lock-free for
    /// readers of different shards; never touches Redis.
    #[inline]
    pub fn tool(&self, tool: &str) -> Option<Arc<ToolRoutes>> {
        self.inner.tools.get(tool).map(|entry| Arc::clone(entry.value()))
    }

    /// Names of tools that have a `prefix:` hash, sorted (what `/list` shows).
    pub fn tools_with_routes(&self) -> Vec<ToolName> {
        let mut names: Vec<ToolName> =
            self.inner.tools.iter().filter(|e| e.value().has_routes_key()).map(|e| e.key().clone()).collect();
        names.sort();
        names
    }

    /// The cache's freshness.
    pub fn status(&self) -> CacheStatus {
        let confirmed = self.inner.confirmed_at_ms.load(Ordering::Acquire);
        let age = (confirmed > 0).then(|| {
            let now_ms = self.inner.epoch.elapsed().as_millis() as u64;
            Duration::from_millis(now_ms.saturating_sub(confirmed - 1))
        });
        CacheStatus {
            redis_connected: self.inner.connected.load(Ordering::Acquire),
            age,
            full_loads: self.inner.full_loads.load(Ordering::Acquire),
            tools: self.inner.tools.len(),
        }
    }

    /// True once a full load has completed.
    pub fn is_loaded(&self) -> bool {
        self.inner.full_loads.load(Ordering::Acquire) > 0
    }

    /// Where the table comes from: server, failovers followed, snapshot.
    pub fn origin(&self) -> &CacheOrigin {
        &self.inner.origin
    }

    /// Every tool's entry, in no particular order (for writing a snapshot).
    pub fn entries(&self) -> Vec<(ToolName, Arc<ToolRoutes>)> {
        self.inner.tools.iter().map(|e| (e.key().clone(), Arc::clone(e.value()))).collect()
    }

    /// Fills a cache that has never loaded from Redis with a last-known-good
    /// table read from disk, written at `written_at`. Returns false (and
    /// changes nothing) once a load from Redis has happened: Redis wins.
    /// The first full load replaces the snapshot's entries, dropping tools
    /// Redis no longer has.
    pub fn restore_snapshot(&self, tools: Vec<(ToolName, ToolRoutes)>, written_at: std::time::SystemTime) -> bool {
        if self.is_loaded() {
            return false;
        }
        for (tool, routes) in tools {
            self.put(tool, routes);
        }
        self.inner.origin.serving_snapshot(written_at);
        true
    }

    /// Registers `hook`, called from the sync task each time a tool's entry
    /// changes (not when a reload finds it unchanged), after readers can see
    /// the new entry: requests waiting for a route are woken by it instead
    /// of polling. Hooks must be quick and must not block.
    pub fn on_change(&self, hook: ChangeHook) {
        if let Ok(mut hooks) = self.inner.hooks.write() {
            hooks.push(hook);
        }
    }

    fn changed(&self, tool: &str, old: Option<&ToolRoutes>, new: Option<&ToolRoutes>) {
        if let Ok(hooks) = self.inner.hooks.read() {
            for hook in hooks.iter() {
                hook(tool, old, new);
            }
        }
    }

    /// Sets or removes one tool's entry. The entry is always a new one, even
    /// when equal to the cached one: a tool's write (a `webservice restart`
    /// registering the same backend again) is news to those who watch the
    /// entry, such as the outlier marks that a new registration clears.
    pub(crate) fn put(&self, tool: ToolName, routes: ToolRoutes) {
        if routes.is_absent() {
            if let Some((name, old)) = self.inner.tools.remove(tool.as_str()) {
                self.changed(name.as_str(), Some(&old), None);
            }
            return;
        }
        let routes = Arc::new(routes);
        let old = self.inner.tools.insert(tool.clone(), Arc::clone(&routes));
        if old.as_deref() != Some(&*routes) {
            self.changed(tool.as_str(), old.as_deref(), Some(&routes));
        }
    }

    /// As [`RouteCache::put`], but an entry equal to the cached one leaves
    /// the cached one in place: a full reload, which finds nearly every tool
    /// unchanged and is no tool's write, then frees each new entry at once
    /// instead of moving the whole table to fresh memory. Only the sync task
    /// writes, so nothing changes the entry between the comparison and the insert.
    pub(crate) fn put_if_changed(&self, tool: ToolName, routes: ToolRoutes) {
        if !routes.is_absent() && self.tool(tool.as_str()).is_some_and(|old| *old == routes) {
            return;
        }
        self.put(tool, routes);
    }

    /// Ends a full load: drops tools the load did not see and counts the load.
    pub(crate) fn finish_full_load(&self, seen: &std::collections::HashSet<ToolName>) {
        let mut dropped = Vec::new();
        self.inner.tools.retain(|name, routes| {
            let keep = seen.contains(name);
            if !keep {
                dropped.push((name.clone(), Arc::clone(routes)));
            }
            keep
        });
        for (name, old) in dropped {
            self.changed(name.as_str(), Some(&old), None);
        }
        self.inner.full_loads.fetch_add(1, Ordering::AcqRel);
    }

    /// Records that the cache matches Redis as of now.
    pub(crate) fn mark_confirmed(&self) {
        let now_ms = self.inner.epoch.elapsed().as_millis() as u64;
        self.inner.confirmed_at_ms.store(now_ms + 1, Ordering::Release);
    }

    /// Records whether the sync task holds a live, tracked connection.
    pub(crate) fn set_connected(&self, connected: bool) {
        self.inner.connected.store(connected, Ordering::Release);
    }
}
