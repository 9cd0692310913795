//! Hold-and-wake (`[proxy] hold_secs`): `webservice restart` unregisters a
//! tool's route and registers a new one seconds later; requests arriving in
//! between would get the "no webservice" page or reach a backend that
//! refuses. Such requests wait instead, up to `hold_secs`, and the route
//! cache wakes them the moment the tool's entry changes (a
//! [`RouteCache::on_change`] hook, no polling); they are then routed
//! normally, or get their page when the time is up.
//!
//! When a request is held:
//!
//! - it would take a fallback (default backend, `prefix:admin`, or "no
//!   webservice") for a tool that *lost* a route within the last
//!   `hold_secs`. A tool that never had a route, or lost it long ago, is
//!   served at once as before: with a default backend (the Kubernetes
//!   ingress), holding every request of a Kubernetes-only tool would only
//!   add delay. A restart's gap is short, so "recently" is `hold_secs`.
//! - its tool's backend refused the connection, and the request has no body.
//!   A refused connection means the backend saw nothing, so sending again is
//!   safe for any method; but the client's body is streamed, not buffered,
//!   and went away with the first attempt, so only bodiless requests (GET,
//!   HEAD, or an empty body) can be sent again.
//!
//! Held requests are bounded per tool ([`MAX_HELD_PER_TOOL`]) and in all
//! ([`MAX_HELD`]); beyond, a request gets its page at once (outcome
//! `refused`). Metrics: `dynamicproxy_proxy_held_requests` (now) and
//! `dynamicproxy_proxy_hold_outcomes{outcome=woken|timed_out|refused}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use dynamicproxy_redis::{BackendUrl, RouteCache, ToolRoutes};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::route::{Decision, Router, Via};

/// Requests held at once for one tool: a busy tool's restart is covered,
/// and a dead tool cannot take every slot.
pub const MAX_HELD_PER_TOOL: usize = 64;
/// Requests held at once in all: each is a parked task and an open client
/// connection, bounded so a mass outage sheds load instead of piling up.
pub const MAX_HELD: usize = 4096;
/// Tools remembered as "recently lost a route" before expired ones are swept.
const SWEEP_AT: usize = 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The hold metrics, registered with the proxy's others.
#[derive(Clone)]
pub struct HoldMetrics {
    held: Gauge,
    outcomes: Family<OutcomeLabel, Counter>,
}

impl HoldMetrics {
    /// Registers the metrics in `registry` (already prefixed `dynamicproxy_proxy`).
    pub fn register(registry: &mut Registry) -> Self {
        let held = Gauge::default();
        registry.register("held_requests", "Requests waiting for their tool's route (hold_secs)", held.clone());
        let outcomes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "hold_outcomes",
            "Held requests by outcome: woken by a new route, timed_out, or refused (hold full)",
            outcomes.clone(),
        );
        HoldMetrics { held, outcomes }
    }

    fn outcome(&self, outcome: &'static str) {
        self.outcomes.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// Waits for routes; cheap to share. Off when `hold_secs` is 0.
pub struct Hold {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    hold_for: Duration,
    per_tool: usize,
    total: usize,
    tools: Mutex<HashMap<Box<str>, ToolState>>,
    held: AtomicUsize,
    metrics: HoldMetrics,
}

/// What is known about one tool that is held for or recently lost a route.
struct ToolState {
    /// Woken on every change of the tool's cache entry.
    notify: Arc<Notify>,
    /// Requests held for the tool now.
    held: usize,
    /// When the tool last lost a route.
    lost_at: Option<Instant>,
}

impl ToolState {
    fn idle(&self, now: Instant, window: Duration) -> bool {
        self.held == 0 && self.lost_at.is_none_or(|t| now.duration_since(t) > window)
    }
}

/// A held request's place; gives it back on drop.
struct Slot {
    inner: Arc<Inner>,
    tool: Box<str>,
    notify: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let now = Instant::now();
        if let Ok(mut tools) = self.inner.tools.lock()
            && let Some(state) = tools.get_mut(&self.tool)
        {
            state.held = state.held.saturating_sub(1);
            if state.idle(now, self.inner.hold_for) {
                tools.remove(&self.tool);
            }
        }
        self.inner.held.fetch_sub(1, Ordering::AcqRel);
        self.inner.metrics.held.dec();
    }
}

impl Hold {
    /// Holds for `hold_secs` (0 = off) with the default bounds, woken by `cache`.
    pub fn new(hold_secs: u64, cache: &RouteCache, metrics: HoldMetrics) -> Self {
        Hold::with_bounds(hold_secs, MAX_HELD_PER_TOOL, MAX_HELD, cache, metrics)
    }

    /// As [`Hold::new`] with explicit bounds (per tool, in all).
    pub fn with_bounds(
        hold_secs: u64,
        per_tool: usize,
        total: usize,
        cache: &RouteCache,
        metrics: HoldMetrics,
    ) -> Self {
        if hold_secs == 0 {
            return Hold { inner: None };
        }
        let inner = Arc::new(Inner {
            hold_for: Duration::from_secs(hold_secs),
            per_tool,
            total,
            tools: Mutex::new(HashMap::new()),
            held: AtomicUsize::new(0),
            metrics,
        });
        // Weak: the cache may outlive this proxy (tests restart proxies).
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        cache.on_change(Arc::new(move |tool, old, new| {
            if let Some(inner) = weak.upgrade() {
                inner.changed(tool, old, new);
            }
        }));
        Hold { inner: Some(inner) }
    }

