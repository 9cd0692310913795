//! Request-line and Host checks done before routing: the Host normalised as
//! nginx's `$host` (lower case, no port, no trailing dot) and the URI's
//! percent-encoding.

use std::borrow::Cow;

/// Why a Host header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHost {
    /// Empty, or only a port.
    Empty,
    /// A character no host name has.
    Character,
    /// The port is not a number in 0-65535.
    Port,
}

/// Longest Host accepted: a DNS name is at most 253 bytes, plus a port.
const MAX_HOST_LEN: usize = 260;

/// A host byte's class in [`HOST_BYTE`]: lower case, digit, `-` or `_`.
const PLAIN: u8 = 1;
/// An upper-case letter, lower-cased by normalisation.
const UPPER: u8 = 2;
/// A label separator.
const DOT: u8 = 4;

/// The class of each byte in a DNS name or IPv4 address; 0 for a byte
/// none may hold.
static HOST_BYTE: [u8; 256] = {
    let mut table = [0; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = match b as u8 {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => PLAIN,
            b'A'..=b'Z' => UPPER,
            b'.' => DOT,
            _ => 0,
        };
        b += 1;
    }
    table
};

/// Lower-cases `raw` and strips its port and trailing dot; refuses anything
/// that is not a DNS name, an IPv4 address or a bracketed IPv6 address.
/// Borrows when the host is already in normal form (the common case).
pub fn normalize_host(raw: &str) -> Result<Cow<'_, str>, BadHost> {
    if raw.len() > MAX_HOST_LEN {
        return Err(BadHost::Character);
    }
    let (host, port) = if raw.starts_with('[') {
        let end = raw.find(']').ok_or(BadHost::Character)?;
        let inner = &raw[1..end];
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(BadHost::Character);
        }
        match &raw[end + 1..] {
            "" => (&raw[..=end], None),
            rest => (&raw[..=end], Some(rest.strip_prefix(':').ok_or(BadHost::Port)?)),
        }
    } else {
        match memchr::memchr(b':', raw.as_bytes()) {
            Some(colon) => (&raw[..colon], Some(&raw[colon + 1..])),
            None => (raw, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty()
            || port.len() > 5
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err())
    {
        return Err(BadHost::Port);
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(BadHost::Empty);
    }
    if !host.starts_with('[') {
        // One table load per byte: this runs on every request.
        let mut seen = 0;
        // Starting as if after a dot refuses a leading dot as an empty label.
        let mut previous = DOT;
        for &b in host.as_bytes() {
            let class = HOST_BYTE[usize::from(b)];
            // An empty label (two dots in a row) is refused with the bad bytes.
            if class == 0 || class & previous & DOT != 0 {
                return Err(BadHost::Character);
            }
            seen |= class;
            previous = class;
        }
        // One trailing dot is the root label; a second would survive
        // normalisation and make it not idempotent.
        if previous == DOT {
            return Err(BadHost::Character);
        }
        if seen & UPPER != 0 {
            return Ok(Cow::Owned(host.to_ascii_lowercase()));
        }
    } else if host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Ok(Cow::Owned(host.to_ascii_lowercase()));
    }
    Ok(Cow::Borrowed(host))
}

/// True when `a` and `b` name the same host once normalised (HTTP/2's
/// `host` header against `:authority`); anything unparsable differs.
pub fn same_host(a: &[u8], b: &str) -> bool {
    let Ok(a) = std::str::from_utf8(a) else { return false };
    match (normalize_host(a), normalize_host(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// True when every `%` in `s` starts a two-hex-digit escape.
pub fn valid_percent_encoding(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some(offset) = bytes[i..].iter().position(|b| *b == b'%') {
        let at = i + offset;
        match bytes.get(at + 1..at + 3) {
            Some([a, b]) if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => i = at + 3,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_nginx_host() {
        assert_eq!(normalize_host("Foo.Toolforge.ORG:8080").unwrap(), "foo.toolforge.org");
        assert!(matches!(normalize_host("foo.toolforge.org").unwrap(), Cow::Borrowed(_)));
        assert_eq!(normalize_host("foo.toolforge.org.").unwrap(), "foo.toolforge.org");
        assert_eq!(normalize_host("127.0.0.1:80").unwrap(), "127.0.0.1");
        assert_eq!(normalize_host("[::1]:443").unwrap(), "[::1]");
        assert_eq!(normalize_host("ru_monuments.toolforge.org").unwrap(), "ru_monuments.toolforge.org");
    }

    #[test]
    fn refuses_bad_hosts() {
        for bad in ["", ":80", "a b", "a/b", "a@b", "x:", "x:99999", "x:8a", "[::1", "[zz]", "..", "a..b", ".a", "é"] {
            assert!(normalize_host(bad).is_err(), "{bad:?}");
        }
        assert!(normalize_host(&"a".repeat(300)).is_err());
    }

    #[test]
    fn refuses_malformed_hosts() {
        for bad in [
            "foo.toolforge.org:80:80",
            "foo.toolforge.org:-1",
            "foo.toolforge.org:+80",
            "foo.toolforge.org: 80",
            " foo.toolforge.org",
            "foo.toolforge.org\t",
            "foo\0.toolforge.org",
            "user@foo.toolforge.org",
            "foo.toolforge.org/path",
            "foo.toolforge.org?",
            "foo%2etoolforge.org",
            "[::1]x",
            "[::1]:",
            "[::1]:99999",
            "[]",
            "[foo.toolforge.org]",
            "::1",
            ".",
            "..:80",
            "foo.toolforge.org..",
            "fo\u{f6}.toolforge.org",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn http2_host_header_must_name_the_authority() {
        assert!(same_host(b"Foo.Toolforge.org:443", "foo.toolforge.org"));
        assert!(same_host(b"foo.toolforge.org.", "FOO.toolforge.org:8443"));
        assert!(!same_host(b"other.toolforge.org", "foo.toolforge.org"));
        assert!(!same_host(b"foo.toolforge.org\xff", "foo.toolforge.org"));
        assert!(!same_host(b"a b", "a b"), "unparsable hosts never agree");
    }

    #[test]
    fn percent_encoding() {
        assert!(valid_percent_encoding("/a%20b%2Fc"));
        assert!(valid_percent_encoding("/plain"));
        assert!(!valid_percent_encoding("/a%zz"));
        assert!(!valid_percent_encoding("/a%2"));
        assert!(!valid_percent_encoding("/a%"));
    }
}
