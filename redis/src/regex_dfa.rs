//! Regex route patterns searched in one pass: one fully built DFA for all of
//! a tool's regex routes, whose match states know, as a bit set, every route
//! they report.
//!
//! The DFA is built when a tool is loaded, within a byte budget, so a lookup
//! is one table step per path byte whatever the patterns are: there is no
//! lazy DFA cache to thrash and no slower engine to fall back to. Patterns a
//! DFA cannot run (a Unicode word boundary `\b`) are refused when parsed.

use regex_automata::dfa::{Automaton, StartKind, dense};
use regex_automata::nfa::thompson;
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::util::syntax;
use regex_automata::{Anchored, MatchKind};

/// Parts of a long path searched side by side (see `literals`).
const LANES: usize = 4;
/// Shortest part worth a lane of its own.
const MIN_LANE: usize = 2048;
/// Bytes between the notes a lane takes of its state when its start is a
/// guess (see [`RegexDfa::search_speculative`]): how far a wrong guess is
/// walked again, at least, before the walks can rejoin.
const CHECK: usize = 256;
/// Most notes a lane takes (they live on the stack).
const NOTES: usize = 64;
/// Bytes checked at once when a walk stays in one state (see [`RegexDfa::stay`]).
const SKIP: usize = 8;

/// Why a set of patterns got no DFA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DfaRefusal {
    /// The DFA would exceed the byte budget it was given.
    TooBig,
    /// The patterns cannot become a DFA (syntax, `\b`, ...); the message says why.
    Unsupported(String),
}

/// Regex patterns (each one route, by its bit) found in one pass.
#[derive(Debug)]
pub(crate) struct RegexDfa {
    dfa: dense::DFA<Vec<u32>>,
    /// Where an unanchored search from the start of the path begins.
    start: StateID,
    /// Routes reported by each state (zero unless a match state), indexed by state number.
    found: Box<[u64]>,
    /// The longest match any pattern needs to show it is present, in bytes;
    /// `None` when unbounded. When bounded, a long path is searched in
    /// lanes that overlap by this much.
    longest: Option<usize>,
}

