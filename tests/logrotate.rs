//! logrotate's contract with the real `dynamicproxy proxy`: after the access
//! log is renamed, SIGUSR1 makes the proxy write to a new file by the old
//! name, and does not stop it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dynamicproxy_test_support::{RedisServer, eventually, free_port};

const WAIT: Duration = Duration::from_secs(10);

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

/// Asks for a tool that has no route (503, logged) until the proxy answers.
async fn request(http: u16) {
    let client = reqwest::Client::builder().user_agent("logrotate-test").build().unwrap();
    let url = format!("http://127.0.0.1:{http}/rotated");
    eventually(WAIT, "the proxy answers", || {
        let request = client.get(&url).header("host", "notool.toolforge.org");
        async move { (request.send().await.ok()?.status() == 503).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn sigusr1_reopens_the_access_log_after_rotation() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let http = free_port();
    let mut args = vec!["proxy".to_string(), "--redis-url".into(), redis.url()];
    for (flag, port) in [("--http-listen", http), ("--list-listen", free_port()), ("--admin-listen", free_port())] {
        args.extend([flag.to_string(), format!("127.0.0.1:{port}")]);
    }
    args.extend(["--access-log".into(), log.display().to_string()]);
    let child = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
        .args(&args)
        .env_remove("DYNAMICPROXY_REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dynamicproxy proxy");
    let mut proxy = Proxy(child);

    request(http).await;
    eventually(WAIT, "the first line", || {
        let n = line_count(&log);
        async move { (n >= 1).then_some(()) }
    })
    .await;
    let before = line_count(&log);

    std::fs::rename(&log, &rotated).unwrap();
    let pid = proxy.0.id().to_string();
    assert!(Command::new("kill").args(["-USR1", &pid]).status().unwrap().success());
    eventually(WAIT, "the access log reopened under its name", || {
        let exists = log.exists();
        async move { exists.then_some(()) }
    })
    .await;
    request(http).await;
    eventually(WAIT, "the new line in the new file", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("notool.toolforge.org \"GET /rotated\" 503").then_some(()) }
    })
    .await;
    assert_eq!(line_count(&rotated), before, "the rotated file got no new line");
    assert!(proxy.0.try_wait().unwrap().is_none(), "SIGUSR1 stopped the proxy");
}
