//! Header rewriting between client and backend (SPEC §3 "Request to
//! upstream" and "Response to client").

use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `X-Forwarded-For`.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Builds the table of stripped names from one list: as header names for a
/// map, and as the lower-case bytes a head's fields are compared with.
macro_rules! stripped_names {
    ($($name:literal,)*) => {
        /// Every name the proxy strips from a message, in one table: a
        /// message is checked with one pass over its names, where a lookup
        /// per listed name hashed each of them on every request.
        static STRIPPED: [HeaderName; [$($name),*].len()] = [$(HeaderName::from_static($name)),*];
        /// [`STRIPPED`]'s names as text.
        const STRIPPED_NAMES: [&str; [$($name),*].len()] = [$($name),*];
    };
}

stripped_names! {
    // Hop-by-hop (RFC 9110 §7.6.1 and the usual legacy ones): they describe
    // one connection and never cross the proxy. `http2-settings` belongs to
    // an `h2c` upgrade, which is never forwarded.
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "http2-settings",
    // From a client only. `Proxy`, because of httpoxy (CGI turns it into
    // `HTTP_PROXY`); `Forwarded` (RFC 7239) and `X-Real-IP`, because
    // frameworks trust them for the client address and scheme, so a client
    // could speak for the edge.
    "proxy",
    "forwarded",
    "x-real-ip",
    // The 100-continue exchange happens between client and proxy.
    "expect",
    // From a backend only: on the shared legacy domain it would let one tool
    // register a service worker over every tool's paths.
    "service-worker-allowed",
    // From a client, what the proxy itself sets: written into the head
    // after the client's headers (see [`to_upstream`]).
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-original-uri",
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-forwarded-for",
}

/// Bits of [`STRIPPED`]: the hop-by-hop names.
const HOP_BY_HOP: u32 = 0x03ff;
/// Bits of [`STRIPPED`]: what a request loses on its way to a backend, but
/// for `tracestate` (kept when the client's trace goes on) and
/// `X-Forwarded-For` (extended).
const FROM_CLIENT: u32 = HOP_BY_HOP | 0b1111 << 10 | 0b11_1111 << 15;
/// Bits of [`STRIPPED`]: what a response loses on its way to the client.
const FROM_BACKEND: u32 = HOP_BY_HOP | 1 << 14;
/// The bit of `Connection` in [`STRIPPED`].
const CONNECTION_BIT: u32 = 1;
/// The bit of `Upgrade` in [`STRIPPED`].
const UPGRADE_BIT: u32 = 1 << 6;
/// The bit of `X-Request-Id` in [`STRIPPED`].
const X_REQUEST_ID_BIT: u32 = 1 << 19;
/// The bit of `traceparent` in [`STRIPPED`].
const TRACEPARENT_BIT: u32 = 1 << 20;
/// The bit of `tracestate` in [`STRIPPED`].
const TRACESTATE_BIT: u32 = 1 << 21;
/// The bit of `X-Forwarded-For` in [`STRIPPED`].
const X_FORWARDED_FOR_BIT: u32 = 1 << 22;

/// The places in [`STRIPPED`] of the names `len` bytes long: most names a
/// message carries are none of these, and are told apart by their length.
fn stripped_candidates(len: usize) -> &'static [u32] {
    match len {
        2 => &[3],
        5 => &[10],
        6 => &[13],
        7 => &[4, 6],
        9 => &[11, 12],
        10 => &[0, 1, 21],
        11 => &[20],
        12 => &[19],
        14 => &[9, 18],
        15 => &[22],
        16 => &[2, 15, 16],
        17 => &[5, 17],
        18 => &[7],
        19 => &[8],
        22 => &[14],
        _ => &[],
    }
}

/// `name`'s place in [`STRIPPED`], in any case (a `Connection` token).
fn stripped_index(name: &str) -> Option<u32> {
    stripped_candidates(name.len())
        .iter()
        .copied()
        .find(|&i| name_is(name.as_bytes(), STRIPPED_NAMES[i as usize].as_bytes()))
}

