//! How one Kubernetes Service becomes one route (SPEC §6): pure functions,
//! no I/O, so every rule is pinned by a unit test.

use std::fmt;
use std::net::IpAddr;

use dynamicproxy_redis::{BackendUrl, OwnedServiceRoute, RoutePattern, ToolName};
use k8s_openapi::api::core::v1::Service;

/// The label whose value narrows a tool's route to `/<value>.*`.
pub const PATH_LABEL: &str = "toollabs-proxy-path";

/// Identifies a Service across events: its namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
}

impl ServiceKey {
    /// The key of a Service object; `None` when the API server sent one
    /// without a name or namespace (nothing can be routed for it).
    pub fn of(service: &Service) -> Option<Self> {
        let namespace = service.metadata.namespace.as_deref().filter(|n| !n.is_empty())?;
        let name = service.metadata.name.as_deref().filter(|n| !n.is_empty())?;
        Some(ServiceKey { namespace: namespace.to_string(), name: name.to_string() })
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The route a Service should have in the route table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    /// Tool, pattern and the `k8s_services` member that records ownership.
    pub owned: OwnedServiceRoute,
    /// `http://<clusterIP>:<port>`.
    pub backend: BackendUrl,
}

/// Why a Service gets no route. Not an error: the Service exists, but
/// there is nothing the proxy could send traffic to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// The Service name is not a valid tool name.
    #[error("service name {0:?} is not a valid tool name")]
    InvalidToolName(String),
    /// `tool_namespace_prefix` is set and the Service lives outside `<prefix><name>`:
    /// it would take over another tool's route.
    #[error("service {name:?} is in namespace {namespace:?}, not {expected:?}")]
    ForeignNamespace {
        /// The Service's (and so the tool's) name.
        name: String,
        /// Where the Service is.
        namespace: String,
        /// Where a Service of that tool must be.
        expected: String,
    },
    /// `clusterIP: None`: a headless Service has no virtual IP to proxy to.
    #[error("headless service (clusterIP None)")]
    Headless,
    /// No cluster IP at all (e.g. `type: ExternalName`).
    #[error("service has no cluster IP")]
    NoClusterIp,
    /// No ports, so no backend port.
    #[error("service has no ports")]
    NoPorts,
    /// The `toollabs-proxy-path` label does not make a usable pattern.
    #[error("label {PATH_LABEL}={0:?} does not make a valid route pattern")]
    InvalidPath(String),
    /// Cluster IP and port do not make a valid backend URL.
    #[error("cluster IP {ip:?} and port {port} do not make a valid backend url")]
    InvalidBackend {
        /// The Service's `spec.clusterIP`.
        ip: String,
        /// The chosen port.
        port: i32,
    },
}

