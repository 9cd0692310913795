//! Explain (SPEC §7 `GET /explain?url=URL`, `dynamicproxy routes explain
//! URL`): which rule a request for a URL takes and why, and who wrote that
//! route and when. "Why does my tool 404?" in one command.
//!
//! The decision is [`Router::route_traced`] over the same route cache the
//! request path reads, so it cannot drift from what routing does. Who wrote a
//! route comes from Redis ([`RouteStore`]); explain is an operator's tool, off
//! the request path, so it may ask.
//!
//! Everything said is a field of [`Explanation`] (and [`RouteFacts`] for one
//! route, shared with `/list?detail=1`): a new fact is one field and one line
//! in its `facts`, and shows in the text and the JSON alike.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dynamicproxy_redis::{BackendUrl, Provenance, Route, RoutePattern, RouteStore, ToolName, ToolRoutes};
use http::Uri;
use serde::Serialize;

use crate::ProxyHandle;
use crate::handler::HEALTHZ;
use crate::host::{normalize_host, valid_percent_encoding};
use crate::route::{ADMIN_TOOL, Decision, HostForm, RouteTrace, Router, Via};

/// Why a URL cannot be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// Not a URL at all.
    #[error("not a URL: {0}")]
    InvalidUrl(#[from] http::uri::InvalidUri),
    /// The URL names no host.
    #[error("the URL has no host; give it as https://<host>/<path>")]
    NoHost,
    /// The host is not one the proxy would accept.
    #[error("{0:?} is not a host the proxy accepts (400 bad-request)")]
    BadHost(String),
}

/// Explains URLs against a router, with who wrote each route from Redis.
#[derive(Clone)]
pub struct Explainer {
    router: Router,
    store: Option<Arc<RouteStore>>,
    handle: Option<ProxyHandle>,
}

impl Explainer {
    /// An explainer over `router` (the one the proxy routes with, or one
    /// built the same way from the same configuration); `store` says who
    /// wrote each route (without it, that is left out); `handle` tells
    /// whether maintenance mode is on in this process, and which backends
    /// its prober found dead.
    pub fn new(router: Router, store: Option<Arc<RouteStore>>, handle: Option<ProxyHandle>) -> Self {
        Explainer { router, store, handle }
    }

    /// What a `GET` for `url` would get, and why. `url` is
    /// `scheme://host[:port]/path[?query]`; a URL without a scheme is taken as `http://`.
    pub async fn explain(&self, url: &str) -> Result<Explanation, ExplainError> {
        let url = url.trim();
        let (uri, host) = parse_url(url)?;
        let path = match uri.path() {
            "" => "/",
            path => path,
        };
        let mut explanation =
            Explanation { url: url.to_string(), host: host.clone(), path: path.to_string(), ..Explanation::default() };
        if let Some(answer) = self.before_routing(&host, path, &uri) {
            explanation.decision = answer;
            return Ok(explanation);
        }

        let mut recorder = Recorder::default();
        let decision = self.router.route_traced(&host, path, uri.query(), &mut recorder);
        explanation.host_form = recorder.form;
        explanation.tool = recorder.tool.clone();
        explanation.tables = recorder.tables;
        explanation.tried = recorder.tried;
        explanation.decision =
            describe(&decision, recorder.matched.as_ref(), explanation.tool.as_deref(), &explanation.tables);

        let now = SystemTime::now();
        let mut sources: BTreeMap<String, BTreeMap<String, Provenance>> = BTreeMap::new();
        if let Some(store) = &self.store {
            // Who wrote the route taken, and what the tool has in Redis that the proxy ignores.
            let mut wanted: Vec<&str> = recorder.matched.iter().map(|(tool, _)| tool.as_str()).collect();
            wanted.extend(explanation.tool.as_deref());
            wanted.dedup();
            for tool in wanted {
                let Ok(name) = ToolName::parse(tool) else { continue };
                match store.tool_provenance(&name).await {
                    Ok(found) => {
                        sources.insert(tool.to_string(), found);
                    }
                    Err(error) => explanation.notes.push(format!("who wrote the routes is unknown: Redis: {error}")),
                }
                // When the tool's own routes were not taken, its last change often says why.
                if explanation.tool.as_deref() == Some(tool)
                    && !matches!(decision, Decision::Proxy(_, Via::ToolHost | Via::LegacyPath))
                    && let Ok(Some(change)) = store.last_change(&name).await
                {
                    explanation.last_change = Some(format!(
                        "{} {} `{}`{} by {}",
                        format_time(change.at_ms),
                        change.action,
                        change.pattern,
                        if change.backend.is_empty() { String::new() } else { format!(" -> {}", change.backend) },
                        change.source
                    ));
                }
                if explanation.tool.as_deref() == Some(tool)
                    && let Ok(entry) = store.tool(&name).await
                {
                    explanation.ignored = ignored(tool, &entry.routes);
                    if matches!(decision, Decision::Redirect(..)) {
                        explanation.redirect_written_by = entry
                            .redirects
                            .keys()
                            .find_map(|pattern| sources.get(tool)?.get(pattern))
                            .map(|p| p.source.to_string());
                    }
                }
            }
        }
        if let Some((tool, route)) = &recorder.matched {
            let provenance = sources.get(tool).and_then(|s| s.get(route.pattern.as_str()));
            let dead_since =
                self.handle.as_ref().and_then(|h| h.dead_registrations().dead_since(tool, route.pattern.as_str()));
            let mut facts = RouteFacts::new(tool, route, provenance, now).with_dead_since(dead_since, now);
            if self.store.is_some() && provenance.is_none() && facts.written_by.is_none() {
                facts.written_by = Some("not recorded (written before provenance was kept, or by hand)".into());
            }
            explanation.route = Some(facts);
        }
        Ok(explanation)
    }