/// A message's header name's place in [`STRIPPED`]. A map's names are
/// lower case already, and compare as names: one of http's standard names
/// by its number, where a case-blind compare went byte by byte.
fn stripped_index_of(name: &HeaderName) -> Option<u32> {
    stripped_candidates(name.as_str().len()).iter().copied().find(|&i| STRIPPED[i as usize] == *name)
}

/// The [`STRIPPED`] names a message carries, as bits.
fn stripped_in(headers: &HeaderMap) -> u32 {
    let mut seen = 0u32;
    for name in headers.keys() {
        if let Some(i) = stripped_index_of(name) {
            seen |= 1 << i;
        }
    }
    seen
}

/// The [`STRIPPED`] names a client's request carries, found in one pass
/// over its names when it arrives. A name it does not carry then costs no
/// lookup (a hash each): usually it has no request id, trace or upgrade,
/// and nothing for the strip pass to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carried(u32);

impl Carried {
    /// What `headers` carries.
    pub fn of(headers: &HeaderMap) -> Self {
        Carried(stripped_in(headers))
    }

    /// Whether it has an `X-Request-Id`.
    pub fn request_id(self) -> bool {
        self.0 & X_REQUEST_ID_BIT != 0
    }

    /// Whether it has a `traceparent`.
    pub fn traceparent(self) -> bool {
        self.0 & TRACEPARENT_BIT != 0
    }

    /// Whether it has an `Upgrade`.
    pub fn upgrade(self) -> bool {
        self.0 & UPGRADE_BIT != 0
    }
}

/// Removes the [`STRIPPED`] names selected by `which`, and, when
/// `Connection` is among them, the headers its tokens name. Returns the
/// [`STRIPPED`] names the message had (`carried`), removed or not.
fn strip(headers: &mut HeaderMap, carried: Carried, which: u32) -> u32 {
    debug_assert_eq!(carried, Carried::of(headers), "the request changed since it arrived");
    let seen = carried.0;
    let mut present = seen & which;
    if present == 0 {
        return seen;
    }
    if present & CONNECTION_BIT != 0 {
        // Cloned values share the parsed head's bytes, and a second
        // `Connection` field is rare: usually nothing is allocated. Names are
        // removed by `&str`, which finds a header without building a
        // `HeaderName`: that copied every name not among http's standard
        // ones, such as the `keep-alive` of `Connection: keep-alive`.
        let mut connection = headers.get_all(header::CONNECTION).iter().cloned();
        if let Some(first) = connection.next() {
            let more: Vec<HeaderValue> = connection.collect();
            for value in std::iter::once(&first).chain(&more) {
                let Ok(value) = value.to_str() else { continue };
                for token in value.split(',') {
                    let token = token.trim();
                    // `keep-alive` and the like go below, by their bit.
                    let stripped_anyway = stripped_index(token).is_some_and(|i| which & 1 << i != 0);
                    if !token.is_empty() && !stripped_anyway {
                        headers.remove(token);
                    }
                }
            }
        }
    }
    while present != 0 {
        let i = present.trailing_zeros();
        present &= present - 1;
        headers.remove(&STRIPPED[i as usize]);
    }
    seen
}

/// True when a backend response's header `name`, in any case, never
/// reaches the client: hop-by-hop, or what a backend may not tell the
/// client (SPEC §3 "Response to client"). The backend client leaves these
/// out as it reads a head (with the names its `Connection` fields list), so
/// that they are never built into the response's map only to be removed.
pub fn dropped_from_response(name: &[u8]) -> bool {
    // This runs for every field of every response: most are told apart by
    // their length alone, before any candidate is looked at.
    name.len() < 32
        && FROM_BACKEND_LENGTHS & 1 << name.len() != 0
        && stripped_candidates(name.len())
            .iter()
            .any(|&i| FROM_BACKEND & 1 << i != 0 && name_is(name, STRIPPED_NAMES[i as usize].as_bytes()))
}

