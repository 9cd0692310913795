//! Dead grid registrations found: a bounded, rate-limited prober checks,
//! with a TCP connect, the backends of routes nobody has used for
//! `probe_idle_secs`. A backend that has failed every probe for
//! `dead_after_secs` has its registrations reported dead ([`DeadRegistrations`],
//! a gauge, one log line per transition) and, with
//! `remove_dead_registrations`, removed from Redis (only while the route
//! still names that backend), so webservicemonitor starts the webservice again.
//!
//! Bounds: at most `probe_rate_per_second` probes start per second and at
//! most `probe_max_in_flight` are open at once, however many routes are dead.
//! Probes go through the same [`Egress`] checks as requests (resolver, then
//! `denied_backend_networks`): a denied backend is never connected to.
//!
//! Only one proxy among those sharing Redis probes: the one holding a
//! [`RedisLock`] with an expiry. The others stand by and take over when the
//! holder stops renewing it (it died, or lost Redis).
//!
//! ```text
//! every lock_ttl/3: take or renew the lock (lost → forget everything, stand by)
//! every second:     read the route table → backends and their registrations
//! every 1/rate s:   one due backend (idle, not probed for probe_idle_secs), if a slot is free
//!                     └─ probe: resolve → drop denied → TCP connect, within probe_timeout_ms
//!                         └─ alive / failing since T → dead after dead_after_secs → report, maybe remove
//! ```

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dynamicproxy_redis::{BackendUrl, GuardedDelete, RedisLock, RouteCache, RouteSource, RouteStore, RouteTableError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::dead::{DeadRegistrations, ProberState, Registration, Transition};
use crate::egress::{Egress, denied_cause};
use crate::error::Error;
use crate::last_use::LastUse;
use crate::metrics::Metrics;
use crate::resolver::BackendResolver;

/// How often the route table is read again (when it changed) and due backends are looked for.
const SCAN_EVERY: Duration = Duration::from_secs(1);

/// Default lock expiry: a dead holder's standby takes over within it.
pub const LOCK_TTL: Duration = Duration::from_secs(15);

/// The prober's bounds and thresholds, from `[proxy] probe_*`, `dead_after_secs`
/// and `remove_dead_registrations`.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    /// A backend is probed once nobody has used it, and nobody probed it, for this long.
    pub idle: Duration,
    /// Probes started per second at most.
    pub rate_per_second: u32,
    /// Probes in flight at most.
    pub max_in_flight: usize,
    /// Longest wait for a probe's TCP connection, name resolution included.
    pub timeout: Duration,
    /// How long a backend fails every probe before its registrations are dead.
    pub dead_after: Duration,
    /// Remove dead registrations from Redis.
    pub remove: bool,
    /// Expiry of the lock that lets one proxy probe; renewed every third of it.
    pub lock_ttl: Duration,
}

impl ProbeSettings {
    /// The settings of `config`; `None` when the prober is off (`probe_idle_secs = 0`).
    pub fn from_config(config: &Config) -> Option<Self> {
        (config.probe_idle_secs > 0).then(|| ProbeSettings {
            idle: Duration::from_secs(config.probe_idle_secs),
            rate_per_second: config.probe_rate_per_second.max(1),
            max_in_flight: config.probe_max_in_flight.max(1),
            timeout: Duration::from_millis(config.probe_timeout_ms.max(1)),
            dead_after: Duration::from_secs(config.dead_after_secs),
            remove: config.remove_dead_registrations,
            lock_ttl: LOCK_TTL,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The prober's metrics, under `dynamicproxy_proxy_*`.
pub struct ProbeMetrics {
    probes: Family<ResultLabel, Counter>,
    dead: Gauge,
    in_flight: Gauge,
    active: Gauge,
    removed: Counter,
}

impl ProbeMetrics {
    /// Registers the metrics in `registry` (already prefixed `dynamicproxy_proxy`).
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let probes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "backend_probes",
            "Probes of idle routes' backends, by result: alive, refused, timeout, error, denied",
            probes.clone(),
        );
        let dead = Gauge::default();
        registry.register(
            "dead_registrations",
            "Registrations whose backend has failed every probe for dead_after_secs, now",
            dead.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("backend_probes_in_flight", "Probes waiting for their connection now", in_flight.clone());
        let active = Gauge::default();
        registry.register("prober_active", "1 while this proxy holds the prober lock and probes", active.clone());
        let removed = Counter::default();
        registry.register(
            "dead_registrations_removed",
            "Dead registrations removed from Redis (remove_dead_registrations)",
            removed.clone(),
        );
        ProbeMetrics { probes, dead, in_flight, active, removed }
    }

    /// Probes so far that ended with `result`.
    pub fn probes(&self, result: &'static str) -> u64 {
        self.probes.get_or_create(&ResultLabel { result }).get()
    }

    /// Probes in flight now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }
}

/// What one probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// The backend accepted a TCP connection.
    Alive,
    /// Connection refused: nothing listens there.
    Refused,
    /// No answer within `probe_timeout_ms`.
    Timeout,
    /// The name did not resolve, the network is unreachable, ...
    Error,
    /// Every address is in `denied_backend_networks`: never connected, says nothing.
    Denied,
}

impl ProbeResult {
    /// The metric label and log word.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeResult::Alive => "alive",
            ProbeResult::Refused => "refused",
            ProbeResult::Timeout => "timeout",
            ProbeResult::Error => "error",
            ProbeResult::Denied => "denied",
        }
    }
}

