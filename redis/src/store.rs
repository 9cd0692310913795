//! Typed reads and writes of the route table, for the `routes` CLI, the
//! registrar and kube-sync. Every write is one Lua script that also records
//! its writer next to the route and in the audit stream, so it never lands
//! half-done and is never unaccounted for.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Mutex;

use redis::aio::MultiplexedConnection;

use crate::endpoint::{RESPONSE_TIMEOUT, RedisEndpoint};
use crate::error::RouteTableError;
use crate::keys::{
    AUDIT_STREAM, K8S_SERVICES, K8S_WRITTEN, ROUTES_PREFIX, SOURCES_PREFIX, redirect_key, routes_key, sources_key,
};
use crate::provenance::{AUDIT_MAXLEN, AuditEntry, Provenance, RouteSource};
use crate::sentinel_watch::{MasterSwitches, Switch};
use crate::types::{BackendUrl, RoutePattern, ToolName};

/// A handle on the route table in Redis. Cheap to share behind an `Arc`;
/// reconnects (re-resolving a Sentinel master) after any connection error.
pub struct RouteStore {
    endpoint: RedisEndpoint,
    /// The shared connection, the server (`host:port`) it reaches and when it was opened.
    connection: Mutex<Option<(MultiplexedConnection, String, std::time::Instant)>>,
    /// `+switch-master` announcements of a Sentinel group, subscribed at the
    /// first connection: a connection to a replaced master is dropped before
    /// its next command, even while the old server still accepts writes.
    switches: Mutex<Option<Option<MasterSwitches>>>,
    /// Held while connecting, so concurrent callers share one attempt
    /// instead of each opening a connection while Redis is away.
    connecting: tokio::sync::Mutex<Option<FailedConnect>>,
}

impl fmt::Debug for RouteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteStore").field("endpoint", &self.endpoint.to_string()).finish_non_exhaustive()
    }
}

/// The last failed connection attempt, reused by callers that arrive while it is fresh.
struct FailedConnect {
    at: std::time::Instant,
    reason: String,
}

/// Provenance hashes fetched per pipelined round trip.
const PROVENANCE_BATCH: usize = 1000;
/// Audit stream entries read per `XRANGE`.
const HISTORY_BATCH: usize = 1000;

/// Which way [`RouteStore::walk_audit`] reads the audit stream.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// `XRANGE`: for a tool's history.
    OldestFirst,
    /// `XREVRANGE`: for a tool's last change.
    NewestFirst,
}

/// How long a failed connection attempt answers for everyone before the next try.
const RECONNECT_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// A tool's raw entries as stored, valid or not, for display.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolEntry {
    /// Fields and values of `prefix:<tool>`.
    pub routes: BTreeMap<String, String>,
    /// Fields and values of `redirect:<tool>`.
    pub redirects: BTreeMap<String, String>,
}

impl ToolEntry {
    /// True when neither hash exists.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.redirects.is_empty()
    }
}

/// A route owned by kube-sync: one member `namespace/name/route` of
/// `k8s_services`, where `route` is the pattern without its leading `/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnedServiceRoute {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name, which is also the tool name.
    pub tool: ToolName,
    /// The pattern in `prefix:<tool>`: `.*`, or `/<path>.*`.
    pub pattern: String,
}

impl OwnedServiceRoute {
    /// The `k8s_services` member.
    pub fn member(&self) -> String {
        let route = self.pattern.strip_prefix('/').unwrap_or(&self.pattern);
        format!("{}/{}/{}", self.namespace, self.tool, route)
    }

    /// kube-sync as the writer, for this route's Service.
    pub fn source(&self) -> RouteSource {
        RouteSource::kube_sync(&self.namespace, self.tool.as_str())
    }

