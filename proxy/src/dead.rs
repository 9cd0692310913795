//! What the prober knows: which backends fail their probes, since when, and
//! the registrations (tool, pattern) that send requests there. A backend that
//! has failed every probe for `dead_after_secs` has its registrations
//! reported dead. Only failing backends have an entry: a live one has none.
//!
//! Read by `GET /dead` on the admin API, and meant for `/list?detail=1` and
//! `explain`: [`DeadRegistrations::dead_since`] and
//! [`DeadRegistrations::snapshot`]. Only the proxy whose prober holds the
//! lock knows anything; the others say so with [`ProberState::Standby`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use dynamicproxy_redis::{BackendUrl, ToolName};
use serde_json::{Value, json};

/// One route of one tool: what a registration wrote.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Registration {
    /// The tool.
    pub tool: ToolName,
    /// The route pattern (the field of `prefix:<tool>`).
    pub pattern: String,
}

/// A registration whose backend has been dead for at least `dead_after_secs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRegistration {
    /// The tool and pattern.
    pub registration: Registration,
    /// Where it sends requests.
    pub backend: BackendUrl,
    /// The first failed probe of the current run of failures.
    pub dead_since: SystemTime,
    /// What the last probe saw (`refused`, `timeout`, `error`).
    pub last_result: &'static str,
}

/// Whether this proxy's prober is the one acting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProberState {
    /// `probe_idle_secs = 0`, or the prober is not running in this process.
    Off,
    /// Another proxy holds the lock (or Redis cannot be reached): this one knows nothing.
    Standby,
    /// This proxy holds the lock and probes.
    Active,
}

impl ProberState {
    /// The name shown by the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            ProberState::Off => "off",
            ProberState::Standby => "standby",
            ProberState::Active => "active",
        }
    }
}

/// A backend that failed its last probes.
#[derive(Debug, Clone)]
pub(crate) struct Failing {
    since: SystemTime,
    since_instant: Instant,
    last_result: &'static str,
    /// Reported dead (and logged) already.
    pub(crate) reported: bool,
    pub(crate) registrations: Vec<Registration>,
}

/// How one probe result changed a backend's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Nothing to tell.
    None,
    /// Its registrations are dead from now on (report, log, maybe remove).
    Dead {
        /// Since when the backend has failed.
        since: SystemTime,
        /// Its registrations.
        registrations: Vec<Registration>,
    },
    /// A backend reported dead answers again.
    Alive {
        /// Its registrations.
        registrations: Vec<Registration>,
    },
}

struct State {
    prober: ProberState,
    failing: HashMap<BackendUrl, Failing>,
}

/// The shared report; cloning gives another handle on the same state.
#[derive(Clone)]
pub struct DeadRegistrations {
    inner: Arc<Mutex<State>>,
}

impl Default for DeadRegistrations {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for DeadRegistrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("DeadRegistrations")
            .field("prober", &state.prober)
            .field("failing", &state.failing.len())
            .finish()
    }
}

impl DeadRegistrations {
    /// Nothing known yet; the prober off until it starts.
    pub fn new() -> Self {
        DeadRegistrations { inner: Arc::new(Mutex::new(State { prober: ProberState::Off, failing: HashMap::new() })) }
    }

    /// Since when the backend of `tool`'s route `pattern` has been dead, if
    /// that registration is reported dead.
    pub fn dead_since(&self, tool: &str, pattern: &str) -> Option<SystemTime> {
        let state = self.lock();
        state.failing.values().filter(|f| f.reported).find_map(|f| {
            f.registrations.iter().any(|r| r.tool.as_str() == tool && r.pattern == pattern).then_some(f.since)
        })
    }

    /// Every registration reported dead, by tool and pattern.
    pub fn snapshot(&self) -> Vec<DeadRegistration> {
        let state = self.lock();
        let mut dead: Vec<DeadRegistration> = state
            .failing
            .iter()
            .filter(|(_, f)| f.reported)
            .flat_map(|(backend, f)| {
                f.registrations.iter().map(move |r| DeadRegistration {
                    registration: r.clone(),
                    backend: backend.clone(),
                    dead_since: f.since,
                    last_result: f.last_result,
                })
            })
            .collect();
        dead.sort_by(|a, b| a.registration.cmp(&b.registration));
        dead
    }

    /// Registrations reported dead now (the gauge).
    pub fn count(&self) -> usize {
        self.lock().failing.values().filter(|f| f.reported).map(|f| f.registrations.len()).sum()
    }

    /// Whether this proxy's prober is the one acting.
    pub fn prober(&self) -> ProberState {
        self.lock().prober
    }

