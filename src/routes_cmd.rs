//! `dynamicproxy routes`: list, get, set and delete routes in Redis (each
//! change recorded under the operator's login), explain a URL's routing and
//! show a tool's history, with text output for people and `--json` for scripts.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use dynamicproxy_proxy::explain::{Explainer, format_time};
use dynamicproxy_proxy::route::Router;
use dynamicproxy_redis::{
    AuditEntry, BackendUrl, CacheSyncConfig, NetworkList, RedisEndpoint, RouteCache, RoutePattern, RouteSource,
    RouteStore, RouteTableError, ToolEntry, ToolName, run_cache_sync,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli::{RoutesAction, RoutesCommand};

/// Why a `routes` command failed, with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// The operator's input is invalid (exit 2).
    #[error("{0}")]
    Invalid(#[from] dynamicproxy_redis::InvalidInput),
    /// Redis could not be reached or refused the command (exit 1).
    #[error("{}: {source}", if source.is_unavailable() { format!("cannot reach Redis at {endpoint}") } else { format!("Redis at {endpoint} failed") })]
    Redis {
        /// Where Redis was looked for.
        endpoint: RedisEndpoint,
        /// What went wrong.
        #[source]
        source: RouteTableError,
    },
    /// The tool has no routes (exit 3).
    #[error("tool {0} has no routes")]
    NoSuchTool(ToolName),
    /// `explain` was given something it cannot explain (exit 2).
    #[error("{0}")]
    Explain(#[from] dynamicproxy_proxy::explain::ExplainError),
    /// The configuration's [proxy] settings that `explain` routes with are unusable (exit 64).
    #[error("{0}")]
    Config(String),
}

impl RoutesError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            RoutesError::Redis { .. } => ExitCode::from(1),
            RoutesError::Invalid(_) | RoutesError::Explain(_) => ExitCode::from(2),
            RoutesError::NoSuchTool(_) => ExitCode::from(3),
            RoutesError::Config(_) => ExitCode::from(crate::daemons::EXIT_CONFIG),
        }
    }
}

/// The networks `routes set` warns about: `[proxy] denied_backend_networks`
/// from the same layered configuration the proxy reads (file, env), so the
/// warning matches what the proxy will do; the default list when it is
/// absent or invalid (the proxy itself reports an invalid list at start).
pub fn denied_networks(figment: &figment::Figment) -> NetworkList {
    figment
        .extract_inner::<Vec<String>>("proxy.denied_backend_networks")
        .ok()
        .and_then(|list| NetworkList::parse(&list).ok())
        .unwrap_or_else(NetworkList::default_denied)
}

/// How long `routes set` waits for the backend name to resolve before it
/// gives up on the warning (the route is written either way).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Warnings (on stderr) for a backend the proxy would refuse: every address
/// its host resolves to that falls in `denied`. The route is still written:
/// an operator may be about to change the proxy's list.
async fn warn_if_denied(backend: &BackendUrl, denied: &NetworkList) -> Vec<String> {
    let host = backend.host().trim_start_matches('[').trim_end_matches(']');
    let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, backend.port()))).await;
    let addrs: Vec<std::net::IpAddr> = match resolved {
        Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
        Ok(Err(error)) => return vec![format!("cannot resolve {host} ({error}); the proxy answers 502 until it does")],
        Err(_) => return vec![format!("{host} did not resolve within {}s", RESOLVE_TIMEOUT.as_secs())],
    };
    let mut warnings = Vec::new();
    let mut seen = Vec::new();
    for addr in addrs {
        if seen.contains(&addr) {
            continue;
        }
        seen.push(addr);
        if let Some(network) = denied.matching(addr) {
            warnings.push(format!(
                "{backend} resolves to {addr}, in the denied network {network}: the proxy will refuse to \
                 connect (502 denied-backend) unless [proxy] denied_backend_networks allows it"
            ));
        }
    }
    warnings
}

