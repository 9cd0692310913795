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
//!
//! On a Sentinel group the liveness check is `ROLE` (a demoted master still
//! answers PING), the Sentinels' announcements end the session at once (see
//! [`crate::sentinel_watch`]), and every reload records the server it read
//! in [`crate::origin::CacheOrigin`], so a failover shows in `/server_info`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::Rng;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::cache::RouteCache;
use crate::endpoint::RedisEndpoint;
use crate::error::{RouteTableError, is_too_old};
use crate::keys::{REDIRECT_PREFIX, ROUTES_PREFIX, TableKey, redirect_key, routes_key};
use crate::sentinel_watch::{MasterSwitches, Switch};
use crate::store::scan_keys;
use crate::table::{MAX_ROUTES_PER_TOOL, Route, ToolRoutes, match_order};
use crate::types::{BackendUrl, InvalidInput, RoutePattern, ToolName};

/// Tools fetched per pipelined round trip.
const FETCH_BATCH: usize = 1000;
/// Distinct malformed entries remembered so each is logged once; beyond this, they are only debug-logged.
const MAX_WARNED: usize = 10_000;
/// Budget of the compiled-regex memo, in estimated bytes (pattern text plus
/// [`RoutePattern::estimated_size`], an upper bound). Real tables have a few
/// dozen distinct regexes; 16 MiB holds about 340 at the compiled-size limit,
/// so churn of distinct hostile patterns cannot grow the proxy past it.
const MEMO_BUDGET_BYTES: usize = 16 << 20;

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
    /// Longest retry delay. Default 5 s; 500 ms for a Sentinel group, so the
    /// cache follows a promoted master within a second of the promotion
    /// (each retry asks a Sentinel first, which is cheap).
    pub retry_max: Duration,
}