/// Connects to `backend` through `egress` within `timeout`, and closes at once.
pub async fn probe(egress: &Egress, backend: &BackendUrl, timeout: Duration) -> ProbeResult {
    let host = backend.host().trim_start_matches('[').trim_end_matches(']');
    match tokio::time::timeout(timeout, egress.connect(host, backend.port())).await {
        Err(_) => ProbeResult::Timeout,
        Ok(Ok(_stream)) => ProbeResult::Alive,
        Ok(Err(e)) if denied_cause(&e).is_some() => ProbeResult::Denied,
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => ProbeResult::Refused,
        Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => ProbeResult::Timeout,
        Ok(Err(_)) => ProbeResult::Error,
    }
}

/// Runs the prober of a proxy configured by `config` until `shutdown`: the
/// binary starts it next to [`crate::run`] when `probe_idle_secs` is above 0.
pub async fn run(
    config: &Config,
    cache: RouteCache,
    store: Arc<RouteStore>,
    handle: &crate::ProxyHandle,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let Some(settings) = ProbeSettings::from_config(config) else {
        handle.dead_registrations().set_prober(ProberState::Off);
        return Ok(());
    };
    let egress = Egress::new(config.denied_backend_networks()?, BackendResolver::new(&config.dns_servers()?));
    let prober = Prober {
        settings,
        egress,
        cache,
        store,
        last_use: handle.last_use().clone(),
        dead: handle.dead_registrations().clone(),
        metrics,
    };
    prober.run(shutdown).await;
    Ok(())
}

/// Everything the prober works with.
pub struct Prober {
    /// Bounds and thresholds.
    pub settings: ProbeSettings,
    /// Resolution and denied networks, as for requests.
    pub egress: Egress,
    /// The route table.
    pub cache: RouteCache,
    /// Redis, for the lock and removals.
    pub store: Arc<RouteStore>,
    /// Last request per backend.
    pub last_use: LastUse,
    /// The report.
    pub dead: DeadRegistrations,
    /// `dynamicproxy_proxy_*` metrics.
    pub metrics: Arc<Metrics>,
}

/// What one probe task needs, shared.
struct Context {
    settings: ProbeSettings,
    egress: Egress,
    store: Arc<RouteStore>,
    dead: DeadRegistrations,
    metrics: Arc<Metrics>,
    lock: RedisLock,
}

