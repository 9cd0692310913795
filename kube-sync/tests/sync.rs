//! kube-sync end to end: a fake Kubernetes API server over real HTTP, a real
//! redis-server, and the route table as a user of Redis sees it.

mod fake_apiserver;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use dynamicproxy_kube_sync::{Config, Error, Metrics, client_from_config, run};
use dynamicproxy_redis::RouteStore;
use dynamicproxy_test_support::{RedisServer, eventually};
use fake_apiserver::{FakeApiServer, GoneStyle, service, with_label, without_label};
use prometheus_client::registry::Registry;
use redis::Commands;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
/// Where kube-sync records the backend it wrote for each `k8s_services` member.
const WRITTEN: &str = "k8s_services_written";

/// kube-sync running in the test's runtime.
struct KubeSync {
    metrics: Arc<Metrics>,
    registry: Registry,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl KubeSync {
    fn start(api: &FakeApiServer, redis: &RedisServer, config: Config) -> Self {
        Self::start_with_client(api.client(), redis, config)
    }

    fn start_with_client(client: kube::Client, redis: &RedisServer, config: Config) -> Self {
        // Logs go to the test's captured output, shown when it fails.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,dynamicproxy_kube_sync=debug"))
            .with_test_writer()
            .try_init();
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let store = Arc::new(RouteStore::new(redis.url().parse().expect("redis url")));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(config, client, store, metrics.clone(), shutdown.clone()));
        KubeSync { metrics, registry, shutdown, task }
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode metrics");
        text
    }

    fn watch_errors(&self) -> u64 {
        let text = self.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix("kube_sync_watch_errors_total "))
            .and_then(|n| n.trim().parse().ok())
            .expect("kube_sync_watch_errors_total is exported")
    }

    /// Stops it and checks it ends cleanly (it never ends by itself).
    async fn stop(self) {
        assert!(!self.task.is_finished(), "kube-sync exited on its own");
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("kube-sync stops within 15 s of shutdown")
            .expect("kube-sync task did not panic");
        assert!(result.is_ok(), "kube-sync returned {result:?}");
    }
}

fn hgetall(redis: &RedisServer, key: &str) -> BTreeMap<String, String> {
    redis.client().hgetall(key).unwrap_or_default()
}

fn members(redis: &RedisServer) -> BTreeSet<String> {
    redis.client().smembers("k8s_services").unwrap_or_default()
}

