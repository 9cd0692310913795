//! The `[proxy]` configuration section and its command-line flags.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dynamicproxy_redis::{BackendUrl, NetworkList};
use serde::{Deserialize, Serialize};

/// A `[proxy]` value that cannot work; the message names the key and the value.
#[derive(Debug, thiserror::Error)]
#[error("invalid [proxy] {key} = {value}: {reason}")]
pub struct ConfigError {
    /// The TOML key.
    pub key: &'static str,
    /// The offending value, as the operator wrote it.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    fn new(key: &'static str, value: impl std::fmt::Debug, reason: impl std::fmt::Display) -> Self {
        ConfigError { key, value: format!("{value:?}"), reason: reason.to_string() }
    }
}

/// Settings of the edge proxy (`[proxy]` in the configuration file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Plain HTTP listener. Default `0.0.0.0:80`.
    pub http_listen: SocketAddr,
    /// HTTPS listener, used only when at least one certificate is configured. Default `0.0.0.0:443`.
    pub https_listen: SocketAddr,
    /// PEM certificate chains, paired by position with `tls_key`; chosen by SNI, the first is the default.
    pub tls_cert: Vec<PathBuf>,
    /// PEM private keys, paired by position with `tls_cert`.
    pub tls_key: Vec<PathBuf>,
    /// Listener of the `/list` API read by the reconciliation monitor. Default `0.0.0.0:8081`.
    pub list_listen: SocketAddr,
    /// Admin API listener (metrics, maintenance switch); served by the binary. Default `127.0.0.1:9631`.
    pub admin_listen: SocketAddr,
    /// Tools are served as `<tool>.<canonical_domain>`. Default `toolforge.org`.
    pub canonical_domain: String,
    /// Where requests go that no route claims (the Kubernetes ingress); none by default,
    /// in which case they get the "no webservice" page.
    pub default_backend: Option<String>,
    /// Directory whose `banned.html`, `ratelimit.html`, ... replace the built-in pages.
    pub error_pages: Option<PathBuf>,
    /// Client addresses (IPv4/IPv6 CIDRs or single addresses) that get the "banned" page.
    pub banned_cidrs: Vec<String>,
    /// Networks the proxy never connects to, checked after name resolution on
    /// every new backend connection (SPEC §3): a tool's route must not reach the
    /// edge host itself. Default loopback, link-local and unspecified; `[]` allows all.
    pub denied_backend_networks: Vec<String>,
    /// DNS servers (`IP` or `IP:port`) asked for backend names, through the
    /// proxy's TTL-respecting cache. Default empty: the name servers of
    /// `/etc/resolv.conf`.
    pub dns_servers: Vec<String>,
    /// User-Agent regexes (case-insensitive) that are refused with 403.
    pub blocked_user_agents: Vec<String>,
    /// Referer regexes (case-insensitive) that are refused with 403.
    pub blocked_referers: Vec<String>,
    /// Refuse requests without a User-Agent (SPEC §3 step 3). Default true; load
    /// generators that send none need it off.
    pub require_user_agent: bool,
    /// Sustained requests per second allowed per client IP; 0 turns the limit off.
    pub rate_limit_per_second: u32,
    /// Requests a client may make at once above the sustained rate.
    pub rate_limit_burst: u32,
    /// Start in maintenance mode (every request gets the "technical issues" page).
    pub maintenance: bool,
    /// Largest request body accepted, in bytes; larger bodies get 413. Default 128 MiB.
    pub max_body_size: u64,
    /// Seconds to wait for a TCP connection to a backend; then 504. Default 10.
    pub connect_timeout_secs: u64,
    /// Seconds a backend may stay silent (before its response head or within its body)
    /// before the exchange is cut; before the head that is a 504. Default 3600, for
    /// long-running tools and WebSockets.
    pub read_timeout_secs: u64,
    /// Seconds a client connection may see no traffic in either direction while a
    /// request or tunnel is open. Default 3600.
    pub client_timeout_secs: u64,
    /// Seconds a client has to send a complete request head (slow-client protection). Default 60.
    pub header_timeout_secs: u64,
    /// Seconds a client has to complete a TLS handshake. Default 10.
    pub tls_handshake_timeout_secs: u64,
    /// Seconds an HTTP/1 connection may wait for its next request once the
    /// previous response is sent. Default 60: nginx uses 75, but hyper's
    /// head timer (`header_timeout_secs`, 60) already starts when the
    /// connection begins waiting for a head, so a longer value would not hold.
    pub keepalive_timeout_secs: u64,
    /// Seconds an HTTP/2 connection with no open stream is kept before it is
    /// closed with GOAWAY. Default 60, as HTTP/1 keep-alive (nginx applies its
    /// keepalive_timeout to HTTP/2 too): idle h2 connections must not hold
    /// `max_connections` places for the 3600 s request idle.
    pub http2_idle_timeout_secs: u64,
    /// Seconds a request body may pause between two reads while it is being
    /// sent upstream (nginx client_body_timeout). Default 60, nginx's.
    pub client_body_timeout_secs: u64,
    /// Seconds a response may wait on a client that does not read it (no write
    /// progress at all) before the connection is cut (nginx send_timeout). Default 60, nginx's.
    pub send_timeout_secs: u64,
    /// Seconds in-flight requests, tunnels and idle keep-alive connections
    /// may take to finish after a shutdown signal or a hand-over. Default 30:
    /// long enough for ordinary slow responses, short enough that a restart
    /// does not keep two processes around for long (WebSockets open longer
    /// than that are closed and clients reconnect to the new process).
    pub shutdown_grace_secs: u64,
    /// Unix socket through which a new proxy process takes this one's
    /// listening sockets (restart or binary upgrade without closing them;
    /// the `handover` module of the binary). None = off, the default: only
    /// useful when something starts the next process while this one runs
    /// (the systemd unit sets `/run/dynamicproxy/handover.sock`).
    pub handover_socket: Option<PathBuf>,
    /// Client connections served at once; further connections are closed at accept. Default 50000.
    pub max_connections: usize,
    /// Concurrent connections from one IPv4 address or one IPv6 /64 (SPEC §1);
    /// further ones are refused at accept (429 on plain HTTP). 0 = off. Default
    /// 256: a browser opens at most 6 HTTP/1.1 connections per host, so 256
    /// leaves room for dozens of busy users behind one university or carrier
    /// NAT, while a single address can hold at most 0.5% of `max_connections`.
    pub max_connections_per_client: usize,
    /// Idle keep-alive connections kept per backend. Default 128.
    pub upstream_max_idle_per_backend: usize,
    /// Requests in flight to one backend address at once, across all event
    /// loops; 0 = off. Default 512: well above what one tool's webservice
    /// serves at once (a grid lighttpd has a few dozen workers), low enough
    /// that a flood to one tool cannot take thousands of sockets and file
    /// descriptors from the others.
    pub max_connections_per_backend: usize,
    /// Milliseconds a request waits for a slot under `max_connections_per_backend`
    /// before its 503 (`over-capacity`). Default 1000: rides out a burst
    /// without leaving clients hanging on a saturated backend.
    pub backend_queue_timeout_ms: u64,
    /// Seconds an idle keep-alive connection to a backend is kept. Default 60.
    pub upstream_idle_timeout_secs: u64,
    /// Access log: `off`, `stdout`, or a file path to append to. Default `off`.
    pub access_log: String,
    /// Headers added to every response, replacing the backend's copies.
    pub extra_headers: BTreeMap<String, String>,
    /// Tool host redirects: `<from>.<any domain>` answers 301 to `<to>.<same domain>`.
    pub host_redirects: BTreeMap<String, String>,
    /// Compress text responses with gzip when the client accepts it and the backend did not.
    pub gzip: bool,
    /// Single-threaded event loops serving client connections, each with its
    /// own upstream pool. 0 (default) = one per core but one, at least one:
    /// the measured best on 2 cores (bench/RESULTS.md); measure again on
    /// bigger machines.
    pub event_loops: usize,
    /// Requests one tool may have in flight to its backends at once, WebSocket
    /// tunnels included; more get 503 `over-capacity` at once. 0 = off.
    /// Default 256: far more than a tool's single backend serves at once, so
    /// only a hung or flooded tool meets it, and small enough that such a tool
    /// holds a sliver of `max_connections` instead of all of it.
    pub tool_max_concurrent_requests: u32,
    /// Per-tool shares replacing `tool_max_concurrent_requests` for the named
    /// tools (operators raise a busy tool's share): `toolname = 1024`.
    pub tool_max_concurrent_requests_overrides: BTreeMap<String, u32>,
    /// Consecutive connect failures or timeouts that mark a backend down
    /// (fast 502 `backend-down`); 0 = never. Default 5: one or two failures
    /// happen to healthy backends (a restart, a full accept queue); five in a
    /// row with none answered is a dead backend.
    pub backend_down_after_failures: u32,
    /// Seconds of the first window a backend stays marked down. Default 1:
    /// a backend back from a restart loses at most a second.
    pub backend_down_first_secs: u64,
    /// Longest window, in seconds, as failed trials double it. Default 30:
    /// a dead backend costs one connect attempt per 30 s, and a revived one
    /// is found within 30 s even if its tool does not register again.
    pub backend_down_max_secs: u64,

    // Dead registrations (the prober).
    /// Seconds without a request after which a route's backend is checked by
    /// a TCP connect (the prober, see the `prober` module), and again every
    /// as many seconds while nobody uses it; 0 = no prober. Default 300: a
    /// route used in the last five minutes is watched by its own traffic
    /// (backends marked down), and at `probe_rate_per_second` 10 the prober
    /// goes round 3000 idle backends, Toolforge's scale, in that time.
    pub probe_idle_secs: u64,
    /// Probes started per second at most, whatever the number of idle
    /// routes (10,000 dead tools cannot flood anything). Default 10:
    /// negligible next to real traffic. 1 to 1000.
    pub probe_rate_per_second: u32,
    /// Probes in flight at once at most. Default 16: with `probe_timeout_ms`
    /// 3000, backends that drop packets cost at most 16 sockets and still
    /// see five probes a second. 1 to 1024.
    pub probe_max_in_flight: usize,
    /// Milliseconds a probe waits for its TCP connection (name resolution
    /// included). Default 3000: a live backend accepts within milliseconds;
    /// 3 s leaves room for a loaded host without holding a probe slot for
    /// the 10 s of `connect_timeout_secs`.
    pub probe_timeout_ms: u64,
    /// Seconds a backend must have failed every probe before its
    /// registrations are reported dead (metrics, log, `GET /dead`). Default
    /// 1800: a restart or a wait in the grid queue takes minutes; half an
    /// hour of refusals is no restart.
    pub dead_after_secs: u64,
    /// Remove registrations reported dead from Redis (only while they still
    /// name the dead backend), so webservicemonitor starts the webservice
    /// again. Default false: removal changes the route table, which
    /// operators turn on deliberately.
    pub remove_dead_registrations: bool,

    /// Shape of access log lines: `text` (default, for people) or `json` (for log shippers).
    pub access_log_format: crate::access_log::Format,
    /// Seconds a request for a tool that just lost its route, or whose
    /// backend refused a bodiless request, waits for the route to come
    /// (back) before its error page (see the `hold` module). 0 (default) = off.
    pub hold_secs: u64,
    /// Last-known-good copy of the route table (SPEC §1), rewritten
    /// atomically at most every [`crate::snapshot::MIN_WRITE_INTERVAL`] after
    /// a change, and served at start until Redis answers. Unset (default) = off.
    pub snapshot_file: Option<PathBuf>,

    // https backends.
    /// PEM file of CA certificates trusted for `https://` backends, in
    /// addition to the system roots (a private CA that signs tools'
    /// certificates). Unset (default): the system roots only.
    pub backend_ca_file: Option<PathBuf>,
}

