//! Routing (SPEC §3 steps 6-8): from a normalised Host and a path to a
//! backend, a redirect or "no webservice", reading only the route cache.

use dynamicproxy_redis::{BackendUrl, Route, RouteCache, ToolName, ToolRoutes};
use http::StatusCode;

/// The tool whose routes every legacy path falls back to.
pub const ADMIN_TOOL: &str = "admin";

/// How a request was routed, for the access log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `<tool>.<canonical-domain>` matched a route of the tool.
    ToolHost,
    /// Legacy `/<tool>/...` matched a route of the tool.
    LegacyPath,
    /// Legacy path matched a `prefix:admin` route.
    Admin,
    /// Nothing matched; the default backend.
    Default,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward to this backend, URI unchanged.
    Proxy(BackendUrl, Via),
    /// Answer with a redirect.
    Redirect(StatusCode, String),
    /// Nothing matched and there is no default backend.
    NoWebservice,
}

/// Routing rules over the shared route cache.
#[derive(Clone)]
pub struct Router {
    cache: RouteCache,
    /// `.` + canonical domain, so a tool host is one suffix check.
    dot_domain: Box<str>,
    default_backend: Option<BackendUrl>,
    /// First-label rewrites (`ru_monuments` → `ru-monuments`), few enough to scan.
    host_redirects: Vec<(Box<str>, Box<str>)>,
}

impl Router {
    /// A router for `canonical_domain`, falling back to `default_backend`.
    pub fn new(
        cache: RouteCache,
        canonical_domain: &str,
        default_backend: Option<BackendUrl>,
        host_redirects: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        Router {
            cache,
            dot_domain: format!(".{canonical_domain}").into(),
            default_backend,
            host_redirects: host_redirects.into_iter().map(|(a, b)| (a.into(), b.into())).collect(),
        }
    }

    /// The router `config` describes (canonical domain, default backend, host
    /// redirects) over `cache`: the proxy's, and explain's outside the proxy.
    pub fn from_config(config: &crate::Config, cache: RouteCache) -> Result<Self, crate::ConfigError> {
        Ok(Router::new(cache, &config.canonical_domain, config.default_backend()?, config.host_redirects.clone()))
    }

    /// The route cache the router reads.
    pub fn cache(&self) -> &RouteCache {
        &self.cache
    }

    /// The configured host redirect for `host`, as the full new host.
    pub fn host_redirect(&self, host: &str) -> Option<String> {
        if self.host_redirects.is_empty() {
            return None;
        }
        // memchr: `split_once` costs a hundred instructions more per request.
        let dot = memchr::memchr(b'.', host.as_bytes())?;
        let (label, rest) = (&host[..dot], &host[dot + 1..]);
        let (_, to) = self.host_redirects.iter().find(|(from, _)| &**from == label)?;
        Some(format!("{to}.{rest}"))
    }

    /// The tool named by a `<tool>.<canonical-domain>` host, if it is one.
    pub fn tool_host<'h>(&self, host: &'h str) -> Option<&'h str> {
        let label = host.strip_suffix(&*self.dot_domain)?;
        (!label.is_empty() && !label.contains('.')).then_some(label)
    }

    /// SPEC §3 steps 6-8 for a normalised `host`, the request `path` and `query`.
    #[inline]
    pub fn route(&self, host: &str, path: &str, query: Option<&str>) -> Decision {
        self.route_traced(host, path, query, &mut ())
    }

    /// [`Router::route`], telling `trace` each step as it is taken. This is
    /// the one implementation of the rules: the request path runs it with
    /// `()`, which compiles the calls away, and explain with a recorder, so
    /// what explain says is what routing does.
    pub fn route_traced(&self, host: &str, path: &str, query: Option<&str>, trace: &mut impl RouteTrace) -> Decision {
        if let Some(tool) = self.tool_host(host) {
            trace.host_form(HostForm::ToolSubdomain, Some(tool));
            let routes = self.cache.tool(tool);
            trace.table(tool, routes.as_deref());
            if let Some(routes) = routes
                && let Some(backend) = find(tool, &routes, path, trace)
            {
                return Decision::Proxy(backend.clone(), Via::ToolHost);
            }
            return self.fallback();
        }
        let (tool, rest) = split_legacy(path);
        if ToolName::is_valid(tool) {
            trace.host_form(HostForm::LegacyPath, Some(tool));
            let routes = self.cache.tool(tool);
            trace.table(tool, routes.as_deref());
            if let Some(routes) = routes {
                if routes.canonical_redirect() {
                    let mut location = String::with_capacity(16 + tool.len() + self.dot_domain.len() + path.len());
                    location.push_str("https://");
                    location.push_str(tool);
                    location.push_str(&self.dot_domain);
                    location.push_str(rest);
                    if let Some(query) = query {
                        location.push('?');
                        location.push_str(query);
                    }
                    return Decision::Redirect(StatusCode::TEMPORARY_REDIRECT, location);
                }
                if let Some(backend) = find(tool, &routes, rest, trace) {
                    return Decision::Proxy(backend.clone(), Via::LegacyPath);
                }
            }
        } else {
            trace.host_form(HostForm::Other, None);
        }
        let admin = self.cache.tool(ADMIN_TOOL);
        trace.table(ADMIN_TOOL, admin.as_deref());
        if let Some(admin) = admin
            && let Some(backend) = find(ADMIN_TOOL, &admin, path, trace)
        {
            return Decision::Proxy(backend.clone(), Via::Admin);
        }
        self.fallback()
    }

    /// The backend requests go to when nothing matched (`--default-backend`).
    pub fn default_backend(&self) -> Option<&BackendUrl> {
        self.default_backend.as_ref()
    }

    fn fallback(&self) -> Decision {
        match &self.default_backend {
            Some(backend) => Decision::Proxy(backend.clone(), Via::Default),
            None => Decision::NoWebservice,
        }
    }

    /// The tool a request is about, for the access log.
    pub fn tool_of<'a>(&self, host: &'a str, path: &'a str) -> Option<&'a str> {
        match self.tool_host(host) {
            Some(tool) => Some(tool),
            None => Some(split_legacy(path).0).filter(|t| ToolName::is_valid(t)),
        }
    }
}