fn routes(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Waits until `key` holds exactly `expected`.
async fn wait_routes(redis: &RedisServer, key: &str, expected: &[(&str, &str)]) {
    let expected = routes(expected);
    let what = format!("{key} = {expected:?}");
    eventually(WAIT, &what, || {
        let now = hgetall(redis, key);
        let ok = now == expected;
        async move { ok.then_some(()) }
    })
    .await;
}

/// Waits until `k8s_services` holds exactly `expected`.
async fn wait_members(redis: &RedisServer, expected: &[&str]) {
    let expected = set(expected);
    let what = format!("k8s_services = {expected:?}");
    eventually(WAIT, &what, || {
        let ok = members(redis) == expected;
        async move { ok.then_some(()) }
    })
    .await;
}

/// Waits until the metrics text holds every one of `lines`.
async fn wait_metrics(kube_sync: &KubeSync, lines: &[&str]) {
    let what = format!("metrics {lines:?}");
    eventually(WAIT, &what, || {
        let text = kube_sync.metrics_text();
        let ok = lines.iter().all(|l| text.lines().any(|t| t == *l));
        async move { ok.then_some(()) }
    })
    .await;
}

async fn wait_synced(kube_sync: &KubeSync) {
    eventually(WAIT, "a completed sync", || {
        let ok = kube_sync.metrics.last_successful_sync().is_some();
        async move { ok.then_some(()) }
    })
    .await;
}

fn three_services(api: &FakeApiServer) {
    api.apply(service("tool-foo", "foo", "10.0.0.1", &[("", 8000)]));
    api.apply(with_label(
        service("tool-bar", "bar", "10.0.0.2", &[("metrics", 9100), ("http", 8080)]),
        "toollabs-proxy-path",
        "api",
    ));
    api.apply(service("tool-baz", "baz", "10.0.0.3", &[("web", 80), ("other", 81)]));
    // Not selected: no toolforge=tool label.
    api.apply(without_label(service("kube-system", "dns", "10.0.0.10", &[("dns", 53)]), "toolforge"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_writes_every_selected_service() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    three_services(&api);
    let kube_sync = KubeSync::start(&api, &redis, Config::default());

    wait_members(&redis, &["tool-foo/foo/.*", "tool-bar/bar/api.*", "tool-baz/baz/.*"]).await;
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.1:8000")]).await;
    wait_routes(&redis, "prefix:bar", &[("/api.*", "http://10.0.0.2:8080")]).await;
    wait_routes(&redis, "prefix:baz", &[(".*", "http://10.0.0.3:80")]).await;
    assert!(hgetall(&redis, "prefix:dns").is_empty(), "a Service outside the selector got a route");
    wait_synced(&kube_sync).await;

    let requests = api.requests();
    assert!(requests[0].contains("labelSelector=toolforge%3Dtool"), "{requests:?}");
    wait_metrics(
        &kube_sync,
        &[
            "kube_sync_events_total{type=\"listed\"} 3",
            "kube_sync_events_total{type=\"relisted\"} 1",
            "kube_sync_owned_routes 3",
            "kube_sync_redis_connected 1",
        ],
    )
    .await;
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_add_modify_and_delete_routes() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    api.apply(service("tool-foo", "foo", "10.0.0.1", &[("", 8000)]));
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    wait_members(&redis, &["tool-foo/foo/.*"]).await;
    wait_synced(&kube_sync).await;

    // ADDED
    api.apply(service("tool-new", "new", "10.0.0.5", &[("http", 8000)]));
    wait_routes(&redis, "prefix:new", &[(".*", "http://10.0.0.5:8000")]).await;
    wait_members(&redis, &["tool-foo/foo/.*", "tool-new/new/.*"]).await;

    // A BOOKMARK moves the watch along without a relist.
    api.bookmark();

    // MODIFIED: new cluster IP and port.
    api.apply(service("tool-new", "new", "10.0.0.6", &[("http", 9000)]));
    wait_routes(&redis, "prefix:new", &[(".*", "http://10.0.0.6:9000")]).await;

    // DELETED
    assert!(api.delete("tool-new", "new"));
    wait_members(&redis, &["tool-foo/foo/.*"]).await;
    wait_routes(&redis, "prefix:new", &[]).await;
    assert_eq!(hgetall(&redis, "prefix:foo"), routes(&[(".*", "http://10.0.0.1:8000")]));

    // A Service whose labels stop matching the selector leaves like a deletion.
    api.apply(without_label(service("tool-foo", "foo", "10.0.0.1", &[("", 8000)]), "toolforge"));
    wait_members(&redis, &[]).await;
    wait_routes(&redis, "prefix:foo", &[]).await;

    assert_eq!(api.list_count(), 1, "no relist was needed: {:?}", api.requests());
    wait_metrics(
        &kube_sync,
        &[
            "kube_sync_events_total{type=\"added\"} 1",
            "kube_sync_events_total{type=\"modified\"} 1",
            "kube_sync_events_total{type=\"deleted\"} 2",
            "kube_sync_owned_routes 0",
        ],
    )
    .await;
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_path_label_moves_the_route() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    let base = service("tool-foo", "foo", "10.0.0.1", &[("", 8000)]);
    api.apply(base.clone());
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.1:8000")]).await;

    api.apply(with_label(base.clone(), "toollabs-proxy-path", "api"));
    wait_routes(&redis, "prefix:foo", &[("/api.*", "http://10.0.0.1:8000")]).await;
    wait_members(&redis, &["tool-foo/foo/api.*"]).await;

    api.apply(with_label(base.clone(), "toollabs-proxy-path", "v2"));
    wait_routes(&redis, "prefix:foo", &[("/v2.*", "http://10.0.0.1:8000")]).await;
    wait_members(&redis, &["tool-foo/foo/v2.*"]).await;

    api.apply(base);
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.1:8000")]).await;
    wait_members(&redis, &["tool-foo/foo/.*"]).await;
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_deleted_while_down_is_removed_and_others_are_left_alone() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    {
        let mut c = redis.client();
        // Left by an earlier run: a Service that has since been deleted.
        let _: () = c.hset("prefix:gone", ".*", "http://10.0.0.99:8000").unwrap();
        let _: () = c.sadd("k8s_services", "tool-gone/gone/.*").unwrap();
        let _: () = c.hset(WRITTEN, "tool-gone/gone/.*", "http://10.0.0.99:8000").unwrap();
        // A grid registration of the same tool, and of another tool: not ours.
        let _: () = c.hset("prefix:gone", "/grid.*", "http://tools-webgrid-1:33555").unwrap();
        let _: () = c.hset("prefix:gridtool", ".*", "http://tools-webgrid-2:41000").unwrap();
        let _: () = c.hset("redirect:gridtool", ".*", "gridtool.toolforge.org").unwrap();
        // An operator's fallback route.
        let _: () = c.hset("prefix:admin", "/.*", "http://admin.example:80").unwrap();
        // A member in an unknown format: not understood, never deleted.
        let _: () = c.sadd("k8s_services", "garbage").unwrap();
        // A route of a live Service, written by an earlier run, with a stale backend.
        let _: () = c.hset("prefix:foo", ".*", "http://10.0.0.50:8000").unwrap();
        let _: () = c.hset("prefix:foo", "/legacy.*", "http://tools-webgrid-1:33556").unwrap();
        let _: () = c.sadd("k8s_services", "tool-foo/foo/.*").unwrap();
        let _: () = c.hset(WRITTEN, "tool-foo/foo/.*", "http://10.0.0.50:8000").unwrap();
    }
    api.apply(service("tool-foo", "foo", "10.0.0.1", &[("", 8000)]));
    let kube_sync = KubeSync::start(&api, &redis, Config::default());

    wait_members(&redis, &["tool-foo/foo/.*", "garbage"]).await;
    wait_routes(&redis, "prefix:gone", &[("/grid.*", "http://tools-webgrid-1:33555")]).await;
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.1:8000"), ("/legacy.*", "http://tools-webgrid-1:33556")])
        .await;
    assert_eq!(hgetall(&redis, "prefix:gridtool"), routes(&[(".*", "http://tools-webgrid-2:41000")]));
    assert_eq!(hgetall(&redis, "redirect:gridtool"), routes(&[(".*", "gridtool.toolforge.org")]));
    assert_eq!(hgetall(&redis, "prefix:admin"), routes(&[("/.*", "http://admin.example:80")]));

    // Deleting the live Service removes only its own route.
    api.delete("tool-foo", "foo");
    wait_routes(&redis, "prefix:foo", &[("/legacy.*", "http://tools-webgrid-1:33556")]).await;
    wait_members(&redis, &["garbage"]).await;
    assert_eq!(hgetall(&redis, "prefix:gridtool"), routes(&[(".*", "http://tools-webgrid-2:41000")]));
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_mid_watch_are_retried_and_changes_caught_up() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    three_services(&api);
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    wait_members(&redis, &["tool-foo/foo/.*", "tool-bar/bar/api.*", "tool-baz/baz/.*"]).await;
    wait_synced(&kube_sync).await;

    // 500s: open watches are cut and every request fails for a while.
    api.set_failing(true);
    let failed_before = api.requests().len();
    api.apply(service("tool-new", "new", "10.0.0.7", &[("", 8000)]));
    api.delete("tool-baz", "baz");
    eventually(WAIT, "kube-sync retrying against the failing server", || {
        let retried = api.requests().len() > failed_before;
        async move { retried.then_some(()) }
    })
    .await;
    assert!(hgetall(&redis, "prefix:foo").contains_key(".*"), "routes must survive an API outage");
    api.set_failing(false);
    wait_members(&redis, &["tool-foo/foo/.*", "tool-bar/bar/api.*", "tool-new/new/.*"]).await;
    wait_routes(&redis, "prefix:baz", &[]).await;
    wait_routes(&redis, "prefix:new", &[(".*", "http://10.0.0.7:8000")]).await;

    // The API server unreachable altogether (connections refused), then back.
    api.go_offline().await;
    api.apply(service("tool-later", "later", "10.0.0.8", &[("", 8000)]));
    let errors_before = kube_sync.watch_errors();
    eventually(WAIT, "a reconnect attempt failing", || {
        let failed = kube_sync.watch_errors() > errors_before;
        async move { failed.then_some(()) }
    })
    .await;
    api.go_online().await;
    wait_routes(&redis, "prefix:later", &[(".*", "http://10.0.0.8:8000")]).await;
    assert!(hgetall(&redis, "prefix:foo").contains_key(".*"));

    assert!(kube_sync.watch_errors() >= 2, "API errors are counted");
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_watch_relists_and_reconciles() {
    for style in [GoneStyle::ErrorEvent, GoneStyle::HttpStatus] {
        let api = FakeApiServer::start().await;
        api.set_gone_style(style);
        let redis = RedisServer::start();
        three_services(&api);
        let kube_sync = KubeSync::start(&api, &redis, Config::default());
        wait_members(&redis, &["tool-foo/foo/.*", "tool-bar/bar/api.*", "tool-baz/baz/.*"]).await;
        wait_synced(&kube_sync).await;
        assert_eq!(api.list_count(), 1);

        // While kube-sync cannot watch, a Service is deleted and the history
        // the watch would resume from is compacted away: only a relist can tell.
        api.set_failing(true);
        api.delete("tool-baz", "baz");
        api.apply(service("tool-foo", "foo", "10.0.0.11", &[("", 8000)]));
        api.compact();
        api.set_failing(false);

        wait_members(&redis, &["tool-foo/foo/.*", "tool-bar/bar/api.*"]).await;
        wait_routes(&redis, "prefix:baz", &[]).await;
        wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.11:8000")]).await;
        assert!(api.list_count() >= 2, "{style:?}: no relist in {:?}", api.requests());
        eventually(WAIT, "the relist counted", || {
            let n = kube_sync.metrics.events(dynamicproxy_kube_sync::metrics::EventType::Relisted);
            async move { (n >= 2).then_some(()) }
        })
        .await;
        kube_sync.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_cut_short_deletes_nothing() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    // More than one page (kube lists 500 at a time).
    for i in 0..600 {
        api.apply(service(&format!("tool-t{i}"), &format!("t{i}"), "10.0.1.1", &[("", 8000 + (i % 100) as u16)]));
    }
    {
        // Owned routes of Services that do not exist: a complete list removes them.
        let mut c = redis.client();
        let _: () = c.hset("prefix:stale", ".*", "http://10.0.0.99:8000").unwrap();
        let _: () = c.sadd("k8s_services", "tool-stale/stale/.*").unwrap();
        let _: () = c.hset(WRITTEN, "tool-stale/stale/.*", "http://10.0.0.99:8000").unwrap();
    }
    api.set_fail_continue(true);
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    eventually(WAIT, "two lists failing on their second page", || {
        let failed = api.requests().iter().filter(|r| r.contains("continue=")).count();
        async move { (failed >= 2).then_some(()) }
    })
    .await;
    assert_eq!(members(&redis), set(&["tool-stale/stale/.*"]), "a cut-short list changed the owned set");
    assert_eq!(hgetall(&redis, "prefix:stale"), routes(&[(".*", "http://10.0.0.99:8000")]));
    assert!(kube_sync.metrics.last_successful_sync().is_none());

    api.set_fail_continue(false);
    wait_routes(&redis, "prefix:stale", &[]).await;
    eventually(WAIT, "600 owned routes", || {
        let n = members(&redis).len();
        async move { (n == 600).then_some(()) }
    })
    .await;
    wait_routes(&redis, "prefix:t599", &[(".*", "http://10.0.1.1:8099")]).await;

    // The same on a relist: a cut-short relist keeps every route.
    api.set_fail_continue(true);
    api.set_failing(true);
    api.delete("tool-t0", "t0");
    api.compact();
    api.set_failing(false);
    let failed_before = api.requests().iter().filter(|r| r.contains("continue=")).count();
    eventually(WAIT, "a relist failing on its second page", || {
        let failed = api.requests().iter().filter(|r| r.contains("continue=")).count();
        async move { (failed > failed_before).then_some(()) }
    })
    .await;
    assert_eq!(members(&redis).len(), 600, "a cut-short relist deleted routes");
    api.set_fail_continue(false);
    eventually(WAIT, "the deleted Service removed after a complete relist", || {
        let n = members(&redis).len();
        async move { (n == 599).then_some(()) }
    })
    .await;
    wait_routes(&redis, "prefix:t0", &[]).await;
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_holds_changes_until_redis_is_back() {
    let api = FakeApiServer::start().await;
    let mut redis = RedisServer::start();
    three_services(&api);
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    wait_members(&redis, &["tool-foo/foo/.*", "tool-bar/bar/api.*", "tool-baz/baz/.*"]).await;
    wait_synced(&kube_sync).await;

    redis.stop();
    api.apply(service("tool-new", "new", "10.0.0.7", &[("", 8000)]));
    api.delete("tool-baz", "baz");
    eventually(WAIT, "kube-sync noticing Redis is down", || {
        let down = kube_sync.metrics_text().contains("kube_sync_redis_connected 0");
        async move { down.then_some(()) }
    })
    .await;
    assert!(kube_sync.metrics.events(dynamicproxy_kube_sync::metrics::EventType::Deleted) >= 1);

    // Redis comes back empty (restart without persistence): everything is rewritten.
    redis.restart();
    wait_members(&redis, &["tool-foo/foo/.*", "tool-bar/bar/api.*", "tool-new/new/.*"]).await;
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.1:8000")]).await;
    wait_routes(&redis, "prefix:bar", &[("/api.*", "http://10.0.0.2:8080")]).await;
    wait_routes(&redis, "prefix:new", &[(".*", "http://10.0.0.7:8000")]).await;
    assert!(hgetall(&redis, "prefix:baz").is_empty());
    eventually(WAIT, "redis reported connected again", || {
        let up = kube_sync.metrics_text().contains("kube_sync_redis_connected 1");
        async move { up.then_some(()) }
    })
    .await;
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_redis_is_down() {
    let api = FakeApiServer::start().await;
    let mut redis = RedisServer::start();
    redis.stop();
    three_services(&api);
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    eventually(WAIT, "the list done while Redis is down", || {
        let n = kube_sync.metrics.events(dynamicproxy_kube_sync::metrics::EventType::Relisted);
        async move { (n >= 1).then_some(()) }
    })
    .await;
    redis.restart();
    wait_members(&redis, &["tool-foo/foo/.*", "tool-bar/bar/api.*", "tool-baz/baz/.*"]).await;
    wait_synced(&kube_sync).await;
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_and_portless_services_get_no_route() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    api.apply(service("tool-headless", "headless", "None", &[("http", 8000)]));
    api.apply(service("tool-noports", "noports", "10.0.0.3", &[]));
    let mut external = service("tool-ext", "ext", "", &[("", 80)]);
    external["spec"] = serde_json::json!({"type": "ExternalName", "externalName": "example.org"});
    api.apply(external);
    api.apply(service("tool-foo", "foo", "10.0.0.1", &[("", 8000)]));
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    wait_members(&redis, &["tool-foo/foo/.*"]).await;
    wait_synced(&kube_sync).await;
    for tool in ["headless", "noports", "ext"] {
        assert!(hgetall(&redis, &format!("prefix:{tool}")).is_empty(), "{tool} got a route");
    }
    wait_metrics(&kube_sync, &["kube_sync_skipped_services 3"]).await;

    // A routed Service turned headless loses its route; back to a cluster IP, it returns.
    api.apply(service("tool-foo", "foo", "None", &[("", 8000)]));
    wait_members(&redis, &[]).await;
    wait_routes(&redis, "prefix:foo", &[]).await;
    api.apply(service("tool-foo", "foo", "10.0.0.2", &[("", 8000)]));
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.2:8000")]).await;
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_of_the_same_name_in_two_namespaces_share_the_route() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    api.apply(service("ns-a", "foo", "10.0.0.1", &[("", 8000)]));
    api.apply(service("ns-b", "foo", "10.0.0.2", &[("", 8000)]));
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    // One writer per route, chosen by namespace order, not by write timing.
    wait_members(&redis, &["ns-a/foo/.*"]).await;
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.1:8000")]).await;
    // When the first goes away, the other's route takes its place.
    api.delete("ns-a", "foo");
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.2:8000")]).await;
    wait_members(&redis, &["ns-b/foo/.*"]).await;
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_namespace_reconciles_only_its_own_routes() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    three_services(&api);
    {
        let mut c = redis.client();
        // Owned by an instance watching another namespace.
        let _: () = c.hset("prefix:other", ".*", "http://10.0.9.9:8000").unwrap();
        let _: () = c.sadd("k8s_services", "tool-other/other/.*").unwrap();
    }
    let config = Config { namespace: Some("tool-foo".into()), ..Config::default() };
    let kube_sync = KubeSync::start(&api, &redis, config);
    wait_members(&redis, &["tool-foo/foo/.*", "tool-other/other/.*"]).await;
    wait_synced(&kube_sync).await;
    assert!(hgetall(&redis, "prefix:bar").is_empty());
    assert_eq!(hgetall(&redis, "prefix:other"), routes(&[(".*", "http://10.0.9.9:8000")]));
    assert!(api.requests()[0].starts_with("/api/v1/namespaces/tool-foo/services?"), "{:?}", api.requests());
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_a_kubeconfig_file() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    api.apply(service("tool-foo", "foo", "10.0.0.1", &[("", 8000)]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, api.kubeconfig()).unwrap();
    let config = Config { kubeconfig: Some(path), ..Config::default() };
    let client = client_from_config(&config).await.expect("client from kubeconfig");
    let kube_sync = KubeSync::start_with_client(client, &redis, config);
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.1:8000")]).await;
    kube_sync.stop().await;

    let missing = Config { kubeconfig: Some(dir.path().join("nope")), ..Config::default() };
    let err = client_from_config(&missing).await.err().expect("a missing kubeconfig is an error").to_string();
    assert!(err.contains("nope"), "the error names the file: {err}");
    std::fs::write(dir.path().join("bad"), "clusters: [[[").unwrap();
    let bad = Config { kubeconfig: Some(dir.path().join("bad")), ..Config::default() };
    let err = client_from_config(&bad).await.err().expect("a broken kubeconfig is an error").to_string();
    assert!(err.contains("bad"), "the error names the file: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_refused_at_start() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    let config = Config { namespace: Some("Not A Namespace".into()), ..Config::default() };
    let kube_sync = KubeSync::start(&api, &redis, config);
    let result = tokio::time::timeout(WAIT, kube_sync.task).await.unwrap().unwrap();
    let err = result.expect_err("invalid namespace refused").to_string();
    assert!(err.contains("[kube_sync] namespace = \"Not A Namespace\""), "{err}");
    assert!(api.requests().is_empty());
}

/// The Service webservice-runner creates for a grid webservice: exactly these two labels.
fn grid_service(namespace: &str, name: &str, cluster_ip: &str) -> serde_json::Value {
    let mut svc = service(namespace, name, cluster_ip, &[("http", 8000)]);
    svc["metadata"]["labels"] = serde_json::json!({"toolforge": "tool", "webservice.toolforge.org/gridengine": "true"});
    svc
}

const GRID: &str = "http://172.16.1.2:33555";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_registration_is_never_taken_over_by_its_service() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    {
        let mut c = redis.client();
        // webservice-runner's registration (registerCanonical).
        let _: () = c.hset("prefix:gridtool", ".*", GRID).unwrap();
        let _: () = c.hset("redirect:gridtool", ".*", "gridtool.toolforge.org").unwrap();
    }
    api.apply(grid_service("tool-gridtool", "gridtool", "10.0.0.5"));
    api.apply(service("tool-foo", "foo", "10.0.0.1", &[("", 8000)]));
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.1:8000")]).await;
    wait_synced(&kube_sync).await;
    wait_metrics(&kube_sync, &["kube_sync_takeovers_refused_total 1"]).await;
    assert_eq!(hgetall(&redis, "prefix:gridtool"), routes(&[(".*", GRID)]));
    assert_eq!(members(&redis), set(&["tool-foo/foo/.*"]), "kube-sync claimed the grid route");

    // The Service changes: still not ours. Then it goes: the grid route stays.
    api.apply(grid_service("tool-gridtool", "gridtool", "10.0.0.6"));
    eventually(WAIT, "the modified grid Service refused again", || {
        let n = kube_sync.metrics.takeovers_refused();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    assert!(api.delete("tool-gridtool", "gridtool"));
    eventually(WAIT, "the deletion seen", || {
        let n = kube_sync.metrics.events(dynamicproxy_kube_sync::metrics::EventType::Deleted);
        async move { (n >= 1).then_some(()) }
    })
    .await;
    // Its own route still follows the Service: a new cluster IP, then deletion.
    api.apply(service("tool-foo", "foo", "10.0.0.2", &[("", 8000)]));
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.2:8000")]).await;
    api.delete("tool-foo", "foo");
    wait_routes(&redis, "prefix:foo", &[]).await;
    wait_members(&redis, &[]).await;
    assert_eq!(hgetall(&redis, "prefix:gridtool"), routes(&[(".*", GRID)]));
    assert_eq!(hgetall(&redis, "redirect:gridtool"), routes(&[(".*", "gridtool.toolforge.org")]));
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_rewritten_by_the_grid_is_neither_taken_back_nor_deleted() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    api.apply(service("tool-foo", "foo", "10.0.0.1", &[("", 8000)]));
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    wait_routes(&redis, "prefix:foo", &[(".*", "http://10.0.0.1:8000")]).await;
    wait_synced(&kube_sync).await;

    // The tool moves to the grid: webservice-runner registers over kube-sync's route.
    let _: () = redis.client().hset("prefix:foo", ".*", GRID).unwrap();
    api.apply(service("tool-foo", "foo", "10.0.0.2", &[("", 8000)]));
    wait_metrics(&kube_sync, &["kube_sync_takeovers_refused_total 1"]).await;
    assert_eq!(hgetall(&redis, "prefix:foo"), routes(&[(".*", GRID)]));
    assert_eq!(members(&redis), set(&[]), "a stale claim on the grid's route is kept");

    // A restarted kube-sync does not take it back either.
    kube_sync.stop().await;
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    wait_synced(&kube_sync).await;
    wait_metrics(&kube_sync, &["kube_sync_takeovers_refused_total 1"]).await;
    assert_eq!(hgetall(&redis, "prefix:foo"), routes(&[(".*", GRID)]));

    // The Service goes: the grid's route stays.
    api.delete("tool-foo", "foo");
    eventually(WAIT, "the deletion seen", || {
        let n = kube_sync.metrics.events(dynamicproxy_kube_sync::metrics::EventType::Deleted);
        async move { (n >= 1).then_some(()) }
    })
    .await;
    assert_eq!(hgetall(&redis, "prefix:foo"), routes(&[(".*", GRID)]));
    kube_sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_from_before_the_record_is_adopted_only_when_it_holds_the_services_backend() {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    {
        let mut c = redis.client();
        // Claimed in k8s_services by an earlier version, which kept no record of values.
        let _: () = c.hset("prefix:same", ".*", "http://10.0.0.1:8000").unwrap();
        let _: () = c.sadd("k8s_services", "tool-same/same/.*").unwrap();
        let _: () = c.hset("prefix:grid", ".*", GRID).unwrap();
        let _: () = c.sadd("k8s_services", "tool-grid/grid/.*").unwrap();
    }
    api.apply(service("tool-same", "same", "10.0.0.1", &[("", 8000)]));
    api.apply(service("tool-grid", "grid", "10.0.0.2", &[("", 8000)]));
    let kube_sync = KubeSync::start(&api, &redis, Config::default());
    wait_synced(&kube_sync).await;
    wait_metrics(&kube_sync, &["kube_sync_takeovers_refused_total 1"]).await;
    assert_eq!(hgetall(&redis, "prefix:grid"), routes(&[(".*", GRID)]));

    // The adopted route is kube-sync's from now on: it follows the Service.
    api.apply(service("tool-same", "same", "10.0.0.3", &[("", 8000)]));
    wait_routes(&redis, "prefix:same", &[(".*", "http://10.0.0.3:8000")]).await;
    api.delete("tool-same", "same");
    wait_routes(&redis, "prefix:same", &[]).await;
    kube_sync.stop().await;
}
