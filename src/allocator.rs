//! Keeps glibc's allocator from holding freed memory: one arena for every
//! thread, and freed pages given back after each full route table load and
//! once a minute.
//!
//! A full load (at start, at every resync and after every Redis reconnect)
//! allocates a table's worth of short-lived replies and entries among the
//! long-lived ones it keeps. glibc's malloc returns memory to the system only
//! from the top of a heap, so the pages those short-lived allocations used
//! stayed resident after they were freed: bench/soak.sh saw the proxy's
//! anonymous memory step up by 0.3-1 MiB at each Redis restart while heaptrack
//! showed its live heap flat at about 2 MiB. `malloc_trim(0)` hands every
//! whole free page of every arena back (madvise), wherever it lies. Route
//! writes, connections and WebSockets come and go in between and leave the
//! same holes more slowly: hence the trim once a minute as well.
//!
//! Trimming took the steps away but a slow climb stayed (+1.4 % of RSS per
//! 10 min over 30 min): each thread that allocates gets an arena of its own
//! (three here: the event loop, the runtime's workers), and long-lived
//! allocations scattered over three heaps keep more pages partly used. With
//! one arena the same soak grew 0.5 % per 10 min. The event loop does
//! nearly all the allocating and small blocks come from each thread's cache
//! (tcache) without the arena's lock, so sharing one arena costs little.

use std::time::{Duration, Instant};

use dynamicproxy_redis::RouteCache;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often the cache's count of full loads is looked at. A load's garbage
/// lives a few seconds at most; a trim a few seconds later is soon enough.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Longest time between two trims. A trim walks the free lists of every
/// arena, each under its lock: 1.9-2.6 ms for the soak's 1,000-tool proxy,
/// the blocking thread's start included, so an allocation on an event loop
/// waits at most that long, once a minute.
const TRIM_AT_LEAST_EVERY: Duration = Duration::from_secs(60);

/// Trims the allocator after each full load of `cache` and at least once a
/// minute, until `shutdown`.
pub async fn trim_periodically(cache: RouteCache, shutdown: CancellationToken) {
    let mut trimmed_after = 0;
    let mut trimmed_at = Instant::now();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let full_loads = cache.status().full_loads;
        if full_loads == trimmed_after && trimmed_at.elapsed() < TRIM_AT_LEAST_EVERY {
            continue;
        }
        trimmed_after = full_loads;
        trimmed_at = Instant::now();
        // It walks every arena under its lock: off the event loops' threads.
        match tokio::task::spawn_blocking(release_free_memory).await {
            Ok(released) => {
                debug!(full_loads, released, took_us = trimmed_at.elapsed().as_micros() as u64, "allocator trimmed")
            }
            Err(error) => debug!(%error, "allocator trim did not run"),
        }
    }
}

/// Makes every thread allocate from glibc's main arena (`M_ARENA_MAX` = 1).
/// Called first thing in `main`, before any thread is started; the
/// `MALLOC_ARENA_MAX` environment variable still overrides it.
pub fn use_one_arena() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        set_arena_max(1);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_arena_max(arenas: i32) {
    // SAFETY: mallopt takes no pointer; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_arenas: i32) {}

/// Asks glibc to return every free page to the system; true when it did.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointer, and glibc serialises it with
    // every other allocator call.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other C libraries have no such call (musl returns memory on its own).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() -> bool {
    false
}