impl CacheSyncConfig {
    /// Defaults for `endpoint`.
    pub fn new(endpoint: RedisEndpoint) -> Self {
        CacheSyncConfig {
            resync_interval: Duration::from_secs(300),
            ping_interval: Duration::from_secs(1),
            retry_min: Duration::from_millis(100),
            retry_max: if endpoint.is_sentinel() { Duration::from_millis(500) } else { Duration::from_secs(5) },
            endpoint,
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
    let mut switches = config.endpoint.watch_switches();
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = session(&config, &mut loader, &mut delay, &mut failures, &mut switches) => result,
        };
        cache.set_connected(false);
        let Err(error) = result;
        failures += 1;
        if let RouteTableError::TooOld(_) = error {
            // Retrying cannot help until the server is upgraded: say so once, and in `/ready`.
            if cache.origin().state().problem.is_none() {
                error!(redis = %config.endpoint, %error, "route cache cannot follow this Redis; upgrade it");
                cache.origin().set_problem(Some(format!("Redis at {} {error}", config.endpoint)));
            }
        } else if failures == 1 || failures.is_multiple_of(10) {
            // First failure loudly, then every tenth, so an outage does not flood the log.
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
    switches: &mut Option<MasterSwitches>,
) -> Result<std::convert::Infallible, RouteTableError> {
    let (push_tx, mut pushes) = mpsc::unbounded_channel();
    let (mut conn, server) = config.endpoint.connect_to(true, Some(push_tx)).await?;
    let opened = Instant::now();
    if let Some(switches) = switches.as_mut()
        && let Some(switch) = switches.borrow_and_update().clone()
        && switch.refuses(&server, opened)
    {
        // A Sentinel that has not heard of the failover yet named the replaced master.
        return Err(RouteTableError::NotMaster(format!("{server} was replaced by {}", switch.new)));
    }
    redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("BCAST")
        .arg("PREFIX")
        .arg(ROUTES_PREFIX)
        .arg("PREFIX")
        .arg(REDIRECT_PREFIX)
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| if is_too_old(&e) { RouteTableError::TooOld(e) } else { e.into() })?;
    let started = Instant::now();
    let tools = loader.full_load(&mut conn).await?;
    loader.cache.set_connected(true);
    loader.cache.mark_confirmed();
    if let Some(previous) = loader.cache.origin().loaded_from(&server) {
        warn!(redis = %config.endpoint, from = previous, to = server, "route cache now follows another Redis server (failover)");
    }
    info!(redis = %config.endpoint, server, tools, elapsed_ms = started.elapsed().as_millis() as u64,
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
            announced = next_switch(switches) => {
                if let Some(switch) = announced.filter(|s| s.refuses(&server, opened)) {
                    return Err(RouteTableError::NotMaster(format!("replaced by {}", switch.new)));
                }
            }
            _ = ping.tick() => {
                if config.endpoint.is_sentinel() {
                    // A demoted master keeps answering (and replicating), but the
                    // group's master is elsewhere now: follow it.
                    let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
                    match role.first().and_then(|v| value_to_str(v)) {
                        Some("master") => {}
                        other => return Err(RouteTableError::NotMaster(other.unwrap_or("unknown").to_string())),
                    }
                } else {
                    redis::cmd("PING").query_async::<()>(&mut conn).await?;
                }
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

/// The next master announced by the Sentinels; never resolves for a direct
/// URL or once the subscriptions are gone.
async fn next_switch(switches: &mut Option<MasterSwitches>) -> Option<Switch> {
    if let Some(rx) = switches
        && rx.changed().await.is_ok()
    {
        return rx.borrow_and_update().clone();
    }
    std::future::pending().await
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

/// Compiled patterns that need the regex engine, by source: compiling is the
/// costly part of a load, and many tools share patterns. Bounded by
/// [`MEMO_BUDGET_BYTES`]; every full load drops what the table no longer uses.
#[derive(Default)]
struct RegexMemo {
    entries: HashMap<String, MemoEntry>,
    /// Sum of the entries' estimated sizes.
    bytes: usize,
    /// Full loads started; entries not used by the last one are dropped.
    generation: u64,
}

struct MemoEntry {
    compiled: Result<RoutePattern, InvalidInput>,
    bytes: usize,
    used_in: u64,
}

impl RegexMemo {
    /// The compiled form of `pattern`, from the memo or freshly compiled
    /// (and remembered when the budget allows).
    fn get_or_compile(&mut self, pattern: &str) -> Result<RoutePattern, InvalidInput> {
        if let Some(entry) = self.entries.get_mut(pattern) {
            entry.used_in = self.generation;
            return entry.compiled.clone();
        }
        let compiled = RoutePattern::parse(pattern);
        // Literals and `.*` cost less to rebuild than to remember.
        if compiled.as_ref().map_or(true, RoutePattern::is_regex) {
            let bytes = Self::estimate(pattern, &compiled);
            if self.bytes + bytes <= MEMO_BUDGET_BYTES {
                self.bytes += bytes;
                self.entries.insert(
                    pattern.to_string(),
                    MemoEntry { compiled: compiled.clone(), bytes, used_in: self.generation },
                );
            }
        }
        compiled
    }

    fn estimate(pattern: &str, compiled: &Result<RoutePattern, InvalidInput>) -> usize {
        let key = pattern.len() + 64;
        match compiled {
            Ok(p) => key + p.estimated_size(),
            Err(e) => key + e.to_string().len(),
        }
    }

    /// Called as a full load starts: what it does not use is dropped at its end.
    fn start_full_load(&mut self) {
        self.generation += 1;
    }

    /// Drops every entry the full load that just ended did not use.
    fn finish_full_load(&mut self) {
        let generation = self.generation;
        self.entries.retain(|_, e| e.used_in == generation);
        self.bytes = self.entries.values().map(|e| e.bytes).sum();
        self.entries.shrink_to_fit();
    }
}

/// Reads tools from Redis into the cache, remembering compiled regexes and
/// which malformed entries were already logged.
struct Loader {
    cache: RouteCache,
    regexes: RegexMemo,
    warned: HashSet<String>,
}

impl Loader {
    fn new(cache: RouteCache) -> Self {
        Loader { cache, regexes: RegexMemo::default(), warned: HashSet::new() }
    }

    /// Loads every tool into the cache and drops tools that are gone. Each
    /// tool's entry is built and put before the next is built, and an entry
    /// equal to the cached one is dropped at once: memory holds the table
    /// plus one tool, never a second table (a batch of built entries held a
    /// second copy of a 1,000-tool table until the batch was put, and the
    /// allocator kept that peak as resident memory for good). Returns the
    /// tool count.
    async fn full_load(&mut self, conn: &mut MultiplexedConnection) -> Result<usize, RouteTableError> {
        self.regexes.start_full_load();
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
            let replies = self.fetch(conn, batch).await?;
            for (tool, pair) in batch.iter().zip(replies.chunks(2)) {
                let routes = self.build(tool, pair);
                if !routes.is_absent() {
                    seen.insert(tool.clone());
                }
                self.cache.put_if_changed(tool.clone(), routes);
            }
        }
        self.cache.finish_full_load(&seen);
        self.regexes.finish_full_load();
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
            let replies = self.fetch(conn, batch).await?;
            for (tool, pair) in batch.iter().zip(replies.chunks(2)) {
                let routes = self.build(tool, pair);
                debug!(tool = %tool, routes = routes.routes().len(), redirect = routes.canonical_redirect(), "route cache updated");
                self.cache.put(tool.clone(), routes);
            }
        }
        Ok(())
    }

    /// Fetches one batch of tools in one pipelined round trip: for each tool,
    /// in order, the `HGETALL` of its routes and the `EXISTS` of its redirect.
    /// The raw replies are small; the caller builds each tool's entry from
    /// them one at a time ([`Loader::build`]).
    async fn fetch(
        &mut self,
        conn: &mut MultiplexedConnection,
        batch: &[ToolName],
    ) -> Result<Vec<redis::RedisResult<Value>>, RouteTableError> {
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
        Ok(replies)
    }

    /// One tool's entry from its two replies in [`Loader::fetch`]. A tool with
    /// neither key comes back absent, so the caller removes it.
    fn build(&mut self, tool: &ToolName, pair: &[redis::RedisResult<Value>]) -> ToolRoutes {
        let (routes, has_routes_key) = match &pair[0] {
            Ok(value) => self.parse_routes(tool, value),
            Err(error) => {
                self.warn_once(
                    format!("{tool}:wrongtype"),
                    || warn!(key = %routes_key(tool.as_str()), %error, "skipping route table key that is not a hash"),
                );
                (Vec::new(), false)
            }
        };
        let redirect = matches!(pair.get(1), Some(Ok(Value::Int(n))) if *n > 0);
        ToolRoutes::new(routes, has_routes_key, redirect)
    }

    /// Turns one `HGETALL` reply into valid routes, logging each bad field
    /// once. Fields are taken in match order and only the first
    /// [`MAX_ROUTES_PER_TOOL`] valid ones are kept: the rest are never compiled.
    fn parse_routes(&mut self, tool: &ToolName, value: &Value) -> (Vec<Route>, bool) {
        let fields = hash_fields(value);
        let has_key = !fields.is_empty();
        let mut text = Vec::with_capacity(fields.len());
        for (field, target) in fields {
            match (value_to_str(field), value_to_str(target)) {
                (Some(field), Some(target)) => text.push((field, target)),
                _ => self.warn_once(format!("{tool}:utf8"), || warn!(tool = %tool, "skipping route that is not UTF-8")),
            }
        }
        text.sort_by(|a, b| match_order(a.0, b.0));
        let mut routes = Vec::with_capacity(text.len().min(MAX_ROUTES_PER_TOOL));
        for (index, &(field, target)) in text.iter().enumerate() {
            if routes.len() == MAX_ROUTES_PER_TOOL {
                let dropped = text.len() - index;
                let first_dropped = field;
                self.warn_once(format!("{tool}\0over cap\0{}", text.len()), || {
                    warn!(tool = %tool, kept = MAX_ROUTES_PER_TOOL, dropped, first_dropped,
                        "tool has more routes than the cap; the shortest patterns are ignored")
                });
                break;
            }
            let pattern = self.regexes.get_or_compile(field);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A distinct regex of the largest allowed length.
    fn big_regex(i: usize) -> String {
        let head = format!("^/{i}/[a-z]+/");
        format!("{head}{}", "x".repeat(crate::types::MAX_PATTERN_LEN - head.len()))
    }

    #[test]
    fn memo_stays_within_its_byte_budget() {
        let mut memo = RegexMemo::default();
        memo.start_full_load();
        let mut compiled = 0;
        for i in 0..2_000 {
            let pattern = big_regex(i);
            assert!(memo.get_or_compile(&pattern).is_ok());
            compiled += 1;
            assert!(memo.bytes <= MEMO_BUDGET_BYTES, "memo at {} bytes", memo.bytes);
        }
        assert!(memo.entries.len() < compiled, "the budget never bound: {} entries", memo.entries.len());
        assert!(memo.entries.len() > 100, "the budget holds a useful number of regexes: {}", memo.entries.len());
        // Literals are never memoised; errors are, within the budget.
        memo.finish_full_load();
        memo.start_full_load();
        assert!(memo.get_or_compile("/api.*").is_ok());
        assert!(!memo.entries.contains_key("/api.*"));
    }

    #[test]
    fn a_full_load_drops_what_it_did_not_use() {
        let mut memo = RegexMemo::default();
        memo.start_full_load();
        for i in 0..10 {
            let _ = memo.get_or_compile(&big_regex(i));
        }
        let _ = memo.get_or_compile("(?!bad)");
        memo.finish_full_load();
        assert_eq!(memo.entries.len(), 11);

        memo.start_full_load();
        let _ = memo.get_or_compile(&big_regex(3));
        memo.finish_full_load();
        assert_eq!(memo.entries.keys().collect::<Vec<_>>(), [&big_regex(3)]);
        assert_eq!(memo.bytes, memo.entries.values().map(|e| e.bytes).sum::<usize>());
    }
}
