//! The route cache against a real redis-server: invalidations, outages,
//! malformed data.

use std::time::{Duration, Instant};

use dynamicproxy_redis::{CacheSyncConfig, RedisEndpoint, RouteCache, run_cache_sync};
use dynamicproxy_test_support::{RedisServer, eventually};
use redis::Commands;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// A cache synced to `redis`, stopped when dropped.
struct SyncedCache {
    cache: RouteCache,
    shutdown: CancellationToken,
}

impl SyncedCache {
    async fn start(redis: &RedisServer) -> Self {
        let endpoint: RedisEndpoint = redis.url().parse().unwrap();
        let mut config = CacheSyncConfig::new(endpoint);
        config.ping_interval = Duration::from_millis(100);
        config.retry_max = Duration::from_millis(200);
        let cache = RouteCache::new();
        let shutdown = CancellationToken::new();
        tokio::spawn(run_cache_sync(config, cache.clone(), shutdown.clone()));
        eventually(WAIT, "first load", || async { cache.is_loaded().then_some(()) }).await;
        SyncedCache { cache, shutdown }
    }

    fn backend(&self, tool: &str, path: &str) -> Option<String> {
        self.cache.tool(tool).and_then(|t| t.find(path).map(|b| b.to_string()))
    }

    async fn wait_backend(&self, tool: &str, path: &str, expected: Option<&str>) {
        let what = format!("{tool}{path} -> {expected:?}");
        eventually(WAIT, &what, || async { (self.backend(tool, path).as_deref() == expected).then_some(()) }).await;
    }
}

impl Drop for SyncedCache {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test]
async fn loads_existing_routes_in_spec_order() {
    let redis = RedisServer::start();
    let mut c = redis.client();
    let _: () = c.hset("prefix:foo", ".*", "http://10.0.0.1:8000").unwrap();
    let _: () = c.hset("prefix:foo", "/api.*", "10.0.0.2:8000").unwrap();
    let _: () = c.hset("prefix:foo", "/apx.*", "http://10.0.0.3:8000").unwrap();
    let _: () = c.hset("redirect:bar", ".*", "bar.toolforge.org").unwrap();
    let synced = SyncedCache::start(&redis).await;

    assert_eq!(synced.backend("foo", "/foo/api/x").as_deref(), Some("http://10.0.0.2:8000"));
    assert_eq!(synced.backend("foo", "/apx").as_deref(), Some("http://10.0.0.3:8000"));
    assert_eq!(synced.backend("foo", "/other").as_deref(), Some("http://10.0.0.1:8000"));
    let bar = synced.cache.tool("bar").unwrap();
    assert!(bar.canonical_redirect() && !bar.has_routes_key());
    assert!(synced.cache.tool("nope").is_none());
    let listed: Vec<String> = synced.cache.tools_with_routes().iter().map(|t| t.to_string()).collect();
    assert_eq!(listed, ["foo"]);
    let status = synced.cache.status();
    assert!(status.redis_connected);
    assert!(status.age.unwrap() < Duration::from_secs(5));
}

#[tokio::test]
async fn follows_writes_by_other_clients() {
    let redis = RedisServer::start();
    let synced = SyncedCache::start(&redis).await;
    let mut c = redis.client();

    let _: () = c.hset("prefix:foo", ".*", "http://10.0.0.1:1").unwrap();
    synced.wait_backend("foo", "/", Some("http://10.0.0.1:1")).await;

    let _: () = c.hset("prefix:foo", "/api.*", "http://10.0.0.2:2").unwrap();
    synced.wait_backend("foo", "/api", Some("http://10.0.0.2:2")).await;

    let _: () = c.hdel("prefix:foo", "/api.*").unwrap();
    synced.wait_backend("foo", "/api", Some("http://10.0.0.1:1")).await;

    let _: () = c.hset("redirect:foo", ".*", "foo.toolforge.org").unwrap();
    eventually(WAIT, "redirect set", || async { synced.cache.tool("foo").filter(|t| t.canonical_redirect()) }).await;
    let _: () = c.del("redirect:foo").unwrap();
    eventually(WAIT, "redirect gone", || async {
        synced.cache.tool("foo").filter(|t| !t.canonical_redirect() && t.has_routes_key())
    })
    .await;

    let _: () = c.del("prefix:foo").unwrap();
    eventually(WAIT, "tool gone", || async { synced.cache.tool("foo").is_none().then_some(()) }).await;

    // A flush invalidates everything at once.
    let _: () = c.hset("prefix:a", ".*", "http://10.0.0.1:1").unwrap();
    synced.wait_backend("a", "/", Some("http://10.0.0.1:1")).await;
    let _: () = redis::cmd("FLUSHALL").query(&mut c).unwrap();
    eventually(WAIT, "flushed", || async { synced.cache.tool("a").is_none().then_some(()) }).await;
}

