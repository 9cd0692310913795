//! The search of one tool's routes for a request path, built once each time
//! the tool is loaded: one pass over the path for all its literal routes and
//! one for all its regex routes, whatever their number.
//!
//! A long path is searched as four lanes side by side (see `literals` and
//! `regex_dfa`), which makes a 64 KiB path cost about what 16 KiB did: lanes
//! that overlap by the longest match when matches are bounded in length,
//! lanes whose starting state is guessed and then checked otherwise. A
//! tool with both kinds of route walks the path twice (walking both
//! automata in the same lanes measured slower).
//!
//! The answer is the route SPEC §2 picks (the first in match order whose
//! pattern is found in the path): each pass reports every route it found as
//! one bit per route, in match order, so the lowest bit set wins, and a pass
//! stops as soon as nothing later in the path could beat what it found.

use std::sync::Arc;

use crate::literals::LiteralSet;
use crate::regex_dfa::RegexDfa;
use crate::table::Route;
use crate::types::{RoutePattern, TOOL_REGEX_DFA_LIMIT};

/// How one kind of route (literal or regex) is searched.
#[derive(Debug)]
enum Pass<S> {
    /// No route of this kind can win.
    Nothing,
    /// One route: its own pattern is searched.
    One(usize),
    /// Several routes, in one automaton.
    Many(Arc<S>),
    /// Several routes that could not share an automaton (beyond the caps,
    /// which keep this from happening): each pattern in turn.
    Each(Box<[usize]>),
}

// Not derived: that would require `S: Clone`, and the automata are shared, not copied.
impl<S> Clone for Pass<S> {
    fn clone(&self) -> Self {
        match self {
            Pass::Nothing => Pass::Nothing,
            Pass::One(i) => Pass::One(*i),
            Pass::Many(set) => Pass::Many(Arc::clone(set)),
            Pass::Each(indices) => Pass::Each(indices.clone()),
        }
    }
}

/// The one-pass search of a tool's routes (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Lookup {
    /// The first route whose pattern matches every path (`.*`): routes after
    /// it are never chosen, so no pass includes them.
    everything: Option<usize>,
    /// Bits of the literal routes before `everything`.
    literal_bits: u64,
    literals: Pass<LiteralSet>,
    /// Bits of the regex routes before `everything`.
    regex_bits: u64,
    regexes: Pass<RegexDfa>,
}

impl Default for Lookup {
    fn default() -> Self {
        Lookup { everything: None, literal_bits: 0, literals: Pass::Nothing, regex_bits: 0, regexes: Pass::Nothing }
    }
}

/// A regex DFA for the tool would exceed [`TOOL_REGEX_DFA_LIMIT`].
#[derive(Debug)]
pub(crate) struct OverBudget;

impl Lookup {
    /// Builds the search of `routes`, which are in match order and at most 64.
    /// Fails only when the tool's regex routes together need a DFA over the
    /// per-tool budget (see [`fitting_regex_routes`]).
    pub(crate) fn build(routes: &[Route]) -> Result<Lookup, OverBudget> {
        let everything = routes.iter().position(|r| r.pattern.literal() == Some(""));
        let reachable = &routes[..everything.unwrap_or(routes.len())];
        let mut literals: Vec<(&[u8], u32)> = Vec::new();
        let mut regexes: Vec<(&RoutePattern, u32)> = Vec::new();
        for (i, route) in reachable.iter().enumerate() {
            match route.pattern.literal() {
                Some(literal) => literals.push((literal.as_bytes(), i as u32)),
                None => regexes.push((&route.pattern, i as u32)),
            }
        }
        let literal_pass = match literals.as_slice() {
            [] => Pass::Nothing,
            [(_, bit)] => Pass::One(*bit as usize),
            many => match LiteralSet::build(many) {
                Some(set) => Pass::Many(Arc::new(set)),
                None => Pass::Each(many.iter().map(|(_, bit)| *bit as usize).collect()),
            },
        };
        let regex_pass = regex_pass(&regexes)?;
        Ok(Lookup {
            everything,
            literal_bits: bits(&literals),
            literals: literal_pass,
            regex_bits: bits(&regexes),
            regexes: regex_pass,
        })
    }

    /// Every route tried in turn, in match order: the search of last resort
    /// when no automaton can be built.
    pub(crate) fn each(routes: &[Route]) -> Lookup {
        Lookup {
            everything: None,
            literal_bits: below(routes.len()),
            literals: Pass::Each((0..routes.len()).collect()),
            regex_bits: 0,
            regexes: Pass::Nothing,
        }
    }

