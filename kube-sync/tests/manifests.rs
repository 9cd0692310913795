//! The manifests in deploy/kubernetes/ are valid Kubernetes objects, wire
//! together, carry the configuration kube-sync accepts, and grant nothing
//! beyond Services get/list/watch.

use std::collections::BTreeSet;
use std::path::PathBuf;

use dynamicproxy_kube_sync::Config;
use dynamicproxy_redis::RedisEndpoint;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    deployments: Vec<Deployment>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Parses into the typed object and checks nothing was lost on the way:
/// a misspelt or misplaced field would be silently ignored otherwise.
fn typed<T: DeserializeOwned + Serialize>(source: &str, doc: &Value) -> T {
    let object: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{source}: {e}"));
    let back = serde_json::to_value(&object).unwrap();
    assert_eq!(&back, doc, "{source}: fields the Kubernetes types do not know (typo?)");
    object
}

fn load() -> Manifests {
    let mut manifests = Manifests::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("deploy/kubernetes exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            let source = format!("{} ({})", file.display(), doc["kind"]);
            match (doc["apiVersion"].as_str(), doc["kind"].as_str()) {
                (Some("v1"), Some("Namespace")) => manifests.namespaces.push(typed(&source, &doc)),
                (Some("v1"), Some("ServiceAccount")) => manifests.service_accounts.push(typed(&source, &doc)),
                (Some("v1"), Some("ConfigMap")) => manifests.config_maps.push(typed(&source, &doc)),
                (Some("apps/v1"), Some("Deployment")) => manifests.deployments.push(typed(&source, &doc)),
                (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
                    manifests.cluster_roles.push(typed(&source, &doc))
                }
                (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
                    manifests.cluster_role_bindings.push(typed(&source, &doc))
                }
                // Anything else (a Role, a Secret, a second binding...) must be
                // reviewed and added here on purpose.
                _ => panic!("{source}: unexpected object"),
            }
        }
    }
    manifests
}

fn name<T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(o: &T) -> &str {
    o.metadata().name.as_deref().unwrap_or_default()
}

#[test]
fn rbac_grants_only_services_get_list_watch() {
    let m = load();
    assert_eq!(m.cluster_roles.len(), 1, "one ClusterRole");
    let role = &m.cluster_roles[0];
    assert!(role.aggregation_rule.is_none(), "an aggregated role could grow beyond what is written here");
    let rules = role.rules.as_deref().unwrap_or_default();
    assert!(!rules.is_empty());
    let allowed: BTreeSet<&str> = ["get", "list", "watch"].into();
    let mut granted = BTreeSet::new();
    for rule in rules {
        assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]), "core API group only");
        assert_eq!(rule.resources.as_deref(), Some(&["services".to_string()][..]), "Services only");
        assert!(rule.non_resource_urls.is_none(), "no non-resource URLs");
        assert!(rule.resource_names.is_none(), "no per-name grants");
        for verb in &rule.verbs {
            assert!(allowed.contains(verb.as_str()), "verb {verb:?} is not needed");
            granted.insert(verb.as_str());
        }
    }
    assert_eq!(granted, allowed, "kube-sync needs get, list and watch");

    assert_eq!(m.cluster_role_bindings.len(), 1, "one ClusterRoleBinding");
    let binding = &m.cluster_role_bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.api_group.as_deref(), Some("rbac.authorization.k8s.io"));
    assert_eq!(binding.role_ref.name, name(role));
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "bound to the service account only");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    let account = &m.service_accounts[0];
    assert_eq!(subjects[0].name, name(account));
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
}

#[test]
fn deployment_runs_kube_sync_with_its_account_config_probes_and_limits() {
    let m = load();
    assert_eq!(m.deployments.len(), 1);
    let deployment = &m.deployments[0];
    let namespace = deployment.metadata.namespace.clone().expect("namespaced");
    assert!(m.namespaces.iter().any(|n| name(n) == namespace), "its namespace is created");
    let spec = &deployment.spec;
    let template_labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
        assert_eq!(template_labels.get(k), Some(v), "the selector matches the pod template");
    }
    let pod = spec.template.spec.as_ref().unwrap();
    let account = pod.service_account_name.as_deref().expect("a service account");
    assert!(
        m.service_accounts.iter().any(|a| name(a) == account && a.metadata.namespace.as_deref() == Some(&namespace)),
        "the service account exists in the namespace"
    );
    assert_eq!(pod.containers.len(), 1);
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("kube-sync"));

    // The configuration file the args name is the one the ConfigMap provides.
    let config_path = args.windows(2).find(|w| w[0] == "--config").map(|w| PathBuf::from(&w[1])).expect("--config");
    let mount = container
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| config_path.starts_with(&v.mount_path))
        .expect("the config file is mounted");
    let volume =
        pod.volumes.as_deref().unwrap_or_default().iter().find(|v| v.name == mount.name).expect("the mount's volume");
    let map_name = volume.config_map.as_ref().map(|c| c.name.clone()).expect("a ConfigMap volume");
    let map = m
        .config_maps
        .iter()
        .find(|c| name(*c) == map_name && c.metadata.namespace.as_deref() == Some(&namespace))
        .expect("the ConfigMap exists in the namespace");
    let file_name = config_path.file_name().unwrap().to_str().unwrap();
    let toml_text = map.data.as_ref().and_then(|d| d.get(file_name)).expect("the ConfigMap has the file");
    let config = kube_sync_config(toml_text);

    // Probes reach the admin listener on the pod IP.
    let admin_port = config.admin_listen.port();
    assert!(!config.admin_listen.ip().is_loopback(), "the kubelet cannot probe a loopback listener");
    let ports = container.ports.as_deref().unwrap_or_default();
    let port_of = |p: &IntOrString| match p {
        IntOrString::Int(n) => *n,
        IntOrString::String(named) => {
            ports.iter().find(|cp| cp.name.as_deref() == Some(named)).map(|cp| cp.container_port).expect("named port")
        }
    };
    for (what, probe) in [("liveness", &container.liveness_probe), ("readiness", &container.readiness_probe)] {
        let probe = probe.as_ref().unwrap_or_else(|| panic!("a {what} probe"));
        let http = probe.http_get.as_ref().unwrap_or_else(|| panic!("an HTTP {what} probe"));
        assert_eq!(port_of(&http.port), i32::from(admin_port), "{what} probe on the admin port");
    }

    let resources = container.resources.as_ref().expect("resources");
    let limits = resources.limits.as_ref().expect("limits");
    let requests = resources.requests.as_ref().expect("requests");
    for key in ["cpu", "memory"] {
        assert!(limits.contains_key(key) && requests.contains_key(key), "{key} request and limit");
    }
    let security = container.security_context.as_ref().expect("a security context");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
}

/// The `[kube_sync]` section as the daemon reads it, and the other sections sane.
fn kube_sync_config(text: &str) -> Config {
    let file: toml::Table = toml::from_str(text).expect("the config file is TOML");
    let section = file.get("kube_sync").cloned().expect("a [kube_sync] section");
    let config: Config = section.try_into().expect("[kube_sync] deserializes into the daemon's Config");
    config.validate().expect("[kube_sync] is valid");
    assert!(config.kubeconfig.is_none(), "in the cluster the service account is used");
    let url = file.get("redis").and_then(|r| r.get("url")).and_then(|u| u.as_str()).expect("[redis] url");
    url.parse::<RedisEndpoint>().expect("a valid redis url");
    config
}
