//! W3C Trace Context across the edge: the backend receives a valid
//! `traceparent` whose trace id is the one in the access log line; a valid
//! incoming trace is continued, an invalid one replaced.

mod common;

use std::time::Duration;

use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_proxy::trace_context::parse_traceparent;
use dynamicproxy_test_support::eventually;

const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn traced_proxy() -> (Proxy, Backend, std::path::PathBuf) {
    let log = std::env::temp_dir().join(format!(
        "dynamicproxy-trace-{}-{}.log",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    let proxy = Proxy::start(Config { access_log: log.display().to_string(), ..Config::default() }).await;
    let backend = Backend::echo("traced").await;
    proxy.set_route("traced", ".*", &backend.url()).await;
    (proxy, backend, log)
}

/// The access log line for `path`, once written.
async fn log_line(log: &std::path::Path, path: &str) -> String {
    let needle = format!("\"GET {path}\"");
    eventually(Duration::from_secs(5), "the access log line", || {
        let line =
            std::fs::read_to_string(log).ok().and_then(|t| t.lines().find(|l| l.contains(&needle)).map(String::from));
        async move { line }
    })
    .await
}

#[tokio::test]
async fn backend_gets_a_new_trace_matching_the_access_log() {
    let (proxy, _backend, log) = traced_proxy().await;
    let got = get(proxy.http, "traced.toolforge.org", "/fresh", &[("tracestate", "orphan=1")]).await;
    assert_eq!(got.status, 200);
    let sent = parse_traceparent(got.echoed("traceparent").expect("traceparent sent").as_bytes()).unwrap();
    assert_eq!(sent.flags, 0, "a new trace is not sampled: nothing is recorded");
    assert_eq!(got.echoed("tracestate"), None, "no tracestate without the traceparent it belongs to");
    let line = log_line(&log, "/fresh").await;
    assert!(line.contains(&format!("trace_id={}", hex(&sent.trace_id))), "{line}");
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn a_valid_incoming_trace_is_continued() {
    let (proxy, _backend, log) = traced_proxy().await;
    let headers = [("traceparent", VALID), ("tracestate", "congo=t61rcWkgMzE")];
    let got = get(proxy.http, "traced.toolforge.org", "/continued", &headers).await;
    let sent = parse_traceparent(got.echoed("traceparent").unwrap().as_bytes()).unwrap();
    assert_eq!(hex(&sent.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(sent.flags, 1);
    assert_ne!(hex(&sent.parent_id), "00f067aa0ba902b7", "the backend's parent is the proxy's span");
    assert_eq!(got.echoed("tracestate"), Some("congo=t61rcWkgMzE"));
    let line = log_line(&log, "/continued").await;
    assert!(line.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"), "{line}");
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn an_invalid_incoming_trace_is_replaced() {
    let (proxy, _backend, log) = traced_proxy().await;
    let zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    for (path, bad) in [("/zero", zero), ("/upper", &*VALID.to_uppercase()), ("/short", "00-4bf92f35-01")] {
        let got = get(proxy.http, "traced.toolforge.org", path, &[("traceparent", bad), ("tracestate", "a=b")]).await;
        let echoed = got.echoed("traceparent").unwrap();
        assert_ne!(echoed, bad);
        let sent = parse_traceparent(echoed.as_bytes()).unwrap();
        assert_ne!(hex(&sent.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(got.echoed("tracestate"), None);
        let line = log_line(&log, path).await;
        assert!(line.contains(&format!("trace_id={}", hex(&sent.trace_id))), "{line}");
    }
    let _ = std::fs::remove_file(&log);
}