    /// Parses a `k8s_services` member; `None` when it is not of the form
    /// `namespace/name/route` with a valid tool name.
    pub fn parse_member(member: &str) -> Option<Self> {
        let mut parts = member.splitn(3, '/');
        let namespace = parts.next().filter(|n| !n.is_empty())?;
        let tool = ToolName::parse(parts.next()?).ok()?;
        let route = parts.next()?;
        // `.*` is stored as is; every other route lost its leading `/`.
        let pattern = if route == ".*" { route.to_string() } else { format!("/{route}") };
        Some(OwnedServiceRoute { namespace: namespace.into(), tool, pattern })
    }
}

impl fmt::Display for OwnedServiceRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.member())
    }
}

/// Checks that each key `KEYS[i]` has the i-th given type or is absent,
/// before touching any: Redis scripts are atomic, but a command failing
/// halfway does not undo the commands before it.
macro_rules! check_types {
    ($($kind:literal),+) => {
        concat!(
            "local expected = {", $("'", $kind, "',",)+ "}\n",
            r#"
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= expected[i] and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. kind .. ', not a ' .. expected[i])
  end
end
"#
        )
    };
}
pub(crate) use check_types;

/// The Lua function every writing script shares: appends the change to the
/// audit stream and records (or clears) who wrote the route, in the same
/// script as the route write, so neither exists without the other.
///
/// Every such script takes `KEYS[1]` = `route_source:<tool>`, `KEYS[2]` =
/// `route_audit`, and `ARGV[1..4]` = tool, writer, who, audit MAXLEN; its
/// own keys and arguments follow. The time recorded is the stream entry's
/// ID: the Redis server's clock, the same for every writer.
macro_rules! record_fn {
    () => {
        r#"
local function record(action, pattern, backend)
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
    'tool', ARGV[1], 'action', action, 'pattern', pattern, 'backend', backend or '',
    'writer', ARGV[2], 'who', ARGV[3])
  if action == 'set' or action == 'set-canonical' then
    redis.call('HSET', KEYS[1], pattern, string.match(id, '^%d+') .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
  elseif action == 'delete' then
    redis.call('HDEL', KEYS[1], pattern)
  end
end
"#
    };
}
pub(crate) use record_fn;

/// `HSET KEYS[3] ARGV[5] ARGV[6]`, recorded (see [`record_fn`]).
const SET_ROUTE_SCRIPT: &str = concat!(
    check_types!("hash", "stream", "hash"),
    record_fn!(),
    "redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])\n",
    "record('set', ARGV[5], ARGV[6])\n",
    "return 1\n"
);

/// `HSET KEYS[3] ARGV[5] ARGV[6]` and `HSET KEYS[4] ARGV[5] ARGV[7]`, recorded, all or nothing.
const SET_CANONICAL_SCRIPT: &str = concat!(
    check_types!("hash", "stream", "hash", "hash"),
    record_fn!(),
    "redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])\n",
    "redis.call('HSET', KEYS[4], ARGV[5], ARGV[7])\n",
    "record('set-canonical', ARGV[5], ARGV[6])\n",
    "return 1\n"
);

/// `HSET KEYS[3] ARGV[5] ARGV[6]` only when the field already exists or the
/// hash has fewer than `ARGV[7]` fields, and then (when `KEYS[4]` is given)
/// `HSET KEYS[4] ARGV[5] ARGV[8]`; recorded; returns 1 when written, 0 when
/// refused. Count and write in one script, so concurrent registrations
/// cannot both see room for one more route.
const SET_ROUTE_CAPPED_SCRIPT: &str = concat!(
    check_types!("hash", "stream", "hash", "hash"),
    record_fn!(),
    r#"
if redis.call('HEXISTS', KEYS[3], ARGV[5]) == 0 and redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[7]) then
  return 0
end
redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
if KEYS[4] then
  redis.call('HSET', KEYS[4], ARGV[5], ARGV[8])
  record('set-canonical', ARGV[5], ARGV[6])
else
  record('set', ARGV[5], ARGV[6])
end
return 1
"#
);

