//! Backends marked down (passive outlier detection): after
//! `backend_down_after_failures` consecutive connect failures or timeouts, a
//! backend is marked down for a window that starts at `backend_down_first_secs`
//! and doubles up to `backend_down_max_secs`. Requests to it get a fast 502
//! `backend-down` instead of each waiting for a connect timeout; the first
//! request after a window ends is let through as the trial (its success
//! clears the mark, its failure doubles the window). A new registration for
//! the tool clears the mark at once: the mark remembers the tool's routes as
//! they were when it was set, and the route cache replaces them on every
//! registration.
//!
//! Only backends that failed recently have an entry, and a count of them
//! spares the request path every lookup while none has failed.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use dynamicproxy_redis::{BackendUrl, ToolRoutes};
use foldhash::fast::RandomState;
use hyper::Response;

use crate::egress::denied_cause;
use crate::metrics::Metrics;
use crate::route::{Router, Via, split_legacy};
use crate::upstream::UpstreamError;

/// The thresholds, from `[proxy] backend_down_*`.
#[derive(Debug, Clone, Copy)]
pub struct OutlierSettings {
    /// Consecutive failures that mark a backend down; 0 = never.
    pub after_failures: u32,
    /// The first window a backend stays marked down.
    pub first: Duration,
    /// The longest window, however often trials fail.
    pub max: Duration,
}

/// What one exchange with a backend says about its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered (any status: it is up).
    Answered,
    /// Connect failure or timeout: the backend looks down.
    Failed,
    /// Says nothing about the backend (the client's body broke, policy refused it).
    Neutral,
}

/// Whether a request may go to its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send it.
    Go,
    /// The backend is marked down and its window is over: this request probes it.
    Trial,
    /// The backend is marked down: answer 502 `backend-down` at once.
    Down,
}

/// Health of the backends that failed recently.
pub struct Outliers {
    settings: OutlierSettings,
    /// foldhash over the backend's own keyed hash: SipHash cost several
    /// times as much on every request.
    backends: DashMap<BackendUrl, Health, RandomState>,
    /// Raised before an entry is added and lowered after one is removed, so
    /// never below the number of entries: while it is 0, a request takes no
    /// lock and hashes no key.
    entries: AtomicUsize,
    metrics: Arc<Metrics>,
}

struct Health {
    /// Consecutive failures so far.
    failures: u32,
    /// Set while marked down.
    down: Option<Down>,
    /// The tool's routes when the first failure was seen; a registration
    /// replaces them, which clears the mark.
    routes: Option<Weak<ToolRoutes>>,
}

struct Down {
    /// When the next trial may go.
    until: Instant,
    /// The current window.
    window: Duration,
    /// A trial went out in this window: its failure doubles the window.
    trial: bool,
}

impl Health {
    fn routes_changed(&self, now: Option<&Arc<ToolRoutes>>) -> bool {
        match (&self.routes, now) {
            (None, None) => false,
            // Holding the `Weak` keeps the allocation, so the address cannot
            // be reused by a newer table while we compare.
            (Some(then), Some(now)) => !std::ptr::eq(then.as_ptr(), Arc::as_ptr(now)),
            _ => true,
        }
    }
}

impl Outliers {
    /// An empty set: every backend starts up.
    pub fn new(settings: OutlierSettings, metrics: Arc<Metrics>) -> Self {
        Outliers {
            settings,
            backends: DashMap::with_hasher(RandomState::default()),
            entries: AtomicUsize::new(0),
            metrics,
        }
    }