/// The lengths of the names in [`FROM_BACKEND`], as bits (all are under 32 bytes).
const FROM_BACKEND_LENGTHS: u32 = {
    let mut lengths = 0;
    let mut i = 0;
    while i < STRIPPED_NAMES.len() {
        if FROM_BACKEND & 1 << i != 0 {
            assert!(STRIPPED_NAMES[i].len() < 32);
            lengths |= 1 << STRIPPED_NAMES[i].len();
        }
        i += 1;
    }
    lengths
};

/// True when `name`, a field name or `Connection` token as it came (any
/// case), is `lower`: lower-case letters, digits and `-`. Setting the
/// 0x20 bit lower-cases a letter and leaves a digit or `-` as it is; no
/// other byte a field name or value may hold turns into one of those, so
/// this is exact, at a fraction of a case-blind compare's cost (it runs for
/// every field of every response).
pub fn name_is(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'));
    name.len() == lower.len() && name.iter().zip(lower).fold(0, |diff, (a, b)| diff | ((a | 0x20) ^ b)) == 0
}

/// What a backend is told about a request: the connection it came in on,
/// its id and its trace.
pub struct Forwarded<'a> {
    /// The client's address, as a header value made once per connection.
    pub client_ip: &'a HeaderValue,
    /// The normalised Host, as the backend's `Host` and `X-Forwarded-Host`.
    pub host: &'a HeaderValue,
    /// `X-Forwarded-Port` value: the port the client connected to.
    pub port: &'a HeaderValue,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The raw request URI.
    pub original_uri: &'a str,
    /// `X-Request-Id`.
    pub request_id: &'a HeaderValue,
    /// `traceparent`: the client's trace, or a new one, with the proxy's span.
    pub traceparent: &'a [u8],
    /// The client's `tracestate` goes on: its trace is continued.
    pub keep_tracestate: bool,
}

/// Rewrites a client request's headers for the backend: hop-by-hop and
/// `Proxy` dropped, `Expect` handled here, `Forwarded` and `X-Real-IP`
/// dropped, the upgrade kept when `upgrade` is given. `Host` is the
/// normalised host, as nginx's `proxy_set_header Host $host`: tools compare
/// it with their own name, and HTTP/2 clients send `:authority` only.
///
/// Returns the header lines the proxy adds, each `name: value\r\n`, for
/// the request head: `X-Forwarded-*` and `X-Original-URI` (the client's
/// copies removed, a client's `X-Forwarded-For` extended), `X-Request-Id`
/// and `traceparent`. Written straight into the head, they cost no hash,
/// insert or copy into the header map on every request.
pub fn to_upstream(
    headers: &mut HeaderMap,
    carried: Carried,
    fwd: &Forwarded<'_>,
    upgrade: Option<HeaderValue>,
) -> Vec<u8> {
    let which = if fwd.keep_tracestate { FROM_CLIENT } else { FROM_CLIENT | TRACESTATE_BIT };
    // `X-Forwarded-For` is left for below; a `Connection` field naming it
    // has removed it already.
    let seen = strip(headers, carried, which);
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
    // Usually the client's one `Host` is that already, and is left in place.
    let mut hosts = headers.get_all(header::HOST).iter();
    if !(hosts.next() == Some(fwd.host) && hosts.next().is_none()) {
        headers.insert(header::HOST, fwd.host.clone());
    }

    let mut lines = Vec::with_capacity(ADDED_LINES_LEN + fwd.host.len() + fwd.original_uri.len());
    // Usually the client sent none: the connection's own value alone.
    lines.extend_from_slice(b"x-forwarded-for: ");
    if seen & X_FORWARDED_FOR_BIT != 0 {
        for previous in headers.get_all(&X_FORWARDED_FOR).iter().filter(|v| !v.is_empty()) {
            lines.extend_from_slice(previous.as_bytes());
            lines.extend_from_slice(b", ");
        }
        headers.remove(&X_FORWARDED_FOR);
    }
    lines.extend_from_slice(fwd.client_ip.as_bytes());
    lines.extend_from_slice(b"\r\n");
    add_line(&mut lines, b"x-forwarded-host: ", fwd.host.as_bytes());
    add_line(&mut lines, b"x-forwarded-port: ", fwd.port.as_bytes());
    add_line(&mut lines, b"x-forwarded-proto: ", fwd.proto.as_bytes());
    // A URI is always a valid field value; one that is not is left out,
    // never sent broken.
    if fwd.original_uri.bytes().all(|b| b == b'\t' || (b >= b' ' && b != 0x7f)) {
        add_line(&mut lines, b"x-original-uri: ", fwd.original_uri.as_bytes());
    }
    add_line(&mut lines, b"x-request-id: ", fwd.request_id.as_bytes());
    add_line(&mut lines, b"traceparent: ", fwd.traceparent);
    lines
}