    /// The report as JSON, for `GET /dead`: the prober's state and one
    /// object per dead registration.
    pub fn to_json(&self) -> Value {
        let prober = self.prober();
        let dead: Vec<Value> = self
            .snapshot()
            .into_iter()
            .map(|d| {
                let since = d.dead_since.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
                json!({
                    "tool": d.registration.tool.as_str(),
                    "pattern": d.registration.pattern,
                    "backend": d.backend.to_string(),
                    "dead_since": since,
                    "dead_since_rfc3339": jiff::Timestamp::from_second(since as i64).map(|t| t.to_string()).ok(),
                    "last_result": d.last_result,
                })
            })
            .collect();
        json!({ "prober": prober.as_str(), "dead": dead })
    }

    /// Sets the prober's state; leaving `Active` forgets everything, since
    /// the proxy that takes over probes afresh and this report would go stale.
    pub(crate) fn set_prober(&self, prober: ProberState) {
        let mut state = self.lock();
        if prober != ProberState::Active {
            state.failing.clear();
        }
        state.prober = prober;
    }

    /// A probe of `backend` failed with `result`; `registrations` are the
    /// routes naming it now. Reports them dead once it has failed for `dead_after`.
    pub(crate) fn failed(
        &self,
        backend: &BackendUrl,
        registrations: Vec<Registration>,
        result: &'static str,
        dead_after: Duration,
    ) -> Transition {
        let mut state = self.lock();
        let failing = state.failing.entry(backend.clone()).or_insert_with(|| Failing {
            since: SystemTime::now(),
            since_instant: Instant::now(),
            last_result: result,
            reported: false,
            registrations: Vec::new(),
        });
        failing.last_result = result;
        failing.registrations = registrations;
        if failing.reported || failing.since_instant.elapsed() < dead_after {
            return Transition::None;
        }
        failing.reported = true;
        Transition::Dead { since: failing.since, registrations: failing.registrations.clone() }
    }

    /// A probe of `backend` connected (or says nothing about it): it is not failing.
    pub(crate) fn alive(&self, backend: &BackendUrl) -> Transition {
        match self.lock().failing.remove(backend) {
            Some(f) if f.reported => Transition::Alive { registrations: f.registrations },
            _ => Transition::None,
        }
    }

    /// Keeps only backends that routes still name, with their registrations
    /// as they are now; returns the registrations no longer reported (their
    /// route was removed or now names another backend).
    pub(crate) fn refresh(&self, current: &HashMap<BackendUrl, Vec<Registration>>) -> Vec<Registration> {
        let mut gone = Vec::new();
        let mut state = self.lock();
        state.failing.retain(|backend, f| {
            let now = current.get(backend).cloned().unwrap_or_default();
            if f.reported {
                gone.extend(f.registrations.iter().filter(|r| !now.contains(r)).cloned());
            }
            f.registrations = now;
            !f.registrations.is_empty()
        });
        gone
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data, updated in single statements: a panic elsewhere cannot leave it half-written.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(tool: &str, pattern: &str) -> Registration {
        Registration { tool: ToolName::parse(tool).unwrap(), pattern: pattern.into() }
    }

    #[test]
    fn reported_after_dead_after_and_once() {
        let dead = DeadRegistrations::new();
        let backend = BackendUrl::parse("http://10.0.0.1:80").unwrap();
        let regs = vec![reg("foo", ".*")];
        assert_eq!(dead.failed(&backend, regs.clone(), "refused", Duration::from_secs(60)), Transition::None);
        assert_eq!(dead.dead_since("foo", ".*"), None);
        assert!(matches!(dead.failed(&backend, regs.clone(), "refused", Duration::ZERO), Transition::Dead { .. }));
        assert_eq!(dead.failed(&backend, regs.clone(), "timeout", Duration::ZERO), Transition::None);
        assert!(dead.dead_since("foo", ".*").is_some());
        assert_eq!(dead.count(), 1);
        assert_eq!(dead.snapshot()[0].last_result, "timeout");
        assert_eq!(dead.alive(&backend), Transition::Alive { registrations: regs });
        assert_eq!(dead.count(), 0);
    }

    #[test]
    fn a_changed_route_is_no_longer_reported() {
        let dead = DeadRegistrations::new();
        let backend = BackendUrl::parse("http://10.0.0.1:80").unwrap();
        dead.failed(&backend, vec![reg("foo", ".*"), reg("bar", ".*")], "refused", Duration::ZERO);
        let current = HashMap::from([(backend.clone(), vec![reg("bar", ".*")])]);
        assert_eq!(dead.refresh(&current), [reg("foo", ".*")]);
        assert_eq!(dead.count(), 1);
        assert!(dead.refresh(&HashMap::new()).contains(&reg("bar", ".*")));
        assert_eq!(dead.count(), 0);
    }
}