    /// May a request go to `backend`? `routes` gives the tool's routes now
    /// (asked only when the backend has an entry).
    pub fn admit(&self, backend: &BackendUrl, routes: impl FnOnce() -> Option<Arc<ToolRoutes>>) -> Admission {
        if self.entries.load(Ordering::Relaxed) == 0 {
            return Admission::Go;
        }
        let Some(mut health) = self.backends.get_mut(backend) else { return Admission::Go };
        if health.routes_changed(routes().as_ref()) {
            let was_down = health.down.is_some();
            drop(health);
            self.remove(backend);
            if was_down {
                self.metrics.backend_up();
            }
            return Admission::Go;
        }
        let Some(down) = &mut health.down else { return Admission::Go };
        let now = Instant::now();
        if now < down.until {
            return Admission::Down;
        }
        // One trial per window: the next one waits for this window to end.
        down.until = now + down.window;
        down.trial = true;
        Admission::Trial
    }

    /// Records what an exchange with `backend` showed.
    pub fn record(&self, backend: &BackendUrl, outcome: Outcome, routes: impl FnOnce() -> Option<Arc<ToolRoutes>>) {
        match outcome {
            Outcome::Neutral => {}
            Outcome::Answered => {
                if let Some(health) = self.remove(backend)
                    && health.down.is_some()
                {
                    self.metrics.backend_up();
                    tracing::info!(%backend, "backend answers again: no longer marked down");
                }
            }
            Outcome::Failed if self.settings.after_failures == 0 => {}
            Outcome::Failed => {
                let mut health = match self.backends.entry(backend.clone()) {
                    Entry::Occupied(health) => health.into_ref(),
                    Entry::Vacant(slot) => {
                        self.entries.fetch_add(1, Ordering::Relaxed);
                        slot.insert(Health { failures: 0, down: None, routes: routes().as_ref().map(Arc::downgrade) })
                    }
                };
                health.failures = health.failures.saturating_add(1);
                let failures = health.failures;
                let now = Instant::now();
                match &mut health.down {
                    // A failed trial: the next window is longer. (Failures of
                    // requests sent before the mark change nothing.)
                    Some(down) if down.trial => {
                        down.trial = false;
                        down.window = (down.window * 2).min(self.settings.max);
                        down.until = now + down.window;
                    }
                    Some(_) => {}
                    None if failures >= self.settings.after_failures => {
                        health.down =
                            Some(Down { until: now + self.settings.first, window: self.settings.first, trial: false });
                        drop(health);
                        self.metrics.backend_down();
                        tracing::warn!(%backend, failures = self.settings.after_failures,
                            "backend marked down after consecutive failures");
                    }
                    None => {}
                }
            }
        }
    }

    /// Removes `backend`'s entry, if it has one.
    fn remove(&self, backend: &BackendUrl) -> Option<Health> {
        if self.entries.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let (_, health) = self.backends.remove(backend)?;
        self.entries.fetch_sub(1, Ordering::Relaxed);
        Some(health)
    }
}

/// What a backend exchange's result says about the backend.
pub fn outcome<B>(result: &Result<Response<B>, UpstreamError>) -> Outcome {
    let error = match result {
        Ok(_) => return Outcome::Answered,
        Err(error) => error,
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            // A policy refusal or a certificate that does not verify says
            // nothing about the backend's health, and marking it down would
            // replace the page that names the cause with `backend-down`.
            if denied_cause(io).is_some() || crate::backend_tls::untrusted_cause(io).is_some() {
                return Outcome::Neutral;
            }
            if io.kind() == io::ErrorKind::TimedOut {
                return Outcome::Failed;
            }
        }
        source = e.source();
    }
    if error.is_connect() { Outcome::Failed } else { Outcome::Neutral }
}

/// The routes of the tool whose route sent a request to its backend (`None`
/// for the default backend), compared by [`Outliers`] to notice registrations.
pub fn routes_of(router: &Router, host: &str, path: &str, via: Via) -> Option<Arc<ToolRoutes>> {
    let tool = match via {
        Via::ToolHost => router.tool_host(host)?,
        Via::LegacyPath => split_legacy(path).0,
        Via::Admin => "admin",
        Via::Default => return None,
    };
    router.cache().tool(tool)
}
