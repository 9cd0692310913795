//! What the route table should hold, as last seen from Kubernetes, and the
//! work still owed to Redis. Pure bookkeeping: the watcher writes it, the
//! applier drains it, and neither waits on the other.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::metrics::EventType;
use crate::service::{ServiceKey, ServiceRoute, Skip};

/// The route a Service should have, or why it has none.
pub(crate) type Desired = Result<ServiceRoute, Skip>;

/// The desired state and the pending work.
#[derive(Debug, Default)]
pub(crate) struct SyncState {
    /// Every Service currently known, routed or not.
    desired: HashMap<ServiceKey, Desired>,
    /// Services seen by a (re)list in progress. Replaces `desired` only when
    /// the list completes: a list that fails or is cut short changes nothing.
    listing: Option<HashMap<ServiceKey, Desired>>,
    /// Services whose route changed since they were last applied.
    dirty: BTreeSet<ServiceKey>,
    /// The whole table must be reconciled: after a (re)list, or after Redis
    /// was unreachable (it may have come back empty).
    full_resync: bool,
    /// A list has completed at least once, so `desired` means something.
    listed_once: bool,
}

/// A unit of work for the applier.
#[derive(Debug, PartialEq)]
pub(crate) enum Work {
    /// Make the owned routes equal to exactly these.
    Full(Vec<ServiceRoute>),
    /// Bring these Services' routes up to date (`None`: it should have none).
    Services(Vec<(ServiceKey, Option<ServiceRoute>)>),
}

