//! The background task that keeps a [`RouteCache`] equal to Redis.
//!
//! Freshness comes from Redis client-side caching in broadcast mode
//! (`CLIENT TRACKING ON BCAST PREFIX prefix: PREFIX redirect:`) on a RESP3
//! connection: Redis pushes the name of every changed key on the same
//! connection we read from, so an invalidation can never overtake the data
//! it announces, and no server configuration is needed (keyspace
//! notifications need `notify-keyspace-events`, which operators would have to
//! set and keep set). Tracking is enabled *before* each full load, so a write
//! that races with the load is announced and re-read afterwards.
//!
//! Safety nets: a full reload every `resync_interval`, after every reconnect
//! and on a flush; a PING every `ping_interval` to notice a dead connection
//! and to confirm the cache's age. While Redis is away the cache keeps its
//! last contents and its age grows.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::Rng;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cache::RouteCache;
use crate::endpoint::RedisEndpoint;
use crate::error::RouteTableError;
use crate::keys::{REDIRECT_PREFIX, ROUTES_PREFIX, TableKey, redirect_key, routes_key};
use crate::store::scan_keys;
use crate::table::{Route, ToolRoutes};
use crate::types::{BackendUrl, InvalidInput, RoutePattern, ToolName};

/// Tools fetched per pipelined round trip.
const FETCH_BATCH: usize = 1000;
/// Distinct malformed entries remembered so each is logged once; beyond this, they are only debug-logged.
const MAX_WARNED: usize = 10_000;
/// Distinct compiled regexes kept for reuse across loads.
const MAX_MEMO: usize = 200_000;

/// Settings of the cache sync task.
#[derive(Debug, Clone)]
pub struct CacheSyncConfig {
    /// Where Redis is.
    pub endpoint: RedisEndpoint,
    /// Full reload period, a safety net under invalidations. Default 5 min.
    pub resync_interval: Duration,
    /// Liveness check period; also how often the cache age is confirmed. Default 1 s.
    pub ping_interval: Duration,
    /// First retry delay after Redis is lost; doubles up to `retry_max`. Default 100 ms.
    pub retry_min: Duration,
    /// Longest retry delay. Default 5 s.
    pub retry_max: Duration,
}

impl CacheSyncConfig {
    /// Defaults for `endpoint`.
    pub fn new(endpoint: RedisEndpoint) -> Self {
        CacheSyncConfig {
            endpoint,
            resync_interval: Duration::from_secs(300),
            ping_interval: Duration::from_secs(1),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// Keeps `cache` equal to Redis until `shutdown` is cancelled. Never returns
/// early because of Redis: connection failures are logged and retried with
/// jittered exponential backoff while the cache keeps serving.
pub async fn run_cache_sync(config: CacheSyncConfig, cache: RouteCache, shutdown: CancellationToken) {
    let mut loader = Loader::new(cache.clone());
    let mut delay = config.retry_min;
    let mut failures: u64 = 0;
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = session(&config, &mut loader, &mut delay, &mut failures) => result,
        };
        cache.set_connected(false);
        let Err(error) = result;
        failures += 1;
        // First failure loudly, then every tenth, so an outage does not flood the log.
        if failures == 1 || failures.is_multiple_of(10) {
            warn!(redis = %config.endpoint, %error, attempts = failures, retry_in_ms = delay.as_millis() as u64,
                "route cache lost Redis; serving the last known table");
        } else {
            debug!(redis = %config.endpoint, %error, "route cache reconnect failed");
        }
        let jittered = delay.mul_f64(rand::rng().random_range(0.5..1.0));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jittered) => {}
        }
        delay = (delay * 2).min(config.retry_max);
    }
}

