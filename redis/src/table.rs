//! One tool's routes, compiled and kept in match order.

use std::cmp::Ordering;

use crate::types::{BackendUrl, RoutePattern};

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

/// Everything the cache knows about one tool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolRoutes {
    /// Valid routes, longest pattern first, ties in ascending byte order.
    routes: Vec<Route>,
    /// `prefix:<tool>` exists (even if none of its routes is valid); such tools are listed by `/list`.
    has_routes_key: bool,
    /// `redirect:<tool>` exists: legacy URLs redirect to the canonical domain.
    canonical_redirect: bool,
}

impl ToolRoutes {
    /// Builds a tool entry; sorts the routes into match order and keeps the
    /// first [`MAX_ROUTES_PER_TOOL`].
    pub fn new(mut routes: Vec<Route>, has_routes_key: bool, canonical_redirect: bool) -> Self {
        routes.sort_by(|a, b| match_order(a.pattern.as_str(), b.pattern.as_str()));
        routes.truncate(MAX_ROUTES_PER_TOOL);
        routes.shrink_to_fit();
        ToolRoutes { routes, has_routes_key, canonical_redirect }
    }

    /// The backend of the first route whose pattern is found in `path`.
    #[inline]
    pub fn find(&self, path: &str) -> Option<&BackendUrl> {
        self.routes.iter().find(|r| r.pattern.is_match(path)).map(|r| &r.backend)
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
