//! Values of the route table that validate themselves: tool names, route
//! patterns and backend URLs.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use memchr::memmem;
use regex::RegexBuilder;

use crate::regex_dfa::{DfaRefusal, RegexDfa};

/// Longest tool name accepted; far above any real tool, it bounds keys and log lines.
pub const MAX_TOOL_NAME_LEN: usize = 255;
/// Longest route pattern accepted, in bytes. Real patterns are `.*` and
/// `/<path>.*`, where the path comes from a Kubernetes label value (at most
/// 63 bytes) or a hand-registered prefix of a tool's URL space: 256 bytes is
/// four times the longest label-made pattern. A lookup costs one pass over
/// the path whatever the patterns (see `benches/worst_lookup.rs`); the length
/// bounds the automata and how far the lanes of a long path overlap.
pub const MAX_PATTERN_LEN: usize = 256;
/// Compiled-size limit of a pattern's automaton (the regex crate's
/// `size_limit`), in bytes. A literal path compiles to a few hundred bytes,
/// a Unicode `.` to about 2 KiB, a Unicode class such as `\w` to about
/// 40 KiB: 16 KiB admits `/<path>.*` with a handful of `.` and ASCII classes
/// (`[a-z0-9_]`), while a hostile pattern (`\w{20}`, `[^x]{200}`) is refused at
/// load instead of costing every proxy its automaton.
pub const PATTERN_SIZE_LIMIT: usize = 16 << 10;
/// Most bytes the DFA of a tool's regex routes may take, all of them
/// together (and so of any one regex route). Every regex route is searched
/// through a DFA built at load, one table step per path byte, so a lookup
/// costs the same whatever the patterns; what hostile patterns can still
/// inflate is the table, which this bounds. Real patterns (`.*`,
/// `/<path>.*`) are literals and need no DFA; measured hand-written regexes
/// take 1-18 KiB each (`^/[a-z]+/v[0-9]+/` 1 KiB, `/index.php.*` 7 KiB,
/// `/a.b.c.d.e.f.*` 18 KiB), a lone Unicode `\w` 179 KiB: 256 KiB holds a
/// dozen of the largest together, while a tool's worst case is a twelfth of
/// the 3 MiB its 64 regex routes could hold before.
pub const TOOL_REGEX_DFA_LIMIT: usize = 256 << 10;

/// Why a tool name, pattern or backend URL was refused. The message is fit
/// for an operator or a registrar client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// The tool name is not `[a-z0-9][a-z0-9_-]*`.
    #[error("invalid tool name {0:?}: must match [a-z0-9][a-z0-9_-]*")]
    ToolName(String),
    /// The route pattern does not compile as a Rust regex.
    #[error("invalid route pattern {pattern:?}: {reason}")]
    Pattern {
        /// The pattern as given.
        pattern: String,
        /// The regex compiler's complaint, first line only.
        reason: String,
    },
    /// The backend is not `http(s)://host:port`.
    #[error("invalid backend url {url:?}: {reason}")]
    BackendUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A tool's name, as used in `<tool>.toolforge.org` and `prefix:<tool>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ToolName(Box<str>);

impl ToolName {
    /// Accepts `[a-z0-9][a-z0-9_-]*` exactly (no case folding).
    pub fn parse(name: &str) -> Result<Self, InvalidInput> {
        if Self::is_valid(name) { Ok(ToolName(name.into())) } else { Err(InvalidInput::ToolName(name.into())) }
    }

