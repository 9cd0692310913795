//! Keeps every admin API to its operators (SPEC §7): nothing that arrives
//! through the proxy may read or change it, whatever a route points at.
//!
//! A tool can point a route at any address, including this host's admin
//! listeners, so the proxy itself may be the client. Every request therefore
//! passes [`check`] before its handler:
//!
//! 1. Headers that a proxy adds (`X-Forwarded-For`, `X-Forwarded-Host`,
//!    `Forwarded`, `X-Real-IP`) are refused: our proxy always adds
//!    `X-Forwarded-For`, and no operator tool sends them.
//! 2. The Host (and an absolute request target) must name the address the
//!    connection was accepted on (`localhost` too when that is loopback):
//!    a proxied request names the tool's host instead. No Host (HTTP/1.0)
//!    is allowed, as curl and probes always send one when they can.
//! 3. Changes (anything but GET/HEAD) come from a loopback peer, or carry
//!    `Authorization: Bearer <[admin] token>` when an operator set one.
//!
//! Refusals answer 403 with one line saying why, are logged once at warn
//! and counted in `dynamicproxy_admin_refused_requests_total{reason}`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Headers that mean a proxy stands between the client and the admin API.
/// The proxy always adds `X-Forwarded-For` and `X-Forwarded-Host`; the other
/// two are what other proxies add instead.
const PROXY_HEADERS: [(&HeaderName, &str); 4] = [
    (&header::FORWARDED, "Forwarded"),
    (&X_FORWARDED_FOR, "X-Forwarded-For"),
    (&X_FORWARDED_HOST, "X-Forwarded-Host"),
    (&X_REAL_IP, "X-Real-IP"),
];
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Shortest accepted `[admin] token`: 16 characters of a random base64 or hex
/// string are 64 to 96 bits, out of reach of guessing over the network.
const TOKEN_MIN_LEN: usize = 16;

/// Both ends of an accepted admin connection, recorded at accept time.
#[derive(Clone, Copy, Debug)]
pub struct AdminConn {
    /// The client's address.
    pub peer: SocketAddr,
    /// The address the connection was accepted on; with a `0.0.0.0` listener
    /// this is the concrete address the client dialled. `None` when the
    /// operating system could not tell, which fails the Host rule closed.
    pub local: Option<SocketAddr>,
}

impl Connected<IncomingStream<'_, TcpListener>> for AdminConn {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        AdminConn { peer: *stream.remote_addr(), local: stream.io().local_addr().ok() }
    }
}

/// The operator's shared secret for changes from non-loopback peers
/// (`[admin] token`). Its `Debug` never shows the value.
#[derive(Clone)]
pub struct AdminToken(String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Why a configured token cannot be used; never contains the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Too short to resist guessing.
    #[error("must be at least {TOKEN_MIN_LEN} characters (e.g. `openssl rand -base64 32`)")]
    TooShort,
    /// A character that cannot travel in `Authorization: Bearer` (RFC 6750 b64token).
    #[error("may contain only letters, digits and -._~+/= (e.g. `openssl rand -base64 32`)")]
    BadCharacter,
}

impl AdminToken {
    /// Accepts a token that fits in a bearer header and is long enough to be secret.
    pub fn new(token: String) -> Result<Self, TokenError> {
        if !token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b)) {
            return Err(TokenError::BadCharacter);
        }
        if token.len() < TOKEN_MIN_LEN {
            return Err(TokenError::TooShort);
        }
        Ok(AdminToken(token))
    }

    /// Compares in time independent of where the first difference is, so
    /// response timing does not reveal a prefix of the token.
    fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if expected.len() != presented.len() {
            return false;
        }
        let difference = expected.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It carries this proxy header.
    Proxied(&'static str),
    /// Its Host or request target names something else than this listener.
    ForeignHost,
    /// A change from a peer that is not loopback, and no token is configured.
    NotLoopback,
    /// A change with a missing or wrong bearer token.
    BadToken,
}