/// `HDEL ARGV[5]` from `KEYS[3]` and `KEYS[4]`, and from the provenance,
/// all or nothing; recorded when something was removed. Returns the number
/// of fields removed.
const DELETE_ROUTE_SCRIPT: &str = concat!(
    check_types!("hash", "stream", "hash", "hash"),
    record_fn!(),
    r#"
local backend = redis.call('HGET', KEYS[3], ARGV[5])
local removed = redis.call('HDEL', KEYS[3], ARGV[5]) + redis.call('HDEL', KEYS[4], ARGV[5])
redis.call('HDEL', KEYS[1], ARGV[5])
if removed > 0 then
  record('delete', ARGV[5], backend)
end
return removed
"#
);

/// `DEL KEYS[3] KEYS[4]` and the provenance; recorded when something was removed.
const DELETE_TOOL_SCRIPT: &str = concat!(
    check_types!("hash", "stream", "hash", "hash"),
    record_fn!(),
    r#"
local removed = redis.call('DEL', KEYS[3], KEYS[4])
redis.call('DEL', KEYS[1])
if removed > 0 then
  record('delete-tool', '', '')
end
return removed
"#
);

/// kube-sync's write of `KEYS[3]` field `ARGV[5]` = `ARGV[6]` for the
/// `k8s_services` (`KEYS[4]`) member `ARGV[7]`, recording the value in
/// `KEYS[5]`. The ownership check and the write are one script, so no other
/// writer can slip in between. The field is kube-sync's own when the member is
/// in the set and the field holds the value recorded for it (or, for a member
/// from before the record existed, already the value being written). A
/// refusal also drops a stale claim, so the Service going away later has
/// nothing to delete. A write is recorded (see [`record_fn`]). Returns `{1}`
/// written, `{2}` already so, `{0, current}` refused.
const SET_OWNED_SCRIPT: &str = concat!(
    check_types!("hash", "stream", "hash", "set", "hash"),
    record_fn!(),
    r#"
local current = redis.call('HGET', KEYS[3], ARGV[5])
if current then
  local member = redis.call('SISMEMBER', KEYS[4], ARGV[7]) == 1
  local written = redis.call('HGET', KEYS[5], ARGV[7])
  local own = member and ((written and written == current) or (not written and current == ARGV[6]))
  if not own then
    redis.call('SREM', KEYS[4], ARGV[7])
    redis.call('HDEL', KEYS[5], ARGV[7])
    return {0, current}
  end
  if current == ARGV[6] then
    if not written then
      redis.call('HSET', KEYS[5], ARGV[7], ARGV[6])
    end
    return {2}
  end
end
redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
redis.call('SADD', KEYS[4], ARGV[7])
redis.call('HSET', KEYS[5], ARGV[7], ARGV[6])
record('set', ARGV[5], ARGV[6])
return {1}
"#
);

/// kube-sync's removal of member `ARGV[6]`: drops it from `k8s_services`
/// (`KEYS[4]`) and its record (`KEYS[5]`), and deletes field `ARGV[5]` of
/// `KEYS[3]` only while the field still holds the recorded value, compared
/// and deleted in one script, and recorded. Returns `{1}` deleted, `{2}` the
/// field was already gone, `{0, current}` left alone because it holds
/// someone else's value.
const DELETE_OWNED_SCRIPT: &str = concat!(
    check_types!("hash", "stream", "hash", "set", "hash"),
    record_fn!(),
    r#"
local written = redis.call('HGET', KEYS[5], ARGV[6])
local current = redis.call('HGET', KEYS[3], ARGV[5])
redis.call('SREM', KEYS[4], ARGV[6])
redis.call('HDEL', KEYS[5], ARGV[6])
if not current then
  return {2}
end
if written and current == written then
  redis.call('HDEL', KEYS[3], ARGV[5])
  record('delete', ARGV[5], current)
  return {1}
end
return {0, current}
"#
);

