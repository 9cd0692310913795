//! The one-pass route lookup picks exactly the route that trying each
//! pattern in match order with `regex::Regex::is_match` picks (SPEC §2),
//! over many generated route sets and paths: overlapping literals, regexes
//! with anchors and classes, `.*` in the middle of the order, Unicode paths.

use dynamicproxy_redis::table::match_order;
use dynamicproxy_redis::{BackendUrl, MAX_ROUTES_PER_TOOL, Route, RoutePattern, ToolRoutes};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use regex::Regex;

/// Path pieces: few distinct ones, so patterns and paths overlap often.
const PATH_PIECES: &[&str] = &["/", "a", "b", "ab", "é", "日本", "x", ".", "1", "A", "-", "/a/", "ü"];

/// Pattern pieces: plain text (so some patterns stay literals) and regex syntax.
const LITERAL_PIECES: &[&str] = &["/", "a", "b", "ab", "x", "1", "-", "/a", "A"];
const REGEX_PIECES: &[&str] = &[
    ".",
    "^",
    "$",
    "[ab]",
    "[^/]",
    "é",
    "日",
    "\\d",
    "a+",
    "b?",
    "(a|/b)",
    "x*",
    "(?i)a",
    "[é-ü]",
    "(?-u:\\b)",
    "\\.",
    "{2}",
    ".*",
    "/",
];

fn pattern(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        0 => ".*".to_string(),
        1 => String::new(),
        2..=5 => {
            let mut p: String = (0..rng.random_range(1..5)).map(|_| *LITERAL_PIECES.choose(rng).unwrap()).collect();
            if rng.random_bool(0.5) {
                p.push_str(".*");
            }
            p
        }
        _ => (0..rng.random_range(1..5))
            .map(|_| {
                if rng.random_bool(0.4) {
                    *LITERAL_PIECES.choose(rng).unwrap()
                } else {
                    *REGEX_PIECES.choose(rng).unwrap()
                }
            })
            .collect(),
    }
}

fn path(rng: &mut StdRng) -> String {
    // Now and then a long one, which the lookup searches in lanes.
    if !rng.random_ratio(1, 20) {
        return (0..rng.random_range(0..12)).map(|_| *PATH_PIECES.choose(rng).unwrap()).collect();
    }
    let mut pieces: Vec<&str> = if rng.random_bool(0.5) {
        (0..rng.random_range(4000..6000)).map(|_| *PATH_PIECES.choose(rng).unwrap()).collect()
    } else {
        // One piece over and over with a few others here and there: a
        // match may then need what one lane saw to complete in another.
        vec![*PATH_PIECES.choose(rng).unwrap(); rng.random_range(8000..12000)]
    };
    for _ in 0..rng.random_range(0..4) {
        let at = rng.random_range(0..pieces.len());
        pieces[at] = PATH_PIECES.choose(rng).unwrap();
    }
    pieces.concat()
}

/// The naive lookup: each valid pattern in match order, the first found wins.
fn reference<'a>(patterns: &'a [(String, Regex)], path: &str) -> Option<&'a str> {
    patterns.iter().find(|(_, regex)| regex.is_match(path)).map(|(p, _)| p.as_str())
}

/// The backend of a tool's `i`-th route: tells the routes apart.
fn backend(i: usize) -> BackendUrl {
    BackendUrl::parse(&format!("http://10.0.0.1:{}", 1000 + i)).unwrap()
}

/// A tool holding `sources` (valid patterns, in match order), each to its own backend.
fn tool_of(sources: &[String]) -> ToolRoutes {
    let routes = sources
        .iter()
        .enumerate()
        .map(|(i, s)| Route { pattern: RoutePattern::parse(s).unwrap(), backend: backend(i) })
        .collect();
    ToolRoutes::new(routes, true, false)
}

/// The routes `tool` kept, as regexes for [`reference`].
fn reference_patterns(tool: &ToolRoutes) -> Vec<(String, Regex)> {
    tool.routes()
        .iter()
        .map(|r| (r.pattern.as_str().to_string(), Regex::new(r.pattern.as_str()).expect("a route pattern is a regex")))
        .collect()
}