/// The first route of `tool` whose pattern is found in `path`, in match
/// order, telling `trace` each pattern tried. Without a recording trace
/// (the request path) this is [`ToolRoutes::find`], the one-pass lookup
/// built when the tool was loaded; pattern by pattern it gives the same
/// answer (the redis crate's equivalence tests), so explain stays true.
#[inline]
fn find<'r, T: RouteTrace>(tool: &str, routes: &'r ToolRoutes, path: &str, trace: &mut T) -> Option<&'r BackendUrl> {
    if !T::RECORDS {
        return routes.find(path);
    }
    routes
        .routes()
        .iter()
        .find(|route| {
            let matched = route.pattern.is_match(path);
            trace.tried(tool, route, path, matched);
            matched
        })
        .map(|route| &route.backend)
}

/// Which form of request a host and path are (SPEC §3 steps 6 and 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostForm {
    /// `<tool>.<canonical-domain>`: the tool's routes see the whole path.
    ToolSubdomain,
    /// Any other host, with a path `/<tool>/...`: the tool's routes see the rest.
    LegacyPath,
    /// Any other host, and the path names no tool: only `prefix:admin` and the default apply.
    Other,
}

/// Told each step of a routing decision as it is taken (see
/// [`Router::route_traced`]). Every method does nothing by default.
pub trait RouteTrace {
    /// False for a trace that records nothing: routing then takes the
    /// tool's one-pass lookup instead of trying each pattern in turn.
    const RECORDS: bool = true;
    /// The form of the request, and the tool it names.
    fn host_form(&mut self, _form: HostForm, _tool: Option<&str>) {}
    /// The cache's entry for `tool` (`prefix:admin` is the tool `admin`); `None` when Redis has no key for it.
    fn table(&mut self, _tool: &str, _entry: Option<&ToolRoutes>) {}
    /// `route` of `tool` was searched for in `path`.
    fn tried(&mut self, _tool: &str, _route: &Route, _path: &str, _matched: bool) {}
}

/// The request path's trace: records nothing.
impl RouteTrace for () {
    const RECORDS: bool = false;
}

/// Splits a legacy path `/<tool><rest>`; `rest` defaults to `/`.
pub fn split_legacy(path: &str) -> (&str, &str) {
    let Some(after) = path.strip_prefix('/') else { return ("", path) };
    match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, "/"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_split() {
        assert_eq!(split_legacy("/foo/bar/baz"), ("foo", "/bar/baz"));
        assert_eq!(split_legacy("/foo"), ("foo", "/"));
        assert_eq!(split_legacy("/foo/"), ("foo", "/"));
        assert_eq!(split_legacy("/"), ("", "/"));
        assert_eq!(split_legacy("*"), ("", "*"));
    }

    #[test]
    fn tool_hosts_have_one_label() {
        let router = Router::new(RouteCache::new(), "toolforge.org", None, []);
        assert_eq!(router.tool_host("foo.toolforge.org"), Some("foo"));
        assert_eq!(router.tool_host("a.b.toolforge.org"), None);
        assert_eq!(router.tool_host("toolforge.org"), None);
        assert_eq!(router.tool_host("footoolforge.org"), None);
        assert_eq!(router.tool_host("tools.wmflabs.org"), None);
    }

    #[test]
    fn host_redirects_keep_the_domain() {
        let router = Router::new(
            RouteCache::new(),
            "toolforge.org",
            None,
            [("ru_monuments".to_string(), "ru-monuments".to_string())],
        );
        assert_eq!(router.host_redirect("ru_monuments.toolforge.org").as_deref(), Some("ru-monuments.toolforge.org"));
        assert_eq!(router.host_redirect("ru_monuments.example.org").as_deref(), Some("ru-monuments.example.org"));
        assert_eq!(router.host_redirect("other.toolforge.org"), None);
    }

    #[test]
    fn empty_cache_without_default_is_no_webservice() {
        let router = Router::new(RouteCache::new(), "toolforge.org", None, []);
        assert_eq!(router.route("foo.toolforge.org", "/", None), Decision::NoWebservice);
        assert_eq!(router.route("tools.wmflabs.org", "/foo/", None), Decision::NoWebservice);
        let default = BackendUrl::parse("http://127.0.0.1:9").unwrap();
        let router = Router::new(RouteCache::new(), "toolforge.org", Some(default.clone()), []);
        assert_eq!(router.route("x.toolforge.org", "/", None), Decision::Proxy(default, Via::Default));
    }
}
