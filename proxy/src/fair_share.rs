//! Fair shares (SPEC §1 `tool_max_concurrent_requests`): how many requests
//! one tool may have in flight to its backends at once, WebSocket tunnels
//! included. A tool over its share gets 503 `over-capacity` at once, so a
//! tool whose backend hangs cannot take every connection and event-loop
//! slot from the others.
//!
//! Counting is one sharded map shared by all event loops: a request touches
//! one shard's lock for an increment and again for the decrement, and a
//! tool's entry is removed when its count falls to zero, so the map holds
//! only tools with requests in flight.
//!
//! Tools are counted under a keyed 64-bit hash of their name rather than the
//! name itself: a request to a tool with nothing in flight would otherwise
//! copy the name into a new key, one allocation per request on a busy proxy
//! whose requests spread over many tools. The key is random per process, so
//! nobody outside can pick two names that share a count, and two of a
//! table's names sharing one by chance is about as likely as 2^-64 per pair.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Arc;

use dashmap::DashMap;

/// The per-tool in-flight counters and their limits.
#[derive(Debug)]
pub struct FairShare {
    /// The share of a tool without an override; 0 = no limit.
    default_limit: u32,
    /// Shares raised (or lowered) for named tools by the operator.
    overrides: HashMap<Box<str>, u32>,
    /// Requests in flight per tool (by [`FairShare::key`]); an entry exists
    /// only while above zero.
    in_flight: DashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    /// The random key of the tools' hashes.
    keys: RandomState,
}

/// Hashes a key that is already a keyed hash ([`FairShare::key`]) to
/// itself: hashing it again cost as much as making it.
#[derive(Debug, Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; anything else still hashes, if slowly.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

/// One request's place in its tool's share; dropping it frees the place.
#[derive(Debug)]
#[must_use = "the place is freed when this is dropped"]
pub struct Slot {
    held: Option<(Arc<FairShare>, u64)>,
}

impl FairShare {
    /// Shares of `default_limit` (0 = off) with per-tool `overrides`.
    pub fn new(default_limit: u32, overrides: &BTreeMap<String, u32>) -> Arc<Self> {
        Arc::new(FairShare {
            default_limit,
            overrides: overrides.iter().map(|(tool, limit)| (tool.as_str().into(), *limit)).collect(),
            in_flight: DashMap::default(),
            keys: RandomState::new(),
        })
    }

    /// The count `tool` is kept under.
    fn key(&self, tool: &str) -> u64 {
        self.keys.hash_one(tool)
    }

    /// The share of `tool`; 0 = no limit.
    pub fn limit(&self, tool: &str) -> u32 {
        self.overrides.get(tool).copied().unwrap_or(self.default_limit)
    }

    /// Takes a place for one request to `tool`, or `None` when the tool has
    /// its whole share in flight already.
    pub fn try_acquire(self: &Arc<Self>, tool: &str) -> Option<Slot> {
        let limit = self.limit(tool);
        if limit == 0 {
            return Some(Slot { held: None });
        }
        let key = self.key(tool);
        let mut count = self.in_flight.entry(key).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Slot { held: Some((self.clone(), key)) })
    }

    /// Requests in flight to `tool` now.
    pub fn in_flight(&self, tool: &str) -> u32 {
        self.in_flight.get(&self.key(tool)).map_or(0, |count| *count)
    }

    /// Tools with requests in flight now.
    pub fn tools_in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((share, key)) = self.held.take() {
            share.in_flight.remove_if_mut(&key, |_, count| {
                *count = count.saturating_sub(1);
                *count == 0
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_over_its_share_is_refused_and_others_are_not() {
        let share = FairShare::new(2, &BTreeMap::from([("big".to_string(), 3)]));
        let a1 = share.try_acquire("a").unwrap();
        let _a2 = share.try_acquire("a").unwrap();
        assert!(share.try_acquire("a").is_none());
        let _b = share.try_acquire("b").unwrap();
        let big: Vec<Slot> = (0..3).map(|_| share.try_acquire("big").unwrap()).collect();
        assert!(share.try_acquire("big").is_none());
        drop(a1);
        assert_eq!(share.in_flight("a"), 1);
        let _a3 = share.try_acquire("a").unwrap();
        drop(big);
        assert_eq!(share.in_flight("big"), 0);
        assert_eq!(share.tools_in_flight(), 2, "entries at zero are removed");
    }

    #[test]
    fn zero_is_no_limit() {
        let share = FairShare::new(0, &BTreeMap::new());
        let slots: Vec<Slot> = (0..1000).map(|_| share.try_acquire("a").unwrap()).collect();
        assert_eq!(slots.len(), 1000);
        assert_eq!(share.tools_in_flight(), 0);
    }
}