/// Starts an invocation of a recording script: the provenance hash and the
/// audit stream as `KEYS[1..2]`, tool, writer, who and MAXLEN as `ARGV[1..4]`.
pub(crate) fn recorded<'a>(
    script: &'a redis::Script,
    tool: &ToolName,
    source: &RouteSource,
) -> redis::ScriptInvocation<'a> {
    let mut invocation = script.key(sources_key(tool.as_str()));
    invocation.key(AUDIT_STREAM).arg(tool.as_str()).arg(source.writer.as_str()).arg(&source.who).arg(AUDIT_MAXLEN);
    invocation
}

/// What became of kube-sync's write of one of its routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedWrite {
    /// The field now holds the backend.
    Written,
    /// The field already held the backend; nothing changed.
    Unchanged,
    /// The field holds another writer's value (a grid registration, an
    /// operator's edit) and was left alone; a stale claim on it was dropped.
    Refused {
        /// The value found in the field.
        current: String,
    },
}

/// What became of kube-sync's removal of one of its routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedDelete {
    /// The field held kube-sync's value and is gone.
    Deleted,
    /// The field was already gone.
    Absent,
    /// The field holds another writer's value and was left alone; only the
    /// ownership record was dropped.
    Kept {
        /// The value found in the field.
        current: String,
    },
}

/// Splits a script's `{status[, current]}` reply.
fn script_status(reply: Vec<redis::Value>) -> Result<(i64, Option<String>), RouteTableError> {
    let mut items = reply.into_iter();
    let status = match items.next() {
        Some(redis::Value::Int(n)) => n,
        other => return Err(unexpected_reply(format!("{other:?}"))),
    };
    let current = match items.next() {
        Some(redis::Value::BulkString(bytes)) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Some(redis::Value::SimpleString(s)) => Some(s),
        _ => None,
    };
    Ok((status, current))
}

/// One `XRANGE` item, `[id, [field, value, ...]]` (or a map of fields), as text.
fn stream_entry(item: redis::Value) -> Option<(String, Vec<(String, String)>)> {
    let redis::Value::Array(mut parts) = item else { return None };
    if parts.len() != 2 {
        return None;
    }
    let fields = parts.pop()?;
    let id = value_text(parts.pop()?)?;
    let pairs = match fields {
        redis::Value::Array(flat) => {
            let mut flat = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                pairs.push((value_text(k)?, value_text(v)?));
            }
            pairs
        }
        redis::Value::Map(map) => {
            map.into_iter().map(|(k, v)| Some((value_text(k)?, value_text(v)?))).collect::<Option<Vec<_>>>()?
        }
        _ => return None,
    };
    Some((id, pairs))
}

fn value_text(value: redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn unexpected_reply(what: String) -> RouteTableError {
    RouteTableError::Redis(redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected script reply",
        what,
    )))
}

impl RouteStore {
    /// A store for `endpoint`. Does not connect yet: the first command does,
    /// so a daemon can start while Redis is down.
    pub fn new(endpoint: RedisEndpoint) -> Self {
        RouteStore {
            endpoint,
            connection: Mutex::new(None),
            switches: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(None),
        }
    }