impl RegexDfa {
    /// Builds the DFA of `patterns`, each with its route's bit (0..64),
    /// refusing it when its transition table would exceed `limit` bytes.
    /// The syntax is the `regex` crate's defaults (Unicode, UTF-8), so a
    /// pattern matches here exactly where `regex::Regex::is_match` says.
    pub(crate) fn build(patterns: &[(&str, u32)], limit: usize) -> Result<RegexDfa, DfaRefusal> {
        let sources: Vec<&str> = patterns.iter().map(|(p, _)| *p).collect();
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .start_kind(StartKind::Unanchored)
                    .accelerate(false)
                    .minimize(false)
                    .dfa_size_limit(Some(limit))
                    // Determinizing keeps each state's NFA set besides the
                    // table: bound that working memory (and so the build time) too.
                    .determinize_size_limit(Some(4 * limit)),
            )
            .syntax(syntax::Config::new().utf8(true))
            .thompson(thompson::Config::new().utf8(true).which_captures(thompson::WhichCaptures::None))
            .build_many(&sources)
            .map_err(|e| {
                if e.is_size_limit_exceeded() { DfaRefusal::TooBig } else { DfaRefusal::Unsupported(e.to_string()) }
            })?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::No))
            .map_err(|e| DfaRefusal::Unsupported(e.to_string()))?;
        let bits: Vec<u32> = patterns.iter().map(|(_, bit)| *bit).collect();
        let found = match_bits(&dfa, &bits);
        let longest = patterns.iter().map(|(p, _)| longest_needed(p)).try_fold(0, |acc, n| n.map(|n| acc.max(n)));
        Ok(RegexDfa { dfa, start, found, longest })
    }

    /// The bits of the patterns found in `haystack`. Stops early once a bit
    /// of `enough` is found.
    #[inline]
    pub(crate) fn search(&self, haystack: &[u8], enough: u64) -> u64 {
        let part = haystack.len() / LANES;
        match self.longest {
            Some(longest) if part >= MIN_LANE.max(2 * longest) => self.search_lanes(haystack, part, longest, enough),
            None if part >= MIN_LANE => self.search_speculative(haystack, part, enough),
            _ => self.walk(haystack, enough),
        }
    }

    /// One walk over the whole path.
    fn walk(&self, haystack: &[u8], enough: u64) -> u64 {
        let (state, seen) = self.walk_from(self.start, haystack, enough);
        if seen & enough != 0 {
            return seen;
        }
        // Matches are reported one byte late: the end of the path may complete one.
        seen | self.found_at(self.dfa.next_eoi_state(state))
    }

    /// Walks `haystack` from `state`: the state reached and the bits found,
    /// stopping early once a bit of `enough` is found.
    // Not inlined: the lane loops that call it keep their states in registers.
    #[inline(never)]
    fn walk_from(&self, mut state: StateID, haystack: &[u8], enough: u64) -> (StateID, u64) {
        let mut seen = 0u64;
        let mut i = 0;
        while let Some(&b) = haystack.get(i) {
            let before = state;
            state = self.dfa.next_state(state, b);
            i += 1;
            // Dead, quit and match states are numbered first: one comparison
            // tells the (rare) states that need a look from the others.
            if self.dfa.is_special_state(state) {
                seen |= self.found_at(state);
                // Nothing is found after a dead state, and it never changes.
                if seen & enough != 0 || self.dfa.is_dead_state(state) {
                    break;
                }
            }
            if state == before {
                // Staying adds nothing to `seen`: skip to the byte that leaves.
                i += self.stay(state, &haystack[i..]);
            }
        }
        (state, seen)
    }

    /// How many of the first bytes of `haystack` keep a walk in `state`.
    /// A walk waits on each step's memory load before it can take the next;
    /// whether a byte leaves a known state does not, so [`SKIP`] bytes are
    /// checked at once. States that loop on what the path is made of
    /// (`[^/]*`, a pattern's unanchored start, a saturated `[ab/]{n}`) are
    /// then crossed several times faster than they are walked.
    #[inline]
    fn stay(&self, state: StateID, haystack: &[u8]) -> usize {
        if self.dfa.is_dead_state(state) {
            return haystack.len();
        }
        let mut stayed = 0;
        let mut chunks = haystack.chunks_exact(SKIP);
        for chunk in &mut chunks {
            let leaves = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (j, &b)| acc | u32::from(self.dfa.next_state(state, b) != state) << j);
            if leaves != 0 {
                return stayed + leaves.trailing_zeros() as usize;
            }
            stayed += SKIP;
        }
        stayed + chunks.remainder().iter().take_while(|&&b| self.dfa.next_state(state, b) == state).count()
    }

    /// Four walks side by side when matches have no length bound, so no
    /// lane can start early enough to see every match that ends in its
    /// part. Each lane guesses that its part starts in the start state and
    /// notes its state every [`CHECK`] bytes; then, lane by lane, the state
    /// the path really reaches at a lane's start is compared with the guess.
    /// A lane guessed wrong is walked again from the real state only until
    /// it reaches a state its guessed walk noted at the same place: from
    /// there both walks are the same, so what the guessed walk found after
    /// it is real. Most route sets forget the past within a few bytes (any
    /// run of `[^/]` or of plain text resets them), so the walks rejoin at
    /// the first note; a set that never does costs one more walk of the
    /// path than a single walk, at worst. Such a set usually stays in one
    /// state for long stretches (an anchored `^[ab/]+` alive to the end),
    /// which [`RegexDfa::stay`] crosses several bytes at a time.
    fn search_speculative(&self, haystack: &[u8], part: usize, enough: u64) -> u64 {
        // Notes per lane: [`CHECK`] bytes apart, fewer (further apart) on a longer path.
        let step = CHECK.max(part.div_ceil(NOTES));
        let notes = part.div_ceil(step);
        let lanes: [&[u8]; LANES] = std::array::from_fn(|k| &haystack[k * part..(k + 1) * part]);
        let mut guesses = [self.start; LANES];
        for (k, guess) in guesses.iter_mut().enumerate().skip(1) {
            let config = start::Config::new().anchored(Anchored::No).look_behind(Some(haystack[k * part - 1]));
            match self.dfa.start_state(&config) {
                Ok(s) => *guess = s,
                // Cannot happen with the DFAs built here (no quit bytes); stay exact anyway.
                Err(_) => return self.walk(haystack, enough),
            }
        }
        let mut states = guesses;
        // For each lane, its state at the end of each stretch and what it found in it.
        let mut noted = [[StateID::ZERO; NOTES]; LANES];
        let mut found = [[0u64; NOTES]; LANES];
        for n in 0..notes {
            let stretch = n * step..part.min((n + 1) * step);
            // Dead lanes (all guesses die when every pattern starts with
            // `^`) find nothing more: a lone live lane is walked on its own,
            // where `walk_from` can cross the states it stays in.
            let live = states.iter().filter(|&&s| !self.dfa.is_dead_state(s)).count();
            if live <= 1 {
                for k in 0..LANES {
                    let (reached, here) = self.walk_from(states[k], &lanes[k][stretch.clone()], 0);
                    states[k] = reached;
                    found[k][n] |= here;
                }
            } else {
                let here = self.walk_side_by_side(&mut states, lanes.map(|lane| &lane[stretch.clone()]));
                for k in 0..LANES {
                    found[k][n] |= here[k];
                }
            }
            for k in 0..LANES {
                noted[k][n] = states[k];
            }
            // The first lane started from the real start: what it finds is real.
            if found[0][n] & enough != 0 {
                return found[0][n];
            }
        }
        let found_after = |k: usize, n: usize| found[k][n..notes].iter().fold(0, |acc, f| acc | f);
        let mut seen = found_after(0, 0);
        let mut state = states[0];
        for k in 1..LANES {
            if state == guesses[k] {
                seen |= found_after(k, 0);
                state = states[k];
                continue;
            }
            for n in 0..notes {
                let (reached, here) = self.walk_from(state, &lanes[k][n * step..part.min((n + 1) * step)], enough);
                seen |= here;
                state = reached;
                if seen & enough != 0 {
                    return seen;
                }
                if state == noted[k][n] {
                    seen |= found_after(k, n + 1);
                    state = states[k];
                    break;
                }
            }
            if seen & enough != 0 {
                return seen;
            }
        }
        let (state, tail) = self.walk_from(state, &haystack[LANES * part..], enough);
        seen | tail | self.found_at(self.dfa.next_eoi_state(state))
    }

    /// Walks each lane from its state, all lanes one byte at a time (that
    /// their walks interleave is the point): the bits each found. The lanes
    /// are as long as each other.
    // Not inlined, so that the four states stay in registers.
    #[inline(never)]
    fn walk_side_by_side(&self, states: &mut [StateID; LANES], lanes: [&[u8]; LANES]) -> [u64; LANES] {
        let mut found = [0u64; LANES];
        let [l0, l1, l2, l3] = lanes;
        for (((&b0, &b1), &b2), &b3) in l0.iter().zip(l1).zip(l2).zip(l3) {
            for ((state, found), b) in states.iter_mut().zip(found.iter_mut()).zip([b0, b1, b2, b3]) {
                *state = self.dfa.next_state(*state, b);
                if self.dfa.is_special_state(*state) {
                    *found |= self.found_at(*state);
                }
            }
        }
        found
    }

    /// Four walks side by side, lane k reporting the matches that end in
    /// its part of the path. A lane starts `longest` bytes early, from the
    /// start state for the byte before it (so `^` and `\b` see the real
    /// context): no match that ends in its part can begin before that.
    fn search_lanes(&self, haystack: &[u8], part: usize, longest: usize, enough: u64) -> u64 {
        let begin = |k: usize| (k * part).saturating_sub(longest);
        // Matches show one byte late, so a lane reads one byte past its part;
        // the last lane reads to the end and then the end of the path.
        let lane = |k: usize| {
            let end = if k + 1 == LANES { haystack.len() } else { (k + 1) * part + 1 };
            &haystack[begin(k)..end]
        };
        let lanes: [&[u8]; LANES] = std::array::from_fn(lane);
        let mut states = [self.start; LANES];
        for (k, state) in states.iter_mut().enumerate().skip(1) {
            let config = start::Config::new().anchored(Anchored::No).look_behind(Some(haystack[begin(k) - 1]));
            match self.dfa.start_state(&config) {
                Ok(s) => *state = s,
                // Cannot happen with the DFAs built here (no quit bytes); stay exact anyway.
                Err(_) => return self.walk(haystack, enough),
            }
        }
        let mut seen = 0u64;
        // Taking a byte of each lane at a time is the point: their walks interleave.
        let [l0, l1, l2, l3] = lanes.map(|lane| &lane[..part]);
        for (((&b0, &b1), &b2), &b3) in l0.iter().zip(l1).zip(l2).zip(l3) {
            for (state, b) in states.iter_mut().zip([b0, b1, b2, b3]) {
                *state = self.dfa.next_state(*state, b);
                if self.dfa.is_special_state(*state) {
                    seen |= self.found_at(*state);
                }
            }
            if seen & enough != 0 {
                return seen;
            }
        }
        for k in 0..LANES {
            let (reached, tail) = self.walk_from(states[k], &lanes[k][part..], 0);
            states[k] = reached;
            seen |= tail;
        }
        seen | self.found_at(self.dfa.next_eoi_state(states[LANES - 1]))
    }

    #[inline(always)]
    fn found_at(&self, state: StateID) -> u64 {
        self.found.get(state.as_usize() >> self.dfa.stride2()).copied().unwrap_or(0)
    }

    /// Heap bytes held, for memory budgets.
    pub(crate) fn memory_usage(&self) -> usize {
        self.dfa.memory_usage() + self.found.len() * size_of::<u64>()
    }
}

