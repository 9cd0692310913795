//! One tool's routes, compiled and kept in match order.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::sync::Mutex;

use tracing::warn;

use crate::lookup::{Lookup, fitting_regex_routes, regex_patterns_fit};
use crate::types::{BackendUrl, RoutePattern, TOOL_REGEX_DFA_LIMIT};

/// Most routes one tool may hold. A real tool has one (`.*`) or a handful
/// (`/<path>.*`); the cap bounds both a lookup (every pattern may be searched
/// in a 64 KiB path) and a tool's share of memory. The loader keeps the first
/// routes in match order and logs the rest; the registrar refuses more.
pub const MAX_ROUTES_PER_TOOL: usize = 64;

/// One route: a pattern and where matching requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The compiled pattern.
    pub pattern: RoutePattern,
    /// The backend for paths the pattern matches.
    pub backend: BackendUrl,
}

/// Distinct refusals remembered so each is logged once.
const MAX_WARNED: usize = 10_000;

/// Everything the cache knows about one tool.
#[derive(Debug, Clone, Default)]
pub struct ToolRoutes {
    /// Valid routes, longest pattern first, ties in ascending byte order.
    routes: Vec<Route>,
    /// The search of `routes`, built here so requests only run it.
    lookup: Lookup,
    /// `prefix:<tool>` exists (even if none of its routes is valid); such tools are listed by `/list`.
    has_routes_key: bool,
    /// `redirect:<tool>` exists: legacy URLs redirect to the canonical domain.
    canonical_redirect: bool,
}

impl ToolRoutes {
    /// Builds a tool entry and its search; sorts the routes into match order
    /// and keeps the first [`MAX_ROUTES_PER_TOOL`]. When the regex routes
    /// together need a DFA over [`TOOL_REGEX_DFA_LIMIT`], the first regex
    /// routes in match order that fit are kept and the others are dropped
    /// and logged once, as past the route cap.
    pub fn new(mut routes: Vec<Route>, has_routes_key: bool, canonical_redirect: bool) -> Self {
        routes.sort_by(|a, b| match_order(a.pattern.as_str(), b.pattern.as_str()));
        routes.truncate(MAX_ROUTES_PER_TOOL);
        let lookup = Lookup::build(&routes).unwrap_or_else(|_| {
            let keep = fitting_regex_routes(&routes);
            let mut regexes = 0;
            let mut dropped = Vec::new();
            routes.retain(|route| {
                let regex = route.pattern.literal().is_none();
                regexes += usize::from(regex);
                let kept = !regex || regexes <= keep;
                if !kept {
                    dropped.push(route.pattern.as_str().to_string());
                }
                kept
            });
            warn_over_budget(keep, dropped);
            Lookup::build(&routes).unwrap_or_else(|_| Lookup::each(&routes))
        });
        if lookup.shares_regex_dfa() {
            for route in &mut routes {
                route.pattern = route.pattern.without_own_dfa();
            }
        }
        routes.shrink_to_fit();
        ToolRoutes { routes, lookup, has_routes_key, canonical_redirect }
    }

    /// The backend of the first route in match order whose pattern is found
    /// in `path`, in one pass over it per kind of route (see `lookup`).
    #[inline]
    pub fn find(&self, path: &str) -> Option<&BackendUrl> {
        self.lookup.find(&self.routes, path).map(|i| &self.routes[i].backend)
    }

    /// Heap bytes held by this tool's shared automata (not counting the
    /// routes' own patterns), for memory accounting.
    pub fn lookup_memory(&self) -> usize {
        self.lookup.memory_usage()
    }

    /// The routes in match order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// True when `prefix:<tool>` exists in Redis.
    pub fn has_routes_key(&self) -> bool {
        self.has_routes_key
    }

    /// True when `redirect:<tool>` exists in Redis.
    pub fn canonical_redirect(&self) -> bool {
        self.canonical_redirect
    }

    /// True when neither key exists: the entry can be dropped.
    pub(crate) fn is_absent(&self) -> bool {
        !self.has_routes_key && !self.canonical_redirect
    }
}

