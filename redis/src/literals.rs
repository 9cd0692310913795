//! Many literal route patterns searched in one pass: an Aho-Corasick
//! automaton whose states know, as a bit set, every route they complete.
//!
//! One substring search per literal route costs a pass over the path each,
//! and a tool may hold [`MAX_ROUTES_PER_TOOL`](crate::MAX_ROUTES_PER_TOOL)
//! of them. Here each path byte costs one table step whatever the number of
//! literals, and a state that completes several overlapping literals reports
//! them all with one OR (an overlapping search that reports matches one by one
//! can be made to report dozens per byte).

use std::collections::VecDeque;

/// Marks a trie transition not yet filled in while building.
const NONE: u16 = u16::MAX;
/// Parts of a long path searched side by side: each step of a walk waits on
/// the previous one's memory load, so four independent walks keep the CPU
/// busy about four times as well as one.
const LANES: usize = 4;
/// Shortest part worth a lane of its own.
const MIN_LANE: usize = 2048;

/// A set of literals (each one route, by its bit) found in one pass.
#[derive(Debug)]
pub(crate) struct LiteralSet {
    /// Byte to equivalence class; class 0 stands for every byte no literal uses.
    classes: [u8; 256],
    /// Classes per state (the width of a row of `next`).
    stride: usize,
    /// Dense transitions, `state * stride + class`; state 0 is the root.
    next: Box<[u16]>,
    /// Routes whose literal ends at each state (its own and its suffixes').
    found: Box<[u64]>,
    /// Length of the longest literal: how far lanes overlap.
    longest: usize,
}

impl LiteralSet {
    /// Builds the automaton of `literals`, each given with its route's bit
    /// (0..64). `None` when the literals are too many bytes for 16-bit state
    /// numbers or use every byte value; the route table's caps (64 routes of
    /// 256 bytes of plain characters) keep both far away.
    pub(crate) fn build(literals: &[(&[u8], u32)]) -> Option<LiteralSet> {
        let mut classes = [0u8; 256];
        let mut class_count: usize = 1;
        for (literal, _) in literals {
            for &b in *literal {
                if classes[usize::from(b)] == 0 {
                    classes[usize::from(b)] = u8::try_from(class_count).ok()?;
                    class_count += 1;
                }
            }
        }
        let states: usize = 1 + literals.iter().map(|(l, _)| l.len()).sum::<usize>();
        if states >= usize::from(NONE) {
            return None;
        }
        let stride = class_count;
        let mut next = vec![NONE; stride];
        let mut found = vec![0u64];
        for &(literal, bit) in literals {
            let mut state = 0usize;
            for &b in literal {
                let slot = state * stride + usize::from(classes[usize::from(b)]);
                if next[slot] == NONE {
                    // `states` bounds the count below NONE, checked above.
                    next[slot] = found.len() as u16;
                    next.resize(next.len() + stride, NONE);
                    found.push(0);
                }
                state = usize::from(next[slot]);
            }
            found[state] |= 1u64 << bit;
        }
        fill_failure_transitions(&mut next, &mut found, stride);
        let longest = literals.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        Some(LiteralSet { classes, stride, next: next.into_boxed_slice(), found: found.into_boxed_slice(), longest })
    }

    /// The bits of the literals found in `haystack`. Stops early once a bit
    /// of `enough` is found, as nothing later can change the caller's answer.
    #[inline]
    pub(crate) fn search(&self, haystack: &[u8], enough: u64) -> u64 {
        let part = haystack.len() / LANES;
        if part < MIN_LANE.max(2 * self.longest) {
            return self.walk(0, haystack, enough).1;
        }
        // Lane k reports literals ending in its part; it starts a literal's
        // length early so none that ends there is missed.
        let lane = |k: usize| {
            let end = if k + 1 == LANES { haystack.len() } else { (k + 1) * part };
            &haystack[(k * part).saturating_sub(self.longest)..end]
        };
        let lanes: [&[u8]; LANES] = std::array::from_fn(lane);
        let mut states = [0usize; LANES];
        let mut seen = 0u64;
        // Every lane is at least `part` long: walk that much side by side
        // (indexing all lanes at one offset is the point: their walks interleave).
        #[allow(clippy::needless_range_loop)]
        for i in 0..part {
            for k in 0..LANES {
                states[k] = self.step(states[k], lanes[k][i]);
                seen |= self.found[states[k]];
            }
            if seen & enough != 0 {
                return seen;
            }
        }
        for k in 0..LANES {
            let (_, tail) = self.walk(states[k], &lanes[k][part..], enough);
            seen |= tail;
        }
        seen
    }