    /// True when `name` is a valid tool name; cheap, for the request path.
    pub fn is_valid(name: &str) -> bool {
        let bytes = name.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_TOOL_NAME_LEN
            && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
            && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for ToolName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ToolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a pattern is matched. Most tools use `.*`, which needs no regex at all.
#[derive(Debug, Clone)]
enum Matcher {
    /// Matches every path (`.*` and the empty pattern).
    Everything,
    /// A literal, optionally followed by `.*` (the usual `/<path>.*`):
    /// a substring search (SIMD, with a worst case linear in the path),
    /// without the memory of a compiled regex.
    Contains(Box<memmem::Finder<'static>>),
    /// An unanchored regex search, as a DFA built once at parse; `None` once
    /// the pattern's tool searches it through a DFA shared by all its regex
    /// routes (see `lookup`), so the table does not hold both.
    Regex(Option<Arc<RegexDfa>>),
}

/// A route pattern: a regex searched (unanchored) in the request path.
#[derive(Debug, Clone)]
pub struct RoutePattern {
    source: Arc<str>,
    matcher: Matcher,
}

impl RoutePattern {
    /// Compiles a pattern; refuses what does not compile (e.g. PCRE lookaround),
    /// patterns longer than [`MAX_PATTERN_LEN`] and patterns whose automaton
    /// would exceed [`PATTERN_SIZE_LIMIT`].
    pub fn parse(pattern: &str) -> Result<Self, InvalidInput> {
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(InvalidInput::Pattern {
                pattern: pattern.into(),
                reason: format!("longer than {MAX_PATTERN_LEN} bytes"),
            });
        }
        let literal = pattern.strip_suffix(".*").unwrap_or(pattern);
        let matcher = if literal.is_empty() {
            Matcher::Everything
        } else if literal.bytes().all(is_plain_literal_byte) {
            Matcher::Contains(Box::new(memmem::Finder::new(literal.as_bytes()).into_owned()))
        } else {
            let refuse = |reason: String| InvalidInput::Pattern { pattern: pattern.into(), reason };
            // The regex crate's compiler gives the clearest syntax errors and
            // applies the compiled-size limit; the DFA is what is kept.
            RegexBuilder::new(pattern)
                .size_limit(PATTERN_SIZE_LIMIT)
                .build()
                .map_err(|e| refuse(first_line(&e.to_string())))?;
            let dfa = RegexDfa::build(&[(pattern, 0)], TOOL_REGEX_DFA_LIMIT).map_err(|e| match e {
                DfaRefusal::TooBig => refuse(format!("its DFA would exceed {} KiB", TOOL_REGEX_DFA_LIMIT >> 10)),
                DfaRefusal::Unsupported(why) if why.contains("word boundar") => {
                    refuse(r"a Unicode word boundary (\b) is not supported; use the ASCII one, (?-u:\b)".to_string())
                }
                DfaRefusal::Unsupported(why) => refuse(first_line(&why)),
            })?;
            Matcher::Regex(Some(Arc::new(dfa)))
        };
        Ok(RoutePattern { source: pattern.into(), matcher })
    }

    /// True when matching needs the regex engine (not a plain literal or `.*`).
    pub fn is_regex(&self) -> bool {
        matches!(self.matcher, Matcher::Regex(_))
    }

    /// Heap bytes this compiled pattern holds, for memory budgets: a
    /// regex's DFA as built, a literal about its text.
    pub fn estimated_size(&self) -> usize {
        match &self.matcher {
            Matcher::Everything => self.source.len(),
            Matcher::Contains(_) => 2 * self.source.len() + 64,
            Matcher::Regex(dfa) => dfa.as_ref().map_or(0, |d| d.memory_usage()) + self.source.len(),
        }
    }

    /// The same pattern without its own DFA, for a tool that searches it
    /// through a DFA shared by all its regex routes.
    pub(crate) fn without_own_dfa(&self) -> RoutePattern {
        match &self.matcher {
            Matcher::Regex(Some(_)) => RoutePattern { source: Arc::clone(&self.source), matcher: Matcher::Regex(None) },
            _ => self.clone(),
        }
    }

    /// The literal a match needs, when the pattern is a plain literal
    /// (optionally followed by `.*`); empty for `.*`; `None` for a regex.
    pub(crate) fn literal(&self) -> Option<&str> {
        match &self.matcher {
            Matcher::Everything => Some(""),
            Matcher::Contains(_) => Some(self.source.strip_suffix(".*").unwrap_or(&self.source)),
            Matcher::Regex(_) => None,
        }
    }

    /// The pattern as written in Redis.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True when the pattern is found anywhere in `path`.
    #[inline]
    pub fn is_match(&self, path: &str) -> bool {
        match &self.matcher {
            Matcher::Everything => true,
            Matcher::Contains(literal) => literal.find(path.as_bytes()).is_some(),
            Matcher::Regex(Some(dfa)) => dfa.search(path.as_bytes(), 1) != 0,
            // Not on the request path (the tool's shared DFA is): rebuild it.
            Matcher::Regex(None) => RoutePattern::parse(&self.source).is_ok_and(|p| p.is_match(path)),
        }
    }
}

impl PartialEq for RoutePattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for RoutePattern {}

impl fmt::Display for RoutePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Bytes that stand for themselves in a regex; anything else goes to the regex engine.
fn is_plain_literal_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"/_-:@!,;=%~'<>\"".contains(&b)
}

fn first_line(message: &str) -> String {
    // regex errors are multi-line drawings; the last line names the problem.
    message
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(message)
        .trim()
        .trim_start_matches("error: ")
        .to_string()
}

/// The scheme used to talk to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Plain HTTP/1.1.
    Http,
    /// HTTP/1.1 over TLS.
    Https,
}

