//! The applier: drains the work in [`SyncState`] into Redis. Redis being
//! unreachable never loses work: the desired state stays in memory and the
//! whole table is reconciled once Redis answers again.
//!
//! Routes of other writers (grid registrations, operators) are never taken:
//! the store's scripts write a field only when it is absent or still holds
//! what kube-sync wrote, and delete it only in the latter case. Refusals are
//! counted in `kube_sync_takeovers_refused_total` and logged with the tool,
//! the route and the Service.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dynamicproxy_redis::{
    BackendUrl, OwnedDelete, OwnedServiceRoute, OwnedWrite, RouteStore, RouteTableError, ToolName,
};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::service::{ServiceKey, ServiceRoute};
use crate::state::{self, SyncState, Work};

/// Redis commands in flight at once during a full reconcile (one multiplexed
/// connection pipelines them).
const CONCURRENCY: usize = 64;
/// After shutdown is requested, how long pending work may still be written.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// First retry delay after Redis failed.
const RETRY_INITIAL: Duration = Duration::from_millis(200);
/// Longest retry delay while Redis stays down.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How often the whole table is checked against the desired state even when
/// nothing changed: repairs hand edits and silent Redis data loss, and keeps
/// the last-sync metric meaningful for alerting on a quiet cluster. A check
/// that finds nothing to fix only reads.
const RESYNC_INTERVAL: Duration = Duration::from_secs(600);
/// Refused takeovers remembered so each is logged as a warning once (then at
/// debug level on every resync); forgotten all at once beyond this.
const MAX_REFUSALS_REMEMBERED: usize = 10_000;

/// Writes the desired state to Redis.
pub(crate) struct Applier {
    store: Arc<RouteStore>,
    state: Arc<Mutex<SyncState>>,
    notify: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Only owned routes of this namespace are ours to reconcile (all when `None`).
    scope: Option<String>,
    /// The owned routes in scope as last read or written, with the backend
    /// when known: lets a watch event remove a Service's previous route and
    /// skip writes that would change nothing.
    owned: BTreeMap<OwnedServiceRoute, Option<BackendUrl>>,
    /// Redis failed last time; the recovery is worth a log line.
    redis_failing: bool,
    /// Refused takeovers already logged, by member and the value found.
    refusals_logged: HashSet<(String, String)>,
}

/// Counts of one full reconcile, for the log.
#[derive(Debug, Default)]
struct Reconciled {
    set: usize,
    unchanged: usize,
    removed: usize,
    refused: usize,
    /// Routes left alone because another writer holds them.
    not_ours: usize,
}

impl Applier {
    /// An applier for `state`, woken by `notify`.
    pub(crate) fn new(
        store: Arc<RouteStore>,
        state: Arc<Mutex<SyncState>>,
        notify: Arc<Notify>,
        metrics: Arc<Metrics>,
        scope: Option<String>,
    ) -> Self {
        Applier {
            store,
            state,
            notify,
            metrics,
            scope,
            owned: BTreeMap::new(),
            redis_failing: false,
            refusals_logged: HashSet::new(),
        }
    }

    /// Applies work as it comes until `shutdown`, then writes what is still
    /// pending for at most [`DRAIN_GRACE`].
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let mut next_resync = tokio::time::Instant::now() + RESYNC_INTERVAL;
        loop {
            let work = self.lock_state().take_work();
            let Some(work) = work else {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = self.notify.notified() => continue,
                    _ = tokio::time::sleep_until(next_resync) => {
                        next_resync = tokio::time::Instant::now() + RESYNC_INTERVAL;
                        self.lock_state().request_full_resync();
                        continue;
                    }
                }
            };
            let result = tokio::select! {
                result = self.apply(work) => result,
                _ = cancelled_then(&shutdown, DRAIN_GRACE) => return,
            };
            if self.settle(result) {
                backoff.reset();
            } else {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
        let drain = async {
            loop {
                let work = self.lock_state().take_work();
                let Some(work) = work else { break };
                let result = self.apply(work).await;
                if !self.settle(result) {
                    break;
                }
            }
        };
        if tokio::time::timeout(DRAIN_GRACE, drain).await.is_err() {
            warn!("shutting down with route table writes still pending");
        }
    }

    /// Records the outcome of one unit of work; true on success.
    fn settle(&mut self, result: Result<(), RouteTableError>) -> bool {
        match result {
            Ok(()) => {
                self.metrics.redis_ok();
                if std::mem::take(&mut self.redis_failing) {
                    info!("redis is back; route table in sync");
                }
                let idle = self.lock_state().is_idle();
                if idle {
                    self.metrics.synced_now();
                }
                true
            }
            Err(e) => {
                self.metrics.redis_error();
                if !std::mem::replace(&mut self.redis_failing, true) {
                    warn!(error = %e, "redis unavailable; holding the desired routes and retrying");
                } else {
                    debug!(error = %e, "redis still unavailable");
                }
                // Redis may come back empty (restart, failover to a lagging
                // replica): reconcile everything rather than only what changed.
                self.lock_state().request_full_resync();
                false
            }
        }
    }

