//! The headers every response gets (SPEC §3 "Response to client"):
//! `extra_headers`, and `Strict-Transport-Security` over HTTPS, each
//! replacing a backend's copies.
//!
//! An HTTP/1 connection hands them to hyper's writer once, as head lines
//! written into every response head; a response then only loses its own
//! copies, found in one pass over its names. Inserted into each response's
//! header map instead, they cost a hash and an insert per header on every
//! response. HTTP/2 heads go through HPACK, and get them in the map.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `Strict-Transport-Security` over HTTPS: a year, as production's nginx.
const HSTS: HeaderValue = HeaderValue::from_static("max-age=31622400");

/// The headers added to every response, in the forms the two protocols need.
#[derive(Debug)]
pub struct ExtraHeaders {
    /// The pairs sent over plain HTTP (`extra_headers` as configured) and
    /// over HTTPS (with the proxy's HSTS in place of any configured one).
    pairs: [Vec<(HeaderName, HeaderValue)>; 2],
    /// The same as head lines (`name: value\r\n`).
    lines: [Bytes; 2],
    /// Bit `n` set when a name of `pairs` is `n` bytes long (63 for longer
    /// ones): most names a response carries are told apart by their length.
    lengths: u64,
}

impl ExtraHeaders {
    /// The headers from `extra_headers` (already validated).
    pub fn new(extra: Vec<(HeaderName, HeaderValue)>) -> Self {
        let mut over_tls: Vec<_> =
            extra.iter().filter(|(name, _)| *name != header::STRICT_TRANSPORT_SECURITY).cloned().collect();
        over_tls.push((header::STRICT_TRANSPORT_SECURITY, HSTS));
        let pairs = [extra, over_tls];
        let lines = [head_lines(&pairs[0]), head_lines(&pairs[1])];
        let lengths = pairs.iter().flatten().fold(0, |bits, (name, _)| bits | length_bit(name.as_str()));
        ExtraHeaders { pairs, lines, lengths }
    }

    /// The head lines an HTTP/1 connection writes into every response.
    pub fn head_lines(&self, tls: bool) -> Bytes {
        self.lines[usize::from(tls)].clone()
    }

    /// Puts the headers into a response's map, replacing its copies (HTTP/2).
    pub fn insert_into(&self, headers: &mut HeaderMap, tls: bool) {
        for (name, value) in &self.pairs[usize::from(tls)] {
            headers.insert(name.clone(), value.clone());
        }
    }

    /// Removes a response's own copies of the headers its connection's
    /// writer adds (HTTP/1).
    pub fn remove_copies(&self, headers: &mut HeaderMap, tls: bool) {
        let sent = &self.pairs[usize::from(tls)];
        let ours =
            |name: &HeaderName| self.lengths & length_bit(name.as_str()) != 0 && sent.iter().any(|(n, _)| n == name);
        if headers.keys().any(ours) {
            for (name, _) in sent {
                headers.remove(name);
            }
        }
    }
}

/// `name`'s bit in [`ExtraHeaders::lengths`].
fn length_bit(name: &str) -> u64 {
    1 << name.len().min(63)
}

/// `pairs` as `name: value\r\n` lines.
fn head_lines(pairs: &[(HeaderName, HeaderValue)]) -> Bytes {
    let mut lines = BytesMut::new();
    for (name, value) in pairs {
        lines.put_slice(name.as_str().as_bytes());
        lines.put_slice(b": ");
        lines.put_slice(value.as_bytes());
        lines.put_slice(b"\r\n");
    }
    lines.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extra() -> ExtraHeaders {
        ExtraHeaders::new(vec![
            (HeaderName::from_static("x-clacks-overhead"), HeaderValue::from_static("GNU Terry Pratchett")),
            (HeaderName::from_static("permissions-policy"), HeaderValue::from_static("browsing-topics=()")),
        ])
    }

    #[test]
    fn head_lines_carry_hsts_over_https_only() {
        let extra = extra();
        assert_eq!(
            extra.head_lines(false),
            "x-clacks-overhead: GNU Terry Pratchett\r\npermissions-policy: browsing-topics=()\r\n"
        );
        assert_eq!(
            extra.head_lines(true),
            "x-clacks-overhead: GNU Terry Pratchett\r\npermissions-policy: browsing-topics=()\r\n\
             strict-transport-security: max-age=31622400\r\n"
        );
    }

    #[test]
    fn a_response_loses_its_copies_and_keeps_the_rest() {
        let extra = extra();
        let mut headers = HeaderMap::new();
        headers.append("Permissions-Policy", HeaderValue::from_static("camera=()"));
        headers.append("permissions-policy", HeaderValue::from_static("mic=()"));
        headers.append("strict-transport-security", HeaderValue::from_static("max-age=1"));
        headers.append("x-own", HeaderValue::from_static("kept"));
        // Same length as a name of ours, another name.
        headers.append("x-clacks-overhea2", HeaderValue::from_static("kept"));
        let left = |headers: &HeaderMap| {
            let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
            names.sort();
            names.join(" ")
        };
        extra.remove_copies(&mut headers, false);
        assert_eq!(
            left(&headers),
            "strict-transport-security x-clacks-overhea2 x-own",
            "HSTS is the backend's over HTTP"
        );
        extra.remove_copies(&mut headers, true);
        assert_eq!(left(&headers), "x-clacks-overhea2 x-own");
    }

    #[test]
    fn inserted_into_a_map_they_replace_its_copies() {
        let extra = extra();
        let mut headers = HeaderMap::new();
        headers.append("x-clacks-overhead", HeaderValue::from_static("backend"));
        extra.insert_into(&mut headers, true);
        assert_eq!(headers.get_all("x-clacks-overhead").iter().collect::<Vec<_>>(), ["GNU Terry Pratchett"]);
        assert_eq!(headers["strict-transport-security"], "max-age=31622400");
        assert_eq!(headers.len(), 3);
    }

    #[test]
    fn an_operator_s_hsts_goes_over_plain_http_and_the_proxy_s_over_https() {
        let extra = ExtraHeaders::new(vec![(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=5"))]);
        assert_eq!(extra.head_lines(false), "strict-transport-security: max-age=5\r\n");
        assert_eq!(extra.head_lines(true), "strict-transport-security: max-age=31622400\r\n");
    }
}