/// About what the added lines take but for the host and the URI.
const ADDED_LINES_LEN: usize = 224;

/// Appends the line `name: value`, given `name: ` as one piece (the
/// tests read the lines back as a backend does).
fn add_line(lines: &mut Vec<u8>, name_and_colon: &[u8], value: &[u8]) {
    lines.extend_from_slice(name_and_colon);
    lines.extend_from_slice(value);
    lines.extend_from_slice(b"\r\n");
}

/// Joins an HTTP/2 request's `Cookie` fields into one with `; ` (RFC 9113
/// §8.2.3), as HTTP/1.1 backends expect: browsers send each cookie as its
/// own field over HTTP/2, and a backend reading one field, or joining them
/// with `, `, would lose all but the first.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined = BytesMut::new();
    for cookie in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.put_slice(b"; ");
        }
        joined.put_slice(cookie.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_maybe_shared(joined.freeze()) {
        headers.insert(header::COOKIE, value);
    }
}

/// `ip` as the `X-Forwarded-For` value of a client with no proxy before
/// ours; made once per connection, so that each request shares it.
pub fn client_ip_value(ip: IpAddr) -> HeaderValue {
    // An address's text is always a valid header value.
    HeaderValue::from_maybe_shared(Bytes::from(ip.to_string())).unwrap_or(HeaderValue::from_static("-"))
}

