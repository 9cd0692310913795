//! The access log as logrotate and log shippers need it: JSON lines,
//! reopening the file by name, and lost lines counted in the metrics.
//! SIGUSR1 through the real binary is tested in the workspace's `tests/logrotate.rs`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_proxy::access_log::Format;
use dynamicproxy_test_support::eventually;

const WAIT: Duration = Duration::from_secs(5);

fn config(access_log: &Path, format: Format) -> Config {
    Config {
        access_log: access_log.display().to_string(),
        access_log_format: format,
        // The backends of these tests listen on loopback.
        denied_backend_networks: Vec::new(),
        ..Config::default()
    }
}

/// Waits until `path` holds at least `n` lines and returns them.
async fn lines(path: &Path, n: usize) -> Vec<String> {
    eventually(WAIT, &format!("{n} lines in {}", path.display()), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        async move { (lines.len() >= n).then_some(lines) }
    })
    .await
}

#[tokio::test]
async fn json_format_writes_one_object_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let backend = Backend::echo("b").await;
    let proxy = Proxy::start(config(&log, Format::Json)).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    assert_eq!(get(proxy.http, "foo.toolforge.org", "/a?q=%22x%22", &[]).await.status, 200);
    assert_eq!(get(proxy.http, "none.toolforge.org", "/", &[]).await.status, 503);

    let lines = lines(&log, 2).await;
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["host"], "foo.toolforge.org");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["uri"], "/a?q=%22x%22");
    assert_eq!(first["status"], 200);
    assert_eq!(first["upstream"], backend.url());
    assert_eq!(first["tool"], "foo");
    assert!(first["upstream_time"].as_f64().is_some() && first["total_time"].as_f64().is_some(), "{first}");
    let time = first["time"].as_str().unwrap();
    assert!(time.len() >= 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!((second["status"].as_u64(), second["upstream"].is_null()), (Some(503), true), "{second}");
}

#[tokio::test]
async fn reopen_after_rename_writes_to_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let backend = Backend::echo("b").await;
    let proxy = Proxy::start(config(&log, Format::Text)).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    assert_eq!(get(proxy.http, "foo.toolforge.org", "/before", &[]).await.status, 200);
    lines(&log, 1).await;

    std::fs::rename(&log, &rotated).unwrap();
    proxy.handle.reopen_access_log();
    // The reopened file exists before any new request: logrotate's `create` and a reopen agree.
    eventually(WAIT, "the access log recreated", || {
        let exists = log.exists();
        async move { exists.then_some(()) }
    })
    .await;
    assert_eq!(get(proxy.http, "foo.toolforge.org", "/after", &[]).await.status, 200);

    let new = lines(&log, 1).await;
    assert!(new[0].contains("\"GET /after\" 200"), "{new:?}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(old.lines().count(), 1, "{old}");
    assert!(old.contains("\"GET /before\" 200"), "{old}");
}

#[tokio::test]
async fn lines_lost_on_a_full_disk_are_counted() {
    let proxy = Proxy::start(config(Path::new("/dev/full"), Format::Text)).await;
    for _ in 0..3 {
        assert_eq!(get(proxy.http, "none.toolforge.org", "/", &[]).await.status, 503);
    }
    eventually(WAIT, "3 lost lines counted", || {
        let text = proxy.metrics_text();
        async move { text.contains("dynamicproxy_proxy_access_log_lost_lines_total 3\n").then_some(()) }
    })
    .await;
    // The proxy goes on serving.
    assert_eq!(get(proxy.http, "none.toolforge.org", "/", &[]).await.status, 503);
}
