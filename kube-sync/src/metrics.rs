//! What kube-sync reports to Prometheus: events seen, sync freshness, owned
//! routes, refused takeovers and the health of its two dependencies.

use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The kind of a Service event, as counted in `kube_sync_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// A Service appeared while watching.
    Added,
    /// A watched Service changed.
    Modified,
    /// A watched Service went away.
    Deleted,
    /// A Service was seen by a (re)list.
    Listed,
    /// A (re)list completed.
    Relisted,
}

impl EventType {
    /// The label value: `added`, `modified`, `deleted`, `listed` or `relisted`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "added",
            EventType::Modified => "modified",
            EventType::Deleted => "deleted",
            EventType::Listed => "listed",
            EventType::Relisted => "relisted",
        }
    }
}

impl EncodeLabelValue for EventType {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// Label set of `kube_sync_events_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EventLabels {
    /// The event kind.
    pub r#type: EventType,
}

/// kube-sync's metrics, registered under the `kube_sync_` prefix.
#[derive(Debug)]
pub struct Metrics {
    events: Family<EventLabels, Counter>,
    watch_errors: Counter,
    redis_errors: Counter,
    redis_connected: Gauge,
    last_sync: Gauge<f64, AtomicU64>,
    owned_routes: Gauge,
    skipped_services: Gauge,
    takeovers_refused: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            events: Family::default(),
            watch_errors: Counter::default(),
            redis_errors: Counter::default(),
            redis_connected: Gauge::default(),
            last_sync: Gauge::default(),
            owned_routes: Gauge::default(),
            skipped_services: Gauge::default(),
            takeovers_refused: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("kube_sync");
        r.register("events", "Service events by type", metrics.events.clone());
        r.register(
            "watch_errors",
            "Failed list or watch requests to the Kubernetes API (retried with backoff)",
            metrics.watch_errors.clone(),
        );
        r.register("redis_errors", "Failed writes or reads of the route table", metrics.redis_errors.clone());
        r.register("redis_connected", "1 when the last Redis operation succeeded", metrics.redis_connected.clone());
        r.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time when Redis last fully matched the Services seen (0 = never)",
            metrics.last_sync.clone(),
        );
        r.register("owned_routes", "Routes in the route table owned by kube-sync", metrics.owned_routes.clone());
        r.register(
            "skipped_services",
            "Services that match the selector but get no route (headless, no ports, bad name)",
            metrics.skipped_services.clone(),
        );
        r.register(
            "takeovers_refused",
            "Writes or deletes of a route that holds another writer's value (a grid registration), left alone",
            metrics.takeovers_refused.clone(),
        );
        metrics
    }

    /// Refused takeovers counted so far.
    pub fn takeovers_refused(&self) -> u64 {
        self.takeovers_refused.get()
    }

    /// Unix time of the last complete sync, `None` before the first.
    pub fn last_successful_sync(&self) -> Option<f64> {
        Some(self.last_sync.get()).filter(|t| *t > 0.0)
    }

    /// Routes currently owned, as last written or read.
    pub fn owned_routes(&self) -> i64 {
        self.owned_routes.get()
    }

    /// Events counted for one type.
    pub fn events(&self, r#type: EventType) -> u64 {
        self.events.get_or_create(&EventLabels { r#type }).get()
    }

    pub(crate) fn event(&self, r#type: EventType) {
        self.events.get_or_create(&EventLabels { r#type }).inc();
    }

    pub(crate) fn watch_error(&self) {
        self.watch_errors.inc();
    }

    pub(crate) fn redis_error(&self) {
        self.redis_errors.inc();
        self.redis_connected.set(0);
    }

    pub(crate) fn takeover_refused(&self) {
        self.takeovers_refused.inc();
    }

    pub(crate) fn redis_ok(&self) {
        self.redis_connected.set(1);
    }

    pub(crate) fn synced_now(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default();
        self.last_sync.set(now);
    }

    pub(crate) fn set_owned_routes(&self, n: usize) {
        self.owned_routes.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_skipped_services(&self, n: usize) {
        self.skipped_services.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