/// One connection's life: track, load, then apply invalidations until the
/// connection fails.
async fn session(
    config: &CacheSyncConfig,
    loader: &mut Loader,
    delay: &mut Duration,
    failures: &mut u64,
) -> Result<std::convert::Infallible, RouteTableError> {
    let (push_tx, mut pushes) = mpsc::unbounded_channel();
    let mut conn = config.endpoint.connect(true, Some(push_tx)).await?;
    redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("BCAST")
        .arg("PREFIX")
        .arg(ROUTES_PREFIX)
        .arg("PREFIX")
        .arg(REDIRECT_PREFIX)
        .query_async::<()>(&mut conn)
        .await?;
    let started = Instant::now();
    let tools = loader.full_load(&mut conn).await?;
    loader.cache.set_connected(true);
    loader.cache.mark_confirmed();
    info!(redis = %config.endpoint, tools, elapsed_ms = started.elapsed().as_millis() as u64,
        after_failures = *failures, "route cache loaded");
    *delay = config.retry_min;
    *failures = 0;

    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + config.ping_interval, config.ping_interval);
    let mut resync =
        tokio::time::interval_at(tokio::time::Instant::now() + config.resync_interval, config.resync_interval);
    loop {
        tokio::select! {
            push = pushes.recv() => {
                let mut changes = Changes::default();
                changes.add(push.ok_or(RouteTableError::Disconnected)?)?;
                // Apply everything already queued in one batch.
                while let Ok(more) = pushes.try_recv() {
                    changes.add(more)?;
                }
                if changes.everything {
                    loader.full_load(&mut conn).await?;
                } else {
                    loader.reload(&mut conn, changes.tools).await?;
                }
            }
            _ = ping.tick() => {
                redis::cmd("PING").query_async::<()>(&mut conn).await?;
                loader.cache.mark_confirmed();
            }
            _ = resync.tick() => {
                let tools = loader.full_load(&mut conn).await?;
                loader.cache.mark_confirmed();
                debug!(tools, "route cache periodic resync done");
            }
        }
    }
}

/// Tools named by a batch of invalidation pushes.
#[derive(Default)]
struct Changes {
    tools: BTreeSet<String>,
    /// A null invalidation (FLUSHDB/FLUSHALL): everything may have changed.
    everything: bool,
}