/// The longest match `pattern` needs to show it is present: its longest
/// match, not counting a final `.*` (which may match nothing); `None` when
/// unbounded.
fn longest_needed(pattern: &str) -> Option<usize> {
    let needed = |p: &str| regex_syntax::parse(p).ok().map(|hir| hir.properties().maximum_len());
    pattern.strip_suffix(".*").and_then(needed).or_else(|| needed(pattern)).flatten()
}

/// Walks every state reachable from a start state and records, for each
/// match state, the bits of the patterns it reports.
fn match_bits(dfa: &dense::DFA<Vec<u32>>, bits: &[u32]) -> Box<[u64]> {
    let stride2 = dfa.stride2();
    let index = |id: StateID| id.as_usize() >> stride2;
    let mut found: Vec<u64> = Vec::new();
    let mut visited: Vec<bool> = Vec::new();
    // Lanes start mid-path, from the start state for the byte before them.
    let mut stack: Vec<StateID> = std::iter::once(None)
        .chain((0..=255u8).map(Some))
        .filter_map(|b| dfa.start_state(&start::Config::new().anchored(Anchored::No).look_behind(b)).ok())
        .collect();
    let representatives: Vec<Option<u8>> = dfa.byte_classes().representatives(..).map(|u| u.as_u8()).collect();
    while let Some(id) = stack.pop() {
        let i = index(id);
        if i >= visited.len() {
            visited.resize(i + 1, false);
            found.resize(i + 1, 0);
        }
        if visited[i] {
            continue;
        }
        visited[i] = true;
        if dfa.is_match_state(id) {
            for m in 0..dfa.match_len(id) {
                let pattern = dfa.match_pattern(id, m).as_usize();
                found[i] |= bits.get(pattern).map_or(0, |bit| 1u64 << bit);
            }
        }
        for unit in &representatives {
            let next = match unit {
                Some(b) => dfa.next_state(id, *b),
                None => dfa.next_eoi_state(id),
            };
            if index(next) >= visited.len() || !visited[index(next)] {
                stack.push(next);
            }
        }
    }
    found.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dfa(patterns: &[&str]) -> RegexDfa {
        let with_bits: Vec<(&str, u32)> = patterns.iter().enumerate().map(|(i, p)| (*p, i as u32)).collect();
        RegexDfa::build(&with_bits, 1 << 20).unwrap()
    }

    #[test]
    fn reports_every_pattern_found() {
        let d = dfa(&["^/api", "v[0-9]+$", "x.y", "é+"]);
        assert_eq!(d.search(b"/api/v2", 0), 0b0011);
        assert_eq!(d.search(b"/x/api/v2/", 0), 0);
        assert_eq!(d.search("/xéy/éé".as_bytes(), 0), 0b1100);
        assert_eq!(d.search(b"", 0), 0);
        assert_eq!(dfa(&["", "a?"]).search(b"", 0), 0b11);
    }

    #[test]
    fn long_paths_are_searched_in_lanes_without_missing_a_match() {
        let d = dfa(&["^/start", "x[0-9]{3}y", r"(?-u:\b)word(?-u:\b)", "end$", "/index.php.*"]);
        assert_eq!(d.longest, Some(13), "`.` may be four bytes");
        for at in [0, 1, 5000, 9995, 9996, 9999, 10000, 10001, 19996, 29990, 39980] {
            let mut path = vec![b'/'; 40000];
            path[at..at + 5].copy_from_slice(b"x123y");
            assert_eq!(d.search(&path, 0), 0b00010, "at {at}");
            path[at..at + 6].copy_from_slice(b" word ");
            assert_eq!(d.search(&path, 0), 0b00100, "at {at}");
            path[at..at + 6].copy_from_slice(b"awordb");
            assert_eq!(d.search(&path, 0), 0, "at {at}");
        }
        let mut path = vec![b'/'; 40000];
        path[..6].copy_from_slice(b"/start");
        path[39997..].copy_from_slice(b"end");
        assert_eq!(d.search(&path, 0), 0b01001);
        // `^` holds at the start of the path only, not where a lane starts.
        let mut path = vec![b'/'; 40000];
        path[10000 - 13..10000 - 7].copy_from_slice(b"/start");
        path[39997..].copy_from_slice(b"enx");
        assert_eq!(d.search(&path, 0), 0);
        assert_eq!(dfa(&["a+"]).longest, None);
    }

    #[test]
    fn unbounded_matches_on_long_paths_are_found_wherever_the_guessed_lanes_go_wrong() {
        // `x.*y` and `^(ab)*c` never forget an `x` or a start with `ab`: a
        // lane's guessed start is wrong up to the end of the path.
        let d = dfa(&["x.*y", "^(ab)*c", "a+b+c", "[0-9]+z", "(?-u:\\b)q+$"]);
        assert_eq!(d.longest, None);
        let filler: [&[u8]; 3] = [b"/", b"ab", b"a1"];
        let inserts: [&[u8]; 7] = [b"x", b"y", b"c", b"aabbc", b"12z", b" qq", b"-q"];
        let len = 4 * MIN_LANE + 3 * CHECK + 7;
        let mut seed = 7u64;
        let mut random = |n: usize| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        for case in 0..300 {
            let piece = filler[case % filler.len()];
            let mut path: Vec<u8> = piece.iter().copied().cycle().take(len).collect();
            for _ in 0..random(4) {
                let insert = inserts[random(inserts.len())];
                // Often right at a lane's start or a note, where a guess is checked.
                let at = match random(3) {
                    0 => random(len - 8),
                    1 => (random(LANES) * (len / LANES)).saturating_sub(random(4)),
                    _ => random(len / CHECK) * CHECK + random(3),
                };
                path[at..at + insert.len()].copy_from_slice(insert);
            }
            assert_eq!(d.search(&path, 0), d.walk(&path, 0), "case {case}");
            for enough in [1, 2, 4, 8, 16] {
                let found = d.search(&path, enough);
                let all = d.walk(&path, 0);
                assert_eq!(found & !all, 0, "case {case}: reported a route not in the path");
                assert!(found & enough != 0 || found == all, "case {case}: stopped before finding enough");
            }
        }
    }

    /// The walk as it was before [`RegexDfa::stay`]: one step per byte.
    fn walk_each_byte(d: &RegexDfa, haystack: &[u8]) -> u64 {
        let mut state = d.start;
        let mut seen = 0;
        for &b in haystack {
            state = d.dfa.next_state(state, b);
            seen |= d.found_at(state);
        }
        seen | d.found_at(d.dfa.next_eoi_state(state))
    }

    #[test]
    fn crossing_the_bytes_a_walk_stays_on_finds_what_walking_each_byte_finds() {
        // Anchored runs (every guessed lane dies), runs that saturate, a
        // match state that loops, and an unanchored route beside anchored ones.
        let sets: [&[&str]; 4] = [
            &["^[ab/]{9}[ab/]*c0", "^[ab/]{3}[ab/]*c1"],
            &["[ab/]{9}[ab/]*c0", "[ab/]{5}c1"],
            &["^/a[ab/]*", "b[ab]*c$"],
            &["^[ab/]{4}[ab/]*c0", "x[ab/]*y"],
        ];
        let len = 4 * MIN_LANE + 3 * CHECK + 5;
        let mut seed = 3u64;
        let mut random = |n: usize| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        for patterns in sets {
            let d = dfa(patterns);
            for case in 0..200 {
                let mut path: Vec<u8> = b"/ab".iter().copied().cycle().take(len).collect();
                for _ in 0..random(4) {
                    let insert: &[u8] = [b"c0".as_slice(), b"c1", b"x", b"y", b"-"][random(5)];
                    let at = match random(3) {
                        0 => random(len - 2),
                        1 => (random(LANES) * (len / LANES) + random(8)).saturating_sub(4),
                        _ => random(len / CHECK) * CHECK + random(SKIP + 1),
                    };
                    let at = at.min(len - insert.len());
                    path[at..at + insert.len()].copy_from_slice(insert);
                }
                let all = walk_each_byte(&d, &path);
                assert_eq!(d.walk(&path, 0), all, "{patterns:?} case {case}");
                assert_eq!(d.search(&path, 0), all, "{patterns:?} case {case}");
                for enough in [1, 2] {
                    let found = d.search(&path, enough);
                    assert_eq!(found & !all, 0, "{patterns:?} case {case}: reported a route not in the path");
                    assert!(found & enough != 0 || found == all, "{patterns:?} case {case}: stopped early");
                }
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_run_or_afford() {
        assert!(matches!(RegexDfa::build(&[(r"\bx", 0)], 1 << 20), Err(DfaRefusal::Unsupported(_))));
        assert!(RegexDfa::build(&[(r"(?-u:\b)x", 0)], 1 << 20).is_ok());
        assert_eq!(RegexDfa::build(&[("a[ab]{20}", 0)], 1 << 16).unwrap_err(), DfaRefusal::TooBig);
    }
}