/// Longest hold accepted: a held request keeps its client waiting and its slot taken.
const MAX_HOLD_SECS: u64 = 300;

/// Longest timeout accepted: a year.
const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

impl Default for Config {
    fn default() -> Self {
        Config {
            http_listen: SocketAddr::from(([0, 0, 0, 0], 80)),
            https_listen: SocketAddr::from(([0, 0, 0, 0], 443)),
            tls_cert: Vec::new(),
            tls_key: Vec::new(),
            list_listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9631)),
            canonical_domain: "toolforge.org".into(),
            default_backend: None,
            error_pages: None,
            banned_cidrs: Vec::new(),
            denied_backend_networks: NetworkList::default_denied_strings(),
            dns_servers: Vec::new(),
            blocked_user_agents: Vec::new(),
            blocked_referers: Vec::new(),
            require_user_agent: true,
            rate_limit_per_second: 0,
            rate_limit_burst: 0,
            maintenance: false,
            max_body_size: 128 * 1024 * 1024,
            connect_timeout_secs: 10,
            read_timeout_secs: 3600,
            client_timeout_secs: 3600,
            header_timeout_secs: 60,
            tls_handshake_timeout_secs: 10,
            keepalive_timeout_secs: 60,
            http2_idle_timeout_secs: 60,
            client_body_timeout_secs: 60,
            send_timeout_secs: 60,
            shutdown_grace_secs: 30,
            handover_socket: None,
            max_connections: 50_000,
            max_connections_per_client: 256,
            upstream_max_idle_per_backend: 128,
            max_connections_per_backend: 512,
            backend_queue_timeout_ms: 1000,
            upstream_idle_timeout_secs: 60,
            access_log: "off".into(),
            extra_headers: default_extra_headers(),
            host_redirects: BTreeMap::from([("ru_monuments".to_string(), "ru-monuments".to_string())]),
            gzip: true,
            event_loops: 0,
            tool_max_concurrent_requests: 256,
            tool_max_concurrent_requests_overrides: BTreeMap::new(),
            backend_down_after_failures: 5,
            backend_down_first_secs: 1,
            backend_down_max_secs: 30,
            probe_idle_secs: 300,
            probe_rate_per_second: 10,
            probe_max_in_flight: 16,
            probe_timeout_ms: 3000,
            dead_after_secs: 1800,
            remove_dead_registrations: false,
            access_log_format: crate::access_log::Format::Text,
            hold_secs: 0,
            snapshot_file: None,
            backend_ca_file: None,
        }
    }
}