    /// Where this store points.
    pub fn endpoint(&self) -> &RedisEndpoint {
        &self.endpoint
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<(), RouteTableError> {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<()>(&mut c).await }).await
    }

    /// Names of all tools that have a `prefix:` hash, sorted. Uses SCAN.
    pub async fn tools(&self) -> Result<Vec<String>, RouteTableError> {
        let keys = self.scan(&format!("{ROUTES_PREFIX}*")).await?;
        let mut tools: Vec<String> =
            keys.iter().filter_map(|k| k.strip_prefix(ROUTES_PREFIX)).map(str::to_string).collect();
        tools.sort();
        Ok(tools)
    }

    /// Both hashes of one tool, as stored.
    pub async fn tool(&self, tool: &ToolName) -> Result<ToolEntry, RouteTableError> {
        let (routes, redirects) = self
            .run(|mut c| async move {
                redis::pipe()
                    .hgetall(routes_key(tool.as_str()))
                    .hgetall(redirect_key(tool.as_str()))
                    .query_async::<(BTreeMap<String, String>, BTreeMap<String, String>)>(&mut c)
                    .await
            })
            .await?;
        Ok(ToolEntry { routes, redirects })
    }

    /// Sets one route of a tool (`HSET prefix:<tool> <pattern> <backend>`),
    /// recording `source` as its writer and in the audit stream.
    pub async fn set_route(
        &self,
        tool: &ToolName,
        pattern: &RoutePattern,
        backend: &BackendUrl,
        source: &RouteSource,
    ) -> Result<(), RouteTableError> {
        let script = redis::Script::new(SET_ROUTE_SCRIPT);
        self.run(|mut c| async move {
            let mut invocation = recorded(&script, tool, source);
            invocation.key(routes_key(tool.as_str())).arg(pattern.as_str()).arg(backend.to_string());
            invocation.invoke_async::<()>(&mut c).await
        })
        .await
    }

    /// Sets a route and marks the tool's legacy URLs as redirecting to
    /// `canonical_host`, atomically (the registrar's `registerCanonical`):
    /// a script, because MULTI/EXEC would keep the first write when the
    /// second meets a key of the wrong type.
    pub async fn set_canonical_route(
        &self,
        tool: &ToolName,
        pattern: &RoutePattern,
        backend: &BackendUrl,
        canonical_host: &str,
        source: &RouteSource,
    ) -> Result<(), RouteTableError> {
        let script = redis::Script::new(SET_CANONICAL_SCRIPT);
        self.run(|mut c| async move {
            let mut invocation = recorded(&script, tool, source);
            invocation
                .key(routes_key(tool.as_str()))
                .key(redirect_key(tool.as_str()))
                .arg(pattern.as_str())
                .arg(backend.to_string())
                .arg(canonical_host);
            invocation.invoke_async::<()>(&mut c).await
        })
        .await
    }

    /// Sets a route unless the tool would then have more than `max_routes`
    /// routes (the registrar's `register`, and `registerCanonical` when
    /// `canonical_host` is given, which also marks legacy URLs as redirecting
    /// there). Replacing an existing route is always allowed. Checked and
    /// written atomically; returns `false` when refused, with nothing written.
    pub async fn set_route_capped(
        &self,
        tool: &ToolName,
        pattern: &RoutePattern,
        backend: &BackendUrl,
        canonical_host: Option<&str>,
        max_routes: usize,
        source: &RouteSource,
    ) -> Result<bool, RouteTableError> {
        let script = redis::Script::new(SET_ROUTE_CAPPED_SCRIPT);
        let written: u64 = self
            .run(|mut c| async move {
                let mut invocation = recorded(&script, tool, source);
                invocation.key(routes_key(tool.as_str()));
                invocation.arg(pattern.as_str()).arg(backend.to_string()).arg(max_routes);
                if let Some(host) = canonical_host {
                    invocation.key(redirect_key(tool.as_str())).arg(host);
                }
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(written == 1)
    }

    /// Removes one route from both hashes of a tool (the registrar's
    /// `unregister`, and `routes delete TOOL PATTERN`), all or nothing.
    /// Returns whether anything was removed.
    pub async fn delete_route(
        &self,
        tool: &ToolName,
        pattern: &str,
        source: &RouteSource,
    ) -> Result<bool, RouteTableError> {
        let script = redis::Script::new(DELETE_ROUTE_SCRIPT);
        let removed: u64 = self
            .run(|mut c| async move {
                let mut invocation = recorded(&script, tool, source);
                invocation.key(routes_key(tool.as_str())).key(redirect_key(tool.as_str())).arg(pattern);
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(removed > 0)
    }

    /// Removes every route and redirect of a tool, and their provenance;
    /// recorded in the audit stream. Returns whether anything was removed.
    pub async fn delete_tool(&self, tool: &ToolName, source: &RouteSource) -> Result<bool, RouteTableError> {
        let script = redis::Script::new(DELETE_TOOL_SCRIPT);
        let removed: u64 = self
            .run(|mut c| async move {
                let mut invocation = recorded(&script, tool, source);
                invocation.key(routes_key(tool.as_str())).key(redirect_key(tool.as_str()));
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(removed > 0)
    }

    /// All members of `k8s_services` that parse; unparsable members are
    /// returned apart so the caller can log them (they are never deleted).
    pub async fn owned_service_routes(&self) -> Result<(BTreeSet<OwnedServiceRoute>, Vec<String>), RouteTableError> {
        let members: Vec<String> =
            self.run(|mut c| async move { redis::cmd("SMEMBERS").arg(K8S_SERVICES).query_async(&mut c).await }).await?;
        let mut owned = BTreeSet::new();
        let mut bad = Vec::new();
        for member in members {
            match OwnedServiceRoute::parse_member(&member) {
                Some(route) => {
                    owned.insert(route);
                }
                None => bad.push(member),
            }
        }
        Ok((owned, bad))
    }

    /// Sets a kube-sync route and records its ownership and value, unless the
    /// field holds another writer's value (see [`OwnedWrite`]).
    pub async fn set_owned_route(
        &self,
        owned: &OwnedServiceRoute,
        backend: &BackendUrl,
    ) -> Result<OwnedWrite, RouteTableError> {
        let script = redis::Script::new(SET_OWNED_SCRIPT);
        let source = owned.source();
        let reply: Vec<redis::Value> = self
            .run(|mut c| async move {
                let mut invocation = recorded(&script, &owned.tool, &source);
                invocation
                    .key(routes_key(owned.tool.as_str()))
                    .key(K8S_SERVICES)
                    .key(K8S_WRITTEN)
                    .arg(&owned.pattern)
                    .arg(backend.to_string())
                    .arg(owned.member());
                invocation.invoke_async(&mut c).await
            })
            .await?;
        match script_status(reply)? {
            (1, _) => Ok(OwnedWrite::Written),
            (2, _) => Ok(OwnedWrite::Unchanged),
            (0, Some(current)) => Ok(OwnedWrite::Refused { current }),
            other => Err(unexpected_reply(format!("{other:?}"))),
        }
    }

    /// Drops a kube-sync route's ownership record, and the route itself while
    /// it still holds the value kube-sync wrote (see [`OwnedDelete`]).
    pub async fn delete_owned_route(&self, owned: &OwnedServiceRoute) -> Result<OwnedDelete, RouteTableError> {
        let script = redis::Script::new(DELETE_OWNED_SCRIPT);
        let source = owned.source();
        let reply: Vec<redis::Value> = self
            .run(|mut c| async move {
                let mut invocation = recorded(&script, &owned.tool, &source);
                invocation
                    .key(routes_key(owned.tool.as_str()))
                    .key(K8S_SERVICES)
                    .key(K8S_WRITTEN)
                    .arg(&owned.pattern)
                    .arg(owned.member());
                invocation.invoke_async(&mut c).await
            })
            .await?;
        match script_status(reply)? {
            (1, _) => Ok(OwnedDelete::Deleted),
            (2, _) => Ok(OwnedDelete::Absent),
            (0, Some(current)) => Ok(OwnedDelete::Kept { current }),
            other => Err(unexpected_reply(format!("{other:?}"))),
        }
    }

    /// Who wrote each route of a tool and when, by pattern. Routes written
    /// before provenance was recorded, or by hand with redis-cli, are absent.
    pub async fn tool_provenance(&self, tool: &ToolName) -> Result<BTreeMap<String, Provenance>, RouteTableError> {
        let raw: BTreeMap<String, String> = self
            .run(|mut c| async move { redis::cmd("HGETALL").arg(sources_key(tool.as_str())).query_async(&mut c).await })
            .await?;
        Ok(raw.into_iter().filter_map(|(pattern, value)| Some((pattern, Provenance::parse(&value)?))).collect())
    }

    /// [`RouteStore::tool_provenance`] of every tool that has any, by tool
    /// name: one SCAN, then one pipelined round trip per batch of tools.
    pub async fn all_provenance(&self) -> Result<BTreeMap<String, BTreeMap<String, Provenance>>, RouteTableError> {
        let keys = self.scan(&format!("{SOURCES_PREFIX}*")).await?;
        let mut all = BTreeMap::new();
        for batch in keys.chunks(PROVENANCE_BATCH) {
            let replies: Vec<BTreeMap<String, String>> = self
                .run(|mut c| async move {
                    let mut pipe = redis::pipe();
                    for key in batch {
                        pipe.hgetall(key);
                    }
                    pipe.query_async(&mut c).await
                })
                .await?;
            for (key, raw) in batch.iter().zip(replies) {
                let Some(tool) = key.strip_prefix(SOURCES_PREFIX) else { continue };
                let parsed: BTreeMap<String, Provenance> =
                    raw.into_iter().filter_map(|(p, v)| Some((p, Provenance::parse(&v)?))).collect();
                all.insert(tool.to_string(), parsed);
            }
        }
        Ok(all)
    }

    /// The tool's newest entry in the audit stream, if any: read newest
    /// first, and stops at the first one found.
    pub async fn last_change(&self, tool: &ToolName) -> Result<Option<AuditEntry>, RouteTableError> {
        let mut found = None;
        self.walk_audit(tool, Direction::NewestFirst, |entry| {
            found = Some(entry);
            ControlFlow::Break(())
        })
        .await?;
        Ok(found)
    }

    /// A tool's entries of the audit stream, oldest first. Reads the whole
    /// (capped) stream in batches and keeps the tool's entries.
    pub async fn history(&self, tool: &ToolName) -> Result<Vec<AuditEntry>, RouteTableError> {
        let mut entries = Vec::new();
        self.walk_audit(tool, Direction::OldestFirst, |entry| {
            entries.push(entry);
            ControlFlow::Continue(())
        })
        .await?;
        Ok(entries)
    }

    /// Reads the audit stream in batches of [`HISTORY_BATCH`], in
    /// `direction`, and hands `tool`'s entries to `visit` until it breaks.
    async fn walk_audit(
        &self,
        tool: &ToolName,
        direction: Direction,
        mut visit: impl FnMut(AuditEntry) -> ControlFlow<()>,
    ) -> Result<(), RouteTableError> {
        let (command, mut from, to) = match direction {
            Direction::OldestFirst => ("XRANGE", "-".to_string(), "+"),
            Direction::NewestFirst => ("XREVRANGE", "+".to_string(), "-"),
        };
        loop {
            let start = from.clone();
            let batch: Vec<redis::Value> = self
                .run(|mut c| async move {
                    redis::cmd(command)
                        .arg(AUDIT_STREAM)
                        .arg(start)
                        .arg(to)
                        .arg("COUNT")
                        .arg(HISTORY_BATCH)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            let count = batch.len();
            let mut last = None;
            for item in batch {
                let Some((id, fields)) = stream_entry(item) else { continue };
                if let Some(entry) = AuditEntry::from_fields(&id, &fields)
                    && entry.tool == tool.as_str()
                    && visit(entry).is_break()
                {
                    return Ok(());
                }
                last = Some(id);
            }
            match last {
                // `(` makes the next range begin past the last ID seen.
                Some(id) if count == HISTORY_BATCH => from = format!("({id}"),
                _ => return Ok(()),
            }
        }
    }

    async fn scan(&self, pattern: &str) -> Result<Vec<String>, RouteTableError> {
        let mut conn = self.connection().await?;
        let result = scan_keys(&mut conn, pattern).await;
        self.forget_on_unavailable(&result);
        result
    }

    /// Runs one command on the shared connection, with a timeout; drops the
    /// connection after a connection-level failure so the next call reconnects.
    pub(crate) async fn run<T, F, Fut>(&self, command: F) -> Result<T, RouteTableError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.connection().await?;
        let result = match tokio::time::timeout(RESPONSE_TIMEOUT, command(conn)).await {
            Ok(result) => result.map_err(RouteTableError::from),
            Err(_) => Err(RouteTableError::Timeout(RESPONSE_TIMEOUT)),
        };
        self.forget_on_unavailable(&result);
        result
    }

    async fn connection(&self) -> Result<MultiplexedConnection, RouteTableError> {
        self.forget_replaced_master();
        if let Some((conn, _, _)) = self.lock().as_ref() {
            return Ok(conn.clone());
        }
        let mut failed = self.connecting.lock().await;
        // Someone else may have connected while we waited for the lock.
        if let Some((conn, _, _)) = self.lock().as_ref() {
            return Ok(conn.clone());
        }
        if let Some(last) = failed.as_ref()
            && last.at.elapsed() < RECONNECT_PAUSE
        {
            return Err(RouteTableError::Unreachable(last.reason.clone()));
        }
        match self.endpoint.connect_to(false, None).await {
            Ok((_, server)) if self.announced().is_some_and(|s| s.refuses(&server, std::time::Instant::now())) => {
                // A Sentinel that has not heard of the failover yet named the replaced master.
                let reason = format!("{server} was replaced as master; waiting for the Sentinels to agree");
                *failed = Some(FailedConnect { at: std::time::Instant::now(), reason: reason.clone() });
                Err(RouteTableError::NotMaster(reason))
            }
            Ok((conn, server)) => {
                *failed = None;
                *self.lock() = Some((conn.clone(), server, std::time::Instant::now()));
                Ok(conn)
            }
            Err(e) => {
                *failed = Some(FailedConnect { at: std::time::Instant::now(), reason: e.to_string() });
                Err(e)
            }
        }
    }

    /// Drops the connection when it reaches a master the Sentinels replaced.
    fn forget_replaced_master(&self) {
        let Some(switch) = self.announced() else { return };
        let mut connection = self.lock();
        if connection.as_ref().is_some_and(|(_, server, opened)| switch.refuses(server, *opened)) {
            tracing::info!(redis = %self.endpoint, old_master = switch.old, new_master = switch.new,
                "leaving the replaced master");
            connection.take();
        }
    }

    /// The Sentinels' latest master change; subscribes to them on first use.
    fn announced(&self) -> Option<Switch> {
        let mut switches = self.switches.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        switches.get_or_insert_with(|| self.endpoint.watch_switches()).as_ref().and_then(|rx| rx.borrow().clone())
    }

    fn forget_on_unavailable<T>(&self, result: &Result<T, RouteTableError>) {
        if let Err(e) = result
            && e.is_unavailable()
        {
            self.lock().take();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(MultiplexedConnection, String, std::time::Instant)>> {
        // The guarded value is a plain handle; a panic elsewhere cannot leave it inconsistent.
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// All keys matching `pattern`, by SCAN (never KEYS), each batch under a timeout.
/// Keys that are not UTF-8 are not route table keys and are skipped.
pub(crate) async fn scan_keys(conn: &mut MultiplexedConnection, pattern: &str) -> Result<Vec<String>, RouteTableError> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let scan = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).to_owned();
        let (next, batch): (u64, Vec<Vec<u8>>) = tokio::time::timeout(RESPONSE_TIMEOUT, scan.query_async(conn))
            .await
            .map_err(|_| RouteTableError::Timeout(RESPONSE_TIMEOUT))??;
        keys.extend(batch.into_iter().filter_map(|k| String::from_utf8(k).ok()));
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_members_round_trip() {
        for (member, pattern) in [("ns/foo/.*", ".*"), ("tool-foo/foo/api.*", "/api.*")] {
            let owned = OwnedServiceRoute::parse_member(member).unwrap();
            assert_eq!(owned.pattern, pattern);
            assert_eq!(owned.member(), member);
        }
        for bad in ["", "ns", "ns/foo", "/foo/.*", "ns/Foo/.*"] {
            assert!(OwnedServiceRoute::parse_member(bad).is_none(), "{bad}");
        }
    }
}