    /// The answers of SPEC §3 steps 1-5 and host redirects that come before
    /// routing and depend on the URL alone (or on the maintenance switch).
    fn before_routing(&self, host: &str, path: &str, uri: &Uri) -> Option<DecisionFacts> {
        if path == HEALTHZ {
            return Some(DecisionFacts::answer("200 proxy ok! (the proxy's own health check, on every host)"));
        }
        if !valid_percent_encoding(path) {
            return Some(DecisionFacts::answer("400 bad-request: the path has a malformed percent-escape"));
        }
        if self.handle.as_ref().is_some_and(ProxyHandle::maintenance) {
            return Some(DecisionFacts::answer("503 maintenance: maintenance mode is on for every request"));
        }
        if let Some(new_host) = self.router.host_redirect(host) {
            let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
            return Some(DecisionFacts::answer(&format!(
                "301 redirect to {}://{new_host}{path_and_query} ([proxy] host_redirects)",
                uri.scheme_str().unwrap_or("http")
            )));
        }
        None
    }
}

/// The URI and the normalised host of a URL to explain; a URL without a
/// scheme is taken as `http://`. Callers may check a URL with it before
/// loading anything.
pub fn parse_url(url: &str) -> Result<(Uri, String), ExplainError> {
    let url = url.trim();
    if url.starts_with('/') {
        return Err(ExplainError::NoHost);
    }
    let uri: Uri = if url.contains("://") { url.parse()? } else { format!("http://{url}").parse()? };
    let authority = uri.authority().ok_or(ExplainError::NoHost)?;
    let host = normalize_host(authority.as_str()).map_err(|_| ExplainError::BadHost(authority.to_string()))?;
    let host = host.into_owned();
    Ok((uri, host))
}

/// Fields of `prefix:<tool>` that the proxy ignores, with why.
fn ignored(tool: &str, raw: &BTreeMap<String, String>) -> Vec<String> {
    raw.iter()
        .filter_map(|(pattern, backend)| {
            let error = RoutePattern::parse(pattern).err().or_else(|| BackendUrl::parse(backend).err())?;
            Some(format!("prefix:{tool} `{pattern}` -> {backend}: {error}"))
        })
        .collect()
}

/// Collects the steps of one routing decision.
#[derive(Default)]
struct Recorder {
    form: Option<HostForm>,
    tool: Option<String>,
    tables: Vec<TableFacts>,
    tried: Vec<Tried>,
    /// The tool whose route matched, and the route.
    matched: Option<(String, Route)>,
}

impl RouteTrace for Recorder {
    fn host_form(&mut self, form: HostForm, tool: Option<&str>) {
        self.form = Some(form);
        self.tool = tool.map(str::to_string);
    }

    fn table(&mut self, tool: &str, entry: Option<&ToolRoutes>) {
        self.tables.push(TableFacts {
            table: format!("prefix:{tool}"),
            present: entry.is_some_and(ToolRoutes::has_routes_key),
            routes: entry.map_or(0, |e| e.routes().len()),
            redirect: entry.is_some_and(ToolRoutes::canonical_redirect),
        });
    }