/// Headers `extra_headers` may not name: the framing, the connection and
/// the date of each response are the proxy's.
const PROXY_OWNED_HEADERS: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "date",
];

/// The production response headers of SPEC §3.
pub fn default_extra_headers() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("X-Clacks-Overhead".to_string(), "GNU Terry Pratchett".to_string()),
        ("Permissions-Policy".to_string(), "browsing-topics=()".to_string()),
        (
            "Content-Security-Policy-Report-Only".to_string(),
            "default-src 'self' 'unsafe-eval' 'unsafe-inline' blob: data: filesystem: mediastream: \
             *.toolforge.org wikibooks.org *.wikibooks.org wikidata.org *.wikidata.org \
             wikimedia.org *.wikimedia.org wikinews.org *.wikinews.org wikipedia.org *.wikipedia.org \
             wikiquote.org *.wikiquote.org wikisource.org *.wikisource.org wikiversity.org \
             *.wikiversity.org wikivoyage.org *.wikivoyage.org wiktionary.org *.wiktionary.org \
             *.wmcloud.org *.wmflabs.org wikimediafoundation.org mediawiki.org *.mediawiki.org \
             wss://*.toolforge.org; report-uri https://csp-report.toolforge.org/collect;"
                .to_string(),
        ),
    ])
}

