//! Who wrote each route and when: the writer passed with every write, what
//! is recorded next to the route (`route_source:<tool>`), and the entries of
//! the audit stream (`route_audit`) that every write and delete appends to.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Entries the audit stream keeps (`XADD MAXLEN ~`). A write is about 115
/// bytes in Redis (`MEMORY USAGE route_audit` was 5.6 MB for 50,000 typical
/// registrar entries), so the stream stays near 6 MB. Toolforge has about 3,500
/// tools: a restart wave of every webservice (a cluster upgrade) writes one
/// entry per tool, and everyday churn is a few thousand writes a day, so
/// this keeps a week or more of history, and a tool's last writes survive
/// several such waves.
pub const AUDIT_MAXLEN: usize = 50_000;

/// Which program wrote a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Writer {
    /// The registrar, for a grid webservice (`register`, `unregister`).
    Registrar,
    /// kube-sync, for a Kubernetes Service.
    KubeSync,
    /// An operator with `dynamicproxy routes`.
    Cli,
    /// The proxy's prober, removing a dead registration (`remove_dead_registrations`).
    Prober,
    /// A name this version does not know (a newer writer), kept as stored.
    Other(String),
}

impl Writer {
    /// The stored name: `registrar`, `kube-sync`, `cli`.
    pub fn as_str(&self) -> &str {
        match self {
            Writer::Registrar => "registrar",
            Writer::KubeSync => "kube-sync",
            Writer::Cli => "cli",
            Writer::Prober => "prober",
            Writer::Other(name) => name,
        }
    }

    fn parse(name: &str) -> Writer {
        match name {
            "registrar" => Writer::Registrar,
            "kube-sync" => Writer::KubeSync,
            "cli" => Writer::Cli,
            "prober" => Writer::Prober,
            other => Writer::Other(other.to_string()),
        }
    }
}

impl fmt::Display for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is writing a route: given with every write, and recorded with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteSource {
    /// The program.
    pub writer: Writer,
    /// Who or what it acted for, in words: `tools.foo from 10.0.0.5:40123`,
    /// `Service tool-foo/foo`, `operator alice`. One line.
    pub who: String,
}

impl RouteSource {
    /// The registrar, acting for the ident user of the client at `client`.
    pub fn registrar(client: SocketAddr, ident_user: &str) -> Self {
        RouteSource { writer: Writer::Registrar, who: one_line(&format!("{ident_user} from {client}")) }
    }

    /// kube-sync, for the Service `namespace/name`.
    pub fn kube_sync(namespace: &str, name: &str) -> Self {
        RouteSource { writer: Writer::KubeSync, who: one_line(&format!("Service {namespace}/{name}")) }
    }

    /// The `routes` CLI, run by the operator `login`.
    pub fn cli(login: &str) -> Self {
        RouteSource { writer: Writer::Cli, who: one_line(&format!("operator {login}")) }
    }

    /// The proxy's prober, removing a registration whose backend failed
    /// every probe for `dead_for_secs`.
    pub fn prober(dead_for_secs: u64) -> Self {
        RouteSource { writer: Writer::Prober, who: format!("backend dead for {dead_for_secs} s") }
    }

    /// Parses `<writer> <who>`.
    fn parse(text: &str) -> Option<Self> {
        let (writer, who) = text.split_once(' ').unwrap_or((text, ""));
        (!writer.is_empty()).then(|| RouteSource { writer: Writer::parse(writer), who: who.to_string() })
    }
}

impl fmt::Display for RouteSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.who.is_empty() { write!(f, "{}", self.writer) } else { write!(f, "{} ({})", self.writer, self.who) }
    }
}

/// Keeps a recorded name on one line of printable text: ident replies and
/// environment variables come from outside, and every reader prints them.
fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).take(256).collect()
}

