//! Key names of SPEC §2. Nothing outside this crate builds them.

/// Prefix of the hash holding a tool's routes (`prefix:<tool>`).
pub(crate) const ROUTES_PREFIX: &str = "prefix:";
/// Prefix of the hash whose presence makes a tool's legacy URLs redirect (`redirect:<tool>`).
pub(crate) const REDIRECT_PREFIX: &str = "redirect:";
/// Set of `namespace/name/route` members owned by kube-sync.
pub(crate) const K8S_SERVICES: &str = "k8s_services";
/// Hash of `k8s_services` member → the backend kube-sync last wrote for it:
/// a field is kube-sync's own only while it still holds that value, so a
/// grid registration written over it is never taken back or deleted.
pub(crate) const K8S_WRITTEN: &str = "k8s_services_written";
/// String holding the token of the proxy whose prober acts (a lock with an
/// expiry, see `lock.rs`); outside the route table's prefixes, so the cache
/// never loads or tracks it.
pub(crate) const PROBER_LOCK: &str = "dynamicproxy:prober-lock";

/// Prefix of the hash saying who wrote each route of a tool and when
/// (`route_source:<tool>`, field = pattern, value = `<unix ms> <writer> <who>`).
/// Apart from `prefix:`, so the legacy hash stays byte for byte as it was and
/// the cache's invalidation prefixes never see these writes.
pub(crate) const SOURCES_PREFIX: &str = "route_source:";
/// Stream of every route write and delete, by every writer, capped.
pub(crate) const AUDIT_STREAM: &str = "route_audit";

/// The provenance hash of a tool.
pub(crate) fn sources_key(tool: &str) -> String {
    format!("{SOURCES_PREFIX}{tool}")
}

/// The routes hash of a tool.
pub(crate) fn routes_key(tool: &str) -> String {
    format!("{ROUTES_PREFIX}{tool}")
}

/// The redirect hash of a tool.
pub(crate) fn redirect_key(tool: &str) -> String {
    format!("{REDIRECT_PREFIX}{tool}")
}

/// Which table a key belongs to, and for which tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableKey<'a> {
    /// `prefix:<tool>`.
    Routes(&'a str),
    /// `redirect:<tool>`.
    Redirect(&'a str),
}

impl<'a> TableKey<'a> {
    /// Classifies a key; `None` for keys outside the route table.
    pub(crate) fn parse(key: &'a str) -> Option<Self> {
        if let Some(tool) = key.strip_prefix(ROUTES_PREFIX) {
            Some(TableKey::Routes(tool))
        } else {
            key.strip_prefix(REDIRECT_PREFIX).map(TableKey::Redirect)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        assert_eq!(TableKey::parse(&routes_key("foo")), Some(TableKey::Routes("foo")));
        assert_eq!(TableKey::parse(&redirect_key("foo")), Some(TableKey::Redirect("foo")));
        assert_eq!(TableKey::parse("k8s_services"), None);
        assert_eq!(TableKey::parse("prefix"), None);
        assert_eq!(TableKey::parse(&sources_key("foo")), None, "provenance is not part of the route table");
    }
}
