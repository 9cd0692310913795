//! The watcher side: lists then watches Services with kube's watcher, and
//! turns its events into the desired state. Never touches Redis.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::metrics::{EventType, Metrics};
use crate::service::{ServiceKey, route_for};
use crate::state::{self, SyncState};

/// First delay before a relist forced by an expired watch (see [`needs_relist`]).
const RELIST_INITIAL: Duration = Duration::from_millis(500);
/// Longest delay between forced relists: each one lists every Service, so an
/// API server that keeps refusing the watch must not be listed in a loop.
const RELIST_MAX: Duration = Duration::from_secs(30);

/// Feeds the desired state from the API server until `shutdown`.
pub(crate) struct ServiceWatch {
    /// Services of one namespace or of all.
    pub(crate) api: Api<Service>,
    /// The namespace watched, used when an object arrives without one.
    pub(crate) namespace: Option<String>,
    /// Only Services matching it are listed and watched.
    pub(crate) label_selector: String,
    /// When set, a Service routes only the tool whose namespace is `<prefix><name>`.
    pub(crate) tool_namespace_prefix: Option<String>,
    /// Shared with the applier.
    pub(crate) state: Arc<Mutex<SyncState>>,
    /// Wakes the applier.
    pub(crate) notify: Arc<Notify>,
    /// Event counters.
    pub(crate) metrics: Arc<Metrics>,
}

impl ServiceWatch {
    /// Runs the watcher until `shutdown`. API errors are retried with kube's
    /// default backoff (exponential with jitter); nothing here gives up.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let config = watcher::Config::default().labels(&self.label_selector);
        let mut relist_backoff = Backoff::new(RELIST_INITIAL, RELIST_MAX);
        'relist: loop {
            let mut events = watcher(self.api.clone(), config.clone()).default_backoff().boxed();
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break 'relist,
                    next = events.next() => next,
                };
                match next {
                    Some(Ok(event)) => {
                        if matches!(event, Event::Apply(_) | Event::Delete(_)) {
                            relist_backoff.reset();
                        }
                        self.handle(event);
                    }
                    Some(Err(e)) => {
                        self.metrics.watch_error();
                        if is_expired(&e) {
                            // Routine: the API server compacted past our version.
                            info!(error = %e, "watch expired; relisting Services");
                        } else {
                            warn!(error = %e, "Kubernetes API request failed; retrying with backoff");
                        }
                        if needs_relist(&e) {
                            break;
                        }
                    }
                    // The watcher stream does not end; if it ever does, start over.
                    None => break,
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break 'relist,
                _ = tokio::time::sleep(relist_backoff.next_delay()) => {}
            }
            info!("starting over with a fresh list of Services");
        }
    }

    fn handle(&self, event: Event<Service>) {
        match event {
            Event::Init => {
                debug!("listing Services");
                self.lock_state().on_init();
            }
            Event::InitApply(service) => {
                let Some(key) = self.key(&service) else { return };
                let desired = route_for(&key, &service, self.tool_namespace_prefix.as_deref());
                if let Err(skip) = &desired {
                    debug!(service = %key, reason = %skip, "Service gets no route");
                }
                self.lock_state().on_listed(key, desired);
                self.metrics.event(EventType::Listed);
            }
            Event::InitDone => {
                let (seen, skipped) = {
                    let mut state = self.lock_state();
                    (state.on_init_done(), state.skipped())
                };
                if let Some(seen) = seen {
                    info!(services = seen, skipped, "Services listed; reconciling the route table");
                    self.metrics.event(EventType::Relisted);
                    self.metrics.set_skipped_services(skipped);
                    self.notify.notify_one();
                }
            }
            Event::Apply(service) => {
                let Some(key) = self.key(&service) else { return };
                let desired = route_for(&key, &service, self.tool_namespace_prefix.as_deref());
                if let Err(skip) = &desired {
                    info!(service = %key, reason = %skip, "Service gets no route");
                }
                let (kind, skipped) = {
                    let mut state = self.lock_state();
                    (state.on_apply(key.clone(), desired), state.skipped())
                };
                debug!(service = %key, event = ?kind, "Service event");
                self.metrics.event(kind);
                self.metrics.set_skipped_services(skipped);
                self.notify.notify_one();
            }
            Event::Delete(service) => {
                let Some(key) = self.key(&service) else { return };
                debug!(service = %key, "Service deleted");
                let skipped = {
                    let mut state = self.lock_state();
                    state.on_delete(key);
                    state.skipped()
                };
                self.metrics.event(EventType::Deleted);
                self.metrics.set_skipped_services(skipped);
                self.notify.notify_one();
            }
        }
    }

    /// The object's key; when watching one namespace an object without one
    /// is taken to be in it.
    fn key(&self, service: &Service) -> Option<ServiceKey> {
        let key = ServiceKey::of(service).or_else(|| {
            let namespace = self.namespace.clone()?;
            let name = service.metadata.name.clone().filter(|n| !n.is_empty())?;
            Some(ServiceKey { namespace, name })
        });
        if key.is_none() {
            warn!("ignoring a Service without a name or namespace");
        }
        key
    }

    fn lock_state(&self) -> MutexGuard<'_, SyncState> {
        state::lock(&self.state)
    }
}

/// A `410 Gone`: the version we watch from is no longer in the API server's history.
fn is_expired(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        other => needs_relist(other),
    }
}

/// kube's watcher relists on a `410 Gone` sent inside a watch stream (what
/// the API server does), but retries a watch *request* refused with HTTP 410
/// for ever with the same expired version. Starting a fresh watcher relists.
fn needs_relist(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410)
}