impl Prober {
    /// Probes while holding the lock, stands by otherwise, until `shutdown`;
    /// then releases the lock so a standby takes over at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let Prober { settings, egress, cache, store, last_use, dead, metrics } = self;
        let lock = RedisLock::prober(store.clone(), settings.lock_ttl);
        let ctx = Arc::new(Context { settings, egress, store, dead, metrics, lock });
        let settings = &ctx.settings;
        let slots = Arc::new(Semaphore::new(settings.max_in_flight));
        let mut tasks = JoinSet::new();
        let mut pace = tokio::time::interval(Duration::from_secs(1) / settings.rate_per_second);
        pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut lock_tick = tokio::time::interval((settings.lock_ttl / 3).max(Duration::from_millis(10)));
        lock_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut table: HashMap<BackendUrl, Vec<Registration>> = HashMap::new();
        let mut last_probe: HashMap<BackendUrl, Instant> = HashMap::new();
        let mut queue: VecDeque<BackendUrl> = VecDeque::new();
        let mut scanned: Option<Instant> = None;
        // Route changes counted by the cache's hook, so an unchanged table is not read again.
        let changes = Arc::new(AtomicU64::new(0));
        let counter = changes.clone();
        cache.on_change(Arc::new(move |_, _, _| {
            counter.fetch_add(1, Ordering::Release);
        }));
        let mut table_seen = 0;
        let mut active = false;
        let mut redis_error_logged = false;
        ctx.dead.set_prober(ProberState::Standby);

        loop {
            // Only a pace tick may start a probe: that is the rate bound.
            let paced = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = lock_tick.tick() => {
                    match ctx.lock.acquire_or_renew().await {
                        Ok(_) => redis_error_logged = false,
                        Err(error) if !redis_error_logged => {
                            redis_error_logged = true;
                            warn!(%error, "prober: cannot reach Redis for its lock; probing stops when the lock expires");
                        }
                        Err(_) => {}
                    }
                    false
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                _ = pace.tick() => true,
            };
            if ctx.lock.is_held() != active {
                active = !active;
                tasks.abort_all();
                queue.clear();
                last_probe.clear();
                scanned = None;
                ctx.dead.set_prober(if active { ProberState::Active } else { ProberState::Standby });
                ctx.metrics.probe.active.set(i64::from(active));
                ctx.metrics.probe.dead.set(0);
                if active {
                    info!(token = ctx.lock.token(), "prober: holding the lock; probing idle routes' backends");
                } else {
                    info!("prober: lock lost or held by another proxy; standing by");
                }
            }
            if !active || !paced {
                continue;
            }
            if scanned.is_none_or(|at| at.elapsed() >= SCAN_EVERY) {
                // The table is read again only when a route changed since.
                let now = changes.load(Ordering::Acquire);
                if scanned.is_none() || now != table_seen {
                    table_seen = now;
                    table = read_table(&cache);
                    last_use.retain(|b| table.contains_key(b));
                    last_probe.retain(|b, _| table.contains_key(b));
                    for gone in ctx.dead.refresh(&table) {
                        info!(tool = %gone.tool, pattern = %gone.pattern, "prober: dead registration changed or removed; no longer reported");
                    }
                    ctx.metrics.probe.dead.set(ctx.dead.count() as i64);
                }
                scanned = Some(Instant::now());
                if queue.is_empty() {
                    queue = due(&table, &last_use, &last_probe, settings.idle);
                }
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
            // Checked again at dispatch: a queued backend may have been used or unrouted since.
            let Some((backend, registrations)) = std::iter::from_fn(|| queue.pop_front())
                .find(|b| last_use.idle_for(b) >= settings.idle)
                .and_then(|b| table.get(&b).cloned().map(|r| (b, r)))
            else {
                continue;
            };
            last_probe.insert(backend.clone(), Instant::now());
            let ctx = ctx.clone();
            tasks.spawn(async move {
                let flying = InFlight::new(slot, &ctx.metrics.probe.in_flight);
                let result = probe(&ctx.egress, &backend, ctx.settings.timeout).await;
                drop(flying);
                ctx.metrics.probe.probes.get_or_create(&ResultLabel { result: result.as_str() }).inc();
                settle(&ctx, &backend, registrations, result).await;
            });
        }
        tasks.abort_all();
        ctx.metrics.probe.active.set(0);
        ctx.metrics.probe.dead.set(0);
        ctx.dead.set_prober(ProberState::Off);
        if ctx.lock.is_held() {
            let _ = tokio::time::timeout(Duration::from_secs(2), ctx.lock.release()).await;
        }
    }
}

/// A probe's slot and its place in the in-flight gauge, both given back
/// when it ends or is aborted (lock lost, shutdown).
struct InFlight<'a> {
    _slot: tokio::sync::OwnedSemaphorePermit,
    gauge: &'a Gauge,
}