    /// Walks `haystack` from `state`: the state reached and the bits found,
    /// stopping early once a bit of `enough` is found.
    #[inline]
    fn walk(&self, mut state: usize, haystack: &[u8], enough: u64) -> (usize, u64) {
        let mut seen = 0u64;
        for &b in haystack {
            state = self.step(state, b);
            let here = self.found[state];
            if here != 0 {
                seen |= here;
                if seen & enough != 0 {
                    break;
                }
            }
        }
        (state, seen)
    }

    #[inline(always)]
    fn step(&self, state: usize, b: u8) -> usize {
        usize::from(self.next[state * self.stride + usize::from(self.classes[usize::from(b)])])
    }

    /// Heap bytes held, for memory budgets.
    pub(crate) fn memory_usage(&self) -> usize {
        self.next.len() * size_of::<u16>() + self.found.len() * size_of::<u64>()
    }
}

/// Turns the trie into a complete automaton: every missing transition goes
/// where the longest proper suffix that is also a trie prefix would go, and
/// every state also reports the literals its suffixes complete. States are
/// visited by depth, so a state's failure state is finished before it.
fn fill_failure_transitions(next: &mut [u16], found: &mut [u64], stride: usize) {
    let mut failure = vec![0u16; found.len()];
    let mut queue = VecDeque::new();
    for slot in next.iter_mut().take(stride) {
        match *slot {
            NONE => *slot = 0,
            child => queue.push_back(child),
        }
    }
    while let Some(state) = queue.pop_front() {
        let state = usize::from(state);
        let fail = usize::from(failure[state]);
        found[state] |= found[fail];
        for class in 0..stride {
            let fallback = next[fail * stride + class];
            match next[state * stride + class] {
                NONE => next[state * stride + class] = fallback,
                child => {
                    failure[usize::from(child)] = fallback;
                    queue.push_back(child);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(literals: &[&str]) -> LiteralSet {
        let with_bits: Vec<(&[u8], u32)> = literals.iter().enumerate().map(|(i, l)| (l.as_bytes(), i as u32)).collect();
        LiteralSet::build(&with_bits).unwrap()
    }

    #[test]
    fn finds_every_literal_including_overlapping_and_nested_ones() {
        let s = set(&["/api/v2", "/api", "pi/", "/b", "v2/x"]);
        assert_eq!(s.search(b"/api/v2/x", 0), 0b10111);
        assert_eq!(s.search(b"/ap/b", 0), 0b01000);
        assert_eq!(s.search(b"", 0), 0);
        assert_eq!(s.search(b"/zzz", 0), 0);
        // Nested suffixes: "aaa" ends inside "baaa" without a trie path of its own.
        let s = set(&["baaa", "aaa", "aa"]);
        assert_eq!(s.search(b"xbaaa", 0), 0b111);
        assert_eq!(s.search(b"aa", 0), 0b100);
    }

    #[test]
    fn long_paths_are_searched_in_lanes_without_missing_a_literal() {
        let s = set(&["/needle-in-lane", "x"]);
        for at in [0, 1, 8000, 8190, 8191, 8192, 8200, 16380, 24570, 32750, 40000 - 15] {
            let mut path = vec![b'/'; 40000];
            path[at..at + 15].copy_from_slice(b"/needle-in-lane");
            assert_eq!(s.search(&path, 0), 0b01, "at {at}");
        }
        let mut path = vec![b'a'; 40000];
        path[39999] = b'x';
        assert_eq!(s.search(&path, 0), 0b10);
    }

    #[test]
    fn stops_once_enough_is_found() {
        let s = set(&["/a", "/b"]);
        assert_eq!(s.search(b"/a/b", 0b01), 0b01);
        assert_eq!(s.search(b"/a/b", 0b10), 0b11);
    }
}