    fn tried(&mut self, tool: &str, route: &Route, path: &str, matched: bool) {
        self.tried.push(Tried {
            table: format!("prefix:{tool}"),
            pattern: route.pattern.as_str().to_string(),
            backend: route.backend.to_string(),
            searched_in: path.to_string(),
            matched,
        });
        if matched {
            self.matched = Some((tool.to_string(), route.clone()));
        }
    }
}

/// One line of an explanation's text: a label and its value.
pub type Fact = (&'static str, String);

/// What a request for a URL gets, and why, fact by fact.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Explanation {
    /// The URL as asked.
    pub url: String,
    /// The Host as the proxy sees it (lower case, no port).
    pub host: String,
    /// The path routing searches.
    pub path: String,
    /// The form of the request; `None` when answered before routing.
    pub host_form: Option<HostForm>,
    /// The tool the host or path names.
    pub tool: Option<String>,
    /// Each route table read, in order.
    pub tables: Vec<TableFacts>,
    /// Each pattern tried, in order; the last one tried matched, if any did.
    pub tried: Vec<Tried>,
    /// Fields of the tool's `prefix:` hash the proxy ignores, with why.
    pub ignored: Vec<String>,
    /// What the request gets.
    pub decision: DecisionFacts,
    /// The route taken, with who wrote it and when.
    pub route: Option<RouteFacts>,
    /// Who wrote the tool's redirect, when the decision is that redirect.
    pub redirect_written_by: Option<String>,
    /// The tool's newest write or delete in the audit stream, when its own routes were not taken.
    pub last_change: Option<String>,
    /// Anything else worth knowing (Redis unavailable, ...).
    pub notes: Vec<String>,
}

impl Explanation {
    /// Every fact, in order, as label and value.
    pub fn facts(&self) -> Vec<Fact> {
        let mut facts: Vec<Fact> =
            vec![("url", self.url.clone()), ("host", self.host.clone()), ("path", self.path.clone())];
        if let Some(form) = self.host_form {
            facts.push(("host form", form_text(form).to_string()));
        }
        if let Some(tool) = &self.tool {
            facts.push(("tool", tool.clone()));
        }
        for table in &self.tables {
            facts.push(("table", table.text()));
        }
        for tried in &self.tried {
            facts.push(("tried", tried.text()));
        }
        for ignored in &self.ignored {
            facts.push(("ignored", ignored.clone()));
        }
        facts.push(("decision", self.decision.text.clone()));
        if let Some(reason) = &self.decision.reason {
            facts.push(("reason", reason.clone()));
        }
        if let Some(route) = &self.route {
            route.facts(&mut facts);
        }
        if let Some(by) = &self.redirect_written_by {
            facts.push(("redirect written by", by.clone()));
        }
        if let Some(change) = &self.last_change {
            facts.push(("last change", change.clone()));
        }
        for note in &self.notes {
            facts.push(("note", note.clone()));
        }
        facts
    }

    /// Plain text, one fact per line (`label: value`).
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for (label, value) in self.facts() {
            text.push_str(label);
            text.push_str(": ");
            text.push_str(&value);
            text.push('\n');
        }
        text
    }
}

fn form_text(form: HostForm) -> &'static str {
    match form {
        HostForm::ToolSubdomain => "tool subdomain (<tool>.<canonical-domain>: the tool's routes see the whole path)",
        HostForm::LegacyPath => "legacy path (/<tool>/... on another host: the tool's routes see the rest of the path)",
        HostForm::Other => "other (another host, and the path names no tool: only prefix:admin and the default apply)",
    }
}

/// One route table read while routing.
#[derive(Debug, Clone, Serialize)]
pub struct TableFacts {
    /// `prefix:<tool>`.
    pub table: String,
    /// The hash exists in Redis.
    pub present: bool,
    /// Valid routes in it, as the proxy holds them.
    pub routes: usize,
    /// `redirect:<tool>` exists.
    pub redirect: bool,
}

impl TableFacts {
    fn text(&self) -> String {
        let tool = self.table.strip_prefix("prefix:").unwrap_or(&self.table);
        let redirect = if self.redirect { format!(", redirect:{tool} present") } else { String::new() };
        if self.present {
            format!("{}: {} valid route(s){redirect}", self.table, self.routes)
        } else {
            format!("{}: absent (no routes in Redis){redirect}", self.table)
        }
    }
}