/// The pattern of the route the one-pass lookup picks for `path`.
fn picked<'a>(tool: &'a ToolRoutes, path: &str) -> Option<&'a str> {
    tool.find(path).and_then(|b| tool.routes().iter().find(|r| &r.backend == b).map(|r| r.pattern.as_str()))
}

#[test]
fn one_pass_lookup_picks_what_trying_each_pattern_in_order_picks() {
    let mut rng = StdRng::seed_from_u64(10);
    let (mut compared, mut matched) = (0, 0);
    let (mut trimmed_sets, mut trimmed_set) = (0, None);
    for set in 0..400 {
        // Mostly small tools, sometimes one at the route cap.
        let count = if set % 50 == 0 { MAX_ROUTES_PER_TOOL + 6 } else { rng.random_range(1..9) };
        let mut sources: Vec<String> = (0..count).map(|_| pattern(&mut rng)).collect();
        sources.sort_by(|a, b| match_order(a, b));
        sources.dedup();
        // What the loader would keep: valid patterns, the first 64 in match order.
        let valid: Vec<(String, RoutePattern)> =
            sources.iter().filter_map(|s| RoutePattern::parse(s).ok().map(|p| (s.clone(), p))).collect();
        let capped: Vec<String> = valid.iter().take(MAX_ROUTES_PER_TOOL).map(|(s, _)| s.clone()).collect();
        let routes: Vec<Route> =
            valid.into_iter().enumerate().map(|(i, (_, pattern))| Route { pattern, backend: backend(i) }).collect();
        let tool = ToolRoutes::new(routes, true, false);
        // Only regex routes past the per-tool DFA budget may be missing (see `tests/limits.rs`).
        let shown: Vec<&str> = tool.routes().iter().map(|r| r.pattern.as_str()).collect();
        let mut rest = shown.iter();
        for pattern in &capped {
            if rest.clone().next() == Some(&pattern.as_str()) {
                rest.next();
            } else {
                assert!(RoutePattern::parse(pattern).unwrap().is_regex(), "{pattern:?} dropped from {capped:?}");
                trimmed_sets += usize::from(trimmed_set != Some(set));
                trimmed_set = Some(set);
            }
        }
        assert!(rest.next().is_none(), "routes {shown:?} are not those of {capped:?}");
        let kept = reference_patterns(&tool);
        let expected = &shown;
        for _ in 0..40 {
            let path = path(&mut rng);
            let want = reference(&kept, &path);
            let got = picked(&tool, &path);
            assert_eq!(got, want, "path {:?} ({} bytes) with routes {expected:?}", path.get(..200), path.len());
            compared += 1;
            matched += usize::from(want.is_some());
        }
    }
    // Most generated tools keep all their routes, so the comparison covers the shared DFA.
    assert!(trimmed_sets < 20, "{trimmed_sets} of 400 tools over the DFA budget");
    // The generator exercises both outcomes.
    assert!(matched > compared / 5 && matched < compared * 4 / 5, "{matched} of {compared} matched");
}

/// A regex whose matches have no length bound, around pieces the long paths
/// below insert: the lookup cannot split the path into lanes that overlap by
/// the longest match, and guesses where each lane starts instead.
fn unbounded_pattern(rng: &mut StdRng) -> String {
    let piece = |rng: &mut StdRng| regex::escape(PATH_PIECES.choose(rng).unwrap());
    match rng.random_range(0..6) {
        0 => format!("{}.*{}", piece(rng), piece(rng)),
        1 => format!("^({})+{}", piece(rng), piece(rng)),
        2 => format!("{}[^/]*{}$", piece(rng), piece(rng)),
        // Anchored runs that the long paths below keep alive to their end,
        // while every guessed lane dies at once: the walk then stays in one
        // state for thousands of bytes, or (when one of these is the only
        // pattern of its kind) the lanes are walked one at a time.
        3 => format!("^[ab/]{{{}}}[ab/]*{}", rng.random_range(1..30), piece(rng)),
        4 => format!("^[^{}]*{}", piece(rng), piece(rng)),
        _ => format!("(?-u:\\b){}+{}", piece(rng), piece(rng)),
    }
}