/// How long `explain` waits for the route table to load from Redis.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one `routes` command and prints its result on stdout; `denied` is
/// what `set` warns about; `figment` the configuration `explain` routes with.
pub async fn run(
    command: RoutesCommand,
    endpoint: RedisEndpoint,
    denied: &NetworkList,
    figment: &figment::Figment,
) -> Result<(), RoutesError> {
    let store = Arc::new(RouteStore::new(endpoint.clone()));
    let me = || RouteSource::cli(&crate::operator::login());
    let redis = |source| RoutesError::Redis { endpoint: endpoint.clone(), source };
    let json = command.json;
    match command.action {
        RoutesAction::List => {
            let tools = store.tools().await.map_err(redis)?;
            if json {
                println!("{}", json!(tools));
            } else {
                for tool in tools {
                    println!("{tool}");
                }
            }
        }
        RoutesAction::Get { tool } => {
            let tool = ToolName::parse(&tool)?;
            let entry = store.tool(&tool).await.map_err(redis)?;
            if entry.is_empty() {
                return Err(RoutesError::NoSuchTool(tool));
            }
            if json {
                println!("{}", json!({"tool": tool.as_str(), "routes": entry.routes, "redirects": entry.redirects}));
            } else {
                print_entry(&entry);
            }
        }
        RoutesAction::Set { tool, pattern, url } => {
            let tool = ToolName::parse(&tool)?;
            let pattern = RoutePattern::parse(&pattern)?;
            let backend = BackendUrl::parse(&url)?;
            store.set_route(&tool, &pattern, &backend, &me()).await.map_err(redis)?;
            for warning in warn_if_denied(&backend, denied).await {
                eprintln!("dynamicproxy routes: warning: {warning}");
            }
            if json {
                println!(
                    "{}",
                    json!({"tool": tool.as_str(), "pattern": pattern.as_str(), "backend": backend.to_string()})
                );
            } else {
                println!("set {tool} {pattern} -> {backend}");
            }
        }
        RoutesAction::Delete { tool, pattern } => {
            let tool = ToolName::parse(&tool)?;
            let deleted = match &pattern {
                Some(pattern) => store.delete_route(&tool, pattern, &me()).await,
                None => store.delete_tool(&tool, &me()).await,
            }
            .map_err(redis)?;
            let what = match &pattern {
                Some(pattern) => format!("{tool} {pattern}"),
                None => format!("{tool} (all routes and redirects)"),
            };
            if json {
                println!("{}", json!({"tool": tool.as_str(), "pattern": pattern, "deleted": deleted}));
            } else if deleted {
                println!("deleted {what}");
            } else {
                println!("nothing to delete for {what}");
            }
        }
        RoutesAction::Explain { url } => {
            // A URL that cannot be explained is the operator's typo (exit 2), whatever Redis says.
            dynamicproxy_proxy::explain::parse_url(&url)?;
            let config: dynamicproxy_proxy::Config =
                crate::settings::section(figment, "proxy").map_err(|e| RoutesError::Config(e.to_string()))?;
            store.ping().await.map_err(redis)?;
            let cache = load_table(&endpoint).await.map_err(redis)?;
            let router = Router::from_config(&config, cache).map_err(|e| RoutesError::Config(e.to_string()))?;
            let explanation = Explainer::new(router, Some(store), None).explain(&url).await?;
            if json {
                println!("{}", json!(explanation));
            } else {
                print!("{}", explanation.to_text());
            }
        }
        RoutesAction::History { tool } => {
            let tool = ToolName::parse(&tool)?;
            let entries = store.history(&tool).await.map_err(redis)?;
            if json {
                let entries: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        json!({"at": format_time(e.at_ms), "action": e.action.as_str(), "pattern": e.pattern,
                            "backend": e.backend, "writer": e.source.writer.as_str(), "who": e.source.who})
                    })
                    .collect();
                println!("{}", json!(entries));
            } else {
                print_history(&entries);
            }
        }
    }
    Ok(())
}

/// The whole route table, loaded once by the same code that keeps the
/// proxy's cache (so `explain` sees what the proxy would), then left alone.
async fn load_table(endpoint: &RedisEndpoint) -> Result<RouteCache, RouteTableError> {
    let cache = RouteCache::new();
    let stop = CancellationToken::new();
    let sync = tokio::spawn(run_cache_sync(CacheSyncConfig::new(endpoint.clone()), cache.clone(), stop.clone()));
    let deadline = tokio::time::Instant::now() + LOAD_TIMEOUT;
    while !cache.is_loaded() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let _ = sync.await;
    if cache.is_loaded() { Ok(cache) } else { Err(RouteTableError::Timeout(LOAD_TIMEOUT)) }
}

/// One line per audit entry, in columns: time, action, pattern, backend, writer.
fn print_history(entries: &[AuditEntry]) {
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|e| {
            let pattern = if e.pattern.is_empty() { "-".into() } else { e.pattern.clone() };
            let backend = if e.backend.is_empty() { "-".into() } else { e.backend.clone() };
            [format_time(e.at_ms), e.action.to_string(), pattern, backend, e.source.to_string()]
        })
        .collect();
    let header = ["TIME", "ACTION", "PATTERN", "BACKEND", "WRITER"].map(String::from);
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let [time, action, pattern, backend, writer] = row;
        let [w0, w1, w2, w3] = widths;
        println!("{time:w0$}  {action:w1$}  {pattern:w2$}  {backend:w3$}  {writer}");
    }
}

fn print_entry(entry: &ToolEntry) {
    let width = entry.routes.keys().chain(entry.redirects.keys()).map(|p| p.len()).max().unwrap_or(0).max(7);
    println!("{:width$}  BACKEND", "PATTERN");
    for (pattern, backend) in &entry.routes {
        let note = match (RoutePattern::parse(pattern), BackendUrl::parse(backend)) {
            (Ok(_), Ok(_)) => String::new(),
            (Err(e), _) | (_, Err(e)) => format!("  (ignored by the proxy: {e})"),
        };
        println!("{pattern:width$}  {backend}{note}");
    }
    for (pattern, target) in &entry.redirects {
        println!("{pattern:width$}  redirect to https://{target}");
    }
}