#[tokio::test]
async fn propagation_of_a_thousand_updates() {
    let redis = RedisServer::start();
    let synced = SyncedCache::start(&redis).await;
    let mut c = redis.client();
    let mut latencies = Vec::with_capacity(1000);
    for i in 0..1000u32 {
        let tool = format!("tool{}", i % 50);
        let backend = format!("http://10.1.{}.{}:{}", i / 256, i % 256, 1000 + i);
        let written = Instant::now();
        let _: () = c.hset(format!("prefix:{tool}"), ".*", &backend).unwrap();
        // Poll tightly: the 10 ms step of `eventually` would hide the real figure.
        while synced.backend(&tool, "/").as_deref() != Some(backend.as_str()) {
            assert!(written.elapsed() < WAIT, "update {i} never reached the cache");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        latencies.push(written.elapsed());
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    let max = latencies[latencies.len() - 1];
    // A figure for the record, not an assertion: timing belongs to benchmarks.
    println!("propagation over 1000 updates: p50 {p50:?}, p99 {p99:?}, max {max:?} (0.2 ms polling)");
}

#[tokio::test]
async fn keeps_serving_through_an_outage_and_converges_after() {
    let mut redis = RedisServer::start();
    let mut c = redis.client();
    let _: () = c.hset("prefix:old", ".*", "http://10.0.0.1:1").unwrap();
    let _: () = c.hset("prefix:kept", ".*", "http://10.0.0.2:2").unwrap();
    drop(c);
    let synced = SyncedCache::start(&redis).await;

    redis.stop();
    eventually(WAIT, "disconnect noticed", || async { (!synced.cache.status().redis_connected).then_some(()) }).await;
    assert_eq!(synced.backend("old", "/").as_deref(), Some("http://10.0.0.1:1"), "serves the last known table");
    let age_then = synced.cache.status().age.unwrap();
    eventually(WAIT, "age grows while Redis is away", || async {
        (synced.cache.status().age.unwrap() > age_then + Duration::from_millis(300)).then_some(())
    })
    .await;

    // Back empty, then refilled with different content while the cache reconnects.
    redis.restart();
    let mut c = redis.client();
    let _: () = c.hset("prefix:kept", ".*", "http://10.0.0.3:3").unwrap();
    let _: () = c.hset("prefix:new", ".*", "http://10.0.0.4:4").unwrap();
    synced.wait_backend("new", "/", Some("http://10.0.0.4:4")).await;
    synced.wait_backend("kept", "/", Some("http://10.0.0.3:3")).await;
    synced.wait_backend("old", "/", None).await;
    assert!(synced.cache.status().redis_connected);
    assert!(synced.cache.status().age.unwrap() < Duration::from_secs(2));
}

/// A full reload (after every reconnect, and every 5 minutes) that finds a
/// tool as it was keeps the cached entry itself: building the whole table a
/// second time beside the first left the proxy's memory a table larger for good.
#[tokio::test]
async fn a_full_reload_keeps_the_entries_it_finds_unchanged() {
    let redis = RedisServer::start();
    let mut c = redis.client();
    let _: () = c.hset("prefix:same", ".*", "http://10.0.0.1:1").unwrap();
    let _: () = c.hset("prefix:same", "/api.*", "http://10.0.0.2:2").unwrap();
    let _: () = c.hset("redirect:same", ".*", "same.toolforge.org").unwrap();
    let synced = SyncedCache::start(&redis).await;
    let before = synced.cache.tool("same").unwrap();
    let loads = synced.cache.status().full_loads;

    // Redis drops the sync task's connection (not this one): it reconnects and reloads everything.
    let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal").query(&mut c).unwrap();
    assert!(killed >= 1, "no connection to kill");
    eventually(WAIT, "a full reload after the reconnect", || async {
        let status = synced.cache.status();
        (status.full_loads > loads && status.redis_connected).then_some(())
    })
    .await;
    let after = synced.cache.tool("same").unwrap();
    assert!(std::sync::Arc::ptr_eq(&before, &after), "the unchanged entry was rebuilt");
    assert_eq!(synced.backend("same", "/x/api").as_deref(), Some("http://10.0.0.2:2"));
}

#[tokio::test]
async fn starts_while_redis_is_down() {
    let mut redis = RedisServer::start();
    redis.stop();
    let endpoint: RedisEndpoint = redis.url().parse().unwrap();
    let mut config = CacheSyncConfig::new(endpoint);
    config.retry_max = Duration::from_millis(200);
    let cache = RouteCache::new();
    let shutdown = CancellationToken::new();
    tokio::spawn(run_cache_sync(config, cache.clone(), shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!cache.is_loaded());
    assert_eq!(cache.status().age, None);

    redis.restart();
    let _: () = redis.client().hset("prefix:late", ".*", "http://10.0.0.9:9").unwrap();
    eventually(WAIT, "late route", || async { cache.tool("late") }).await;
    shutdown.cancel();
}

#[tokio::test]
async fn malformed_entries_are_skipped_not_fatal() {
    let redis = RedisServer::start();
    let mut c = redis.client();
    let _: () = c.hset("prefix:good", ".*", "http://10.0.0.1:1").unwrap();
    let _: () = c.hset("prefix:mixed", "(?!lookaround)", "http://10.0.0.2:2").unwrap();
    let _: () = c.hset("prefix:mixed", "/ok.*", "http://10.0.0.2:2").unwrap();
    let _: () = c.hset("prefix:mixed", "/badurl.*", "ftp://nope").unwrap();
    let _: () = c.hset("prefix:mixed", "/noport.*", "http://host:notaport").unwrap();
    let _: () = c.set("prefix:stringkey", "http://10.0.0.3:3").unwrap();
    let _: () = c.rpush("prefix:listkey", "x").unwrap();
    let _: () = c.hset("prefix:Bad.Name", ".*", "http://10.0.0.4:4").unwrap();
    let _: () = c.hset(b"prefix:bin".as_slice(), b"\xff\xfe".as_slice(), b"\xff".as_slice()).unwrap();
    let synced = SyncedCache::start(&redis).await;

    assert_eq!(synced.backend("good", "/").as_deref(), Some("http://10.0.0.1:1"));
    let mixed = synced.cache.tool("mixed").unwrap();
    let patterns: Vec<&str> = mixed.routes().iter().map(|r| r.pattern.as_str()).collect();
    assert_eq!(patterns, ["/ok.*"]);
    assert!(synced.cache.tool("stringkey").is_none());
    assert!(synced.cache.tool("listkey").is_none());
    assert!(synced.cache.tool("bin").map(|t| t.routes().is_empty()).unwrap_or(true));

    // Malformed data arriving later is skipped too, and the good data keeps flowing.
    let _: () = c.hset("prefix:good", "[", "http://10.0.0.5:5").unwrap();
    let _: () = c.hset("prefix:later", ".*", "http://10.0.0.6:6").unwrap();
    synced.wait_backend("later", "/", Some("http://10.0.0.6:6")).await;
    assert_eq!(synced.cache.tool("good").unwrap().routes().len(), 1);
}