#[test]
fn unbounded_regex_routes_on_long_paths_pick_what_trying_each_pattern_in_order_picks() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut matched = 0;
    for _ in 0..40 {
        let mut sources: Vec<String> = (0..rng.random_range(2..6)).map(|_| unbounded_pattern(&mut rng)).collect();
        sources.sort_by(|a, b| match_order(a, b));
        sources.dedup();
        let tool = tool_of(&sources);
        let kept = reference_patterns(&tool);
        for _ in 0..10 {
            // One piece over and over, a few others here and there.
            let mut pieces = vec![*PATH_PIECES.choose(&mut rng).unwrap(); rng.random_range(8000..12000)];
            for _ in 0..rng.random_range(0..4) {
                let at = rng.random_range(0..pieces.len());
                pieces[at] = PATH_PIECES.choose(&mut rng).unwrap();
            }
            let path = pieces.concat();
            let want = reference(&kept, &path);
            let got = picked(&tool, &path);
            assert_eq!(got, want, "path of {} bytes with routes {sources:?}", path.len());
            matched += usize::from(want.is_some());
        }
    }
    // The generator exercises both outcomes.
    assert!(matched > 10 && matched < 390, "{matched} of 400 matched");
}

/// The worst shape of `benches/worst_lookup.rs`: every route anchored with
/// `^` and alive over a whole 64 KiB path of `[ab/]`, so every guessed lane
/// is wrong to the end and the walk stays in one state for most of it.
/// What ends the run (a `c` and a route's number, or a byte outside the
/// class) is put near where lanes, notes and chunks of the walk begin.
#[test]
fn anchored_routes_alive_over_a_whole_long_path_pick_what_trying_each_pattern_in_order_picks() {
    let mut rng = StdRng::seed_from_u64(12);
    let len = 64 * 1024;
    let base: String = "/ab".chars().cycle().take(len).collect();
    let mut matched = 0;
    for with_unanchored in [false, true] {
        let mut sources: Vec<String> = (0..20).map(|i| format!("^[ab/]{{{}}}[ab/]*c{i:02}", 10 + i)).collect();
        if with_unanchored {
            // A route that keeps the guessed lanes alive: they then never rejoin the real walk.
            sources.push("q[ab/]*z$".to_string());
        }
        sources.sort_by(|a, b| match_order(a, b));
        let tool = tool_of(&sources);
        let kept = reference_patterns(&tool);
        assert_eq!(kept.len(), sources.len(), "every route fits the DFA budget");
        for case in 0..120 {
            let mut path = base.clone().into_bytes();
            for _ in 0..rng.random_range(0..3) {
                let insert: &[u8] = match rng.random_range(0..4) {
                    0 => b"c07",
                    1 => b"c19",
                    2 => b"x",
                    _ => b"q",
                };
                let at = match rng.random_range(0..3) {
                    // Where a lane begins, give or take a few bytes.
                    0 => (rng.random_range(1..4) * len / 4 + rng.random_range(0..8)).saturating_sub(4),
                    // Where a note or a chunk of eight begins.
                    1 => rng.random_range(0..len / 256) * 256 + rng.random_range(0..9),
                    _ => rng.random_range(0..len),
                };
                let at = at.min(len - insert.len());
                path[at..at + insert.len()].copy_from_slice(insert);
            }
            if case % 10 == 0 {
                path.extend_from_slice(b"z");
            }
            let path = String::from_utf8(path).unwrap();
            let want = reference(&kept, &path);
            let got = picked(&tool, &path);
            assert_eq!(got, want, "case {case} with routes {sources:?}");
            matched += usize::from(want.is_some());
        }
    }
    // The generator exercises both outcomes.
    assert!(matched > 20 && matched < 220, "{matched} of 240 matched");
}