    /// True when `hold_secs` is above 0.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Given the routing `decision` for a request, waits for a route when the
    /// decision is a fallback for a tool that just lost one; returns the
    /// decision to act on (the new route, or the fallback when the time is up).
    pub async fn route(
        &self,
        router: &Router,
        (host, path, query): (&str, &str, Option<&str>),
        decision: Decision,
        stop: &CancellationToken,
    ) -> Decision {
        let Some(inner) = &self.inner else { return decision };
        if !is_fallback(&decision) {
            return decision;
        }
        let Some(tool) = router.tool_of(host, path) else { return decision };
        if !inner.recently_lost(tool) {
            return decision;
        }
        let Some(slot) = inner.admit(tool) else { return decision };
        let found = inner
            .wait(&slot, stop, |_| {
                let decision = router.route(host, path, query);
                (!is_fallback(&decision)).then_some(decision)
            })
            .await;
        found.unwrap_or_else(|| router.route(host, path, query))
    }

    /// After `refused` refused the connection for a bodiless request: waits
    /// until the tool's route changes, and returns the backend to send the
    /// request to again; `None` when there is none (off, not a tool's route,
    /// hold full, or the time is up), and the client gets its page.
    pub async fn after_refusal(
        &self,
        router: &Router,
        (host, path, query): (&str, &str, Option<&str>),
        refused: &BackendUrl,
        stop: &CancellationToken,
    ) -> Option<BackendUrl> {
        let inner = self.inner.as_ref()?;
        let tool = router.tool_of(host, path)?;
        let tool_route = |first: bool| match router.route(host, path, query) {
            // A changed route is tried at once; the same one only once the
            // cache says the tool's entry changed (it was registered again).
            Decision::Proxy(backend, Via::ToolHost | Via::LegacyPath) if !first || backend != *refused => Some(backend),
            _ => None,
        };
        if let Some(backend) = tool_route(true) {
            return Some(backend);
        }
        // The default backend or `prefix:admin` refusing is not a tool's restart.
        let current = router.route(host, path, query);
        if is_fallback(&current) && !inner.recently_lost(tool) {
            return None;
        }
        let slot = inner.admit(tool)?;
        inner.wait(&slot, stop, tool_route).await
    }
}

/// True for the decisions a request gets when no route of its tool matched.
fn is_fallback(decision: &Decision) -> bool {
    matches!(decision, Decision::NoWebservice | Decision::Proxy(_, Via::Default | Via::Admin))
}

impl Inner {
    /// The cache hook: remembers lost routes and wakes the tool's held requests.
    fn changed(&self, tool: &str, old: Option<&ToolRoutes>, new: Option<&ToolRoutes>) {
        let lost =
            old.is_some_and(|old| old.routes().iter().any(|route| new.is_none_or(|new| !new.routes().contains(route))));
        let Ok(mut tools) = self.tools.lock() else { return };
        let now = Instant::now();
        if lost {
            if tools.len() >= SWEEP_AT {
                tools.retain(|_, state| !state.idle(now, self.hold_for));
            }
            tools
                .entry(tool.into())
                .or_insert_with(|| ToolState { notify: Arc::new(Notify::new()), held: 0, lost_at: None })
                .lost_at = Some(now);
        }
        if let Some(state) = tools.get(tool) {
            state.notify.notify_waiters();
        }
    }

    fn recently_lost(&self, tool: &str) -> bool {
        let Ok(tools) = self.tools.lock() else { return false };
        tools.get(tool).and_then(|s| s.lost_at).is_some_and(|t| t.elapsed() <= self.hold_for)
    }

    /// A place for one more held request of `tool`, unless a bound is reached.
    fn admit(self: &Arc<Self>, tool: &str) -> Option<Slot> {
        let Ok(mut tools) = self.tools.lock() else { return None };
        if self.held.load(Ordering::Acquire) >= self.total {
            self.metrics.outcome("refused");
            return None;
        }
        let state = tools.entry(tool.into()).or_insert_with(|| ToolState {
            notify: Arc::new(Notify::new()),
            held: 0,
            lost_at: None,
        });
        if state.held >= self.per_tool {
            self.metrics.outcome("refused");
            return None;
        }
        state.held += 1;
        // Under the lock, so the total never overshoots.
        self.held.fetch_add(1, Ordering::AcqRel);
        self.metrics.held.inc();
        Some(Slot { inner: Arc::clone(self), tool: tool.into(), notify: Arc::clone(&state.notify) })
    }

    /// Waits until `check` finds what the request needs (asked first at
    /// once, then after each change of the tool), the time is up, or the
    /// proxy stops. `check` is told whether it is the first look.
    async fn wait<T>(
        &self,
        slot: &Slot,
        stop: &CancellationToken,
        mut check: impl FnMut(bool) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + self.hold_for;
        let mut first = true;
        loop {
            // Registered before looking, so a change between the look and
            // the wait still wakes us.
            let notified = slot.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = check(first) {
                self.metrics.outcome("woken");
                return Some(found);
            }
            first = false;
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = stop.cancelled() => break,
            }
        }
        self.metrics.outcome("timed_out");
        None
    }
}

/// True when `error` is a backend refusing the connection: nothing reached
/// it, so the request may be sent again.
pub fn refused(error: &crate::upstream::UpstreamError) -> bool {
    if !error.is_connect() {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
            return true;
        }
        source = e.source();
    }
    false
}