    async fn apply(&mut self, work: Work) -> Result<(), RouteTableError> {
        let result = match work {
            Work::Full(routes) => self.reconcile(routes).await,
            Work::Services(services) => self.apply_services(services).await,
        };
        self.metrics.set_owned_routes(self.owned.len());
        result
    }

    /// Makes the owned routes in scope exactly `routes`: removes the owned
    /// ones no Service wants, writes the missing or different ones. Only an
    /// unreachable Redis aborts it (and the whole reconcile is retried).
    async fn reconcile(&mut self, routes: Vec<ServiceRoute>) -> Result<(), RouteTableError> {
        let (owned, unparsable) = self.store.owned_service_routes().await?;
        for member in &unparsable {
            warn!(member = %member, "k8s_services member not understood; left alone");
        }
        let owned: BTreeSet<OwnedServiceRoute> = owned.into_iter().filter(|o| self.in_scope(o)).collect();
        let wanted = one_writer_per_route(routes);
        let wanted_members: BTreeSet<&OwnedServiceRoute> = wanted.iter().map(|r| &r.owned).collect();
        let stale: Vec<OwnedServiceRoute> = owned.iter().filter(|o| !wanted_members.contains(o)).cloned().collect();
        let writes: Vec<(ServiceRoute, bool)> = wanted
            .into_iter()
            .map(|r| {
                let was_owned = owned.contains(&r.owned);
                (r, was_owned)
            })
            .collect();

        let mut counts = Reconciled::default();
        let mut still_owned: BTreeMap<OwnedServiceRoute, Option<BackendUrl>> = BTreeMap::new();
        // Removals first: when two Services claim one route, removing the
        // stale claim deletes the hash field the remaining one then rewrites.
        let store = self.store.clone();
        let mut removals = futures::stream::iter(stale)
            .map(|route| {
                let store = store.clone();
                async move {
                    let result = store.delete_owned_route(&route).await;
                    (route, result)
                }
            })
            .buffer_unordered(CONCURRENCY);
        while let Some((route, result)) = removals.next().await {
            match result {
                Ok(outcome) => {
                    counts.removed += 1;
                    if !self.removed(&route, outcome) {
                        counts.not_ours += 1;
                    }
                }
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => {
                    counts.refused += 1;
                    self.metrics.redis_error();
                    error!(route = %route, error = %e, "redis refused to remove a route");
                    still_owned.insert(route, None);
                }
            }
        }

        let mut writes = futures::stream::iter(writes)
            .map(|(route, was_owned)| {
                let store = store.clone();
                async move {
                    let result = store.set_owned_route(&route.owned, &route.backend).await;
                    (route, was_owned, result)
                }
            })
            .buffer_unordered(CONCURRENCY);
        while let Some((route, was_owned, result)) = writes.next().await {
            match result {
                Ok(OwnedWrite::Written) => {
                    counts.set += 1;
                    debug!(route = %route.owned, backend = %route.backend, "route set");
                    still_owned.insert(route.owned, Some(route.backend));
                }
                Ok(OwnedWrite::Unchanged) => {
                    counts.unchanged += 1;
                    still_owned.insert(route.owned, Some(route.backend));
                }
                Ok(OwnedWrite::Refused { current }) => {
                    counts.not_ours += 1;
                    self.refused(&route, &current);
                }
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => {
                    counts.refused += 1;
                    self.metrics.redis_error();
                    error!(route = %route.owned, error = %e, "redis refused to set a route");
                    if was_owned {
                        still_owned.insert(route.owned, None);
                    }
                }
            }
        }
        self.owned = still_owned;
        info!(
            routes = self.owned.len(),
            set = counts.set,
            unchanged = counts.unchanged,
            removed = counts.removed,
            refused = counts.refused,
            not_ours = counts.not_ours,
            "route table reconciled with the Services listed"
        );
        Ok(())
    }

    /// Brings the routes of a few Services up to date after watch events.
    async fn apply_services(
        &mut self,
        services: Vec<(ServiceKey, Option<ServiceRoute>)>,
    ) -> Result<(), RouteTableError> {
        for (key, wanted) in services {
            let previous = self.routes_of(&key);
            for old in previous.iter().filter(|o| wanted.as_ref().map(|w| &w.owned) != Some(*o)) {
                match self.store.delete_owned_route(old).await {
                    Ok(outcome) => {
                        self.owned.remove(old);
                        self.removed(old, outcome);
                    }
                    Err(e) if e.is_unavailable() => return Err(e),
                    Err(e) => {
                        self.metrics.redis_error();
                        error!(service = %key, route = %old, error = %e, "redis refused to remove a route");
                    }
                }
                // Another namespace's Service of the same name may have
                // shared that hash field: put its route back.
                let others = self.lock_state().other_claimants(&key, old.tool.as_str(), &old.pattern);
                for other in others {
                    self.set(&key, &other).await?;
                }
            }
            if let Some(route) = wanted
                && self.owned.get(&route.owned) != Some(&Some(route.backend.clone()))
            {
                self.set(&key, &route).await?;
            }
        }
        Ok(())
    }