/// Locks the state shared by the watcher and the applier. It is plain data
/// changed in single steps, so a panic while it was held cannot have left it
/// half-written: a poisoned lock is used as it is.
pub(crate) fn lock(state: &Mutex<SyncState>) -> MutexGuard<'_, SyncState> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SyncState {
    /// A (re)list starts.
    pub(crate) fn on_init(&mut self) {
        self.listing = Some(HashMap::new());
    }

    /// A (re)list returned a Service.
    pub(crate) fn on_listed(&mut self, key: ServiceKey, desired: Desired) {
        if let Some(listing) = &mut self.listing {
            listing.insert(key, desired);
        }
    }

    /// A (re)list completed: what it saw becomes the desired state, and the
    /// whole table is reconciled against it. Returns how many Services it saw.
    pub(crate) fn on_init_done(&mut self) -> Option<usize> {
        let listing = self.listing.take()?;
        let seen = listing.len();
        self.desired = listing;
        self.dirty.clear();
        self.full_resync = true;
        self.listed_once = true;
        Some(seen)
    }

    /// A watched Service was added or modified.
    pub(crate) fn on_apply(&mut self, key: ServiceKey, desired: Desired) -> EventType {
        let previous = self.desired.insert(key.clone(), desired);
        self.dirty.insert(key);
        if previous.is_some() { EventType::Modified } else { EventType::Added }
    }

    /// A watched Service was deleted.
    pub(crate) fn on_delete(&mut self, key: ServiceKey) {
        self.desired.remove(&key);
        self.dirty.insert(key);
    }

    /// Redis may have lost or missed writes: reconcile everything next time.
    pub(crate) fn request_full_resync(&mut self) {
        // Before the first completed list there is nothing to reconcile
        // against; the list's own InitDone will ask for it.
        if self.listed_once {
            self.full_resync = true;
        }
    }

    /// Takes the pending work, if any. A full resync covers every dirty Service.
    pub(crate) fn take_work(&mut self) -> Option<Work> {
        if self.full_resync {
            self.full_resync = false;
            self.dirty.clear();
            let mut routes: Vec<ServiceRoute> =
                self.desired.values().filter_map(|d| d.as_ref().ok()).cloned().collect();
            routes.sort_by(|a, b| a.owned.cmp(&b.owned));
            return Some(Work::Full(routes));
        }
        if self.dirty.is_empty() {
            return None;
        }
        let keys = std::mem::take(&mut self.dirty);
        Some(Work::Services(
            keys.into_iter()
                .map(|key| {
                    let route = self.desired.get(&key).and_then(|d| d.as_ref().ok()).cloned();
                    (key, route)
                })
                .collect(),
        ))
    }

    /// True when nothing is owed to Redis.
    pub(crate) fn is_idle(&self) -> bool {
        !self.full_resync && self.dirty.is_empty()
    }

    /// Routes of other Services that claim the same tool and pattern as
    /// `route` (two namespaces with a Service of the same name): after
    /// `route` is removed they must be written again.
    pub(crate) fn other_claimants(&self, key: &ServiceKey, tool: &str, pattern: &str) -> Vec<ServiceRoute> {
        self.desired
            .iter()
            .filter(|(k, _)| *k != key)
            .filter_map(|(_, d)| d.as_ref().ok())
            .filter(|r| r.owned.tool.as_str() == tool && r.owned.pattern == pattern)
            .cloned()
            .collect()
    }

    /// Services that match the selector but get no route.
    pub(crate) fn skipped(&self) -> usize {
        self.desired.values().filter(|d| d.is_err()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamicproxy_redis::{BackendUrl, OwnedServiceRoute, ToolName};

    fn key(name: &str) -> ServiceKey {
        ServiceKey { namespace: format!("tool-{name}"), name: name.into() }
    }

    fn route(name: &str, ip: &str) -> Desired {
        Ok(ServiceRoute {
            owned: OwnedServiceRoute {
                namespace: format!("tool-{name}"),
                tool: ToolName::parse(name).unwrap(),
                pattern: ".*".into(),
            },
            backend: BackendUrl::parse(&format!("http://{ip}:80")).unwrap(),
        })
    }

    #[test]
    fn nothing_to_do_before_the_first_list_completes() {
        let mut state = SyncState::default();
        state.on_init();
        state.on_listed(key("a"), route("a", "10.0.0.1"));
        state.request_full_resync();
        assert_eq!(state.take_work(), None);
        assert_eq!(state.on_init_done(), Some(1));
        assert_eq!(state.take_work(), Some(Work::Full(vec![route("a", "10.0.0.1").unwrap()])));
        assert!(state.is_idle());
    }

    #[test]
    fn a_cut_short_list_changes_nothing() {
        let mut state = SyncState::default();
        state.on_init();
        state.on_listed(key("a"), route("a", "10.0.0.1"));
        state.on_init_done();
        state.take_work();
        // A relist that fails halfway: the next Init starts over.
        state.on_init();
        state.on_listed(key("b"), route("b", "10.0.0.2"));
        state.on_init();
        assert_eq!(state.take_work(), None);
        state.on_listed(key("a"), route("a", "10.0.0.1"));
        state.on_listed(key("c"), route("c", "10.0.0.3"));
        state.on_init_done();
        let Some(Work::Full(routes)) = state.take_work() else { panic!("expected a full resync") };
        let names: Vec<&str> = routes.iter().map(|r| r.owned.tool.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
    }

    #[test]
    fn watch_events_mark_services_dirty() {
        let mut state = SyncState::default();
        state.on_init();
        state.on_init_done();
        state.take_work();
        assert_eq!(state.on_apply(key("a"), route("a", "10.0.0.1")), EventType::Added);
        assert_eq!(state.on_apply(key("a"), route("a", "10.0.0.2")), EventType::Modified);
        state.on_apply(key("b"), Err(Skip::Headless));
        state.on_delete(key("c"));
        assert_eq!(state.skipped(), 1);
        assert_eq!(
            state.take_work(),
            Some(Work::Services(vec![
                (key("a"), Some(route("a", "10.0.0.2").unwrap())),
                (key("b"), None),
                (key("c"), None),
            ]))
        );
        assert!(state.is_idle());
        state.request_full_resync();
        assert!(matches!(state.take_work(), Some(Work::Full(routes)) if routes.len() == 1));
    }

    #[test]
    fn claimants_of_the_same_route_in_other_namespaces() {
        let mut state = SyncState::default();
        state.on_init();
        let other = ServiceKey { namespace: "other".into(), name: "a".into() };
        let mut other_route = route("a", "10.0.0.9").unwrap();
        other_route.owned.namespace = "other".into();
        state.on_listed(key("a"), route("a", "10.0.0.1"));
        state.on_listed(other.clone(), Ok(other_route.clone()));
        state.on_init_done();
        assert_eq!(state.other_claimants(&key("a"), "a", ".*"), vec![other_route]);
        assert!(state.other_claimants(&key("a"), "a", "/x.*").is_empty());
    }
}