impl Scheme {
    /// `"http"` or `"https"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Where a route sends requests: `http(s)://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    scheme: Scheme,
    host: Arc<str>,
    port: u16,
    /// The three above hashed once, with a key chosen at random per
    /// process: a request looks its backend up in several tables, and
    /// hashing the host each time cost 80 instructions a lookup. Keyed,
    /// because backends are named by tools: colliding names cannot be
    /// chosen without the key.
    hash: u64,
}

/// The key of [`BackendUrl`]'s hashes.
static BACKEND_HASH_KEY: std::sync::LazyLock<foldhash::quality::RandomState> =
    std::sync::LazyLock::new(foldhash::quality::RandomState::default);

impl std::hash::Hash for BackendUrl {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl BackendUrl {
    /// Parses a backend as stored in Redis. A value without a scheme means
    /// `http://`; the port defaults to the scheme's; a path other than `/`,
    /// a query, a fragment or credentials are refused.
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        let err = |reason| InvalidInput::BackendUrl { url: value.into(), reason };
        let (scheme, rest) = if let Some(rest) = value.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = value.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else if value.contains("://") {
            return Err(err("scheme must be http or https"));
        } else {
            (Scheme::Http, value)
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(err("must be scheme://host:port with no path"));
        }
        if authority.contains('@') {
            return Err(err("credentials are not allowed"));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| err("bad host:port"))?;
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| err("port must be 1-65535"))?,
            None => match scheme {
                Scheme::Http => 80,
                Scheme::Https => 443,
            },
        };
        if !valid_host(host) {
            return Err(err("bad host"));
        }
        let host: Arc<str> = host.to_ascii_lowercase().into();
        let hash = std::hash::BuildHasher::hash_one(&*BACKEND_HASH_KEY, (scheme, &*host, port));
        Ok(BackendUrl { scheme, host, port, hash })
    }

    /// Like [`BackendUrl::parse`] but also requires an explicit scheme and port,
    /// as the registrar demands of new registrations.
    pub fn parse_strict(value: &str) -> Result<Self, InvalidInput> {
        let err = |reason| InvalidInput::BackendUrl { url: value.into(), reason };
        let rest = value
            .strip_prefix("http://")
            .or_else(|| value.strip_prefix("https://"))
            .ok_or_else(|| err("must start with http:// or https://"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        match split_host_port(authority) {
            Some((_, Some(_))) => Self::parse(value),
            _ => Err(err("must name a port")),
        }
    }

    /// The backend's scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The host name or IP address (IPv6 in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
    }
}

/// Splits `host[:port]`, where host may be a bracketed IPv6 address.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if authority.starts_with('[') {
        let end = authority.find(']')?;
        let host = &authority[..=end];
        match &authority[end + 1..] {
            "" => Some((host, None)),
            rest => rest.strip_prefix(':').map(|p| (host, Some(p))),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => Some((host, Some(port))),
            None => Some((authority, None)),
        }
    }
}

