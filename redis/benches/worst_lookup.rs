//! The most expensive lookup a tool can cause: [`MAX_ROUTES_PER_TOOL`]
//! routes, each as long as [`MAX_PATTERN_LEN`] allows, none matching, against
//! a 64 KiB path (the figure; the proxy's request head limit is 32 KiB)
//! made of the patterns' own bytes so no prefilter can skip ahead. Shapes:
//!
//! - `literal`: `/<path>.*` routes, the shape of real data;
//! - `literal_nested`: literals that are suffixes of each other, all found at
//!   every byte of the path, while the first in match order never is;
//! - `regex_literal_prefix`: regexes starting with a literal, as hand-written ones do;
//! - `regex_class`: regexes with no literal at all (`[ab/]{n}…`);
//! - `regex_unbounded`: regexes whose matches have no length bound
//!   (`[ab/]{n}[ab/]*c…`), searched in lanes whose start states are guessed;
//! - `regex_unbounded_anchored`: the same anchored with `^`, so that every
//!   guess is wrong to the end of the path: the worst case of guessed lanes;
//! - `mixed`: half literals, half regexes (one walk of each automaton).
//!
//! Regex routes beyond the per-tool DFA budget are dropped when the tool
//! loads: the output says how many routes each tool kept. Each shape is also
//! run through the lookup this crate had before (each pattern in turn:
//! substring search or `regex::Regex` with the old limits), as `before/…`,
//! so both figures come from one run on the same machine load.
//!
//! Run with `cargo bench -p dynamicproxy-redis --bench worst_lookup`
//! (`WORST_LOOKUP_SHAPE=<shape>` for one shape).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use dynamicproxy_redis::types::MAX_PATTERN_LEN;
use dynamicproxy_redis::{BackendUrl, MAX_ROUTES_PER_TOOL, Route, RoutePattern, ToolRoutes};
use memchr::memmem;
use regex::{Regex, RegexBuilder};