impl<'a> InFlight<'a> {
    fn new(slot: tokio::sync::OwnedSemaphorePermit, gauge: &'a Gauge) -> Self {
        gauge.inc();
        InFlight { _slot: slot, gauge }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Every routed backend and the registrations naming it.
fn read_table(cache: &RouteCache) -> HashMap<BackendUrl, Vec<Registration>> {
    let mut table: HashMap<BackendUrl, Vec<Registration>> = HashMap::new();
    for tool in cache.tools_with_routes() {
        let Some(routes) = cache.tool(tool.as_str()) else { continue };
        for route in routes.routes() {
            table
                .entry(route.backend.clone())
                .or_default()
                .push(Registration { tool: tool.clone(), pattern: route.pattern.as_str().to_string() });
        }
    }
    table
}

/// Backends nobody used nor probed for `idle`, never probed first, then the longest unprobed.
fn due(
    table: &HashMap<BackendUrl, Vec<Registration>>,
    last_use: &LastUse,
    last_probe: &HashMap<BackendUrl, Instant>,
    idle: Duration,
) -> VecDeque<BackendUrl> {
    let mut due: Vec<(Option<Instant>, &BackendUrl)> = table
        .keys()
        .filter(|b| last_use.idle_for(b) >= idle)
        .map(|b| (last_probe.get(b).copied(), b))
        .filter(|(probed, _)| probed.is_none_or(|at| at.elapsed() >= idle))
        .collect();
    due.sort_by_key(|(probed, _)| *probed);
    due.into_iter().map(|(_, b)| b.clone()).collect()
}

/// Applies one probe's result: report, log, and maybe remove.
async fn settle(ctx: &Context, backend: &BackendUrl, registrations: Vec<Registration>, result: ProbeResult) {
    let transition = match result {
        ProbeResult::Alive | ProbeResult::Denied => ctx.dead.alive(backend),
        failed => ctx.dead.failed(backend, registrations, failed.as_str(), ctx.settings.dead_after),
    };
    match transition {
        Transition::None => return,
        Transition::Alive { registrations } => {
            for r in &registrations {
                info!(tool = %r.tool, pattern = %r.pattern, %backend, "prober: dead registration's backend answers again");
            }
        }
        Transition::Dead { since, registrations } => {
            let for_secs = SystemTime::now().duration_since(since).unwrap_or_default().as_secs();
            for r in &registrations {
                warn!(tool = %r.tool, pattern = %r.pattern, %backend, dead_for_secs = for_secs, result = result.as_str(),
                    "prober: registration dead: its backend has failed every probe");
            }
            if ctx.settings.remove {
                for r in &registrations {
                    // Only the lock holder changes the table.
                    if !ctx.lock.is_held() {
                        break;
                    }
                    if let Ok(GuardedDelete::Deleted) = remove_dead_registration(&ctx.store, r, backend, for_secs).await
                    {
                        ctx.metrics.probe.removed.inc();
                    }
                }
            }
        }
    }
    ctx.metrics.probe.dead.set(ctx.dead.count() as i64);
}

/// Removes one dead registration from Redis, only while its route still
/// names `backend`, and logs what happened. This is the one place a dead
/// registration leaves the table, recorded in the audit stream as the
/// prober's (`routes history` shows it).
pub async fn remove_dead_registration(
    store: &RouteStore,
    registration: &Registration,
    backend: &BackendUrl,
    dead_for_secs: u64,
) -> Result<GuardedDelete, RouteTableError> {
    let (tool, pattern) = (&registration.tool, registration.pattern.as_str());
    let source = RouteSource::prober(dead_for_secs);
    let outcome = store.delete_route_if_backend(tool, pattern, backend, &source).await;
    match &outcome {
        Ok(GuardedDelete::Deleted) => {
            warn!(%tool, pattern, %backend, "prober: dead registration removed from Redis (remove_dead_registrations)")
        }
        Ok(GuardedDelete::Changed { current }) => {
            info!(%tool, pattern, %backend, %current, "prober: dead registration not removed: the route changed")
        }
        Ok(GuardedDelete::Absent) => info!(%tool, pattern, "prober: dead registration already gone"),
        Err(error) => warn!(%tool, pattern, %backend, %error, "prober: cannot remove dead registration"),
    }
    outcome
}
