//! Pages that say why: each error page names the reason, the tool and the
//! request id with a hint for the tool's maintainers; `X-Request-Id` goes to
//! the backend, back to the client and into the access log; override pages
//! get their template variables filled in, escaped.

mod common;

use std::time::Duration;

use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_test_support::eventually;

/// A fresh directory of this test process.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dynamicproxy-pages-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Asserts that `got` is the page of `reason` for `tool`, naming its request id.
fn assert_page_says_why(got: &Got, status: u16, reason: &str, tool: &str, hint: &str) {
    assert_eq!(got.status, status, "{got:?}");
    assert_eq!(got.header("x-dynamicproxy-reason"), Some(reason));
    let id = got.header("x-request-id").expect("X-Request-Id on an error page");
    assert!(!id.is_empty());
    for needle in [format!("<code>{reason}</code>"), format!("<code>{tool}</code>"), format!("<code>{id}</code>")] {
        assert!(got.body.contains(&needle), "{needle} missing from the {reason} page: {}", got.body);
    }
    assert!(got.body.contains(hint), "hint {hint:?} missing from the {reason} page: {}", got.body);
}

#[tokio::test]
async fn error_pages_name_the_reason_the_tool_and_the_request_id() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("gone", ".*", &format!("http://{closed}")).await;

    let got = get(proxy.http, "nothing.toolforge.org", "/", &[]).await;
    assert_page_says_why(&got, 503, "no-route", "nothing", "can start it with `webservice start`");
    let got = get(proxy.http, "tools.wmflabs.org", "/nothing/x", &[]).await;
    assert_page_says_why(&got, 503, "no-route", "nothing", "webservice start");

    let got = get(proxy.http, "gone.toolforge.org", "/", &[("x-request-id", "trace-me-42")]).await;
    assert_eq!(got.header("x-request-id"), Some("trace-me-42"), "the client's id is kept");
    assert_page_says_why(&got, 502, "backend-unreachable", "gone", "webservice restart");

    proxy.handle.set_maintenance(true);
    let got = get(proxy.http, "gone.toolforge.org", "/", &[]).await;
    assert_page_says_why(&got, 503, "maintenance", "gone", "nothing is wrong with the tool");
    proxy.handle.set_maintenance(false);

    // Two requests get two different ids.
    let a = get(proxy.http, "nothing.toolforge.org", "/", &[]).await;
    let b = get(proxy.http, "nothing.toolforge.org", "/", &[]).await;
    assert_ne!(a.header("x-request-id"), b.header("x-request-id"));
}

#[tokio::test]
async fn the_backend_and_the_access_log_see_the_id_the_client_gets_back() {
    let backend = Backend::echo("echo").await;
    let dir = scratch_dir("log");
    let log = dir.join("access.log");
    let config = Config { access_log: log.display().to_string(), ..Config::default() };
    let proxy = Proxy::start(config).await;
    proxy.set_route("echo", ".*", &backend.url()).await;

    let got = get(proxy.http, "echo.toolforge.org", "/", &[]).await;
    assert_eq!(got.status, 200);
    let id = got.header("x-request-id").expect("X-Request-Id returned").to_string();
    assert_eq!(id.len(), 16, "a short generated id: {id}");
    assert_eq!(got.echoed_all("x-request-id"), [id.as_str()], "the backend got the same id");

    let got = get(proxy.http, "echo.toolforge.org", "/", &[("x-request-id", "client-chosen")]).await;
    assert_eq!(got.header("x-request-id"), Some("client-chosen"));
    assert_eq!(got.echoed_all("x-request-id"), ["client-chosen"]);

    eventually(Duration::from_secs(5), "access log lines with the ids", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text.contains(&format!("request_id={id}")) && text.contains("request_id=client-chosen");
        async move { found.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn override_pages_get_their_variables_filled_and_escaped() {
    let dir = scratch_dir("override");
    std::fs::write(dir.join("nowebservice.html"), "<p>{{reason}}|{{ tool }}|{{request_id}}|{{hint}}|{{unknown}}</p>\n")
        .unwrap();
    let config = Config { error_pages: Some(dir.clone()), ..Config::default() };
    let proxy = Proxy::start(config).await;

    let got = get(proxy.http, "nothing.toolforge.org", "/", &[("x-request-id", "<b>&'\"")]).await;
    assert_eq!(got.status, 503);
    assert_eq!(got.header("x-request-id"), Some("<b>&'\""));
    assert_eq!(
        got.body,
        "<p>no-route|nothing|&lt;b&gt;&amp;&#39;&quot;|the tool&#39;s webservice is not running: its \
         maintainers can start it with `webservice start`.|{{unknown}}</p>\n"
    );
}
