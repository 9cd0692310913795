//! `redis+sentinel://` against a real Sentinel watching a real master.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dynamicproxy_redis::{
    BackendUrl, CacheSyncConfig, RedisEndpoint, RouteCache, RoutePattern, RouteStore, ToolName, run_cache_sync,
};
use dynamicproxy_test_support::{RedisServer, eventually, free_port};
use redis::Commands;
use tokio_util::sync::CancellationToken;

/// A `redis-server --sentinel` monitoring one master as `mymaster`; killed on drop.
struct Sentinel {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    fn start(master_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master_port} 1\ndir {}\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis sentinel");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answered = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| {
                    redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg("mymaster").query::<Vec<String>>(&mut c)
                });
            if matches!(answered, Ok(ref addr) if addr.len() == 2) {
                break;
            }
            assert!(Instant::now() < deadline, "sentinel did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Sentinel { child, port, _dir: dir }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn store_and_cache_find_the_master_through_sentinel() {
    let master = RedisServer::start();
    let sentinel = Sentinel::start(master.port());
    let endpoint: RedisEndpoint = format!("redis+sentinel://127.0.0.1:{}/mymaster/0", sentinel.port).parse().unwrap();

    let store = RouteStore::new(endpoint.clone());
    let tool = ToolName::parse("foo").unwrap();
    store
        .set_route(
            &tool,
            &RoutePattern::parse(".*").unwrap(),
            &BackendUrl::parse("http://10.0.0.1:1").unwrap(),
            &dynamicproxy_redis::RouteSource::cli("test"),
        )
        .await
        .unwrap();
    let stored: String = master.client().hget("prefix:foo", ".*").unwrap();
    assert_eq!(stored, "http://10.0.0.1:1");

    let cache = RouteCache::new();
    let shutdown = CancellationToken::new();
    tokio::spawn(run_cache_sync(CacheSyncConfig::new(endpoint), cache.clone(), shutdown.clone()));
    eventually(Duration::from_secs(10), "cache loaded through sentinel", || async { cache.tool("foo") }).await;
    let _: () = master.client().hset("prefix:bar", ".*", "http://10.0.0.2:2").unwrap();
    eventually(Duration::from_secs(10), "invalidation through sentinel", || async { cache.tool("bar") }).await;
    shutdown.cancel();
}