/// Who wrote a route and when, as recorded next to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// The writer.
    pub source: RouteSource,
    /// When, in milliseconds since the Unix epoch, by the Redis server's clock
    /// (the same clock for every writer).
    pub written_at_ms: u64,
}

impl Provenance {
    /// When it was written.
    pub fn written_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.written_at_ms)
    }

    /// Time since it was written, zero if the clocks disagree.
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.written_at()).unwrap_or_default()
    }

    /// Parses a stored `<unix ms> <writer> <who>`; `None` for anything else.
    pub(crate) fn parse(value: &str) -> Option<Self> {
        let (ms, rest) = value.split_once(' ')?;
        Some(Provenance { written_at_ms: ms.parse().ok()?, source: RouteSource::parse(rest)? })
    }
}

/// What an audit entry records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditAction {
    /// A route was written (`HSET prefix:<tool>`).
    Set,
    /// A route was written and the tool's legacy URLs redirect (`registerCanonical`).
    SetCanonical,
    /// A route was deleted.
    Delete,
    /// Every route and redirect of the tool was deleted.
    DeleteTool,
    /// A name this version does not know, kept as stored.
    Other(String),
}

impl AuditAction {
    /// The stored name.
    pub fn as_str(&self) -> &str {
        match self {
            AuditAction::Set => "set",
            AuditAction::SetCanonical => "set-canonical",
            AuditAction::Delete => "delete",
            AuditAction::DeleteTool => "delete-tool",
            AuditAction::Other(name) => name,
        }
    }

    pub(crate) fn parse(name: &str) -> Self {
        match name {
            "set" => AuditAction::Set,
            "set-canonical" => AuditAction::SetCanonical,
            "delete" => AuditAction::Delete,
            "delete-tool" => AuditAction::DeleteTool,
            other => AuditAction::Other(other.to_string()),
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the audit stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// When, in milliseconds since the Unix epoch (the stream entry's ID).
    pub at_ms: u64,
    /// The tool.
    pub tool: String,
    /// What happened.
    pub action: AuditAction,
    /// The route pattern; empty for [`AuditAction::DeleteTool`].
    pub pattern: String,
    /// The backend written, or the one deleted; empty when unknown.
    pub backend: String,
    /// Who did it.
    pub source: RouteSource,
}

impl AuditEntry {
    /// Builds an entry from a stream ID and its fields; `None` when the ID
    /// is not `<ms>-<seq>` or the tool is missing.
    pub(crate) fn from_fields(id: &str, fields: &[(String, String)]) -> Option<Self> {
        let at_ms = id.split_once('-').map_or(id, |(ms, _)| ms).parse().ok()?;
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_default();
        let tool = get("tool");
        if tool.is_empty() {
            return None;
        }
        Some(AuditEntry {
            at_ms,
            tool: tool.to_string(),
            action: AuditAction::parse(get("action")),
            pattern: get("pattern").to_string(),
            backend: get("backend").to_string(),
            source: RouteSource { writer: Writer::parse(get("writer")), who: get("who").to_string() },
        })
    }

    /// When it happened.
    pub fn at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_provenance_parses() {
        let p = Provenance::parse("1764441850123 registrar tools.foo from 10.0.0.5:40123").unwrap();
        assert_eq!(p.written_at_ms, 1_764_441_850_123);
        assert_eq!(p.source, RouteSource::registrar("10.0.0.5:40123".parse().unwrap(), "tools.foo"));
        assert_eq!(p.source.to_string(), "registrar (tools.foo from 10.0.0.5:40123)");
        assert_eq!(Provenance::parse("17 cli").unwrap().source.to_string(), "cli");
        for bad in ["", "x cli y", "17", "17 "] {
            assert!(Provenance::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn names_stay_on_one_line() {
        assert_eq!(RouteSource::cli("eve\nINJECTED").who, "operator eve?INJECTED");
        assert_eq!(RouteSource::kube_sync("tool-foo", "foo").to_string(), "kube-sync (Service tool-foo/foo)");
    }
}
