//! SPEC §3 steps 1, 2, 6, 7, 8 through real sockets, a real redis-server and real backends.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_test_support::eventually;

fn config(default_backend: Option<String>) -> Config {
    Config { default_backend, ..Config::default() }
}

#[tokio::test]
async fn healthz_on_any_host_and_without_host() {
    let proxy = Proxy::start(config(None)).await;
    let got = get(proxy.http, "whatever.example", "/.well-known/healthz", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "proxy ok!"));
    assert!(got.header("content-type").unwrap().starts_with("text/plain"));
    let raw = raw(proxy.http, b"GET /.well-known/healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert!(raw.ends_with("proxy ok!"), "{raw}");
}

#[tokio::test]
async fn missing_host_is_400() {
    let backend = Backend::echo("default").await;
    let proxy = Proxy::start(config(Some(backend.url()))).await;
    let raw = raw(proxy.http, b"GET / HTTP/1.0\r\nUser-Agent: t\r\n\r\n").await;
    assert_eq!(status_of(&raw), 400, "{raw}");
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn tool_host_routes_by_longest_pattern() {
    let (a, b, c, default) =
        (Backend::echo("a").await, Backend::echo("b").await, Backend::echo("c").await, Backend::echo("default").await);
    let proxy = Proxy::start(config(Some(default.url()))).await;
    proxy.set_route("foo", ".*", &a.url()).await;
    proxy.set_route("foo", "/api.*", &b.url()).await;
    proxy.set_route("foo", "/api/v2.*", &c.url()).await;
    proxy.set_route("bar", "/only.*", &a.url()).await;

    let got = get(proxy.http, "foo.toolforge.org", "/x?y=1", &[]).await;
    assert_eq!(got.status, 200);
    assert!(got.body.starts_with("backend=a\n"), "{}", got.body);
    assert!(got.body.contains("\nuri=/x?y=1\n"), "URI unchanged: {}", got.body);
    assert!(get(proxy.http, "foo.toolforge.org", "/api/v1", &[]).await.body.starts_with("backend=b\n"));
    assert!(get(proxy.http, "FOO.Toolforge.org:80", "/api/v2/q", &[]).await.body.starts_with("backend=c\n"));
    // No pattern matches: default backend, URI unchanged.
    let got = get(proxy.http, "bar.toolforge.org", "/elsewhere", &[]).await;
    assert!(got.body.starts_with("backend=default\n") && got.body.contains("uri=/elsewhere\n"), "{}", got.body);
    // Unknown tool: default backend.
    assert!(get(proxy.http, "nope.toolforge.org", "/", &[]).await.body.starts_with("backend=default\n"));
    // Two labels before the domain is not a tool host: legacy rules apply to the path.
    let got = get(proxy.http, "x.foo.toolforge.org", "/foo/api/v2", &[]).await;
    assert!(got.body.starts_with("backend=c\n"), "{}", got.body);
}

#[tokio::test]
async fn legacy_paths_redirect_route_admin_and_default() {
    let (tool, admin, default) =
        (Backend::echo("tool").await, Backend::echo("admin").await, Backend::echo("default").await);
    let proxy = Proxy::start(config(Some(default.url()))).await;
    proxy.set_route("foo", "/api.*", &tool.url()).await;
    proxy.set_route("admin", "^/static/.*", &admin.url()).await;
    // A tool with a canonical redirect.
    let mut c = proxy.redis();
    redis::cmd("HSET").arg("prefix:moved").arg(".*").arg(tool.url()).query::<()>(&mut c).unwrap();
    redis::cmd("HSET").arg("redirect:moved").arg(".*").arg("moved.toolforge.org").query::<()>(&mut c).unwrap();
    proxy.wait_for("moved", |r| r.is_some_and(|r| r.canonical_redirect())).await;

    let got = get(proxy.http, "tools.wmflabs.org", "/moved/some/page?a=1&b=2", &[]).await;
    assert_eq!(got.status, 307);
    assert_eq!(got.header("location"), Some("https://moved.toolforge.org/some/page?a=1&b=2"));
    let got = get(proxy.http, "tools.wmflabs.org", "/moved", &[]).await;
    assert_eq!((got.status, got.header("location")), (307, Some("https://moved.toolforge.org/")));

    // rest "/api/x" matches "/api.*"; the backend sees the URI unchanged.
    let got = get(proxy.http, "tools.wmflabs.org", "/foo/api/x?q", &[]).await;
    assert!(got.body.starts_with("backend=tool\n") && got.body.contains("uri=/foo/api/x?q\n"), "{}", got.body);
    // rest does not match: prefix:admin is matched against the whole path.
    let got = get(proxy.http, "tools.wmflabs.org", "/static/logo.png", &[]).await;
    assert!(got.body.starts_with("backend=admin\n") && got.body.contains("uri=/static/logo.png\n"), "{}", got.body);
    // nothing: default backend.
    assert!(get(proxy.http, "tools.wmflabs.org", "/foo/other", &[]).await.body.starts_with("backend=default\n"));
    assert!(get(proxy.http, "tools.wmflabs.org", "/", &[]).await.body.starts_with("backend=default\n"));
    // The bare canonical domain is "any other host" too.
    assert!(get(proxy.http, "toolforge.org", "/foo/api", &[]).await.body.starts_with("backend=tool\n"));
}

#[tokio::test]
async fn no_default_backend_gives_no_webservice_page() {
    let proxy = Proxy::start(config(None)).await;
    for (host, path) in [("foo.toolforge.org", "/"), ("tools.wmflabs.org", "/foo/"), ("example.org", "/")] {
        let got = get(proxy.http, host, path, &[]).await;
        assert_eq!(got.status, 503, "{host}{path}");
        assert!(got.body.contains("No webservice"), "{}", got.body);
        assert!(got.header("content-type").unwrap().starts_with("text/html"));
    }
}

#[tokio::test]
async fn redis_changes_become_routable_quickly() {
    let (one, two) = (Backend::echo("one").await, Backend::echo("two").await);
    let proxy = Proxy::start(config(None)).await;
    let mut c = proxy.redis();
    let started = Instant::now();
    redis::cmd("HSET").arg("prefix:live").arg(".*").arg(one.url()).query::<()>(&mut c).unwrap();
    let addr = proxy.http;
    eventually(Duration::from_secs(5), "new route served", || async move {
        get(addr, "live.toolforge.org", "/", &[]).await.body.starts_with("backend=one\n").then_some(())
    })
    .await;
    eprintln!("new route served after {:?}", started.elapsed());
    let started = Instant::now();
    redis::cmd("HSET").arg("prefix:live").arg(".*").arg(two.url()).query::<()>(&mut c).unwrap();
    eventually(Duration::from_secs(5), "changed route served", || async move {
        get(addr, "live.toolforge.org", "/", &[]).await.body.starts_with("backend=two\n").then_some(())
    })
    .await;
    eprintln!("changed route served after {:?}", started.elapsed());
    redis::cmd("DEL").arg("prefix:live").query::<()>(&mut c).unwrap();
    eventually(Duration::from_secs(5), "deleted route gone", || async move {
        (get(addr, "live.toolforge.org", "/", &[]).await.status == 503).then_some(())
    })
    .await;
}

#[tokio::test]
async fn list_api_format() {
    let backend = Backend::echo("b").await;
    let proxy = Proxy::start(config(None)).await;
    proxy.set_route("zeta", ".*", &backend.url()).await;
    proxy.set_route("alpha", "/x.*", &backend.url()).await;
    let got = get(proxy.list, "anything", "/list", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(json, serde_json::json!({"alpha": {"status": "active"}, "zeta": {"status": "active"}}));
    let age: u64 = got.header("x-route-table-age").unwrap().parse().unwrap();
    assert!(age < 60);
    let got = get(proxy.list, "anything", "/other", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (404, "Page not found\n"));
    let got = get(proxy.list, "anything", "/", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (404, "Page not found\n"));
}

#[tokio::test]
async fn metrics_and_access_log() {
    let backend = Backend::echo("b").await;
    let log = std::env::temp_dir().join(format!("proxy-access-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let proxy = Proxy::start(Config { access_log: log.display().to_string(), ..config(None) }).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    assert_eq!(get(proxy.http, "foo.toolforge.org", "/logged?x=1", &[]).await.status, 200);
    assert_eq!(get(proxy.http, "none.toolforge.org", "/", &[]).await.status, 503);
    let line = eventually(Duration::from_secs(5), "access log lines", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { (text.lines().count() >= 2).then_some(text) }
    })
    .await;
    let first = line.lines().next().unwrap();
    assert!(first.starts_with("127.0.0.1 foo.toolforge.org \"GET /logged?x=1\" 200 "), "{first}");
    assert!(
        first.contains(&format!("upstream={}", backend.url())) && first.contains(" tool=foo request_id="),
        "{first}"
    );
    assert!(line.lines().nth(1).unwrap().contains("\" 503 "), "{line}");

    let metrics = eventually(Duration::from_secs(5), "cache gauges", || {
        let text = proxy.metrics_text();
        async move { text.contains("dynamicproxy_proxy_routes_in_cache 1\n").then_some(text) }
    })
    .await;
    assert!(metrics.contains("dynamicproxy_proxy_requests_total{class=\"2xx\"} 1"), "{metrics}");
    assert!(metrics.contains("dynamicproxy_proxy_requests_total{class=\"5xx\"} 1"), "{metrics}");
    assert!(metrics.contains("dynamicproxy_proxy_upstream_response_seconds_count 1"), "{metrics}");
    assert!(metrics.contains("dynamicproxy_proxy_redis_connected 1"), "{metrics}");
    let _ = std::fs::remove_file(&log);
}