/// One pattern tried.
#[derive(Debug, Clone, Serialize)]
pub struct Tried {
    /// The table it is in.
    pub table: String,
    /// The pattern.
    pub pattern: String,
    /// Where it sends matching requests.
    pub backend: String,
    /// The text it was searched in (the whole path, or the rest after `/<tool>`).
    pub searched_in: String,
    /// Whether it was found there.
    pub matched: bool,
}

impl Tried {
    fn text(&self) -> String {
        let result = if self.matched { "MATCH" } else { "no match" };
        format!("{} `{}` in {} -> {}: {result}", self.table, self.pattern, self.searched_in, self.backend)
    }
}

/// What the request gets.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DecisionFacts {
    /// One line: the answer or the backend.
    pub text: String,
    /// How routing got there (`tool-host`, `legacy-path`, `admin`, `default`,
    /// `redirect`, `no-webservice`); `None` when answered before routing.
    pub via: Option<&'static str>,
    /// The backend the request is proxied to.
    pub backend: Option<String>,
    /// Why, when it is a fallback.
    pub reason: Option<String>,
}

impl DecisionFacts {
    fn answer(text: &str) -> Self {
        DecisionFacts { text: text.to_string(), ..DecisionFacts::default() }
    }
}

fn describe(
    decision: &Decision,
    matched: Option<&(String, Route)>,
    tool: Option<&str>,
    tables: &[TableFacts],
) -> DecisionFacts {
    // "No route matched" reads as "there are routes": say so when there are none.
    let tool_table_absent = |tool: &str| tables.iter().any(|t| t.table == format!("prefix:{tool}") && !t.present);
    let route_of = || matched.map(|(t, r)| format!("route `{}` of prefix:{t}", r.pattern.as_str())).unwrap_or_default();
    match decision {
        Decision::Proxy(backend, via) => {
            let (name, text, reason) = match via {
                Via::ToolHost => ("tool-host", format!("proxy to {backend} ({})", route_of()), None),
                Via::LegacyPath => ("legacy-path", format!("proxy to {backend} ({}), URI unchanged", route_of()), None),
                Via::Admin => (
                    "admin",
                    format!("proxy to {backend} (fallback {} for the legacy domain)", route_of()),
                    Some(no_tool_route(tool, &tool_table_absent)),
                ),
                Via::Default => (
                    "default",
                    format!("proxy to the default backend {backend} ([proxy] default_backend)"),
                    Some(no_route(tool, &tool_table_absent)),
                ),
            };
            DecisionFacts { text, via: Some(name), backend: Some(backend.to_string()), reason }
        }
        Decision::Redirect(status, location) => DecisionFacts {
            text: format!("{} redirect to {location}", status.as_u16()),
            via: Some("redirect"),
            backend: None,
            reason: tool.map(|t| format!("redirect:{t} exists: the tool's legacy URLs go to its canonical domain")),
        },
        Decision::NoWebservice => DecisionFacts {
            text: "503 \"no webservice\" page (X-Dynamicproxy-Reason: no-route)".into(),
            via: Some("no-webservice"),
            backend: None,
            reason: Some(format!(
                "{}, and no [proxy] default_backend is configured",
                no_route(tool, &tool_table_absent)
            )),
        },
    }
}

fn no_tool_route(tool: Option<&str>, absent: &dyn Fn(&str) -> bool) -> String {
    match tool {
        Some(tool) if absent(tool) => format!("the tool has no routes (prefix:{tool} does not exist)"),
        Some(tool) => format!("no route of prefix:{tool} matched"),
        None => "the path names no tool".into(),
    }
}

fn no_route(tool: Option<&str>, absent: &dyn Fn(&str) -> bool) -> String {
    match tool {
        Some(tool) if tool != ADMIN_TOOL => {
            format!("{} and no prefix:{ADMIN_TOOL} route matched", no_tool_route(Some(tool), absent))
        }
        _ => format!("no prefix:{ADMIN_TOOL} route matched"),
    }
}

