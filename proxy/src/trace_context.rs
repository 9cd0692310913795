//! W3C Trace Context (`traceparent`, `tracestate`) across the edge: a valid
//! incoming trace is continued, with the proxy's own span as the backend's
//! parent; an absent or invalid one is replaced by a new trace. The trace id
//! goes into the access log, so a tool's maintainer can find the proxy's
//! line for a request their backend traced.
//!
//! Nothing is exported (no OTLP): the proxy's span exists only as the
//! parent id it hands to the backend, so new traces are sent unsampled
//! (flags `00`), and an incoming trace keeps its flags.

use std::cell::RefCell;
use std::fmt;

use http::HeaderMap;
use http::header::HeaderName;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The W3C `traceparent` header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The W3C `tracestate` header (vendor data, passed through unread).
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Length of a version-00 `traceparent`: `00-` 32 hex `-` 16 hex `-` 2 hex.
const LEN: usize = 55;

/// A parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace's id; never all zero.
    pub trace_id: [u8; 16],
    /// The caller's span id; never all zero.
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Why a `traceparent` value was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTraceParent {
    /// Not 55 bytes (longer only for a future version followed by `-`).
    #[error("wrong length")]
    Length,
    /// Version `ff`, or not two lower-case hex digits.
    #[error("bad version")]
    Version,
    /// A `-` is missing between the fields.
    #[error("missing delimiter")]
    Delimiter,
    /// A field is not lower-case hex.
    #[error("not lower-case hex")]
    Hex,
    /// The trace id is all zero.
    #[error("all-zero trace id")]
    ZeroTraceId,
    /// The parent id is all zero.
    #[error("all-zero parent id")]
    ZeroParentId,
}

/// Parses a `traceparent` value (W3C Trace Context level 1, version 00).
/// A later version (01 to fe) is read by its version-00 prefix, as the
/// specification asks; `ff` is invalid.
pub fn parse_traceparent(value: &[u8]) -> Result<TraceParent, InvalidTraceParent> {
    if value.len() < LEN {
        return Err(InvalidTraceParent::Length);
    }
    let version = hex_byte(&value[0..2]).ok_or(InvalidTraceParent::Version)?;
    if version == 0xff {
        return Err(InvalidTraceParent::Version);
    }
    if value.len() > LEN && (version == 0 || value[LEN] != b'-') {
        return Err(InvalidTraceParent::Length);
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return Err(InvalidTraceParent::Delimiter);
    }
    let mut trace_id = [0u8; 16];
    for (i, byte) in trace_id.iter_mut().enumerate() {
        *byte = hex_byte(&value[3 + 2 * i..5 + 2 * i]).ok_or(InvalidTraceParent::Hex)?;
    }
    let mut parent_id = [0u8; 8];
    for (i, byte) in parent_id.iter_mut().enumerate() {
        *byte = hex_byte(&value[36 + 2 * i..38 + 2 * i]).ok_or(InvalidTraceParent::Hex)?;
    }
    let flags = hex_byte(&value[53..55]).ok_or(InvalidTraceParent::Hex)?;
    if trace_id == [0; 16] {
        return Err(InvalidTraceParent::ZeroTraceId);
    }
    if parent_id == [0; 8] {
        return Err(InvalidTraceParent::ZeroParentId);
    }
    Ok(TraceParent { trace_id, parent_id, flags })
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    Some(hex_digit(two[0])? << 4 | hex_digit(two[1])?)
}

impl TraceParent {
    /// The version-00 header value, as bytes: built on the stack, so a
    /// request's `traceparent` costs one copy into its header value.
    fn encode(&self) -> [u8; LEN] {
        let mut out = [b'-'; LEN];
        out[..2].copy_from_slice(b"00");
        hex_into(&mut out[3..35], &self.trace_id);
        hex_into(&mut out[36..52], &self.parent_id);
        hex_into(&mut out[53..55], &[self.flags]);
        out
    }
}

/// Lower-case hex of `bytes` into `out` (twice as long); also builds request ids.
pub(crate) fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

impl fmt::Display for TraceParent {
    /// The version-00 header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hex digits and dashes only: always UTF-8.
        f.write_str(std::str::from_utf8(&self.encode()).map_err(|_| fmt::Error)?)
    }
}

/// A trace id in hex, held on the stack: the access log writes one per request.
pub struct TraceIdHex([u8; 32]);

impl TraceIdHex {
    /// The 32 hex digits.
    pub fn as_str(&self) -> &str {
        // Hex digits only: always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("-")
    }
}

/// One request's trace: the incoming one continued, or a new one.
#[derive(Debug, Clone, Copy)]
pub struct TraceContext {
    /// What the backend is sent: the trace id, the proxy's span as parent, the flags.
    upstream: TraceParent,
    /// The client sent a valid `traceparent`: its `tracestate` is passed on.
    continued: bool,
}