impl Changes {
    fn add(&mut self, push: PushInfo) -> Result<(), RouteTableError> {
        match push.kind {
            PushKind::Disconnection => Err(RouteTableError::Disconnected),
            PushKind::Invalidate => {
                match push.data.into_iter().next() {
                    Some(Value::Array(keys)) | Some(Value::Set(keys)) => {
                        for key in keys {
                            if let Some(key) = value_to_string(key) {
                                match TableKey::parse(&key) {
                                    Some(TableKey::Routes(tool)) | Some(TableKey::Redirect(tool)) => {
                                        self.tools.insert(tool.to_string());
                                    }
                                    None => {}
                                }
                            }
                        }
                    }
                    _ => self.everything = true,
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Reads tools from Redis into the cache, remembering compiled regexes and
/// which malformed entries were already logged.
struct Loader {
    cache: RouteCache,
    /// Patterns that need the regex engine, by source: compiling is the
    /// costly part of a load, and many tools share patterns.
    regexes: HashMap<String, Result<RoutePattern, InvalidInput>>,
    warned: HashSet<String>,
}

impl Loader {
    fn new(cache: RouteCache) -> Self {
        Loader { cache, regexes: HashMap::new(), warned: HashSet::new() }
    }

    /// Loads every tool into the cache and drops tools that are gone. Entries
    /// are replaced batch by batch, so memory never holds two full tables.
    /// Returns the tool count.
    async fn full_load(&mut self, conn: &mut MultiplexedConnection) -> Result<usize, RouteTableError> {
        let mut names: BTreeSet<String> = BTreeSet::new();
        for (prefix, pattern) in [(ROUTES_PREFIX, "prefix:*"), (REDIRECT_PREFIX, "redirect:*")] {
            for key in scan_keys(conn, pattern).await? {
                if let Some(tool) = key.strip_prefix(prefix) {
                    names.insert(tool.to_string());
                }
            }
        }
        let tools: Vec<ToolName> = names.iter().filter_map(|n| self.check_name(n)).collect();
        let mut seen = HashSet::with_capacity(tools.len());
        for batch in tools.chunks(FETCH_BATCH) {
            for (tool, routes) in self.fetch(conn, batch).await? {
                if !routes.is_absent() {
                    seen.insert(tool.clone());
                }
                self.cache.put(tool, routes);
            }
        }
        self.cache.finish_full_load(&seen);
        if self.regexes.len() > MAX_MEMO {
            self.regexes.clear();
        }
        Ok(seen.len())
    }

    /// Re-reads the named tools and updates or removes their entries.
    async fn reload(
        &mut self,
        conn: &mut MultiplexedConnection,
        names: BTreeSet<String>,
    ) -> Result<(), RouteTableError> {
        let tools: Vec<ToolName> = names.iter().filter_map(|n| self.check_name(n)).collect();
        for batch in tools.chunks(FETCH_BATCH) {
            for (tool, routes) in self.fetch(conn, batch).await? {
                debug!(tool = %tool, routes = routes.routes().len(), redirect = routes.canonical_redirect(), "route cache updated");
                self.cache.put(tool, routes);
            }
        }
        Ok(())
    }

    /// Fetches one batch of tools in one pipelined round trip. Tools with
    /// neither key come back absent, so the caller removes them.
    async fn fetch(
        &mut self,
        conn: &mut MultiplexedConnection,
        batch: &[ToolName],
    ) -> Result<Vec<(ToolName, ToolRoutes)>, RouteTableError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for tool in batch {
            pipe.cmd("HGETALL").arg(routes_key(tool.as_str()));
            pipe.cmd("EXISTS").arg(redirect_key(tool.as_str()));
        }
        let replies: Vec<redis::RedisResult<Value>> = pipe.query_async(conn).await?;
        if replies.len() != batch.len() * 2 {
            return Err(RouteTableError::Disconnected);
        }
        let mut fetched = Vec::with_capacity(batch.len());
        for (tool, pair) in batch.iter().zip(replies.chunks(2)) {
            let (routes, has_routes_key) = match &pair[0] {
                Ok(value) => self.parse_routes(tool, value),
                Err(error) => {
                    self.warn_once(format!("{tool}:wrongtype"), || {
                        warn!(key = %routes_key(tool.as_str()), %error, "skipping route table key that is not a hash")
                    });
                    (Vec::new(), false)
                }
            };
            let redirect = matches!(&pair[1], Ok(Value::Int(n)) if *n > 0);
            fetched.push((tool.clone(), ToolRoutes::new(routes, has_routes_key, redirect)));
        }
        Ok(fetched)
    }

    /// Turns one `HGETALL` reply into valid routes, logging each bad field once.
    fn parse_routes(&mut self, tool: &ToolName, value: &Value) -> (Vec<Route>, bool) {
        let fields = hash_fields(value);
        let has_key = !fields.is_empty();
        let mut routes = Vec::with_capacity(fields.len());
        for (field, target) in fields {
            let (Some(field), Some(target)) = (value_to_str(field), value_to_str(target)) else {
                self.warn_once(format!("{tool}:utf8"), || warn!(tool = %tool, "skipping route that is not UTF-8"));
                continue;
            };
            let pattern = match self.regexes.get(field) {
                Some(compiled) => compiled.clone(),
                None => {
                    let parsed = RoutePattern::parse(field);
                    if parsed.as_ref().map_or(true, RoutePattern::is_regex) {
                        self.regexes.insert(field.to_string(), parsed.clone());
                    }
                    parsed
                }
            };
            match (pattern, BackendUrl::parse(target)) {
                (Ok(pattern), Ok(backend)) => routes.push(Route { pattern, backend }),
                (Err(error), _) | (_, Err(error)) => {
                    self.warn_once(
                        format!("{tool}\0{field}\0{target}"),
                        || warn!(tool = %tool, pattern = field, backend = target, %error, "skipping invalid route"),
                    );
                }
            }
        }
        (routes, has_key)
    }

    fn check_name(&mut self, name: &str) -> Option<ToolName> {
        match ToolName::parse(name) {
            Ok(tool) => Some(tool),
            Err(error) => {
                self.warn_once(
                    format!("name:{name}"),
                    || warn!(%error, "skipping route table key with an invalid tool name"),
                );
                None
            }
        }
    }

    fn warn_once(&mut self, what: String, log: impl FnOnce()) {
        if self.warned.contains(&what) {
            return;
        }
        if self.warned.len() < MAX_WARNED {
            self.warned.insert(what);
            log();
        } else {
            debug!(what, "malformed route table entry (warning budget spent)");
        }
    }
}

/// Field/value pairs of a hash reply (RESP3 map or RESP2 flat array).
fn hash_fields(value: &Value) -> Vec<(&Value, &Value)> {
    match value {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(flat) => flat.chunks_exact(2).map(|p| (&p[0], &p[1])).collect(),
        _ => Vec::new(),
    }
}

fn value_to_str(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn value_to_string(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}