/// Two entries are equal when Redis holds the same for them; the search is
/// derived from the routes.
impl PartialEq for ToolRoutes {
    fn eq(&self, other: &Self) -> bool {
        self.routes == other.routes
            && self.has_routes_key == other.has_routes_key
            && self.canonical_redirect == other.canonical_redirect
    }
}

impl Eq for ToolRoutes {}

/// Logs, once per distinct set, regex routes dropped for the per-tool DFA budget.
fn warn_over_budget(kept: usize, dropped: Vec<String>) {
    static WARNED: Mutex<Option<HashSet<Vec<String>>>> = Mutex::new(None);
    let first_time = WARNED.lock().map_or(true, |mut warned| {
        let warned = warned.get_or_insert_with(HashSet::new);
        if warned.len() >= MAX_WARNED {
            warned.clear();
        }
        warned.insert(dropped.clone())
    });
    if first_time {
        warn!(
            kept_regex_routes = kept,
            dropped = ?dropped,
            limit_kib = TOOL_REGEX_DFA_LIMIT >> 10,
            "a tool's regex routes together need a larger DFA than the per-tool limit; the shortest are ignored"
        );
    }
}

/// True when a tool whose route patterns are `patterns` (any order) keeps
/// all its regex routes when loaded: among its first
/// [`MAX_ROUTES_PER_TOOL`] in match order, those before a `.*` share one
/// DFA within [`TOOL_REGEX_DFA_LIMIT`] (see [`ToolRoutes::new`]). The
/// registrar asks before it writes a regex route.
pub fn regex_routes_fit(mut patterns: Vec<RoutePattern>) -> bool {
    patterns.sort_by(|a, b| match_order(a.as_str(), b.as_str()));
    patterns.truncate(MAX_ROUTES_PER_TOOL);
    let everything = patterns.iter().position(|p| p.literal() == Some("")).unwrap_or(patterns.len());
    let reachable: Vec<&RoutePattern> = patterns[..everything].iter().collect();
    regex_patterns_fit(&reachable)
}

/// SPEC §2: longest pattern first, ties in ascending byte order.
pub fn match_order(a: &str, b: &str) -> Ordering {
    b.len().cmp(&a.len()).then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(pattern: &str, port: u16) -> Route {
        Route {
            pattern: RoutePattern::parse(pattern).unwrap(),
            backend: BackendUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
        }
    }

    #[test]
    fn longest_pattern_wins_then_byte_order() {
        let tool = ToolRoutes::new(
            vec![route(".*", 1), route("/api/v2.*", 3), route("/api.*", 2), route("/b.*", 5), route("/a.*", 4)],
            true,
            false,
        );
        let order: Vec<_> = tool.routes().iter().map(|r| r.pattern.as_str()).collect();
        assert_eq!(order, ["/api/v2.*", "/api.*", "/a.*", "/b.*", ".*"]);
        assert_eq!(tool.find("/api/v2/x").unwrap().port(), 3);
        assert_eq!(tool.find("/api/v1").unwrap().port(), 2);
        assert_eq!(tool.find("/ab").unwrap().port(), 4);
        assert_eq!(tool.find("/").unwrap().port(), 1);
    }

    #[test]
    fn routes_beyond_the_cap_are_dropped_in_match_order() {
        let routes: Vec<Route> =
            (0..100).map(|i| route(&format!("/p{i:03}.*"), 1000 + i)).chain([route(".*", 1)]).collect();
        let tool = ToolRoutes::new(routes, true, false);
        assert_eq!(tool.routes().len(), MAX_ROUTES_PER_TOOL);
        // All `/pNNN.*` have one length, so byte order decides: 000..063 stay, `.*` (shortest) goes.
        let kept: Vec<_> = tool.routes().iter().map(|r| r.pattern.as_str().to_string()).collect();
        let expected: Vec<_> = (0..64).map(|i| format!("/p{i:03}.*")).collect();
        assert_eq!(kept, expected);
        assert!(tool.find("/p099").is_none());
    }

    #[test]
    fn no_match_without_catch_all() {
        let tool = ToolRoutes::new(vec![route("/only.*", 1)], true, false);
        assert!(tool.find("/other").is_none());
        assert!(ToolRoutes::default().find("/").is_none());
    }
}