impl Config {
    /// Cross-field checks; the error names the key and the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let denied = self.denied_backend_networks()?;
        // The operator's own fallback in a denied network would make every
        // unrouted request a 502: say so at start, not per request.
        if let Some(backend) = self.default_backend()?
            && let Ok(ip) = backend.host().trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>()
            && let Some(network) = denied.matching(ip)
        {
            return Err(ConfigError::new(
                "default_backend",
                backend.to_string(),
                format!("is in the denied network {network} of denied_backend_networks; the proxy would refuse it"),
            ));
        }
        self.dns_servers()?;
        if self.hold_secs > MAX_HOLD_SECS {
            return Err(ConfigError::new("hold_secs", self.hold_secs, format!("at most {MAX_HOLD_SECS}")));
        }
        if self.event_loops > 1024 {
            return Err(ConfigError::new("event_loops", self.event_loops, "at most 1024"));
        }
        let domain = self.canonical_domain.trim_matches('.');
        if domain.is_empty()
            || domain != self.canonical_domain
            || !domain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(ConfigError::new("canonical_domain", &self.canonical_domain, "must be a DNS domain"));
        }
        if self.tls_cert.len() != self.tls_key.len() {
            return Err(ConfigError::new(
                "tls_key",
                &self.tls_key,
                format!("{} keys for {} certificates: they go in pairs", self.tls_key.len(), self.tls_cert.len()),
            ));
        }
        if self.rate_limit_per_second == 0 && self.rate_limit_burst > 0 {
            return Err(ConfigError::new(
                "rate_limit_burst",
                self.rate_limit_burst,
                "needs rate_limit_per_second above 0",
            ));
        }
        for (key, value) in [
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("read_timeout_secs", self.read_timeout_secs),
            ("client_timeout_secs", self.client_timeout_secs),
            ("header_timeout_secs", self.header_timeout_secs),
            ("tls_handshake_timeout_secs", self.tls_handshake_timeout_secs),
            ("keepalive_timeout_secs", self.keepalive_timeout_secs),
            ("http2_idle_timeout_secs", self.http2_idle_timeout_secs),
            ("client_body_timeout_secs", self.client_body_timeout_secs),
            ("send_timeout_secs", self.send_timeout_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, value, "must be at least 1"));
            }
        }
        // A deadline past the clock's range would panic in every connection.
        for (key, value) in [
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("read_timeout_secs", self.read_timeout_secs),
            ("client_timeout_secs", self.client_timeout_secs),
            ("header_timeout_secs", self.header_timeout_secs),
            ("tls_handshake_timeout_secs", self.tls_handshake_timeout_secs),
            ("keepalive_timeout_secs", self.keepalive_timeout_secs),
            ("http2_idle_timeout_secs", self.http2_idle_timeout_secs),
            ("client_body_timeout_secs", self.client_body_timeout_secs),
            ("send_timeout_secs", self.send_timeout_secs),
            ("shutdown_grace_secs", self.shutdown_grace_secs),
            ("upstream_idle_timeout_secs", self.upstream_idle_timeout_secs),
        ] {
            if value > MAX_TIMEOUT_SECS {
                return Err(ConfigError::new(key, value, format!("must be at most {MAX_TIMEOUT_SECS} (a year)")));
            }
        }
        if self.backend_queue_timeout_ms > MAX_TIMEOUT_SECS * 1000 {
            return Err(ConfigError::new(
                "backend_queue_timeout_ms",
                self.backend_queue_timeout_ms,
                format!("must be at most {} (a year)", MAX_TIMEOUT_SECS * 1000),
            ));
        }
        if self.max_connections_per_backend > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ConfigError::new(
                "max_connections_per_backend",
                self.max_connections_per_backend,
                format!("must be at most {}", tokio::sync::Semaphore::MAX_PERMITS),
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::new("max_connections", self.max_connections, "must be at least 1"));
        }
        if self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ConfigError::new(
                "max_connections",
                self.max_connections,
                format!("must be at most {}", tokio::sync::Semaphore::MAX_PERMITS),
            ));
        }
        crate::protect::Protection::from_config(self)?;
        for (name, value) in &self.extra_headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::new("extra_headers", name, "not a valid header name"));
            }
            if http::HeaderValue::from_str(value).is_err() {
                return Err(ConfigError::new("extra_headers", value, "not a valid header value"));
            }
            // Written into every HTTP/1 head as it is: one of these would
            // contradict the framing or the connection the proxy sets.
            if PROXY_OWNED_HEADERS.iter().any(|owned| name.eq_ignore_ascii_case(owned)) {
                return Err(ConfigError::new("extra_headers", name, "set by the proxy for each response"));
            }
        }
        if self.backend_down_first_secs == 0 {
            return Err(ConfigError::new("backend_down_first_secs", 0, "must be at least 1"));
        }
        if self.backend_down_max_secs < self.backend_down_first_secs || self.backend_down_max_secs > MAX_TIMEOUT_SECS {
            return Err(ConfigError::new(
                "backend_down_max_secs",
                self.backend_down_max_secs,
                format!("must be between backend_down_first_secs and {MAX_TIMEOUT_SECS}"),
            ));
        }
        for (tool, limit) in &self.tool_max_concurrent_requests_overrides {
            if !dynamicproxy_redis::ToolName::is_valid(tool) {
                return Err(ConfigError::new("tool_max_concurrent_requests_overrides", tool, "not a valid tool name"));
            }
            if *limit == 0 {
                return Err(ConfigError::new(
                    "tool_max_concurrent_requests_overrides",
                    format!("{tool} = {limit}"),
                    "must be at least 1",
                ));
            }
        }
        self.validate_prober()?;
        for (from, to) in &self.host_redirects {
            for label in [from, to] {
                if label.is_empty() || label.contains('.') || label.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(ConfigError::new("host_redirects", label, "must be one lower-case DNS label"));
                }
            }
        }
        Ok(())
    }

    /// The prober's keys: bounds that keep it harmless.
    fn validate_prober(&self) -> Result<(), ConfigError> {
        if self.probe_idle_secs > MAX_TIMEOUT_SECS {
            return Err(ConfigError::new("probe_idle_secs", self.probe_idle_secs, "at most a year"));
        }
        if self.dead_after_secs > MAX_TIMEOUT_SECS {
            return Err(ConfigError::new("dead_after_secs", self.dead_after_secs, "at most a year"));
        }
        if !(1..=1000).contains(&self.probe_rate_per_second) {
            return Err(ConfigError::new("probe_rate_per_second", self.probe_rate_per_second, "must be 1 to 1000"));
        }
        if !(1..=1024).contains(&self.probe_max_in_flight) {
            return Err(ConfigError::new("probe_max_in_flight", self.probe_max_in_flight, "must be 1 to 1024"));
        }
        if !(1..=60_000).contains(&self.probe_timeout_ms) {
            return Err(ConfigError::new("probe_timeout_ms", self.probe_timeout_ms, "must be 1 to 60000"));
        }
        Ok(())
    }

    /// The parsed default backend, if any.
    pub fn default_backend(&self) -> Result<Option<BackendUrl>, ConfigError> {
        match self.default_backend.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(url) => BackendUrl::parse(url).map(Some).map_err(|e| ConfigError::new("default_backend", url, e)),
        }
    }

    /// The number of event loops to run: `event_loops`, or one per core but one.
    pub fn event_loop_count(&self) -> usize {
        match self.event_loops {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
            n => n,
        }
    }

    /// `denied_backend_networks`, parsed.
    pub fn denied_backend_networks(&self) -> Result<NetworkList, ConfigError> {
        NetworkList::parse(&self.denied_backend_networks)
            .map_err(|e| ConfigError::new("denied_backend_networks", &e.entry, e.to_string()))
    }

    /// `dns_servers`, parsed; a server without a port is on port 53.
    pub fn dns_servers(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        self.dns_servers
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                entry
                    .parse::<SocketAddr>()
                    .or_else(|_| entry.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| {
                        ConfigError::new("dns_servers", entry, "expected an address such as 10.0.0.1 or 10.0.0.1:53")
                    })
            })
            .collect()
    }

    /// True when HTTPS is configured (at least one certificate).
    pub fn tls_enabled(&self) -> bool {
        !self.tls_cert.is_empty()
    }

    pub(crate) fn secs(value: u64) -> Duration {
        Duration::from_secs(value)
    }
}

