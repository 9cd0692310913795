//! Registrations per second: the registrar in-process against a local
//! redis-server, each exchange with its ident round-trip (to an in-process
//! ident server) and a distinct tool, at a few concurrency levels.
//!
//! `cargo bench -p dynamicproxy-registrar --bench registrations`
//! (`REGISTRAR_BENCH_TOTAL` exchanges per level, default 3000: every
//! exchange uses two ephemeral ports that then wait in TIME_WAIT).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Harness, IdentScript};

fn main() {
    let total: usize = std::env::var("REGISTRAR_BENCH_TOTAL").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(bench(total));
}

async fn bench(total: usize) {
    // A distinct tool per client port, like many webservices starting at once.
    let script: IdentScript = Arc::new(|c, s| Some(format!("{c},{s}:USERID:UNIX:tools.bench{c}\r\n")));
    let h = Harness::start(script, |c| {
        c.ident_timeout = Duration::from_secs(5);
        c.exchange_timeout = Duration::from_secs(10);
        c.max_connections = 4096;
    })
    .await;
    println!("registrar registrations/s (each with ident + HSET), {total} per level");
    for concurrency in [1usize, 16, 128] {
        let next = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (next, failures, addr) = (next.clone(), failures.clone(), h.addr);
            workers.spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let reply = common::exchange(addr, b"register\n.*\nhttp://web.example:8000\n", false).await;
                    if reply != "ok" {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        while workers.join_next().await.is_some() {}
        let elapsed = started.elapsed();
        println!(
            "  concurrency {concurrency:>4}: {:>8.0} registrations/s ({total} in {:.2} s, {} failed)",
            total as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            failures.load(Ordering::Relaxed),
        );
    }
    let tools: usize = redis::cmd("DBSIZE").query(&mut h.redis.client()).unwrap_or(0);
    println!("  distinct tools in redis: {tools}");
}
