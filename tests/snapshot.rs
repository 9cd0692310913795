//! `[proxy] snapshot_file`, the last-known-good route table, and a Redis too
//! old to follow: what the proxy serves and what `/ready` says when Redis
//! cannot give it a table.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use dynamicproxy_redis::{BackendUrl, Route, RouteCache, RoutePattern, ToolName, ToolRoutes};
use dynamicproxy_test_support::{RedisServer, eventually, free_port};
use redis::Commands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(15);

/// `dynamicproxy proxy` on loopback ports, logging to a file; killed on drop.
struct Proxy {
    child: Child,
    http: u16,
    admin: u16,
    log: std::path::PathBuf,
}

impl Proxy {
    fn start(redis_url: &str, snapshot: Option<&std::path::Path>, log: std::path::PathBuf) -> Self {
        let (http, list, admin) = (free_port(), free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"));
        command.args(["proxy", "--redis-url", redis_url]);
        for (flag, port) in [("--http-listen", http), ("--list-listen", list), ("--admin-listen", admin)] {
            command.args([flag.to_string(), format!("127.0.0.1:{port}")]);
        }
        if let Some(file) = snapshot {
            command.arg("--snapshot-file").arg(file);
        }
        let child = command
            .env_remove("DYNAMICPROXY_REDIS_URL")
            .env("DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS", "[]")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start dynamicproxy");
        Proxy { child, http, admin, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn get(&self, path: &str, host: Option<&str>) -> Option<(u16, String)> {
        let client = reqwest::Client::builder().user_agent("dynamicproxy-tests").build().ok()?;
        let port = if host.is_some() { self.http } else { self.admin };
        let mut request = client.get(format!("http://127.0.0.1:{port}{path}"));
        if let Some(host) = host {
            request = request.header("Host", host);
        }
        let response = request.send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    async fn served(&self, tool: &str) -> Option<String> {
        let (status, body) = self.get("/", Some(&format!("{tool}.toolforge.org"))).await?;
        (status == 200).then_some(body)
    }

    async fn ready(&self) -> (u16, String) {
        eventually(WAIT, "admin API", || self.get("/ready", None)).await
    }

    async fn metrics(&self) -> String {
        self.get("/metrics", None).await.map(|(_, body)| body).unwrap_or_default()
    }

    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the unlabelled sample `name` in a Prometheus text scrape.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn backend(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().fallback(move || async move { body })).await.unwrap();
    });
    port
}

#[tokio::test]
async fn started_without_redis_the_proxy_serves_its_snapshot_until_redis_answers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.snapshot");
    let mut redis = RedisServer::start();
    let port = backend("hello from demo").await;
    let _: () = redis.client().hset("prefix:demo", ".*", format!("http://127.0.0.1:{port}")).unwrap();

    // A first proxy writes the table it loaded.
    let first = Proxy::start(&redis.url(), Some(&file), dir.path().join("first.log"));
    eventually(WAIT, "demo served", || first.served("demo")).await;
    eventually(WAIT, "snapshot written", || async {
        std::fs::read_to_string(&file).ok().filter(|text| text.contains("\"demo\""))
    })
    .await;
    first.stop();

    // Redis is down: the next proxy serves the snapshot at once.
    redis.stop();
    let second = Proxy::start(&redis.url(), Some(&file), dir.path().join("second.log"));
    let body = eventually(WAIT, "demo served from the snapshot", || second.served("demo")).await;
    assert_eq!(body, "hello from demo");
    let (status, body) = second.ready().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ready: serving snapshot, age ") && body.ends_with(" s\n"), "{body}");
    let (_, info) = second.get("/server_info", None).await.unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["route_cache"]["serving_snapshot"], true, "{info}");
    assert_eq!(info["route_cache"]["redis_connected"], false, "{info}");
    assert!(second.log().contains("serving the route snapshot until Redis answers"), "{}", second.log());
    // The same state in /metrics, for alerts (the gauges follow within a second).
    let age = eventually(WAIT, "snapshot gauges", || async {
        let metrics = second.metrics().await;
        (metric(&metrics, "dynamicproxy_proxy_serving_snapshot") == Some(1.0))
            .then(|| metric(&metrics, "dynamicproxy_proxy_snapshot_age_seconds"))
            .flatten()
    })
    .await;
    assert!(age >= 0.0, "snapshot age {age}");