fn valid_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names() {
        for ok in ["a", "0", "foo", "foo-bar", "foo_bar", "a1-"] {
            assert!(ToolName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "_a", "Foo", "foo.bar", "foo/bar", "föö", "a b", &"a".repeat(256)] {
            assert!(ToolName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns() {
        let any = RoutePattern::parse(".*").unwrap();
        assert!(any.is_match("/") && any.is_match(""));
        let path = RoutePattern::parse("/api.*").unwrap();
        assert!(path.is_match("/tool/api/x"));
        assert!(!path.is_match("/tool/other"));
        assert!(matches!(path.matcher, Matcher::Contains(_)));
        let literal = RoutePattern::parse("/foo").unwrap();
        assert!(literal.is_match("/x/foo/y") && !literal.is_match("/fo"));
        let regex = RoutePattern::parse("^/foo.*").unwrap();
        assert!(matches!(regex.matcher, Matcher::Regex(_)));
        assert!(regex.is_match("/foo/x") && !regex.is_match("/x/foo"));
        let dot = RoutePattern::parse("/a.b.*").unwrap();
        assert!(dot.is_match("/aXb") && matches!(dot.matcher, Matcher::Regex(_)));
        let err = RoutePattern::parse("(?!x)").unwrap_err();
        assert!(err.to_string().contains("look-around"), "{err}");
        assert!(RoutePattern::parse("(").is_err());
        assert!(RoutePattern::parse(&"a".repeat(2000)).is_err());
        assert!(RoutePattern::parse("a{1000}{1000}").is_err());
    }

    #[test]
    fn pattern_limits() {
        // The longest allowed pattern loads, one byte more is refused.
        let longest = format!("/{}.*", "p".repeat(MAX_PATTERN_LEN - 3));
        assert_eq!(longest.len(), MAX_PATTERN_LEN);
        assert!(RoutePattern::parse(&longest).is_ok());
        let err = RoutePattern::parse(&format!("/{}.*", "p".repeat(MAX_PATTERN_LEN - 2))).unwrap_err();
        assert!(err.to_string().contains("longer than 256 bytes"), "{err}");
        // Real regexes, with a few Unicode dots, stay under the compiled-size limit.
        for real in ["/index.php.*", "^/[a-z]+/v[0-9]+/", "/a.b.c.d.e.f.*", "(?i)/API/.*"] {
            assert!(RoutePattern::parse(real).is_ok(), "{real}");
        }
        // Short patterns with a huge automaton are refused by compiled size.
        for hostile in [r"\w{100}", "[^x]{200}", "(a|bc|def|ghij){40}"] {
            let err = RoutePattern::parse(hostile).unwrap_err();
            assert!(err.to_string().contains("size limit"), "{hostile}: {err}");
        }
        // Short patterns whose DFA alone would exceed the per-tool budget are refused.
        let err = RoutePattern::parse("a[ab]{12}").unwrap_err();
        assert!(err.to_string().contains("DFA would exceed 256 KiB"), "{err}");
        // A DFA cannot run a Unicode word boundary; the ASCII one is fine.
        let err = RoutePattern::parse(r"\bapi").unwrap_err();
        assert!(err.to_string().contains(r"Unicode word boundary (\b) is not supported"), "{err}");
        assert!(RoutePattern::parse(r"(?-u:\b)api").is_ok());
        // Literal paths stay literals, whatever their length.
        assert!(!RoutePattern::parse(&longest).unwrap().is_regex());
    }

    #[test]
    fn backend_urls() {
        let cases = [
            ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
            ("127.0.0.1:8000", "http://127.0.0.1:8000"),
            ("http://Host.Example:8000/", "http://host.example:8000"),
            ("https://example.org", "https://example.org:443"),
            ("http://[::1]:81", "http://[::1]:81"),
            ("tools-webgrid-1.tools.eqiad.wmflabs:33555", "http://tools-webgrid-1.tools.eqiad.wmflabs:33555"),
        ];
        for (input, shown) in cases {
            assert_eq!(BackendUrl::parse(input).unwrap().to_string(), shown, "{input}");
        }
        for bad in [
            "",
            "ftp://x:1",
            "http://",
            "http://x:0",
            "http://x:65536",
            "http://x:port",
            "http://x:1/path",
            "http://u:p@x:1",
            "http://x y:1",
            "http://[::1:80",
            "http://x:1?q",
            "not a url",
        ] {
            assert!(BackendUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_backend_written_two_ways_is_one_key_and_others_are_not() {
        let hash = |url: &BackendUrl| std::hash::BuildHasher::hash_one(&foldhash::fast::FixedState::default(), url);
        let a = BackendUrl::parse("http://Host.Example:80/").unwrap();
        let b = BackendUrl::parse("host.example").unwrap();
        assert_eq!((&a, hash(&a)), (&b, hash(&b)));
        for other in ["https://host.example:80", "http://host.example:81", "http://host.exampl:80"] {
            let other = BackendUrl::parse(other).unwrap();
            assert_ne!(a, other);
            assert_ne!(hash(&a), hash(&other), "{other}");
        }
    }

    #[test]
    fn strict_backend_urls() {
        assert!(BackendUrl::parse_strict("http://h:1").is_ok());
        assert!(BackendUrl::parse_strict("https://[::1]:443").is_ok());
        assert!(BackendUrl::parse_strict("h:1").is_err());
        assert!(BackendUrl::parse_strict("http://h").is_err());
        assert!(BackendUrl::parse_strict("http://[::1]").is_err());
    }
}