/// Command-line flags of `dynamicproxy proxy`, one per `[proxy]` key; a flag
/// given wins over the environment and the file.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct Flags {
    /// Plain HTTP listen address [default: 0.0.0.0:80]
    #[arg(long = "http-listen", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
    /// HTTPS listen address, used with --tls-cert [default: 0.0.0.0:443]
    #[arg(long = "https-listen", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_listen: Option<SocketAddr>,
    /// PEM certificate chain (repeatable, paired with --tls-key; chosen by SNI, the first is the default)
    #[arg(long = "tls-cert", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<Vec<PathBuf>>,
    /// PEM private key (repeatable, paired with --tls-cert)
    #[arg(long = "tls-key", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<Vec<PathBuf>>,
    /// Listen address of the /list API [default: 0.0.0.0:8081]
    #[arg(long = "list-listen", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub list_listen: Option<SocketAddr>,
    /// Admin API listen address [default: 127.0.0.1:9631]
    #[arg(long = "admin-listen", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    /// Tools are served as <tool>.<DOMAIN> [default: toolforge.org]
    #[arg(long = "canonical-domain", value_name = "DOMAIN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canonical_domain: Option<String>,
    /// Backend for requests no route claims (e.g. the Kubernetes ingress) [default: none]
    #[arg(long = "default-backend", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_backend: Option<String>,
    /// Directory of error page overrides (banned.html, ratelimit.html, ...)
    #[arg(long = "error-pages", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_pages: Option<PathBuf>,
    /// Banned client CIDR or address (repeatable)
    #[arg(long = "banned-cidr", value_name = "CIDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub banned_cidrs: Option<Vec<String>>,
    /// Backend network the proxy never connects to (repeatable; replaces the default list)
    #[arg(long = "denied-backend-network", value_name = "CIDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_backend_networks: Option<Vec<String>>,
    /// DNS server for backend names, IP or IP:port (repeatable) [default: those of /etc/resolv.conf]
    #[arg(long = "dns-server", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
    /// Refused User-Agent regex, case-insensitive (repeatable)
    #[arg(long = "blocked-user-agent", value_name = "REGEX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_user_agents: Option<Vec<String>>,
    /// Refused Referer regex, case-insensitive (repeatable)
    #[arg(long = "blocked-referer", value_name = "REGEX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_referers: Option<Vec<String>>,
    /// Refuse requests without a User-Agent [default: true]
    #[arg(long = "require-user-agent", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_user_agent: Option<bool>,
    /// Requests per second per client IP, 0 = off [default: 0]
    #[arg(long = "rate-limit-per-second", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_second: Option<u32>,
    /// Requests allowed at once above the rate [default: 0]
    #[arg(long = "rate-limit-burst", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_burst: Option<u32>,
    /// Start in maintenance mode
    #[arg(long = "maintenance", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<bool>,
    /// Largest request body in bytes [default: 134217728]
    #[arg(long = "max-body-size", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_size: Option<u64>,
    /// Backend connect timeout in seconds [default: 10]
    #[arg(long = "connect-timeout-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout_secs: Option<u64>,
    /// Backend idle read timeout in seconds [default: 3600]
    #[arg(long = "read-timeout-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_timeout_secs: Option<u64>,
    /// Client connection idle timeout in seconds [default: 3600]
    #[arg(long = "client-timeout-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_timeout_secs: Option<u64>,
    /// Time a client has to send a request head, in seconds [default: 60]
    #[arg(long = "header-timeout-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_timeout_secs: Option<u64>,
    /// Time a client has to finish the TLS handshake, in seconds [default: 10]
    #[arg(long = "tls-handshake-timeout-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_handshake_timeout_secs: Option<u64>,
    /// Seconds an HTTP/1 connection may wait for its next request [default: 60]
    #[arg(long = "keepalive-timeout-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_timeout_secs: Option<u64>,
    /// Seconds an HTTP/2 connection with no open stream is kept [default: 60]
    #[arg(long = "http2-idle-timeout-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http2_idle_timeout_secs: Option<u64>,
    /// Seconds a request body may pause between two reads [default: 60]
    #[arg(long = "client-body-timeout-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_body_timeout_secs: Option<u64>,
    /// Seconds a response may wait on a client that does not read it [default: 60]
    #[arg(long = "send-timeout-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_timeout_secs: Option<u64>,
    /// Grace period for in-flight requests at shutdown, in seconds [default: 30]
    #[arg(long = "shutdown-grace-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_secs: Option<u64>,
    /// Unix socket for handing the listening sockets over to a new process [default: none]
    #[arg(long = "handover-socket", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handover_socket: Option<PathBuf>,
    /// Client connections served at once [default: 50000]
    #[arg(long = "max-connections", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Connections at once from one IPv4 address or IPv6 /64, 0 = off [default: 256]
    #[arg(long = "max-connections-per-client", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_client: Option<usize>,
    /// Idle keep-alive connections kept per backend [default: 128]
    #[arg(long = "upstream-max-idle-per-backend", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_max_idle_per_backend: Option<usize>,
    /// Requests in flight per backend address, 0 = off [default: 512]
    #[arg(long = "max-connections-per-backend", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_backend: Option<usize>,
    /// Milliseconds a request waits for a backend slot before 503 [default: 1000]
    #[arg(long = "backend-queue-timeout-ms", value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_queue_timeout_ms: Option<u64>,
    /// Seconds an idle backend connection is kept [default: 60]
    #[arg(long = "upstream-idle-timeout-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_idle_timeout_secs: Option<u64>,
    /// Access log: off, stdout or a file path [default: off]
    #[arg(long = "access-log", value_name = "off|stdout|FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<String>,
    /// Gzip text responses for clients that accept it [default: true]
    #[arg(long = "gzip", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gzip: Option<bool>,
    /// Event loops serving connections; 0 = one per core but one [default: 0]
    #[arg(long = "event-loops", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_loops: Option<usize>,
    /// Requests in flight to one tool at once, WebSocket tunnels included; 0 = off [default: 256]
    #[arg(long = "tool-max-concurrent-requests", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_max_concurrent_requests: Option<u32>,

    // Dead registrations (the prober).
    /// Seconds without a request before a route's backend is probed, 0 = no prober [default: 300]
    #[arg(long = "probe-idle-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_idle_secs: Option<u64>,
    /// Backend probes started per second at most [default: 10]
    #[arg(long = "probe-rate-per-second", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_rate_per_second: Option<u32>,
    /// Backend probes in flight at once at most [default: 16]
    #[arg(long = "probe-max-in-flight", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_max_in_flight: Option<usize>,
    /// Milliseconds a probe waits for its TCP connection [default: 3000]
    #[arg(long = "probe-timeout-ms", value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_timeout_ms: Option<u64>,
    /// Seconds a backend fails every probe before its registrations are reported dead [default: 1800]
    #[arg(long = "dead-after-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_after_secs: Option<u64>,
    /// Remove registrations reported dead from Redis [default: false]
    #[arg(long = "remove-dead-registrations", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remove_dead_registrations: Option<bool>,

    /// Access log line format [default: text]
    #[arg(long = "access-log-format", value_enum, value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log_format: Option<crate::access_log::Format>,
    /// Seconds a request waits for its tool's route to come back, 0 = off [default: 0]
    #[arg(long = "hold-secs", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_secs: Option<u64>,
    /// Last-known-good route table file, written atomically, served at start until Redis answers [default: off]
    #[arg(long = "snapshot-file", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_file: Option<PathBuf>,

    // https backends.
    /// PEM CA certificates trusted for https:// backends besides the system roots [default: none]
    #[arg(long = "backend-ca-file", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_ca_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn errors_name_key_and_value() {
        let config = Config { default_backend: Some("ftp://x".into()), ..Config::default() };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid [proxy] default_backend = \"ftp://x\""), "{err}");

        let config = Config { tls_cert: vec!["a.pem".into()], ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("tls_key"));

        let config = Config { banned_cidrs: vec!["10.0.0.0/33".into()], ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("banned_cidrs = \"10.0.0.0/33\""));

        let config = Config { blocked_user_agents: vec!["(".into()], ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("blocked_user_agents"));
        let config = Config { dns_servers: vec!["ns1".into()], ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("dns_servers = \"ns1\""));
        let config = Config { dns_servers: vec!["10.0.0.1".into(), "[::1]:5353".into()], ..Config::default() };
        assert_eq!(config.dns_servers().unwrap(), ["10.0.0.1:53".parse().unwrap(), "[::1]:5353".parse().unwrap()]);
    }

    #[test]
    fn default_backend_in_a_denied_network_is_refused_at_start() {
        let config = Config { default_backend: Some("http://127.0.0.1:30000".into()), ..Config::default() };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("default_backend") && err.contains("127.0.0.0/8"), "{err}");
        let config = Config {
            default_backend: Some("http://127.0.0.1:30000".into()),
            denied_backend_networks: Vec::new(),
            ..Config::default()
        };
        config.validate().unwrap();
    }

    #[test]
    fn extra_headers_may_not_name_framing_or_connection_headers() {
        for name in ["Content-Length", "transfer-encoding", "Connection", "date"] {
            let config =
                Config { extra_headers: BTreeMap::from([(name.to_string(), "1".to_string())]), ..Config::default() };
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("extra_headers") && err.contains(name), "{err}");
        }
        let config =
            Config { extra_headers: BTreeMap::from([("X-Ok".to_string(), "1".to_string())]), ..Config::default() };
        config.validate().unwrap();
    }

    #[test]
    fn values_that_would_panic_later_are_refused() {
        let config = Config { read_timeout_secs: u64::MAX, ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("read_timeout_secs"));
        let config = Config { client_timeout_secs: MAX_TIMEOUT_SECS + 1, ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("client_timeout_secs"));
        Config { client_timeout_secs: MAX_TIMEOUT_SECS, ..Config::default() }.validate().unwrap();
        let config = Config { max_connections: usize::MAX, ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("max_connections"));
        for config in [
            Config { keepalive_timeout_secs: 0, ..Config::default() },
            Config { http2_idle_timeout_secs: u64::MAX, ..Config::default() },
            Config { client_body_timeout_secs: 0, ..Config::default() },
            Config { send_timeout_secs: MAX_TIMEOUT_SECS + 1, ..Config::default() },
        ] {
            let err = config.validate().unwrap_err().to_string();
            assert!(
                ["keepalive_timeout", "http2_idle", "client_body", "send_timeout"].iter().any(|k| err.contains(k)),
                "{err}"
            );
        }
        let config = Config { max_connections_per_backend: usize::MAX, ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("max_connections_per_backend"));
        let config = Config { backend_queue_timeout_ms: u64::MAX, ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("backend_queue_timeout_ms"));
    }

    #[test]
    fn prober_bounds_are_checked() {
        for (config, key) in [
            (Config { probe_rate_per_second: 0, ..Config::default() }, "probe_rate_per_second = 0"),
            (Config { probe_rate_per_second: 1001, ..Config::default() }, "probe_rate_per_second = 1001"),
            (Config { probe_max_in_flight: 0, ..Config::default() }, "probe_max_in_flight = 0"),
            (Config { probe_timeout_ms: 0, ..Config::default() }, "probe_timeout_ms = 0"),
            (Config { dead_after_secs: u64::MAX, ..Config::default() }, "dead_after_secs"),
            (Config { probe_idle_secs: u64::MAX, ..Config::default() }, "probe_idle_secs"),
        ] {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        Config { probe_idle_secs: 0, dead_after_secs: 0, ..Config::default() }.validate().unwrap();
    }

    #[test]
    fn share_overrides_name_real_tools_and_real_shares() {
        let with = |tool: &str, limit| Config {
            tool_max_concurrent_requests_overrides: BTreeMap::from([(tool.to_string(), limit)]),
            ..Config::default()
        };
        with("busy-tool", 1024).validate().unwrap();
        let err = with("Not A Tool", 10).validate().unwrap_err().to_string();
        assert!(err.contains("tool_max_concurrent_requests_overrides") && err.contains("Not A Tool"), "{err}");
        let err = with("busy-tool", 0).validate().unwrap_err().to_string();
        assert!(err.contains("busy-tool = 0") && err.contains("at least 1"), "{err}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The `[proxy]` section of the documented example parses into the
    /// defaults, so it cannot drift from them.
    #[test]
    fn example_config_matches_defaults() {
        #[derive(Deserialize)]
        struct File {
            proxy: Config,
        }
        let text = include_str!("../../deploy/dynamicproxy.example.toml");
        let file: File = toml::from_str(text).unwrap();
        let defaults = Config::default();
        assert_eq!(format!("{:?}", file.proxy), format!("{defaults:?}"));
    }
}
