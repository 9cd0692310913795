//! `redis+sentinel://` against a real Sentinel watching a real master.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dynamicproxy_redis::{
    BackendUrl, CacheSyncConfig, RedisEndpoint, RouteCache, RoutePattern, RouteSource, RouteStore, ToolName,
    run_cache_sync,
};
use dynamicproxy_test_support::{RedisServer, SentinelGroup, eventually, free_port};
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

fn route(tool: &str) -> (ToolName, RoutePattern, BackendUrl) {
    (
        ToolName::parse(tool).unwrap(),
        RoutePattern::parse(".*").unwrap(),
        BackendUrl::parse("http://10.0.0.9:9").unwrap(),
    )
}

/// A demoted master keeps answering, read-only: writes must move to the new
/// master (READONLY drops the connection and the master is resolved again),
/// and the cache must follow the new master too.
// Several threads: the test blocks on the Sentinel's announcements while the store's watcher reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_master_still_answering_is_left_for_the_new_one() {
    let group = SentinelGroup::start();
    let endpoint: RedisEndpoint = group.url().parse().unwrap();
    let store = RouteStore::new(endpoint.clone());
    let (tool, pattern, backend) = route("before");
    store.set_route(&tool, &pattern, &backend, &RouteSource::cli("test")).await.unwrap();
    let cache = RouteCache::new();
    let shutdown = CancellationToken::new();
    tokio::spawn(run_cache_sync(CacheSyncConfig::new(endpoint), cache.clone(), shutdown.clone()));
    eventually(Duration::from_secs(10), "cache loaded", || async { cache.tool("before") }).await;
    let first = format!("127.0.0.1:{}", group.master_port());
    assert_eq!(cache.origin().state().server.as_deref(), Some(first.as_str()));

    let switches = group.switch_events();
    group.manual_failover();
    let promoted = format!("127.0.0.1:{}", group.replica_port());
    let (_, event) = switches.recv_timeout(Duration::from_secs(20)).expect("+switch-master");
    assert!(event.ends_with(&promoted.replace(':', " ")), "{event}");
    // The store's connection still reaches the old master, which now says READONLY.
    let (tool, pattern, backend) = route("after");
    eventually(Duration::from_secs(5), "a write lands on the new master", || async {
        store.set_route(&tool, &pattern, &backend, &RouteSource::cli("test")).await.ok()
    })
    .await;
    let on_new: Option<String> = group.replica_client().hget("prefix:after", ".*").unwrap();
    assert_eq!(on_new.as_deref(), Some("http://10.0.0.9:9"));
    // The old master still says it is one (Sentinels demote it a little later), yet got nothing.
    let on_old: Option<String> = group.master_client().hget("prefix:after", ".*").unwrap();
    assert_eq!(on_old, None, "a write went to the replaced master");

    eventually(Duration::from_secs(5), "cache follows the new master", || async {
        let state = cache.origin().state();
        (state.server.as_deref() == Some(promoted.as_str()) && state.server_changes == 1).then_some(())
    })
    .await;
    eventually(Duration::from_secs(5), "cache sees the write", || async { cache.tool("after") }).await;
    shutdown.cancel();
}

/// The proxy's cache may read a local replica: writes to the master reach
/// it through the replication stream, invalidations included.
#[tokio::test]
async fn the_cache_follows_the_master_through_a_replica() {
    let group = SentinelGroup::start();
    let _: () = group.master_client().hset("prefix:first", ".*", "http://10.0.0.1:1").unwrap();
    group.wait_replicated();
    let replica: RedisEndpoint = format!("redis://127.0.0.1:{}/0", group.replica_port()).parse().unwrap();
    let cache = RouteCache::new();
    let shutdown = CancellationToken::new();
    tokio::spawn(run_cache_sync(CacheSyncConfig::new(replica), cache.clone(), shutdown.clone()));
    eventually(Duration::from_secs(10), "cache loaded from the replica", || async { cache.tool("first") }).await;
    let loads = cache.status().full_loads;

    let _: () = group.master_client().hset("prefix:second", ".*", "http://10.0.0.2:2").unwrap();
    let second =
        eventually(Duration::from_secs(5), "write on the master reaches the cache", || async { cache.tool("second") })
            .await;
    assert_eq!(second.routes()[0].backend.to_string(), "http://10.0.0.2:2");
    let _: () = group.master_client().del("prefix:first").unwrap();
    eventually(Duration::from_secs(5), "delete on the master reaches the cache", || async {
        cache.tool("first").is_none().then_some(())
    })
    .await;
    // Through invalidations, not through reloads.
    assert_eq!(cache.status().full_loads, loads);
    shutdown.cancel();
}

/// What a replica answers a writer (`READONLY`) and, once its master is gone
/// and it may not serve stale data, any reader (`MASTERDOWN`): both mean
/// "reconnect and ask again", never "Redis refused the command".
#[tokio::test]
async fn replies_of_a_server_that_is_not_a_usable_master_mean_reconnect() {
    let mut master = RedisServer::start();
    let replica = RedisServer::start();
    let mut admin = replica.client();
    let _: () = redis::cmd("REPLICAOF").arg("127.0.0.1").arg(master.port()).query(&mut admin).unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("replica-serve-stale-data").arg("no").query(&mut admin).unwrap();
    eventually(Duration::from_secs(10), "replica in sync", || async {
        let info: String = redis::cmd("INFO").arg("replication").query(&mut replica.client()).ok()?;
        info.contains("master_link_status:up").then_some(())
    })
    .await;
    let store = RouteStore::new(replica.url().parse().unwrap());
    let (tool, pattern, backend) = route("demo");
    let error = store.set_route(&tool, &pattern, &backend, &RouteSource::cli("test")).await.unwrap_err();
    assert!(error.to_string().contains("read only replica"), "{error}");
    assert!(error.is_unavailable(), "{error}");

    master.stop();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = None;
    let error = loop {
        if let Err(e) = store.tool(&tool).await {
            if e.to_string().contains("MasterDown") {
                break e;
            }
            seen = Some(e.to_string());
        }
        assert!(std::time::Instant::now() < deadline, "no MASTERDOWN; seen {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(error.is_unavailable(), "{error}");
}
