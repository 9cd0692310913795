//! Route lookup on the request path: `RouteCache::tool` + `ToolRoutes::find`,
//! for 10,000 and 100,000 tools, with one `.*` route or several patterns per tool.
//! Run with `cargo bench -p dynamicproxy-redis --bench lookup`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dynamicproxy_redis::{CacheSyncConfig, RouteCache, run_cache_sync};
use dynamicproxy_test_support::RedisServer;
use tokio_util::sync::CancellationToken;

/// Patterns of a tool with several routes: literals, as most data is, plus real regexes.
const SEVERAL: [&str; 5] = [".*", "/api.*", "/static/.*", "^/[a-z]+/v[0-9]+/", "/x.*"];

fn load(redis: &RedisServer, tools: usize, patterns: &[&str]) -> RouteCache {
    let mut c = redis.client();
    let _: () = redis::cmd("FLUSHALL").query(&mut c).expect("flush");
    for chunk in (0..tools).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            for p in patterns {
                pipe.cmd("HSET")
                    .arg(format!("prefix:tool{i}"))
                    .arg(*p)
                    .arg(format!("http://10.0.{}.{}:8000", i / 256 % 256, i % 256))
                    .ignore();
            }
        }
        pipe.query::<()>(&mut c).expect("seed");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let cache = RouteCache::new();
    let shutdown = CancellationToken::new();
    runtime.block_on(async {
        tokio::spawn(run_cache_sync(
            CacheSyncConfig::new(redis.url().parse().expect("url")),
            cache.clone(),
            shutdown.clone(),
        ));
        while cache.status().tools < tools {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
    });
    cache
}

fn lookup(c: &mut Criterion) {
    let redis = RedisServer::start();
    let mut group = c.benchmark_group("route_lookup");
    for (tools, label, patterns) in [
        (10_000, "one", &SEVERAL[..1]),
        (100_000, "one", &SEVERAL[..1]),
        (10_000, "several", &SEVERAL[..]),
        (100_000, "several", &SEVERAL[..]),
    ] {
        let cache = load(&redis, tools, patterns);
        let names: Vec<String> = (0..1024).map(|i| format!("tool{}", (i * 7919) % tools)).collect();
        // The path the last pattern would match, so "several" walks every pattern before `.*`.
        let path = "/tool/page";
        group.bench_with_input(BenchmarkId::new(label, tools), &names, |b, names| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 1023;
                let routes = cache.tool(black_box(&names[i]));
                black_box(routes.as_ref().and_then(|r| r.find(black_box(path))).map(|b| b.port()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
