//! The loader's limits against a real redis-server: routes per tool, pattern
//! length and compiled size. A tool controls its own routes, so none of them
//! may cost the edge more than a bounded share.

use std::time::Duration;

use dynamicproxy_redis::table::MAX_ROUTES_PER_TOOL;
use dynamicproxy_redis::types::MAX_PATTERN_LEN;
use dynamicproxy_redis::{CacheSyncConfig, RedisEndpoint, RouteCache, run_cache_sync};
use dynamicproxy_test_support::{RedisServer, eventually};
use redis::Commands;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

async fn synced_cache(redis: &RedisServer) -> (RouteCache, tokio_util::sync::DropGuard) {
    let endpoint: RedisEndpoint = redis.url().parse().unwrap();
    let mut config = CacheSyncConfig::new(endpoint);
    config.ping_interval = Duration::from_millis(100);
    let cache = RouteCache::new();
    let shutdown = CancellationToken::new();
    tokio::spawn(run_cache_sync(config, cache.clone(), shutdown.clone()));
    eventually(WAIT, "first load", || async { cache.is_loaded().then_some(()) }).await;
    (cache, shutdown.drop_guard())
}

fn patterns(cache: &RouteCache, tool: &str) -> Vec<String> {
    cache.tool(tool).map(|t| t.routes().iter().map(|r| r.pattern.to_string()).collect()).unwrap_or_default()
}

fn backend(cache: &RouteCache, tool: &str, path: &str) -> Option<String> {
    cache.tool(tool).and_then(|t| t.find(path).map(|b| b.to_string()))
}

#[tokio::test]
async fn a_tool_keeps_its_first_64_routes_in_match_order() {
    let redis = RedisServer::start();
    let mut c = redis.client();
    // `/r0.*`..`/r9.*` are shorter than `/r10.*`..`/r99.*`, so they sort last.
    for i in 0..100 {
        let _: () = c.hset("prefix:many", format!("/r{i}.*"), format!("http://10.0.0.1:{}", 1000 + i)).unwrap();
    }
    let _: () = c.hset("prefix:other", ".*", "http://10.0.0.2:80").unwrap();
    let (cache, _stop) = synced_cache(&redis).await;

    let expected: Vec<String> = (10..10 + MAX_ROUTES_PER_TOOL).map(|i| format!("/r{i}.*")).collect();
    assert_eq!(MAX_ROUTES_PER_TOOL, 64);
    assert_eq!(patterns(&cache, "many"), expected);
    assert_eq!(backend(&cache, "many", "/r73/x").as_deref(), Some("http://10.0.0.1:1073"));
    assert_eq!(backend(&cache, "many", "/r74/x"), None, "a route past the cap is served");
    assert_eq!(backend(&cache, "many", "/r5/x"), None, "a route past the cap is served");
    assert_eq!(backend(&cache, "other", "/").as_deref(), Some("http://10.0.0.2:80"));

    // A longer route written later takes the first place; the 64th drops out.
    let _: () = c.hset("prefix:many", "/r100.*", "http://10.0.0.3:80").unwrap();
    eventually(WAIT, "the new route at the head", || {
        let head = patterns(&cache, "many").first().cloned();
        async move { (head.as_deref() == Some("/r100.*")).then_some(()) }
    })
    .await;
    let now = patterns(&cache, "many");
    assert_eq!(now.len(), MAX_ROUTES_PER_TOOL);
    assert_eq!(now.last().map(String::as_str), Some("/r72.*"));
}

#[tokio::test]
async fn an_oversized_pattern_is_skipped_and_the_others_load() {
    let redis = RedisServer::start();
    let mut c = redis.client();
    let too_long = format!("/{}.*", "q".repeat(MAX_PATTERN_LEN));
    // Short, but its automaton is far above the compiled-size limit.
    let too_big = r"/\w{40}";
    let _: () = c.hset("prefix:big", &too_long, "http://10.0.0.9:1").unwrap();
    let _: () = c.hset("prefix:big", too_big, "http://10.0.0.9:2").unwrap();
    let _: () = c.hset("prefix:big", "/api.*", "http://10.0.0.1:80").unwrap();
    let _: () = c.hset("prefix:big", ".*", "http://10.0.0.2:80").unwrap();
    let (cache, _stop) = synced_cache(&redis).await;

    assert_eq!(patterns(&cache, "big"), ["/api.*", ".*"]);
    let long_path = format!("/{}", "q".repeat(MAX_PATTERN_LEN + 10));
    assert_eq!(backend(&cache, "big", &long_path).as_deref(), Some("http://10.0.0.2:80"));
    let word_path = format!("/{}", "w".repeat(50));
    assert_eq!(backend(&cache, "big", &word_path).as_deref(), Some("http://10.0.0.2:80"));
    assert_eq!(backend(&cache, "big", "/api/x").as_deref(), Some("http://10.0.0.1:80"));

    // Rewriting the tool (an invalidation, not a full load) skips them again.
    let _: () = c.hset("prefix:big", "/v2.*", "http://10.0.0.3:80").unwrap();
    eventually(WAIT, "the new route loaded", || {
        let now = patterns(&cache, "big");
        async move { (now == ["/api.*", "/v2.*", ".*"]).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn regex_routes_beyond_the_tool_dfa_budget_are_dropped_in_match_order() {
    let redis = RedisServer::start();
    let mut c = redis.client();
    // Each alone is a fine route (a DFA of about 60 KiB); twenty of them
    // together would need a DFA far over the per-tool budget.
    let hostile: Vec<String> = (0..20).map(|i| format!("/r{i:02}[ab/]{{200}}c")).collect();
    for (i, pattern) in hostile.iter().enumerate() {
        let _: () = c.hset("prefix:dense", pattern, format!("http://10.0.0.1:{}", 1000 + i)).unwrap();
    }
    let _: () = c.hset("prefix:dense", "/static.*", "http://10.0.0.2:80").unwrap();
    let _: () = c.hset("prefix:dense", ".*", "http://10.0.0.3:80").unwrap();
    let (cache, _stop) = synced_cache(&redis).await;

    let kept = patterns(&cache, "dense");
    let kept_regexes: Vec<&String> = kept.iter().filter(|p| p.contains('[')).collect();
    assert!(!kept_regexes.is_empty() && kept_regexes.len() < hostile.len(), "kept {kept:?}");
    // The first in match order stay (all have one length: byte order decides).
    assert_eq!(kept_regexes, hostile.iter().take(kept_regexes.len()).collect::<Vec<_>>());
    assert!(kept.contains(&"/static.*".to_string()) && kept.contains(&".*".to_string()));

    let hit = |i: usize| format!("/r{i:02}{}c", "ab/".repeat(70).get(..200).unwrap_or_default());
    assert_eq!(backend(&cache, "dense", &hit(0)).as_deref(), Some("http://10.0.0.1:1000"));
    let last_kept = kept_regexes.len() - 1;
    assert_eq!(backend(&cache, "dense", &hit(last_kept)), Some(format!("http://10.0.0.1:{}", 1000 + last_kept)));
    // A dropped route is never served: its paths fall through to `.*`.
    assert_eq!(backend(&cache, "dense", &hit(19)).as_deref(), Some("http://10.0.0.3:80"));
    assert_eq!(backend(&cache, "dense", "/static/x").as_deref(), Some("http://10.0.0.2:80"));
}