impl TraceContext {
    /// Reads the client's `traceparent`; exactly one valid value continues
    /// its trace, anything else starts a new one.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let incoming = match (values.next(), values.next()) {
            (Some(value), None) => parse_traceparent(value.as_bytes()).ok(),
            _ => None,
        };
        Self::continuing(incoming)
    }

    /// A new trace, for a request known to carry no `traceparent`.
    pub fn start() -> Self {
        Self::continuing(None)
    }

    /// `incoming`'s trace with a new span of the proxy's, or a new trace.
    fn continuing(incoming: Option<TraceParent>) -> Self {
        IDS.with_borrow_mut(|rng| {
            let parent_id = nonzero(|| rng.random::<u64>().to_ne_bytes(), [0; 8]);
            match incoming {
                Some(incoming) => TraceContext {
                    upstream: TraceParent { trace_id: incoming.trace_id, parent_id, flags: incoming.flags },
                    continued: true,
                },
                None => TraceContext {
                    upstream: TraceParent {
                        // One draw per id: an array is drawn byte by byte.
                        trace_id: nonzero(|| rng.random::<u128>().to_ne_bytes(), [0; 16]),
                        parent_id,
                        flags: 0,
                    },
                    continued: false,
                },
            }
        })
    }

    /// The trace id, as 32 lower-case hex digits (for the access log).
    pub fn trace_id(&self) -> TraceIdHex {
        let mut out = [0u8; 32];
        hex_into(&mut out, &self.upstream.trace_id);
        TraceIdHex(out)
    }

    /// The `traceparent` the backend is sent.
    pub fn upstream(&self) -> TraceParent {
        self.upstream
    }

    /// The `traceparent` value a request going upstream carries.
    pub fn traceparent(&self) -> [u8; LEN] {
        self.upstream.encode()
    }

    /// The client's `tracestate` goes upstream with the request: only when
    /// its trace is continued (the specification forbids keeping it next to
    /// a `traceparent` it does not belong to).
    pub fn keeps_tracestate(&self) -> bool {
        self.continued
    }
}

thread_local! {
    /// Where new trace and span ids come from: W3C asks for ids that are
    /// random and unique, not secret, so a small generator seeded from the
    /// thread's cryptographic one serves, at a tenth of its cost per id.
    static IDS: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// A random id that is not all zero (the all-zero id means "invalid").
fn nonzero<const N: usize>(mut draw: impl FnMut() -> [u8; N], zero: [u8; N]) -> [u8; N] {
    loop {
        let id = draw();
        if id != zero {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_specification_example() {
        let parsed = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(parsed.flags, 1);
        assert_eq!(parsed.parent_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(parsed.to_string(), VALID);
    }

    #[test]
    fn refuses_malformed_values() {
        let cases: &[(&str, InvalidTraceParent)] = &[
            ("", InvalidTraceParent::Length),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0", InvalidTraceParent::Length),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-", InvalidTraceParent::Length),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-010", InvalidTraceParent::Length),
            ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", InvalidTraceParent::Version),
            ("0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", InvalidTraceParent::Version),
            ("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", InvalidTraceParent::Delimiter),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01", InvalidTraceParent::Delimiter),
            ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", InvalidTraceParent::Hex),
            ("00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01", InvalidTraceParent::Hex),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x", InvalidTraceParent::Hex),
            ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", InvalidTraceParent::ZeroTraceId),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", InvalidTraceParent::ZeroParentId),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u{e9}", InvalidTraceParent::Length),
        ];
        for (value, error) in cases {
            assert_eq!(parse_traceparent(value.as_bytes()), Err(*error), "{value:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_prefix() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        let parsed = parse_traceparent(later.as_bytes()).unwrap();
        assert_eq!(parsed.to_string(), VALID);
        let glued = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert_eq!(parse_traceparent(glued.as_bytes()), Err(InvalidTraceParent::Length));
    }

    #[test]
    fn new_traces_do_not_repeat_within_or_across_threads() {
        let draw = || (0..1000).map(|_| TraceContext::from_headers(&HeaderMap::new()).upstream()).collect::<Vec<_>>();
        let mut ids: Vec<_> = draw().into_iter().chain(std::thread::spawn(draw).join().unwrap()).collect();
        let mut spans: Vec<_> = ids.iter().map(|t| t.parent_id).collect();
        ids.sort_by_key(|t| t.trace_id);
        ids.dedup_by_key(|t| t.trace_id);
        spans.sort();
        spans.dedup();
        assert_eq!((ids.len(), spans.len()), (2000, 2000));
    }

    #[test]
    fn continues_a_valid_trace_and_replaces_others() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        headers.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        let trace = TraceContext::from_headers(&headers);
        assert_eq!(trace.trace_id().as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let sent = parse_traceparent(&trace.traceparent()).unwrap();
        assert_eq!((sent.trace_id, sent.flags), (trace.upstream().trace_id, 1));
        assert_ne!(sent.parent_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7], "the proxy's own span");
        assert!(trace.keeps_tracestate());

        let mut headers = HeaderMap::new();
        headers
            .insert(TRACEPARENT, HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        headers.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        let trace = TraceContext::from_headers(&headers);
        let sent = parse_traceparent(&trace.traceparent()).unwrap();
        assert_eq!(sent.flags, 0);
        assert_ne!(trace.trace_id().as_str(), "00000000000000000000000000000000");
        assert!(!trace.keeps_tracestate());

        // Two values: which one is meant is unknown, so neither is trusted.
        let mut headers = HeaderMap::new();
        headers.append(TRACEPARENT, HeaderValue::from_static(VALID));
        headers.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert_ne!(TraceContext::from_headers(&headers).trace_id().as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
