//! Dead grid registrations, as an operator sees them: the real binary, real
//! Redis, a route to a port where nothing listens. The admin API's `GET /dead`
//! and metrics report it, the log says it once, and with removal on the route
//! leaves Redis.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dynamicproxy_test_support::{RedisServer, eventually, free_port};

const WAIT: Duration = Duration::from_secs(20);

/// A running `dynamicproxy proxy`, killed on drop.
struct Daemon {
    child: Child,
    admin: u16,
    list: u16,
}

impl Daemon {
    /// The proxy on loopback ports, probing idle routes after a second; `env`
    /// and `extra` flags override that.
    fn start(redis: &RedisServer, env: &[(&str, &str)], extra: &[&str]) -> Self {
        let (admin, list) = (free_port(), free_port());
        let mut args = vec!["proxy".to_string(), "--redis-url".into(), redis.url()];
        for (flag, port) in [("--http-listen", free_port()), ("--list-listen", list), ("--admin-listen", admin)] {
            args.extend([flag.to_string(), format!("127.0.0.1:{port}")]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
            .args(&args)
            .env_remove("DYNAMICPROXY_REDIS_URL")
            // The test's dead backend is on loopback, which the proxy refuses by default.
            .env("DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS", "[]")
            .env("DYNAMICPROXY_PROXY_PROBE_IDLE_SECS", "1")
            .env("DYNAMICPROXY_PROXY_DEAD_AFTER_SECS", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dynamicproxy");
        Daemon { child, admin, list }
    }

    async fn admin_get(&self, path: &str) -> Option<String> {
        get(self.admin, path).await
    }

    async fn list_get(&self, path: &str) -> Option<String> {
        get(self.list, path).await
    }

    /// Sends SIGTERM and returns everything logged.
    fn terminate(mut self) -> String {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let mut log = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut log);
        }
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(port: u16, path: &str) -> Option<String> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.ok()?;
    response.status().is_success().then_some(())?;
    response.text().await.ok()
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn hset(redis: &RedisServer, tool: &str, pattern: &str, backend: &str) {
    redis::cmd("HSET")
        .arg(format!("prefix:{tool}"))
        .arg(pattern)
        .arg(backend)
        .query::<()>(&mut redis.client())
        .unwrap();
}

#[tokio::test]
async fn a_dead_registration_is_listed_counted_and_logged_once_and_kept() {
    let redis = RedisServer::start();
    let backend = format!("http://127.0.0.1:{}", closed_port());
    hset(&redis, "gone", ".*", &backend);
    // Flags win over the environment's 2 s.
    let daemon = Daemon::start(
        &redis,
        &[("DYNAMICPROXY_PROXY_PROBE_IDLE_SECS", "2")],
        &["--probe-idle-secs", "1", "--dead-after-secs", "1"],
    );

    let report = eventually(WAIT, "GET /dead lists the registration", || async {
        let body = daemon.admin_get("/dead").await?;
        let report: serde_json::Value = serde_json::from_str(&body).ok()?;
        (report["dead"].as_array()?.len() == 1).then_some(report)
    })
    .await;
    assert_eq!(report["prober"], "active");
    assert_eq!(report["dead"][0]["tool"], "gone");
    assert_eq!(report["dead"][0]["pattern"], ".*");
    assert_eq!(report["dead"][0]["backend"], backend);
    assert!(report["dead"][0]["dead_since"].as_u64().is_some(), "{report}");

    let metrics = daemon.admin_get("/metrics").await.unwrap();
    assert!(metrics.contains("dynamicproxy_proxy_dead_registrations 1"), "{metrics}");
    assert!(metrics.contains("dynamicproxy_proxy_backend_probes_total{result=\"refused\"}"), "{metrics}");
    assert!(metrics.contains("dynamicproxy_proxy_prober_active 1"), "{metrics}");
    let info: serde_json::Value = serde_json::from_str(&daemon.admin_get("/server_info").await.unwrap()).unwrap();
    assert_eq!(info["dead_registrations"], 1);

    // The operator's other views say it too: explain and the detailed list.
    let explained = daemon.admin_get("/explain?url=https://gone.toolforge.org/").await.unwrap();
    assert!(explained.contains("backend dead"), "{explained}");
    let detail: serde_json::Value = serde_json::from_str(&daemon.list_get("/list?detail=1").await.unwrap()).unwrap();
    let route = &detail["gone"]["routes"][0];
    assert!(route["dead_since"].as_str().is_some_and(|t| t.ends_with('Z')), "{detail}");
    assert!(route["dead_seconds"].as_u64().is_some(), "{detail}");
    let plain = daemon.list_get("/list").await.unwrap();
    assert!(!plain.contains("dead"), "plain /list must not change: {plain}");

    // More failed probes later: still one line, and the route is still in Redis.
    eventually(WAIT, "more probes", || async {
        let metrics = daemon.admin_get("/metrics").await?;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("dynamicproxy_proxy_backend_probes_total{result=\"refused\"} "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .filter(|n| *n >= 4)
    })
    .await;
    let log = daemon.terminate();
    assert_eq!(log.matches("registration dead").count(), 1, "{log}");
    assert!(log.contains("tool=gone"), "{log}");
    let stored: Option<String> = redis::cmd("HGET").arg("prefix:gone").arg(".*").query(&mut redis.client()).unwrap();
    assert_eq!(stored, Some(backend));
}

#[tokio::test]
async fn removal_on_takes_the_dead_route_out_of_redis() {
    let redis = RedisServer::start();
    hset(&redis, "gone", ".*", &format!("127.0.0.1:{}", closed_port()));
    let daemon = Daemon::start(&redis, &[("DYNAMICPROXY_PROXY_REMOVE_DEAD_REGISTRATIONS", "true")], &[]);
    eventually(WAIT, "the dead route removed", || async {
        let exists: bool = redis::cmd("EXISTS").arg("prefix:gone").query(&mut redis.client()).ok()?;
        (!exists).then_some(())
    })
    .await;
    let log = daemon.terminate();
    assert!(log.contains("dead registration removed from Redis"), "{log}");
}

#[tokio::test]
async fn the_prober_can_be_turned_off() {
    let redis = RedisServer::start();
    hset(&redis, "gone", ".*", &format!("http://127.0.0.1:{}", closed_port()));
    let daemon = Daemon::start(&redis, &[("DYNAMICPROXY_PROXY_PROBE_IDLE_SECS", "0")], &[]);
    let report = eventually(WAIT, "GET /dead answers", || async {
        serde_json::from_str::<serde_json::Value>(&daemon.admin_get("/dead").await?).ok()
    })
    .await;
    assert_eq!(report["prober"], "off", "{report}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = daemon.admin_get("/metrics").await.unwrap();
    assert!(!metrics.contains("dynamicproxy_proxy_backend_probes_total{"), "{metrics}");
    let log = daemon.terminate();
    assert!(!log.contains("stopped unexpectedly"), "{log}");
}

#[tokio::test]
async fn two_proxies_on_one_redis_probe_one_at_a_time_and_a_stopped_one_hands_over_at_once() {
    let redis = RedisServer::start();
    hset(&redis, "gone", ".*", &format!("http://127.0.0.1:{}", closed_port()));
    let first = Daemon::start(&redis, &[], &[]);
    let second = Daemon::start(&redis, &[], &[]);
    let state = |daemon: &Daemon| {
        let admin = daemon.admin;
        async move {
            let body = reqwest::get(format!("http://127.0.0.1:{admin}/dead")).await.ok()?.text().await.ok()?;
            let report: serde_json::Value = serde_json::from_str(&body).ok()?;
            report["prober"].as_str().map(str::to_string)
        }
    };
    let first_holds = eventually(WAIT, "one prober active, the other standing by", || async {
        match (state(&first).await?.as_str(), state(&second).await?.as_str()) {
            ("active", "standby") => Some(true),
            ("standby", "active") => Some(false),
            _ => None,
        }
    })
    .await;
    let (holder, other) = if first_holds { (first, second) } else { (second, first) };
    let metrics = other.admin_get("/metrics").await.unwrap();
    assert!(metrics.contains("dynamicproxy_proxy_prober_active 0"), "{metrics}");
    assert!(!metrics.contains("dynamicproxy_proxy_backend_probes_total{"), "the standby probed: {metrics}");
    // A stopped proxy releases the lock: the other takes over without waiting for it to expire (15 s).
    let stopped = std::time::Instant::now();
    holder.terminate();
    eventually(WAIT, "the other proxy active", || async { (state(&other).await? == "active").then_some(()) }).await;
    assert!(stopped.elapsed() < Duration::from_secs(10), "took {:?}", stopped.elapsed());
}
