//! Prometheus metrics of the proxy. Counters are resolved once, so the
//! request path only does atomic increments.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use dynamicproxy_redis::{CacheStatus, OriginState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

/// The proxy's metrics, registered under `dynamicproxy_proxy_*`.
pub struct Metrics {
    by_class: [Counter; 5],
    upstream_seconds: Histogram,
    upstream_errors: Family<ReasonLabel, Counter>,
    connections_open: Gauge,
    connections_refused: Family<ReasonLabel, Counter>,
    connection_timeouts: Family<PhaseLabel, Counter>,
    routes_in_cache: Gauge,
    cache_age_seconds: Gauge,
    redis_connected: Gauge,
    serving_snapshot: Gauge,
    snapshot_age_seconds: Gauge,
    redis_server_changes: Counter,
    backends_down: Gauge,
    backend_transitions: [Counter; 2],
    access_log_lost_lines: Counter,
    certificate_not_after: Family<PathLabel, Gauge>,
    /// Held requests (`hold_secs`), kept with the hold logic.
    pub(crate) hold: crate::hold::HoldMetrics,
    /// The prober's, kept with the prober.
    pub probe: crate::prober::ProbeMetrics,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix("dynamicproxy_proxy");
        let requests = Family::<ClassLabel, Counter>::default();
        registry.register("requests", "Responses sent, by status class", requests.clone());
        let by_class =
            ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| requests.get_or_create(&ClassLabel { class }).clone());
        let upstream_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "upstream_response_seconds",
            "Time from sending a request upstream to its response head",
            upstream_seconds.clone(),
        );
        let upstream_errors = Family::<ReasonLabel, Counter>::default();
        registry.register("upstream_errors", "Upstream failures, by reason", upstream_errors.clone());
        let connections_open = Gauge::default();
        registry.register("connections_open", "Client connections being served", connections_open.clone());
        let connections_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Client connections refused at accept, by reason (max-connections, per-client)",
            connections_refused.clone(),
        );
        // Exported at 0 from the start, so alerts on their rate see a series before the first refusal.
        for reason in ["max-connections", "per-client"] {
            let _ = connections_refused.get_or_create(&ReasonLabel { reason });
        }
        let connection_timeouts = Family::<PhaseLabel, Counter>::default();
        registry.register(
            "connection_timeouts",
            "Client connections closed by a timeout, by phase (handshake, header, keepalive, http2-idle, send, idle)",
            connection_timeouts.clone(),
        );
        let routes_in_cache = Gauge::default();
        registry.register("routes_in_cache", "Tools in the route cache", routes_in_cache.clone());
        let cache_age_seconds = Gauge::default();
        registry.register(
            "route_cache_age_seconds",
            "Seconds since the route cache last confirmed it matches Redis (-1 before the first load)",
            cache_age_seconds.clone(),
        );
        let redis_connected = Gauge::default();
        registry.register("redis_connected", "1 while the route cache is connected to Redis", redis_connected.clone());
        let serving_snapshot = Gauge::default();
        registry.register(
            "serving_snapshot",
            "1 while the route table is the snapshot file read at start and no load from Redis has replaced it",
            serving_snapshot.clone(),
        );
        let snapshot_age_seconds = Gauge::default();
        snapshot_age_seconds.set(-1);
        registry.register(
            "snapshot_age_seconds",
            "Age of the route snapshot being served, from when it was written (-1 when not serving one)",
            snapshot_age_seconds.clone(),
        );
        let redis_server_changes = Counter::default();
        registry.register(
            "redis_server_changes",
            "Times the route cache moved to another Redis server (a Sentinel failover followed)",
            redis_server_changes.clone(),
        );
        let backends_down = Gauge::default();
        registry.register("backends_down", "Backends marked down after repeated failures, now", backends_down.clone());
        let transitions = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "backend_transitions",
            "Backends marked down (direction=down) and back up (direction=up)",
            transitions.clone(),
        );
        let backend_transitions =
            ["down", "up"].map(|direction| transitions.get_or_create(&DirectionLabel { direction }).clone());
        let access_log_lost_lines = Counter::default();
        registry.register(
            "access_log_lost_lines",
            "Access log lines dropped: queue full, disk full or file unwritable",
            access_log_lost_lines.clone(),
        );
        let certificate_not_after = Family::<PathLabel, Gauge>::default();
        registry.register(
            "certificate_not_after_seconds",
            "Unix time at which each served certificate (by file) expires",
            certificate_not_after.clone(),
        );
        let hold = crate::hold::HoldMetrics::register(registry);
        let probe = crate::prober::ProbeMetrics::register(registry);
        Metrics {
            probe,
            backends_down,
            backend_transitions,
            hold,
            access_log_lost_lines,
            certificate_not_after,
            by_class,
            upstream_seconds,
            upstream_errors,
            connections_open,
            connections_refused,
            connection_timeouts,
            routes_in_cache,
            cache_age_seconds,
            redis_connected,
            serving_snapshot,
            snapshot_age_seconds,
            redis_server_changes,
        }
    }

    /// A response with `status` was sent.
    pub fn response(&self, status: u16) {
        let index = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[index].inc();
    }

    /// An upstream exchange took `seconds` to its response head.
    pub fn upstream(&self, seconds: f64) {
        self.upstream_seconds.observe(seconds);
    }

    /// An upstream exchange failed.
    pub fn upstream_error(&self, reason: &'static str) {
        self.upstream_errors.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_open.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_open.dec();
    }

    /// A connection was refused at accept for `reason` (`max-connections`, `per-client`).
    pub(crate) fn connection_refused(&self, reason: &'static str) {
        self.connections_refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// A client connection was closed by the timeout of `phase`.
    pub(crate) fn connection_timeout(&self, phase: &'static str) {
        self.connection_timeouts.get_or_create(&PhaseLabel { phase }).inc();
    }

    /// A backend was marked down.
    pub fn backend_down(&self) {
        self.backends_down.inc();
        self.backend_transitions[0].inc();
    }

    /// A backend marked down is up again (or its tool registered anew).
    pub fn backend_up(&self) {
        self.backends_down.dec();
        self.backend_transitions[1].inc();
    }

    /// Copies the route cache's state into the gauges.
    pub fn cache_status(&self, status: &CacheStatus) {
        self.routes_in_cache.set(status.tools as i64);
        self.cache_age_seconds.set(status.age.map_or(-1, |a| a.as_secs() as i64));
        self.redis_connected.set(i64::from(status.redis_connected));
    }

    /// Copies where the route table comes from into the snapshot gauges and
    /// the server change counter (the sync task counts; this follows it).
    pub fn cache_origin(&self, origin: &OriginState) {
        let age = origin.snapshot_age();
        self.serving_snapshot.set(i64::from(age.is_some()));
        self.snapshot_age_seconds.set(age.map_or(-1, |a| a.as_secs() as i64));
        let counted = self.redis_server_changes.get();
        if origin.server_changes > counted {
            self.redis_server_changes.inc_by(origin.server_changes - counted);
        }
    }

    /// The counter of lost access log lines, for the access log writer.
    pub fn access_log_lost_lines(&self) -> Counter {
        self.access_log_lost_lines.clone()
    }

    /// Replaces the certificate expiry gauges with `expiries` (file, Unix time).
    pub fn certificates(&self, expiries: &[(std::path::PathBuf, i64)]) {
        self.certificate_not_after.clear();
        for (path, not_after) in expiries {
            self.certificate_not_after.get_or_create(&PathLabel { path: path.display().to_string() }).set(*not_after);
        }
    }
}