/// Builds pattern number `i` (of a tool's routes) with size parameter `n`.
type Shape = fn(usize, usize) -> String;
/// A shape's name, its patterns and the path it is searched with.
type Case = (&'static str, Shape, fn() -> String);

/// Size of the path searched.
const PATH_LEN: usize = 64 * 1024;

/// A 64 KiB path of `a`, `b` and `/`, which no route of the `ab` shapes matches.
fn ab_path() -> String {
    let mut path = String::with_capacity(PATH_LEN);
    while path.len() < PATH_LEN {
        path.push('/');
        path.push_str(&"ab".repeat(60));
    }
    path.truncate(PATH_LEN);
    path
}

/// `/` then `a` up to 64 KiB: every `a{k}` is found everywhere.
fn a_path() -> String {
    format!("/{}", "a".repeat(PATH_LEN - 1))
}

/// The longest pattern `make(i, n)` yields that the route table accepts.
fn longest_accepted(i: usize, make: impl Fn(usize, usize) -> String) -> String {
    (1..=MAX_PATTERN_LEN)
        .rev()
        .map(|n| make(i, n))
        .find(|pattern| pattern.len() <= MAX_PATTERN_LEN && RoutePattern::parse(pattern).is_ok())
        .expect("some size of the pattern is accepted")
}

fn tool(patterns: &[String]) -> ToolRoutes {
    let backend = BackendUrl::parse("http://10.0.0.1:8000").expect("backend");
    let routes = patterns
        .iter()
        .map(|p| Route { pattern: RoutePattern::parse(p).expect("accepted"), backend: backend.clone() })
        .collect();
    ToolRoutes::new(routes, true, false)
}

/// The lookup as it was: each pattern in match order, searched on its own.
enum Before {
    Everything,
    Contains(Box<memmem::Finder<'static>>),
    Regex(Regex),
}

impl Before {
    fn compile(pattern: &str) -> Before {
        let literal = pattern.strip_suffix(".*").unwrap_or(pattern);
        let plain = |b: u8| b.is_ascii_alphanumeric() || b"/_-:@!,;=%~'<>\"".contains(&b);
        if literal.is_empty() {
            Before::Everything
        } else if literal.bytes().all(plain) {
            Before::Contains(Box::new(memmem::Finder::new(literal.as_bytes()).into_owned()))
        } else {
            let regex = RegexBuilder::new(pattern).size_limit(16 << 10).dfa_size_limit(64 << 10).build();
            Before::Regex(regex.expect("the old limits accept it"))
        }
    }

    fn is_match(&self, path: &str) -> bool {
        match self {
            Before::Everything => true,
            Before::Contains(f) => f.find(path.as_bytes()).is_some(),
            Before::Regex(r) => r.is_match(path),
        }
    }
}

/// CPU time this thread has used, in clock ticks (1/100 s), from
/// `/proc/thread-self/stat` (user + system).
fn thread_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the command name (which ends with the last ')'): utime is the 12th, stime the 13th.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// Microseconds of CPU per call of `f`, over at least two seconds of CPU:
/// on a shared machine wall time also counts the time other processes ran.
fn cpu_micros_per_call(mut f: impl FnMut()) -> f64 {
    let start = thread_cpu_ticks();
    let mut calls = 0u64;
    while thread_cpu_ticks() - start < 200 {
        for _ in 0..100 {
            f();
        }
        calls += 100;
    }
    (thread_cpu_ticks() - start) as f64 * 10_000.0 / calls as f64
}

fn worst_lookup(c: &mut Criterion) {
    let shapes: [Case; 7] = [
        // `/abab…ab<NN>c.*`: the path has every prefix of it but never the `c`.
        ("literal", |i, n| format!("/{}{i:02}c.*", "ab".repeat(n / 2)), ab_path),
        // `c` then `a`s first, never found; then `a{k}`, all found at every byte.
        ("literal_nested", |i, n| if i == 0 { format!("c{}", "a".repeat(n)) } else { "a".repeat(n - i) }, a_path),
        ("regex_literal_prefix", |i, n| format!("/ab{i:02}[ab/]{{{n}}}c"), ab_path),
        ("regex_class", |i, n| format!("[ab/]{{{n}}}c{i:02}"), ab_path),
        ("regex_unbounded", |i, n| format!("[ab/]{{{n}}}[ab/]*c{i:02}"), ab_path),
        ("regex_unbounded_anchored", |i, n| format!("^[ab/]{{{n}}}[ab/]*c{i:02}"), ab_path),
        (
            "mixed",
            |i, n| {
                if i % 2 == 0 { format!("/{}{i:02}c.*", "ab".repeat(n / 2)) } else { format!("[ab/]{{{n}}}c{i:02}") }
            },
            ab_path,
        ),
    ];
    let mut group = c.benchmark_group("worst_lookup");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(20);
    // `WORST_LOOKUP_SHAPE=<name>` measures that shape alone.
    let only = std::env::var("WORST_LOOKUP_SHAPE").ok();
    for (name, make, path) in shapes {
        if only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        let path = path();
        let mut patterns: Vec<String> = (0..MAX_ROUTES_PER_TOOL).map(|i| longest_accepted(i, make)).collect();
        patterns.sort_by(|a, b| dynamicproxy_redis::table::match_order(a, b));
        patterns.dedup();
        let routes = tool(&patterns);
        let kept: Vec<&str> = routes.routes().iter().map(|r| r.pattern.as_str()).collect();
        let regexes = routes.routes().iter().filter(|r| r.pattern.is_regex()).count();
        let longest = kept.iter().map(|p| p.len()).max().unwrap_or(0);
        eprintln!(
            "{name}: {} routes written, {} kept ({regexes} regexes), longest {longest} bytes, shared automata {} KiB, path {} bytes",
            patterns.len(),
            kept.len(),
            routes.lookup_memory() >> 10,
            path.len()
        );
        let before: Vec<(Before, &str)> = kept.iter().map(|p| (Before::compile(p), *p)).collect();
        let before_find = |path: &str| before.iter().find(|(b, _)| b.is_match(path)).map(|(_, p)| *p);
        let expected = before_find(&path);
        let got = routes.find(&path).and_then(|_| {
            routes.routes().iter().map(|r| r.pattern.as_str()).find(|p| Regex::new(p).is_ok_and(|r| r.is_match(&path)))
        });
        assert_eq!(got, expected, "{name}: the two lookups disagree");
        if name != "literal_nested" {
            assert!(expected.is_none(), "{name}: a route matched");
        }
        let now = cpu_micros_per_call(|| {
            black_box(routes.find(black_box(&path)));
        });
        let then = cpu_micros_per_call(|| {
            black_box(before_find(black_box(&path)));
        });
        eprintln!("{name}: CPU time per lookup {now:.1} µs (before: {then:.1} µs)");
        group.bench_function(name, |b| b.iter(|| black_box(routes.find(black_box(&path))).is_some()));
        group.bench_function(format!("before/{name}"), |b| {
            b.iter(|| black_box(before_find(black_box(&path))).is_some())
        });
    }
    group.finish();
}

criterion_group!(benches, worst_lookup);
criterion_main!(benches);