    /// The index of the route SPEC §2 picks for `path`, if any.
    #[inline]
    pub(crate) fn find(&self, routes: &[Route], path: &str) -> Option<usize> {
        let mut best = self.everything.unwrap_or(64);
        // In each pass, finding its first route ends it: nothing else in it comes earlier.
        let useful = self.literal_bits & below(best);
        if useful != 0 {
            let found = match &self.literals {
                Pass::Many(set) => set.search(path.as_bytes(), lowest(useful)),
                other => other.search_each(routes, path),
            } & useful;
            if found != 0 {
                best = found.trailing_zeros() as usize;
            }
        }
        let useful = self.regex_bits & below(best);
        if useful != 0 {
            let found = match &self.regexes {
                Pass::Many(dfa) => dfa.search(path.as_bytes(), lowest(useful)),
                other => other.search_each(routes, path),
            } & useful;
            if found != 0 {
                best = found.trailing_zeros() as usize;
            }
        }
        (best < routes.len()).then_some(best)
    }

    /// True when the regex routes are searched through one shared DFA, so
    /// their patterns need not keep their own.
    pub(crate) fn shares_regex_dfa(&self) -> bool {
        matches!(self.regexes, Pass::Many(_))
    }

    /// Heap bytes held by the automata, for memory budgets.
    pub(crate) fn memory_usage(&self) -> usize {
        let literals = match &self.literals {
            Pass::Many(set) => set.memory_usage(),
            _ => 0,
        };
        let regexes = match &self.regexes {
            Pass::Many(dfa) => dfa.memory_usage(),
            _ => 0,
        };
        literals + regexes
    }
}

impl<S> Pass<S> {
    /// The routes of a pass without a shared automaton, each searched in turn.
    fn search_each(&self, routes: &[Route], path: &str) -> u64 {
        let first =
            |indices: &[usize]| indices.iter().find(|&&i| routes[i].pattern.is_match(path)).map_or(0, |&i| 1u64 << i);
        match self {
            Pass::Nothing | Pass::Many(_) => 0,
            Pass::One(i) => first(&[*i]),
            Pass::Each(indices) => first(indices),
        }
    }
}

/// The search of a tool's regex routes (with their bits): one route uses
/// its pattern's own DFA; several share one, within [`TOOL_REGEX_DFA_LIMIT`]
/// (the routes then drop their own, see [`Lookup::shares_regex_dfa`]).
fn regex_pass(regexes: &[(&RoutePattern, u32)]) -> Result<Pass<RegexDfa>, OverBudget> {
    match regexes {
        [] => Ok(Pass::Nothing),
        [(_, bit)] => Ok(Pass::One(*bit as usize)),
        many => {
            let sources: Vec<(&str, u32)> = many.iter().map(|(p, bit)| (p.as_str(), *bit)).collect();
            let dfa = RegexDfa::build(&sources, TOOL_REGEX_DFA_LIMIT).map_err(|_| OverBudget)?;
            if dfa.memory_usage() > TOOL_REGEX_DFA_LIMIT {
                return Err(OverBudget);
            }
            Ok(Pass::Many(Arc::new(dfa)))
        }
    }
}

/// How many of `routes`' regex routes, in match order, fit
/// [`TOOL_REGEX_DFA_LIMIT`] (see [`regex_pass`]): all of them unless
/// hostile patterns multiply the states of the shared DFA. Each regex alone
/// fits (patterns are refused at parse otherwise), so the answer is at least
/// one when there is any.
pub(crate) fn fitting_regex_routes(routes: &[Route]) -> usize {
    let regexes: Vec<(&RoutePattern, u32)> = routes
        .iter()
        .filter(|r| r.pattern.literal().is_none())
        .enumerate()
        .map(|(i, r)| (&r.pattern, i as u32))
        .collect();
    let fits = |n: usize| regex_pass(&regexes[..n]).is_ok();
    if fits(regexes.len()) {
        return regexes.len();
    }
    // The largest n that fits, knowing 1 fits and regexes.len() does not.
    let (mut fit, mut over) = (1, regexes.len());
    while over - fit > 1 {
        let mid = (fit + over) / 2;
        if fits(mid) { fit = mid } else { over = mid }
    }
    fit
}

/// True when the regex patterns among `patterns` (reachable routes, in
/// match order) share one DFA within [`TOOL_REGEX_DFA_LIMIT`].
pub(crate) fn regex_patterns_fit(patterns: &[&RoutePattern]) -> bool {
    let regexes: Vec<(&RoutePattern, u32)> =
        patterns.iter().filter(|p| p.literal().is_none()).enumerate().map(|(i, p)| (*p, i as u32)).collect();
    regex_pass(&regexes).is_ok()
}

fn bits<T>(routes: &[(T, u32)]) -> u64 {
    routes.iter().fold(0, |acc, (_, bit)| acc | 1u64 << bit)
}

/// The bits of routes before `index` (all 64 when `index` is 64).
fn below(index: usize) -> u64 {
    if index >= 64 { u64::MAX } else { (1u64 << index) - 1 }
}

/// The lowest bit of a non-zero set.
fn lowest(set: u64) -> u64 {
    set & set.wrapping_neg()
}