    // Redis comes back with another table: a full resync replaces the snapshot, also on disk.
    redis.restart();
    let other = backend("hello from other").await;
    let _: () = redis.client().hset("prefix:other", ".*", format!("http://127.0.0.1:{other}")).unwrap();
    eventually(WAIT, "other served", || second.served("other")).await;
    eventually(WAIT, "demo gone", || async { second.served("demo").await.is_none().then_some(()) }).await;
    assert_eq!(second.ready().await, (200, "ready\n".to_string()));
    eventually(WAIT, "snapshot gauges cleared", || async {
        let metrics = second.metrics().await;
        (metric(&metrics, "dynamicproxy_proxy_serving_snapshot") == Some(0.0)
            && metric(&metrics, "dynamicproxy_proxy_snapshot_age_seconds") == Some(-1.0))
        .then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "snapshot rewritten from Redis", || async {
        std::fs::read_to_string(&file).ok().filter(|text| text.contains("\"other\"") && !text.contains("\"demo\""))
    })
    .await;
}

/// A valid snapshot naming `demo`, written by the proxy crate's writer.
fn valid_snapshot(path: &std::path::Path) -> Vec<u8> {
    let cache = RouteCache::new();
    let route = Route {
        pattern: RoutePattern::parse(".*").unwrap(),
        backend: BackendUrl::parse("http://127.0.0.1:1").unwrap(),
    };
    let tools = vec![(ToolName::parse("demo").unwrap(), ToolRoutes::new(vec![route], true, false))];
    assert!(cache.restore_snapshot(tools, SystemTime::now()));
    dynamicproxy_proxy::snapshot::write(path, &cache).unwrap();
    std::fs::read(path).unwrap()
}

#[tokio::test]
async fn a_damaged_snapshot_is_refused_and_the_proxy_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.snapshot");
    let good = valid_snapshot(&file);
    let mut flipped = good.clone();
    let last = flipped.len() - 5;
    flipped[last] ^= 0x20;
    let truncated = good[..good.len() - 10].to_vec();
    let unreachable = format!("redis://127.0.0.1:{}/0", free_port());
    for (name, bytes, reason) in [("flipped", flipped, "checksum mismatch"), ("truncated", truncated, "truncated")] {
        std::fs::write(&file, &bytes).unwrap();
        let proxy = Proxy::start(&unreachable, Some(&file), dir.path().join(format!("{name}.log")));
        let (status, body) = proxy.ready().await;
        assert_eq!(status, 503, "{name}: {body}");
        assert!(body.contains("route table not loaded"), "{name}: {body}");
        let (status, _) = eventually(WAIT, "proxy answers", || proxy.get("/", Some("demo.toolforge.org"))).await;
        assert_ne!(status, 200, "{name}: a damaged snapshot was served");
        let log = proxy.log();
        let refusals: Vec<&str> = log.lines().filter(|l| l.contains("route snapshot refused")).collect();
        assert_eq!(refusals.len(), 1, "{name}: {log}");
        assert!(refusals[0].contains(reason), "{name}: {}", refusals[0]);
    }
}

/// A server that answers every command as Redis 5 answers `HELLO`.
async fn redis_5() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]);
                    // One reply per command: each starts with an array header.
                    let commands = text.split("\r\n").filter(|l| l.starts_with('*')).count().max(1);
                    let reply = "-ERR unknown command 'HELLO'\r\n".repeat(commands);
                    if socket.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_redis_older_than_6_is_named_once_and_in_ready() {
    let dir = tempfile::tempdir().unwrap();
    let old = redis_5().await;
    let proxy = Proxy::start(&format!("redis://127.0.0.1:{old}/0"), None, dir.path().join("proxy.log"));
    let body = eventually(WAIT, "/ready names the old Redis", || async {
        let (status, body) = proxy.get("/ready", None).await?;
        (status == 503 && body.contains("too old")).then_some(body)
    })
    .await;
    assert!(body.contains("Redis 6.0 or newer"), "{body}");
    // Retries go on (an upgrade is picked up) but the log says it once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = proxy.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("too old")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("ERROR"), "{log}");
}