/// One route with who wrote it and when: the route taken in an explanation,
/// and each route of `/list?detail=1`.
#[derive(Debug, Clone, Serialize)]
pub struct RouteFacts {
    /// The table it is in (`prefix:<tool>`).
    pub table: String,
    /// The pattern.
    pub pattern: String,
    /// The backend.
    pub backend: String,
    /// The writer (`registrar`, `kube-sync`, `cli`); `None` when not recorded.
    pub writer: Option<String>,
    /// The writer and whom it acted for, in words.
    pub written_by: Option<String>,
    /// When, RFC 3339 (UTC).
    pub written_at: Option<String>,
    /// Seconds since it was written.
    pub age_seconds: Option<u64>,
    /// Since when the prober has found its backend dead (RFC 3339); `None` when it is not.
    pub dead_since: Option<String>,
    /// Seconds the backend has been dead.
    pub dead_seconds: Option<u64>,
}

impl RouteFacts {
    /// The facts of `route` of `tool`, written as `provenance` says (if known), seen at `now`.
    pub fn new(tool: &str, route: &Route, provenance: Option<&Provenance>, now: SystemTime) -> Self {
        RouteFacts {
            table: format!("prefix:{tool}"),
            pattern: route.pattern.as_str().to_string(),
            backend: route.backend.to_string(),
            writer: provenance.map(|p| p.source.writer.to_string()),
            written_by: provenance.map(|p| p.source.to_string()),
            written_at: provenance.map(|p| format_time(p.written_at_ms)),
            age_seconds: provenance.map(|p| p.age(now).as_secs()),
            dead_since: None,
            dead_seconds: None,
        }
    }

    /// The same facts, with the prober's finding that the backend has been dead since `since`.
    pub fn with_dead_since(mut self, since: Option<SystemTime>, now: SystemTime) -> Self {
        if let Some(since) = since {
            let ms = since.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
            self.dead_since = Some(format_time(u64::try_from(ms).unwrap_or(u64::MAX)));
            self.dead_seconds = Some(now.duration_since(since).unwrap_or_default().as_secs());
        }
        self
    }

    /// Appends this route's facts (who and when) to `facts`.
    pub fn facts(&self, facts: &mut Vec<Fact>) {
        if let Some(by) = &self.written_by {
            facts.push(("written by", by.clone()));
        }
        if let (Some(at), Some(age)) = (&self.written_at, self.age_seconds) {
            facts.push(("written at", format!("{at} ({} ago)", format_age(Duration::from_secs(age)))));
        }
        if let (Some(since), Some(dead)) = (&self.dead_since, self.dead_seconds) {
            facts.push((
                "backend dead",
                format!(
                    "since {since} ({}): every probe failed (the prober's finding; see GET /dead)",
                    format_age(Duration::from_secs(dead))
                ),
            ));
        }
    }
}

/// A Unix time in milliseconds as RFC 3339 in UTC (`2026-11-29T18:44:10.123Z`).
pub fn format_time(ms: u64) -> String {
    match jiff::Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX)) {
        Ok(at) => at.to_string(),
        Err(_) => format!("{ms} ms after the Unix epoch"),
    }
}

/// A duration in the two largest units that matter (`3d4h`, `5m12s`, `40s`).
pub fn format_age(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use dynamicproxy_redis::RouteCache;

    use super::*;

    #[test]
    fn ages_read_well() {
        assert_eq!(format_age(Duration::from_secs(42)), "42s");
        assert_eq!(format_age(Duration::from_secs(312)), "5m12s");
        assert_eq!(format_age(Duration::from_secs(7_500)), "2h5m");
        assert_eq!(format_age(Duration::from_secs(90_000)), "1d1h");
        assert_eq!(format_time(1_764_441_850_123), "2025-11-29T18:44:10.123Z");
    }

    #[tokio::test]
    async fn answers_before_routing_and_bad_urls() {
        let router = Router::new(RouteCache::new(), "toolforge.org", None, [("a_b".to_string(), "a-b".to_string())]);
        let explainer = Explainer::new(router, None, None);
        let text = explainer.explain("https://x.toolforge.org/.well-known/healthz").await.unwrap().to_text();
        assert!(text.contains("decision: 200 proxy ok!"), "{text}");
        let text = explainer.explain("a_b.toolforge.org/x?y=1").await.unwrap().to_text();
        assert!(text.contains("decision: 301 redirect to http://a-b.toolforge.org/x?y=1"), "{text}");
        assert!(matches!(explainer.explain("/just/a/path").await, Err(ExplainError::NoHost)));
        assert!(matches!(explainer.explain("http://bad host/").await, Err(ExplainError::InvalidUrl(_))));
    }
}