    async fn set(&mut self, key: &ServiceKey, route: &ServiceRoute) -> Result<(), RouteTableError> {
        match self.store.set_owned_route(&route.owned, &route.backend).await {
            Ok(OwnedWrite::Written | OwnedWrite::Unchanged) => {
                self.owned.insert(route.owned.clone(), Some(route.backend.clone()));
                info!(service = %key, route = %route.owned, backend = %route.backend, "route set");
                Ok(())
            }
            Ok(OwnedWrite::Refused { current }) => {
                self.owned.remove(&route.owned);
                self.refused(route, &current);
                Ok(())
            }
            Err(e) if e.is_unavailable() => Err(e),
            Err(e) => {
                self.metrics.redis_error();
                error!(service = %key, route = %route.owned, error = %e, "redis refused to set a route");
                Ok(())
            }
        }
    }

    /// Counts and logs a write refused because the field holds another
    /// writer's value: typically a grid registration next to the Service
    /// webservice-runner creates for it.
    fn refused(&mut self, route: &ServiceRoute, current: &str) {
        self.metrics.takeover_refused();
        let owned = &route.owned;
        let service = format!("{}/{}", owned.namespace, owned.tool);
        if self.refusals_logged.len() >= MAX_REFUSALS_REMEMBERED {
            self.refusals_logged.clear();
        }
        if self.refusals_logged.insert((owned.member(), current.to_string())) {
            warn!(tool = %owned.tool, route = %owned.pattern, service = %service, current, wanted = %route.backend,
                "route holds another writer's backend; not taking it over");
        } else {
            debug!(tool = %owned.tool, route = %owned.pattern, service = %service, current,
                "route still holds another writer's backend");
        }
    }

    /// Logs the outcome of removing an owned route; false when the field was
    /// left alone because another writer holds it (counted as a refused takeover).
    fn removed(&mut self, owned: &OwnedServiceRoute, outcome: OwnedDelete) -> bool {
        let service = format!("{}/{}", owned.namespace, owned.tool);
        match outcome {
            OwnedDelete::Deleted => {
                info!(tool = %owned.tool, route = %owned.pattern, service = %service, "route removed");
                true
            }
            OwnedDelete::Absent => {
                debug!(tool = %owned.tool, route = %owned.pattern, service = %service, "route already gone");
                true
            }
            OwnedDelete::Kept { current } => {
                self.metrics.takeover_refused();
                warn!(tool = %owned.tool, route = %owned.pattern, service = %service, current,
                    "route holds another writer's backend; left in place, only kube-sync's claim dropped");
                false
            }
        }
    }

    /// The owned routes recorded for one Service (they sort together).
    fn routes_of(&self, key: &ServiceKey) -> Vec<OwnedServiceRoute> {
        let Ok(tool) = ToolName::parse(&key.name) else { return Vec::new() };
        let first = OwnedServiceRoute { namespace: key.namespace.clone(), tool, pattern: String::new() };
        self.owned
            .range(first..)
            .map(|(owned, _)| owned)
            .take_while(|owned| owned.namespace == key.namespace && owned.tool.as_str() == key.name)
            .cloned()
            .collect()
    }

    fn in_scope(&self, owned: &OwnedServiceRoute) -> bool {
        self.scope.as_deref().is_none_or(|ns| owned.namespace == ns)
    }

    fn lock_state(&self) -> MutexGuard<'_, SyncState> {
        state::lock(&self.state)
    }
}

/// When Services in two namespaces claim the same tool and pattern, only
/// the first (by namespace) writes it, so the outcome does not depend on
/// write order. `routes` is sorted by namespace, tool, pattern.
fn one_writer_per_route(routes: Vec<ServiceRoute>) -> Vec<ServiceRoute> {
    let mut claimed: HashMap<(String, String), String> = HashMap::new();
    let mut winners = Vec::with_capacity(routes.len());
    for route in routes {
        let claim = (route.owned.tool.as_str().to_string(), route.owned.pattern.clone());
        if let Some(namespace) = claimed.get(&claim) {
            warn!(
                route = %route.owned,
                kept = %namespace,
                "two Services claim the same tool and route; keeping the first namespace's"
            );
            continue;
        }
        claimed.insert(claim, route.owned.namespace.clone());
        winners.push(route);
    }
    winners
}

/// Completes `grace` after `shutdown` is cancelled.
async fn cancelled_then(shutdown: &CancellationToken, grace: Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
}