/// The route a Service should have, or why it has none. With a
/// `tool_namespace_prefix`, only a Service in namespace `<prefix><name>` may
/// claim the tool `<name>`.
pub fn route_for(
    key: &ServiceKey,
    service: &Service,
    tool_namespace_prefix: Option<&str>,
) -> Result<ServiceRoute, Skip> {
    let tool = ToolName::parse(&key.name).map_err(|_| Skip::InvalidToolName(key.name.clone()))?;
    if let Some(prefix) = tool_namespace_prefix {
        let expected = format!("{prefix}{}", key.name);
        if key.namespace != expected {
            return Err(Skip::ForeignNamespace { name: key.name.clone(), namespace: key.namespace.clone(), expected });
        }
    }
    let spec = service.spec.as_ref();
    let cluster_ip = spec.and_then(|s| s.cluster_ip.as_deref()).map(str::trim).unwrap_or_default();
    if cluster_ip.eq_ignore_ascii_case("none") {
        return Err(Skip::Headless);
    }
    if cluster_ip.is_empty() {
        return Err(Skip::NoClusterIp);
    }
    let ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
    // The port named `http` wins; otherwise the first, as kube2proxy did.
    let port =
        ports.iter().find(|p| p.name.as_deref() == Some("http")).or_else(|| ports.first()).ok_or(Skip::NoPorts)?;
    let invalid_backend = || Skip::InvalidBackend { ip: cluster_ip.to_string(), port: port.port };
    let host = match cluster_ip.parse::<IpAddr>().map_err(|_| invalid_backend())? {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    let port_number = u16::try_from(port.port).map_err(|_| invalid_backend())?;
    let backend = BackendUrl::parse_strict(&format!("http://{host}:{port_number}")).map_err(|_| invalid_backend())?;
    let pattern = pattern_for(service)?;
    Ok(ServiceRoute { owned: OwnedServiceRoute { namespace: key.namespace.clone(), tool, pattern }, backend })
}

/// `.*`, or `/<value>.*` with the path label. An empty label value means the
/// whole tool: `/.*` would be recorded in `k8s_services` as `ns/name/.*`,
/// which reads back as `.*`, so ownership could not be tracked.
fn pattern_for(service: &Service) -> Result<String, Skip> {
    let value = service.metadata.labels.as_ref().and_then(|l| l.get(PATH_LABEL)).map(String::as_str);
    let pattern = match value {
        None | Some("") => return Ok(".*".to_string()),
        Some(value) => format!("/{value}.*"),
    };
    let invalid = || Skip::InvalidPath(value.unwrap_or_default().to_string());
    if value.is_some_and(|v| v.starts_with('/')) {
        return Err(invalid());
    }
    RoutePattern::parse(&pattern).map_err(|_| invalid())?;
    Ok(pattern)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn service(name: &str, ip: Option<&str>, ports: &[(Option<&str>, i32)], path: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(format!("tool-{name}")),
                labels: path.map(|p| [(PATH_LABEL.to_string(), p.to_string())].into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: ip.map(Into::into),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p)| ServicePort { name: n.map(Into::into), port: *p, ..Default::default() })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn route(svc: &Service) -> Result<(String, String), Skip> {
        let key = ServiceKey::of(svc).unwrap();
        route_for(&key, svc, None).map(|r| (r.owned.member(), r.backend.to_string()))
    }

    #[test]
    fn namespace_prefix_keeps_tools_in_their_own_namespace() {
        let own = service("foo", Some("10.0.0.1"), &[(None, 8000)], None);
        let key = ServiceKey::of(&own).unwrap();
        assert!(route_for(&key, &own, Some("tool-")).is_ok());
        let mut foreign = own.clone();
        foreign.metadata.namespace = Some("tool-bar".into());
        let key = ServiceKey::of(&foreign).unwrap();
        assert!(route_for(&key, &foreign, None).is_ok(), "off by default, as SPEC §6 says");
        assert_eq!(
            route_for(&key, &foreign, Some("tool-")).map(|_| ()),
            Err(Skip::ForeignNamespace {
                name: "foo".into(),
                namespace: "tool-bar".into(),
                expected: "tool-foo".into()
            })
        );
    }

    #[test]
    fn whole_tool_route() {
        let svc = service("foo", Some("10.0.0.1"), &[(None, 8000)], None);
        assert_eq!(route(&svc), Ok(("tool-foo/foo/.*".into(), "http://10.0.0.1:8000".into())));
    }

    #[test]
    fn path_label_narrows_the_route() {
        let svc = service("foo", Some("10.0.0.1"), &[(None, 8000)], Some("api"));
        let key = ServiceKey::of(&svc).unwrap();
        let r = route_for(&key, &svc, None).unwrap();
        assert_eq!(r.owned.pattern, "/api.*");
        assert_eq!(r.owned.member(), "tool-foo/foo/api.*");
        // An empty value means the whole tool (see pattern_for).
        let svc = service("foo", Some("10.0.0.1"), &[(None, 8000)], Some(""));
        assert_eq!(route(&svc).unwrap().0, "tool-foo/foo/.*");
        let svc = service("foo", Some("10.0.0.1"), &[(None, 8000)], Some("a("));
        assert_eq!(route(&svc), Err(Skip::InvalidPath("a(".into())));
    }

    #[test]
    fn port_named_http_wins_else_first() {
        let svc = service("foo", Some("10.0.0.1"), &[(Some("metrics"), 9000), (Some("http"), 8000)], None);
        assert_eq!(route(&svc).unwrap().1, "http://10.0.0.1:8000");
        let svc = service("foo", Some("10.0.0.1"), &[(Some("a"), 9000), (Some("b"), 8000)], None);
        assert_eq!(route(&svc).unwrap().1, "http://10.0.0.1:9000");
    }

    #[test]
    fn ipv6_cluster_ip_is_bracketed() {
        let svc = service("foo", Some("fd00::10"), &[(None, 80)], None);
        assert_eq!(route(&svc).unwrap().1, "http://[fd00::10]:80");
    }

    #[test]
    fn services_without_a_backend_are_skipped() {
        assert_eq!(route(&service("foo", Some("None"), &[(None, 80)], None)), Err(Skip::Headless));
        assert_eq!(route(&service("foo", None, &[(None, 80)], None)), Err(Skip::NoClusterIp));
        assert_eq!(route(&service("foo", Some(""), &[(None, 80)], None)), Err(Skip::NoClusterIp));
        assert_eq!(route(&service("foo", Some("10.0.0.1"), &[], None)), Err(Skip::NoPorts));
        assert!(matches!(
            route(&service("foo", Some("10.0.0.1"), &[(None, 0)], None)),
            Err(Skip::InvalidBackend { .. })
        ));
        assert!(matches!(
            route(&service("foo", Some("10.0.0.1"), &[(None, 70000)], None)),
            Err(Skip::InvalidBackend { .. })
        ));
        assert!(matches!(
            route(&service("foo", Some("not an ip"), &[(None, 80)], None)),
            Err(Skip::InvalidBackend { .. })
        ));
        let mut no_spec = service("foo", None, &[], None);
        no_spec.spec = None;
        assert_eq!(route(&no_spec), Err(Skip::NoClusterIp));
    }

    #[test]
    fn names_that_are_not_tools_are_skipped() {
        let svc = service("Foo.bar", Some("10.0.0.1"), &[(None, 80)], None);
        assert_eq!(route(&svc), Err(Skip::InvalidToolName("Foo.bar".into())));
    }

    #[test]
    fn objects_without_name_or_namespace_have_no_key() {
        let mut svc = service("foo", Some("10.0.0.1"), &[(None, 80)], None);
        svc.metadata.namespace = None;
        assert_eq!(ServiceKey::of(&svc), None);
    }
}