impl Refusal {
    /// Label of `dynamicproxy_admin_refused_requests_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Proxied(_) => "proxied",
            Refusal::ForeignHost => "foreign_host",
            Refusal::NotLoopback => "not_loopback",
            Refusal::BadToken => "bad_token",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Proxied(name) => write!(f, "admin API: refused a request that came through a proxy ({name})"),
            Refusal::ForeignHost => {
                f.write_str("admin API: refused a request whose Host is not this listener's address")
            }
            Refusal::NotLoopback => f.write_str(
                "admin API: refused a change from a non-loopback peer (an operator can set [admin] token to allow it)",
            ),
            Refusal::BadToken => {
                f.write_str("admin API: refused a change without the right Authorization: Bearer token")
            }
        }
    }
}

/// Decides whether one admin request may reach its handler.
pub fn check(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    conn: &AdminConn,
    token: Option<&AdminToken>,
) -> Result<(), Refusal> {
    if let Some((_, name)) = PROXY_HEADERS.iter().find(|(h, _)| headers.contains_key(*h)) {
        return Err(Refusal::Proxied(name));
    }
    let local = conn.local;
    let addressed_here = |authority: &[u8]| local.is_some_and(|local| host_matches(authority, local));
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => {}
        (Some(host), None) if addressed_here(host.as_bytes()) => {}
        _ => return Err(Refusal::ForeignHost),
    }
    // An absolute target (or HTTP/2's :authority) overrides Host; hold it to the same rule.
    if let Some(authority) = uri.authority()
        && !addressed_here(authority.as_str().as_bytes())
    {
        return Err(Refusal::ForeignHost);
    }
    if matches!(*method, Method::GET | Method::HEAD) {
        return Ok(());
    }
    let loopback = conn.peer.ip().to_canonical().is_loopback();
    match (token, bearer(headers)) {
        (Some(token), Some(presented)) if token.matches(presented) => Ok(()),
        // A token that is presented must be right, even from loopback: it shows a misconfigured client.
        (Some(_), Some(_)) => Err(Refusal::BadToken),
        _ if loopback => Ok(()),
        (Some(_), None) => Err(Refusal::BadToken),
        (None, _) => Err(Refusal::NotLoopback),
    }
}

/// The credentials of a single `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else { return None };
    let value = value.as_bytes();
    let scheme = value.get(..7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| value[7..].trim_ascii())
}

