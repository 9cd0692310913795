//! The most expensive lookup a tool can cause: [`MAX_ROUTES_PER_TOOL`]
//! routes, each as long as [`MAX_PATTERN_LEN`] allows, none matching, against
//! a 64 KiB path (the proxy's request head limit) made of the patterns' own
//! bytes so no prefilter can skip ahead. Three shapes:
//!
//! - `literal`: `/<path>.*` routes, the shape of real data (a substring search each);
//! - `regex_literal_prefix`: regexes starting with a literal, as hand-written ones do;
//! - `regex_class`: regexes with no literal at all (`[ab/]{n}…`), the worst the caps allow.
//!
//! Run with `cargo bench -p dynamicproxy-redis --bench worst_lookup`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use dynamicproxy_redis::types::MAX_PATTERN_LEN;
use dynamicproxy_redis::{BackendUrl, MAX_ROUTES_PER_TOOL, Route, RoutePattern, ToolRoutes};

/// Builds pattern number `i` (of a tool's routes) with size parameter `n`.
type Shape = fn(usize, usize) -> String;

/// Size of the path searched: the proxy refuses request heads above 64 KiB.
const PATH_LEN: usize = 64 * 1024;

/// A 64 KiB path of `a`, `b` and `/`, which no route below matches.
fn hostile_path() -> String {
    let mut path = String::with_capacity(PATH_LEN);
    while path.len() < PATH_LEN {
        path.push('/');
        path.push_str(&"ab".repeat(60));
    }
    path.truncate(PATH_LEN);
    path
}

/// The longest pattern `make(i, n)` yields that the route table accepts.
fn longest_accepted(i: usize, make: impl Fn(usize, usize) -> String) -> RoutePattern {
    (1..=MAX_PATTERN_LEN)
        .rev()
        .find_map(|n| {
            let pattern = make(i, n);
            if pattern.len() > MAX_PATTERN_LEN {
                return None;
            }
            RoutePattern::parse(&pattern).ok()
        })
        .expect("some size of the pattern is accepted")
}

fn tool(make: impl Fn(usize, usize) -> String) -> ToolRoutes {
    let backend = BackendUrl::parse("http://10.0.0.1:8000").expect("backend");
    let routes = (0..MAX_ROUTES_PER_TOOL)
        .map(|i| Route { pattern: longest_accepted(i, &make), backend: backend.clone() })
        .collect();
    ToolRoutes::new(routes, true, false)
}

fn worst_lookup(c: &mut Criterion) {
    let path = hostile_path();
    let shapes: [(&str, Shape); 3] = [
        // `/abab…ab<NN>c.*`: the path has every prefix of it but never the `c`.
        ("literal", |i, n| format!("/{}{i:02}c.*", "ab".repeat(n / 2))),
        ("regex_literal_prefix", |i, n| format!("/ab{i:02}[ab/]{{{n}}}c")),
        ("regex_class", |i, n| format!("[ab/]{{{n}}}c{i:02}")),
    ];
    let mut group = c.benchmark_group("worst_lookup");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(20);
    for (name, make) in shapes {
        let routes = tool(make);
        assert_eq!(routes.routes().len(), MAX_ROUTES_PER_TOOL);
        let longest = routes.routes().iter().map(|r| r.pattern.as_str().len()).max().unwrap_or(0);
        let regexes = routes.routes().iter().filter(|r| r.pattern.is_regex()).count();
        eprintln!(
            "{name}: {} routes, {regexes} regexes, longest {longest} bytes, path {} bytes",
            routes.routes().len(),
            path.len()
        );
        assert!(routes.find(&path).is_none(), "{name}: a route matched");
        group.bench_function(name, |b| b.iter(|| black_box(routes.find(black_box(&path))).is_some()));
    }
    group.finish();
}

criterion_group!(benches, worst_lookup);
criterion_main!(benches);