/// Rewrites `Location: http://<host>/...` to the scheme the client used, so a
/// backend that only knows plain HTTP does not bounce HTTPS clients to HTTP.
/// `host` is the Host header as the client sent it.
pub fn rewrite_location(headers: &mut HeaderMap, host: &str, proto: &'static str) {
    if proto == "http" {
        return;
    }
    let Some(location) = headers.get(header::LOCATION) else { return };
    let Some(rest) = location.as_bytes().strip_prefix(b"http://") else { return };
    let authority_end = rest.iter().position(|b| matches!(b, b'/' | b'?' | b'#')).unwrap_or(rest.len());
    if !rest[..authority_end].eq_ignore_ascii_case(host.as_bytes()) {
        return;
    }
    let mut rewritten = BytesMut::with_capacity(location.len() + 1);
    rewritten.put_slice(proto.as_bytes());
    rewritten.put_slice(b"://");
    rewritten.put_slice(rest);
    if let Ok(value) = HeaderValue::from_maybe_shared(rewritten.freeze()) {
        headers.insert(header::LOCATION, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_id::X_REQUEST_ID;
    use crate::trace_context::{TRACEPARENT, TRACESTATE};

    /// `to_upstream`, with the lines it adds put into the map, as the
    /// backend reads them.
    fn forward(headers: &mut HeaderMap, fwd: &Forwarded<'_>, upgrade: Option<HeaderValue>) {
        let lines = to_upstream(headers, Carried::of(headers), fwd, upgrade);
        let text = std::str::from_utf8(&lines).unwrap();
        assert!(text.ends_with("\r\n"), "{text:?}");
        for line in text.trim_end_matches("\r\n").split("\r\n") {
            let (name, value) = line.split_once(": ").unwrap();
            headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
    }

    static ID: HeaderValue = HeaderValue::from_static("id-1");
    const TRACE: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn fwd<'a>(client_ip: &'a HeaderValue, host: &'a HeaderValue, port: &'a HeaderValue) -> Forwarded<'a> {
        Forwarded {
            client_ip,
            host,
            port,
            proto: "http",
            original_uri: "/",
            request_id: &ID,
            traceparent: TRACE,
            keep_tracestate: false,
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    #[test]
    fn upstream_headers() {
        let mut headers = map(&[
            ("host", "Foo.toolforge.org"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy", "http://evil"),
            ("te", "trailers"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-host", "spoofed"),
            ("x-forwarded-proto", "spoofed"),
            ("x-forwarded-port", "1"),
            ("x-original-uri", "/spoofed"),
            ("x-request-id", "spoofed"),
            ("traceparent", "spoofed"),
            ("tracestate", "spoofed"),
            ("forwarded", "for=10.9.9.9;proto=https"),
            ("x-real-ip", "10.9.9.9"),
            ("user-agent", "ua"),
        ]);
        let port = HeaderValue::from_static("8080");
        let client = client_ip_value("192.0.2.7".parse().unwrap());
        let host = HeaderValue::from_static("foo.toolforge.org");
        let fwd = Forwarded { original_uri: "/a?b=c", ..fwd(&client, &host, &port) };
        forward(&mut headers, &fwd, None);
        assert_eq!(headers["host"], "foo.toolforge.org");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 192.0.2.7");
        assert_eq!(headers["x-forwarded-host"], "foo.toolforge.org");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-port"], "8080");
        assert_eq!(headers["x-original-uri"], "/a?b=c");
        assert_eq!(headers["x-request-id"], "id-1");
        assert_eq!(headers["traceparent"].as_bytes(), TRACE);
        assert_eq!(headers["user-agent"], "ua");
        for gone in ["connection", "x-private", "keep-alive", "proxy", "te", "forwarded", "x-real-ip", "tracestate"] {
            assert!(!headers.contains_key(gone), "{gone}");
        }
        for once in ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-original-uri"] {
            assert_eq!(headers.get_all(once).iter().count(), 1, "{once}");
        }
        for once in ["x-request-id", "traceparent"] {
            assert_eq!(headers.get_all(once).iter().count(), 1, "{once}");
        }
    }

    #[test]
    fn the_backend_gets_one_host_the_normalised_one() {
        let port = HeaderValue::from_static("443");
        let client = client_ip_value("192.0.2.7".parse().unwrap());
        let host = HeaderValue::from_static("foo.toolforge.org");
        let fwd = Forwarded { proto: "https", ..fwd(&client, &host, &port) };
        for sent in [&[][..], &["foo.toolforge.org"], &["FOO.toolforge.org"], &["foo.toolforge.org", "evil.example"]] {
            let mut headers = map(&sent.iter().map(|h| ("host", *h)).collect::<Vec<_>>());
            forward(&mut headers, &fwd, None);
            let hosts: Vec<_> = headers.get_all("host").iter().collect();
            assert_eq!(hosts, ["foo.toolforge.org"], "{sent:?}");
        }
    }

    #[test]
    fn every_connection_field_names_headers_to_drop_in_any_case() {
        let mut headers = map(&[
            ("connection", "X-One"),
            ("connection", " x-two ,close,, not a name"),
            ("x-one", "1"),
            ("x-two", "2"),
            ("x-three", "3"),
            ("keep-alive", "timeout=5"),
        ]);
        let carried = Carried::of(&headers);
        strip(&mut headers, carried, HOP_BY_HOP);
        let left: Vec<&str> = headers.keys().map(|name| name.as_str()).collect();
        assert_eq!(left, ["x-three"]);
    }

    #[test]
    fn a_name_matches_its_lower_case_form_and_nothing_else() {
        for name in ["connection", "Connection", "CONNECTION", "cOnNeCtIoN"] {
            assert!(name_is(name.as_bytes(), b"connection"), "{name}");
        }
        assert!(name_is(b"HTTP2-Settings", b"http2-settings"));
        assert!(!name_is(b"connectio", b"connection"));
        assert!(!name_is(b"connectiom", b"connection"));
        // Exact over every byte a field may hold (httparse refuses the other
        // control bytes, such as the CR that 0x20 would fold onto `-`).
        let lower_alphabet = (b'a'..=b'z').chain(b'0'..=b'9').chain([b'-']);
        for target in lower_alphabet {
            for b in (0..=255u8).filter(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)) {
                assert_eq!(name_is(&[b], &[target]), b.to_ascii_lowercase() == target, "{b:#x} against {target:#x}");
            }
        }
    }

    #[test]
    fn a_request_says_what_it_carries() {
        let carried = Carried::of(&map(&[("host", "a"), ("user-agent", "b")]));
        assert!(!carried.request_id() && !carried.traceparent() && !carried.upgrade());
        let carried = Carried::of(&map(&[("X-Request-Id", "1"), ("traceparent", "2"), ("upgrade", "websocket")]));
        assert!(carried.request_id() && carried.traceparent() && carried.upgrade());
        assert_eq!(STRIPPED[UPGRADE_BIT.trailing_zeros() as usize], header::UPGRADE);
        assert_eq!(STRIPPED[X_REQUEST_ID_BIT.trailing_zeros() as usize], X_REQUEST_ID);
        assert_eq!(STRIPPED[TRACEPARENT_BIT.trailing_zeros() as usize], TRACEPARENT);
        assert_eq!(STRIPPED[TRACESTATE_BIT.trailing_zeros() as usize], TRACESTATE);
        assert_eq!(STRIPPED[X_FORWARDED_FOR_BIT.trailing_zeros() as usize], X_FORWARDED_FOR);
    }

    #[test]
    fn every_stripped_name_is_found_by_its_index() {
        for (i, name) in STRIPPED.iter().enumerate() {
            assert_eq!(stripped_index(name.as_str()), Some(i as u32), "{name}");
            assert_eq!(stripped_index_of(name), Some(i as u32), "{name}");
        }
        // As a parsed message's names are: lower case, standard or not.
        for other in ["host", "user-agent", "x-forwarded-fo", "content-type", "x-request-ie", "cookie"] {
            assert_eq!(stripped_index_of(&HeaderName::from_bytes(other.as_bytes()).unwrap()), None, "{other}");
        }
        let parsed = HeaderName::from_bytes(b"X-Forwarded-Host").unwrap();
        assert_eq!(stripped_index_of(&parsed), Some(15));
        assert_eq!(stripped_index("Keep-Alive"), Some(1));
        for other in ["host", "user-agent", "x-forwarded-fo", "te2", "proxy-connectio", "cookie", ""] {
            assert_eq!(stripped_index(other), None, "{other}");
        }
    }

    #[test]
    fn a_backend_s_hop_by_hop_and_service_worker_scope_do_not_reach_the_client() {
        for name in ["Connection", "keep-alive", "Transfer-Encoding", "TE", "Upgrade", "Service-Worker-Allowed"] {
            assert!(dropped_from_response(name.as_bytes()), "{name}");
        }
        for (i, name) in STRIPPED.iter().enumerate() {
            let dropped = FROM_BACKEND & 1 << i != 0;
            assert_eq!(dropped_from_response(name.as_str().as_bytes()), dropped, "{name}");
            assert_eq!(dropped_from_response(name.as_str().to_ascii_uppercase().as_bytes()), dropped, "{name}");
        }
        // `Proxy` and `X-Forwarded-*` are dropped from a client's request only.
        for name in ["Content-Type", "Proxy", "X-Forwarded-For", "Set-Cookie", "Connectio", "", "Connections"] {
            assert!(!dropped_from_response(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn a_client_s_forwarded_for_is_extended_and_otherwise_the_connection_s_is_shared() {
        let port = HeaderValue::from_static("80");
        let client = client_ip_value("192.0.2.7".parse().unwrap());
        let host = HeaderValue::from_static("h");
        let fwd = fwd(&client, &host, &port);
        let mut headers = map(&[]);
        forward(&mut headers, &fwd, None);
        assert_eq!(headers["x-forwarded-for"], "192.0.2.7");
        let mut headers = map(&[("x-forwarded-for", "10.0.0.1")]);
        forward(&mut headers, &fwd, None);
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        let mut headers = map(&[("x-forwarded-for", "")]);
        forward(&mut headers, &fwd, None);
        assert_eq!(headers["x-forwarded-for"], "192.0.2.7");
        // A client naming it in `Connection` loses its own, as any hop-by-hop one.
        let mut headers = map(&[("connection", "X-Forwarded-For"), ("x-forwarded-for", "10.0.0.1")]);
        forward(&mut headers, &fwd, None);
        assert_eq!(headers.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), ["192.0.2.7"]);
    }

    #[test]
    fn a_continued_trace_keeps_its_state_and_a_uri_that_is_no_field_value_is_left_out() {
        let port = HeaderValue::from_static("80");
        let client = client_ip_value("192.0.2.7".parse().unwrap());
        let host = HeaderValue::from_static("h");
        let fwd = Forwarded { keep_tracestate: true, original_uri: "/a\x7fb", ..fwd(&client, &host, &port) };
        let mut headers = map(&[("tracestate", "congo=t61rcWkgMzE"), ("x-original-uri", "/spoofed")]);
        forward(&mut headers, &fwd, None);
        assert_eq!(headers["tracestate"], "congo=t61rcWkgMzE");
        assert!(!headers.contains_key("x-original-uri"));
    }

    #[test]
    fn http2_cookie_fields_are_joined() {
        let mut headers = map(&[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")]);
        join_cookies(&mut headers);
        assert_eq!(headers.get_all("cookie").iter().collect::<Vec<_>>(), ["a=1; b=2; c=3"]);
        let mut headers = map(&[("cookie", "a=1; b=2")]);
        join_cookies(&mut headers);
        assert_eq!(headers.get_all("cookie").iter().collect::<Vec<_>>(), ["a=1; b=2"]);
        let mut headers = map(&[]);
        join_cookies(&mut headers);
        assert!(!headers.contains_key("cookie"));
    }

    #[test]
    fn upgrade_is_kept() {
        let mut headers = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let port = HeaderValue::from_static("80");
        let client = client_ip_value("::1".parse().unwrap());
        let host = HeaderValue::from_static("h");
        let fwd = fwd(&client, &host, &port);
        forward(&mut headers, &fwd, Some(HeaderValue::from_static("websocket")));
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(headers["x-forwarded-for"], "::1");
    }

    #[test]
    fn location_follows_client_scheme() {
        let mut headers = map(&[("location", "http://foo.toolforge.org/x?y")]);
        rewrite_location(&mut headers, "foo.toolforge.org", "https");
        assert_eq!(headers["location"], "https://foo.toolforge.org/x?y");

        let mut headers = map(&[("location", "http://elsewhere.org/x")]);
        rewrite_location(&mut headers, "foo.toolforge.org", "https");
        assert_eq!(headers["location"], "http://elsewhere.org/x");

        let mut headers = map(&[("location", "http://foo.toolforge.org/x")]);
        rewrite_location(&mut headers, "foo.toolforge.org", "http");
        assert_eq!(headers["location"], "http://foo.toolforge.org/x");
    }
}
