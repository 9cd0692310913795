//! `X-Request-Id` (SPEC §3): the id that ties a user's error page, the
//! access log line and the backend's own logs together. The client's id is
//! kept when it is sane; otherwise a short random one is made.

use std::hash::{BuildHasher, RandomState};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// The header, sent to backends and returned on every response.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-sent id kept; longer ones are replaced (they end up in
/// pages and log lines).
const MAX_LEN: usize = 128;

/// Keys chosen at random once per process, so ids are not guessable from
/// one another and differ between restarts.
static KEYS: LazyLock<RandomState> = LazyLock::new(RandomState::new);
/// Requests numbered in order, hashed into ids: unique within a process.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// The request's id: the client's `X-Request-Id` when it is printable ASCII
/// of a sane length, otherwise a new one.
pub fn of(headers: &HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID)
        && !id.is_empty()
        && id.len() <= MAX_LEN
        && id.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return id.clone();
    }
    new()
}

/// A new id: 16 hex digits.
pub fn new() -> HeaderValue {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Owned by a shared allocation from the start: the id is cloned for the
    // backend and for the response, and a value copied from a slice would
    // take a second allocation at its first clone.
    let id = Bytes::from_owner(hex16(KEYS.hash_one(n)));
    HeaderValue::from_maybe_shared(id).unwrap_or(HeaderValue::from_static("0000000000000000"))
}

/// The id as a response header that HTTP/2's HPACK never adds to its
/// table: each id is sent once, and indexed it would only push the headers
/// that do repeat out of the table, and hold memory on an idle connection.
pub fn never_indexed(id: &HeaderValue) -> HeaderValue {
    let mut id = id.clone();
    id.set_sensitive(true);
    id
}

/// `n` as 16 lower-case hex digits, built on the stack: an id costs one
/// copy into its header value and no formatting.
fn hex16(n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    crate::trace_context::hex_into(&mut id, &n.to_be_bytes());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_on_responses_are_never_indexed_and_unchanged() {
        let id = new();
        let sent = never_indexed(&id);
        assert!(sent.is_sensitive());
        assert_eq!(sent, id);
        assert!(!id.is_sensitive(), "the request's own copy, sent to the backend, is not marked");
    }

    #[test]
    fn sane_ids_are_kept_and_others_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(of(&headers), "abc-123");
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(of(&headers), "has space");
        headers.insert(X_REQUEST_ID, HeaderValue::from_str(&"x".repeat(200)).unwrap());
        assert_eq!(of(&headers).len(), 16);
        let (a, b) = (new(), new());
        assert_ne!(a, b);
        assert!(a.to_str().unwrap().bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn ids_are_sixteen_hex_digits_with_leading_zeros() {
        for n in [0, 1, 0xabc, 0x0123_4567_89ab_cdef, u64::MAX] {
            assert_eq!(hex16(n), format!("{n:016x}").as_bytes(), "{n:x}");
        }
    }
}