/// Whether a Host value (`host[:port]`) names `local`: the same IP address
/// (IPv6 in brackets, IPv4-mapped forms equal to IPv4), or `localhost` when
/// `local` is loopback; case-insensitive; the port, when given, must match.
pub fn host_matches(host: &[u8], local: SocketAddr) -> bool {
    let Ok(host) = std::str::from_utf8(host) else { return false };
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, "")) => (ip, None),
            Some((ip, after)) => match after.strip_prefix(':') {
                Some(port) => (ip, Some(port)),
                None => return false,
            },
            None => return false,
        },
        None => match host.split_once(':') {
            // A second colon means an IPv6 address without brackets: not a valid Host.
            Some((_, port)) if port.contains(':') => return false,
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        },
    };
    // `host:` (empty port) means the default port; otherwise it must be this listener's.
    if let Some(port) = port.filter(|p| !p.is_empty())
        && !(port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>() == Ok(local.port()))
    {
        return false;
    }
    let local_ip = local.ip().to_canonical();
    let bracketed = host.starts_with('[');
    match name.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) if !bracketed => false,
        Ok(IpAddr::V4(_)) if bracketed => false,
        Ok(ip) => ip.to_canonical() == local_ip,
        Err(_) => !bracketed && name.eq_ignore_ascii_case("localhost") && local_ip.is_loopback(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The guard's configuration and counters, shared by every admin connection.
#[derive(Clone)]
pub struct AdminGuard {
    token: Option<AdminToken>,
    refused: Family<ReasonLabel, Counter>,
}

impl AdminGuard {
    /// Registers `dynamicproxy_admin_refused_requests_total{reason}`.
    pub fn new(token: Option<AdminToken>, registry: &mut Registry) -> Self {
        let refused = Family::<ReasonLabel, Counter>::default();
        registry.sub_registry_with_prefix("dynamicproxy").register(
            "admin_refused_requests",
            "Admin API requests refused (proxied, foreign_host, not_loopback, bad_token)",
            refused.clone(),
        );
        AdminGuard { token, refused }
    }
}

/// Middleware in front of every admin route: runs [`check`], answers 403 on refusal.
pub async fn enforce(
    State(guard): State<AdminGuard>,
    ConnectInfo(conn): ConnectInfo<AdminConn>,
    request: Request,
    next: Next,
) -> Response {
    match check(request.method(), request.uri(), request.headers(), &conn, guard.token.as_ref()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            guard.refused.get_or_create(&ReasonLabel { reason: refusal.reason() }).inc();
            tracing::warn!(
                peer = %conn.peer,
                local = %conn.local.map_or_else(|| "unknown".to_string(), |a| a.to_string()),
                method = %request.method(),
                path = request.uri().path(),
                reason = refusal.reason(),
                "{refusal}"
            );
            (StatusCode::FORBIDDEN, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{refusal}\n"))
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn host_names_the_listener_address() {
        let v4 = addr("127.0.0.1:9631");
        for ok in
            ["127.0.0.1", "127.0.0.1:9631", "localhost", "LOCALHOST:9631", "localhost:", "[::ffff:127.0.0.1]:9631"]
        {
            assert!(host_matches(ok.as_bytes(), v4), "{ok}");
        }
        for refused in [
            "127.0.0.1:80",
            "127.0.0.2",
            "evil.toolforge.org",
            "localhost.",
            "localhost:9631:1",
            "127.0.0.1:+9631",
            "127.0.0.1:09631x",
            "[127.0.0.1]",
            "",
            "user@127.0.0.1",
            "127.0.0.1 ",
        ] {
            assert!(!host_matches(refused.as_bytes(), v4), "{refused}");
        }
        assert!(!host_matches(b"\xff", v4));
    }

    #[test]
    fn host_rules_for_ipv6_and_non_loopback_listeners() {
        let v6 = addr("[::1]:9631");
        for ok in ["[::1]", "[::1]:9631", "[0:0:0:0:0:0:0:1]:9631", "localhost:9631"] {
            assert!(host_matches(ok.as_bytes(), v6), "{ok}");
        }
        for refused in ["::1", "[::1]:1", "[::1", "[::1]x", "[::2]:9631", "127.0.0.1:9631"] {
            assert!(!host_matches(refused.as_bytes(), v6), "{refused}");
        }
        let pod = addr("10.64.0.7:9632");
        assert!(host_matches(b"10.64.0.7:9632", pod));
        assert!(!host_matches(b"localhost:9632", pod), "localhost is only loopback");
        // A dual-stack listener sees IPv4 clients on an IPv4-mapped local address.
        let mapped = addr("[::ffff:10.64.0.7]:9632");
        assert!(host_matches(b"10.64.0.7:9632", mapped));
        let global = addr("[2001:db8::7]:9632");
        assert!(host_matches(b"[2001:DB8::7]:9632", global), "IPv6 hex digits are case-insensitive");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        map
    }

    fn conn(peer: &str, local: &str) -> AdminConn {
        AdminConn { peer: addr(peer), local: Some(addr(local)) }
    }

    const LOCAL: &str = "127.0.0.1:9631";
    const TOKEN: &str = "0123456789abcdef0123";

    fn run(method: Method, uri: &str, pairs: &[(&str, &str)], peer: &str, token: Option<&str>) -> Result<(), Refusal> {
        let token = token.map(|t| AdminToken::new(t.into()).unwrap());
        let local = if peer.starts_with("127.") { LOCAL } else { "192.0.2.2:9631" };
        check(&method, &uri.parse().unwrap(), &headers(pairs), &conn(peer, local), token.as_ref())
    }

    #[test]
    fn proxy_headers_and_foreign_hosts_are_refused_for_reads_too() {
        let local_peer = "127.0.0.1:40000";
        assert_eq!(run(Method::GET, "/metrics", &[("host", "127.0.0.1:9631")], local_peer, None), Ok(()));
        assert_eq!(run(Method::GET, "/metrics", &[], local_peer, None), Ok(()), "HTTP/1.0 without Host");
        for (name, shown) in
            [("x-forwarded-for", "X-Forwarded-For"), ("Forwarded", "Forwarded"), ("x-real-ip", "X-Real-IP")]
        {
            assert_eq!(
                run(Method::GET, "/metrics", &[("host", "localhost"), (name, "1.2.3.4")], local_peer, None),
                Err(Refusal::Proxied(shown))
            );
        }
        assert_eq!(
            run(Method::GET, "/ready", &[("host", "evil.toolforge.org")], local_peer, None),
            Err(Refusal::ForeignHost)
        );
        assert_eq!(
            run(Method::GET, "/ready", &[("host", "localhost"), ("host", "evil")], local_peer, None),
            Err(Refusal::ForeignHost)
        );
        assert_eq!(
            run(Method::GET, "http://evil.toolforge.org/ready", &[("host", "localhost")], local_peer, None),
            Err(Refusal::ForeignHost),
            "an absolute target overrides Host"
        );
        let unknown_local = AdminConn { peer: addr(local_peer), local: None };
        let with_host = headers(&[("host", "localhost")]);
        assert_eq!(
            check(&Method::GET, &"/".parse().unwrap(), &with_host, &unknown_local, None),
            Err(Refusal::ForeignHost)
        );
    }

    #[test]
    fn changes_need_loopback_or_the_token() {
        let here = [("host", "127.0.0.1:9631")];
        let pod = [("host", "192.0.2.2:9631")];
        let (loopback, remote) = ("127.0.0.1:40000", "192.0.2.9:40000");
        assert_eq!(run(Method::POST, "/maintenance", &here, loopback, None), Ok(()));
        assert_eq!(run(Method::POST, "/maintenance", &here, loopback, Some(TOKEN)), Ok(()));
        assert_eq!(run(Method::GET, "/ready", &pod, remote, None), Ok(()), "probes read from off-host");
        assert_eq!(run(Method::POST, "/maintenance", &pod, remote, None), Err(Refusal::NotLoopback));
        assert_eq!(run(Method::DELETE, "/maintenance", &pod, remote, None), Err(Refusal::NotLoopback));
        assert_eq!(run(Method::POST, "/maintenance", &pod, remote, Some(TOKEN)), Err(Refusal::BadToken));
        let right = format!("Bearer {TOKEN}");
        fn with(auth: &str) -> [(&str, &str); 2] {
            [("host", "192.0.2.2:9631"), ("authorization", auth)]
        }
        assert_eq!(run(Method::POST, "/logging", &with(&right), remote, Some(TOKEN)), Ok(()));
        assert_eq!(run(Method::POST, "/logging", &with(&format!("bearer  {TOKEN}")), remote, Some(TOKEN)), Ok(()));
        for wrong in [format!("Bearer {TOKEN}x"), format!("Basic {TOKEN}"), "Bearer ".into(), TOKEN.into()] {
            assert_eq!(
                run(Method::POST, "/logging", &with(&wrong), remote, Some(TOKEN)),
                Err(Refusal::BadToken),
                "{wrong}"
            );
        }
        assert_eq!(
            run(Method::POST, "/logging", &[here[0], ("authorization", "Bearer nope")], loopback, Some(TOKEN)),
            Err(Refusal::BadToken),
            "a wrong token is refused even from loopback"
        );
        assert_eq!(run(Method::POST, "/logging", &with(&right), remote, None), Err(Refusal::NotLoopback));
        // The token does not open the door to proxied requests.
        let proxied = [pod[0], ("authorization", right.as_str()), ("x-forwarded-for", "1.2.3.4")];
        assert_eq!(
            run(Method::POST, "/logging", &proxied, remote, Some(TOKEN)),
            Err(Refusal::Proxied("X-Forwarded-For"))
        );
    }

    #[test]
    fn tokens_must_be_long_and_header_safe_and_never_printed() {
        assert_eq!(AdminToken::new("short".into()).unwrap_err(), TokenError::TooShort);
        assert_eq!(AdminToken::new("has a space in it, long".into()).unwrap_err(), TokenError::BadCharacter);
        assert_eq!(AdminToken::new(String::new()).unwrap_err(), TokenError::TooShort);
        let token = AdminToken::new("q83vEjRWeJq83vEjRWeJ+/=".into()).unwrap();
        assert!(!format!("{token:?}").contains("q83v"));
        assert!(token.matches(b"q83vEjRWeJq83vEjRWeJ+/="));
        assert!(!token.matches(b"q83vEjRWeJq83vEjRWeJ+/"));
    }
}
