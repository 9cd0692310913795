//! The edge proxy: routes HTTP(S) requests for `<tool>.<domain>` and legacy
//! `/<tool>/...` URLs to tool backends from the in-memory route cache, and
//! serves the `/list` API.
//!
//! # Layout
//!
//! - [`config`]: [`Config`] (`[proxy]`) and its command-line [`Flags`].
//! - [`server`] (private): accept loop, connection limits, TLS handshake, HTTP/1.1 and HTTP/2 serving, drain.
//! - [`shed`]: refusals at accept (`max_connections`, `max_connections_per_client`) and their short answers.
//! - [`client_limit`]: open connections per IPv4 address / IPv6 /64.
//! - [`activity`]: requests in flight per connection; keep-alive and HTTP/2 idle closes.
//! - [`drain`]: HTTP/1 responses say `Connection: close` while draining; idle connections are not cut at once.
//! - [`linger`]: lingering close, so early answers are not lost to a RST.
//! - [`park`] (private): idle HTTP/1 keep-alive connections hold only their socket between requests.
//! - [`pace`] (private): an HTTP/1 response body is read from its backend only as fast as the client takes it.
//! - [`workers`] (private): single-threaded event loops (one per core but one), each with its own upstream pool.
//! - [`handler`] (private): one request's life, in SPEC §3 order; errors become pages there.
//! - [`route`]: the routing rules over the route cache, traceable step by step.
//! - [`explain`]: which rule a request for a URL takes and why, and who wrote that route (`/explain`).
//! - [`hold`]: hold-and-wake: requests wait for a tool's route to come back (`hold_secs`).
//! - [`host`]: Host normalisation and URI checks.
//! - [`protect`]: bans, User-Agent/Referer block lists, per-client rate limit.
//! - [`headers`]: request and response header rewriting.
//! - [`extra_headers`]: `extra_headers` and HSTS on every response; HTTP/1 heads get them from hyper's writer.
//! - [`upstream`]: the client for backends: exchanges, connect and idle timeouts, failure classification.
//! - [`backend_conn`]: one HTTP/1.1 connection to a backend, driven by the task of the request using it.
//! - [`upstream_pool`]: idle keep-alive connections per backend, one pool per event loop.
//! - [`egress`]: where the proxy may connect: resolution, then `denied_backend_networks`.
//! - [`backend_tls`]: TLS to `https://` backends: system roots plus `backend_ca_file`, SNI.
//! - [`resolver`]: backend names through a TTL-respecting DNS cache with a stale window.
//! - [`upgrade`]: which protocol upgrades are tunnelled (WebSocket only).
//! - [`backend_limit`]: requests in flight per backend and per client connection.
//! - [`buffers`]: buffer, window and stream limits (memory per connection).
//! - [`body`]: response and request body types (streamed, never buffered whole).
//! - [`chunked`]: chunked response bodies from backends, decoded strictly and without copying.
//! - [`compress`]: on-the-fly gzip.
//! - [`sniff`]: HTTP/1 request-smuggling guard.
//! - [`snapshot`]: the last-known-good route table on disk, written atomically and read at start.
//! - [`idle`]: idle and send timeouts for connections.
//! - [`clock`]: the time, read once per poll of a connection's task.
//! - [`loop_turn`]: how busy the event loop's turn is; a backend write waits for the turn's other tasks in a burst.
//! - [`deadline`]: a timer re-armed only when it fires early, for deadlines checked on every wait.
//! - [`wake_gate`]: a side branch of a connection's `select!`, polled only when its own waker fired.
//! - [`tls`]: certificates by SNI, hot reload.
//! - [`cert_expiry`]: a certificate's expiry, for the metrics.
//! - [`pages`]: built-in and overridden error pages.
//! - [`list`]: the `/list` API.
//! - [`outlier`]: backends marked down after repeated failures, answered fast with `backend-down`.
//! - [`last_use`]: when each routed backend last had a request (which routes are idle).
//! - [`prober`]: idle routes' backends checked by TCP connect, one proxy at a time (a Redis lock).
//! - [`dead`]: [`DeadRegistrations`], registrations whose backend failed every probe for long.
//! - [`request_id`]: `X-Request-Id`, kept from the client or made, on both sides and in the log.
//! - [`reasons`]: what each reason code means for a tool's maintainers, for the pages.
//! - [`access_log`], [`metrics`]: observability.
//! - [`fair_share`]: requests in flight per tool, against `tool_max_concurrent_requests`.
//! - [`trace_context`]: W3C `traceparent` continued or started, passed to backends.
//! - [`error`]: [`Error`] (cannot start) and [`ProxyError`] (one request, mapped to a status).
//!
//! # A request's path
//!
//! ```text
//! accept (server::accept_loop: connection limits, refusals answered at once, span per connection)
//!  └─ hand over (workers: next event loop in turn; the connection stays on its thread)
//!   └─ TLS handshake with timeout (tls::TlsAcceptor; ALPN picks h2 or http/1.1)
//!       └─ serve connection (hyper http1 + upgrades / http2; per-phase timeouts; smuggling guard; lingering close;
//!          idle HTTP/1 connections parked between requests)
//!           └─ handle request (handler::handle: context, metrics, access log, error → page)
//!               ├─ 1 healthz · 2 Host / URI checks · HTTP→HTTPS redirect
//!               ├─ 3 bans, User-Agent, Referer · 4 rate limit · 5 maintenance · host redirects
//!               ├─ route (route::Router over RouteCache: tool host, legacy path, admin, default)
//!               ├─ backend marked down? (outlier: fast 502 backend-down; one trial per window)
//!               ├─ the tool's share (fair_share: over tool_max_concurrent_requests → 503 over-capacity)
//!               └─ forward (upstream client pool; headers rewritten; body streamed; WebSocket tunnelled)
//!                   ├─ new connection: resolve (resolver cache) → drop denied addresses (egress) → connect
//!                   │   └─ https:// backend: TLS handshake, SNI from the host, certificate verified (backend_tls)
//!                   ├─ exchange in the request's own task (backend_conn; in a busy loop turn the write
//!                   │   waits for the turn's other tasks, loop_turn): head and body out, response head in
//!                   └─ response policy (hop-by-hop, Location, default files, gzip, extra headers, HSTS)
//! ```

#![forbid(unsafe_code)]

pub mod access_log;
pub mod activity;
pub mod backend_conn;
pub mod backend_limit;
pub mod backend_tls;
pub mod body;
pub mod buffers;
pub mod cert_expiry;
pub mod chunked;
pub mod client_limit;
pub mod clock;
pub mod compress;
pub mod config;
pub mod dead;
pub mod deadline;
pub mod drain;
pub mod egress;
pub mod error;
pub mod explain;
pub mod extra_headers;
pub mod fair_share;
mod handler;
pub mod headers;
pub mod hold;
pub mod host;
pub mod idle;
pub mod last_use;
pub mod linger;
pub mod list;
pub mod loop_turn;
pub mod metrics;
pub mod outlier;
mod pace;
pub mod pages;
mod park;
pub mod prober;
pub mod protect;
pub mod reasons;
pub mod request_id;
pub mod resolver;
pub mod route;
mod server;
pub mod shed;
pub mod snapshot;
pub mod sniff;
pub mod tls;
pub mod trace_context;
pub mod upgrade;
pub mod upstream;
pub mod upstream_pool;
pub mod wake_gate;
mod workers;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dynamicproxy_redis::{RouteCache, RouteStore};
use http::{HeaderName, HeaderValue};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::{Config, ConfigError, Flags};
pub use dead::DeadRegistrations;
pub use error::{Error, ProxyError};
pub use metrics::Metrics;

/// The already-bound listeners the proxy serves.
pub struct Listeners {
    /// Plain HTTP (`http_listen`).
    pub http: TcpListener,
    /// HTTPS (`https_listen`); used only when certificates are configured.
    pub https: Option<TcpListener>,
    /// The `/list` API (`list_listen`).
    pub list: TcpListener,
}

/// A cheap, cloneable handle for runtime switches (the admin API uses it).
#[derive(Clone, Debug)]
pub struct ProxyHandle {
    maintenance: Arc<AtomicBool>,
    reload: Arc<Notify>,
    /// Certificate reloads that succeeded and failed, for the admin API.
    reloads: Arc<[AtomicU64; 2]>,
    /// Wakes the access log writer to reopen its file (SIGUSR1, logrotate).
    reopen_log: Arc<Notify>,
    /// Where `/list?detail=1` reads who wrote each route; without it, that is left out.
    sources: Option<Arc<RouteStore>>,
    /// Last request per backend, written by requests, read by the prober.
    last_use: last_use::LastUse,
    /// What the prober found.
    dead: DeadRegistrations,
    /// True once the accept loops run: a hand-over waits for it before the old process stops accepting.
    serving: Arc<tokio::sync::watch::Sender<bool>>,
    /// Set when a successor took the listeners over: idle connections are then kept until the grace ends.
    handed_over: Arc<AtomicBool>,
}

impl ProxyHandle {
    /// A handle starting in the maintenance state `config.maintenance`.
    pub fn new(config: &Config) -> Self {
        ProxyHandle {
            maintenance: Arc::new(AtomicBool::new(config.maintenance)),
            reload: Arc::new(Notify::new()),
            reloads: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
            reopen_log: Arc::new(Notify::new()),
            sources: None,
            last_use: last_use::LastUse::new(),
            dead: DeadRegistrations::new(),
            serving: Arc::new(tokio::sync::watch::Sender::new(false)),
            handed_over: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The same handle, with `/list?detail=1` saying who wrote each route
    /// (read from `store`, off the request path).
    pub fn with_sources(mut self, store: Arc<RouteStore>) -> Self {
        self.sources = Some(store);
        self
    }

    /// Last request per backend (the prober probes only idle backends).
    pub fn last_use(&self) -> &last_use::LastUse {
        &self.last_use
    }

    /// Registrations the prober found dead, for the admin API, `/list?detail=1` and `explain`.
    pub fn dead_registrations(&self) -> &DeadRegistrations {
        &self.dead
    }

    /// Marks that a successor serves the listeners now; call before the
    /// shutdown token fires. The drain then keeps idle keep-alive connections
    /// open until the end of `shutdown_grace_secs` (their clients may be
    /// sending), where a plain stop closes them at once.
    pub fn handed_over(&self) {
        self.handed_over.store(true, Ordering::Relaxed);
    }

    /// Returns once the proxy accepts on all its listeners.
    pub async fn serving(&self) {
        let mut serving = self.serving.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = serving.wait_for(|on| *on).await;
    }

    /// Turns maintenance mode on or off.
    pub fn set_maintenance(&self, enabled: bool) {
        self.maintenance.store(enabled, Ordering::Relaxed);
    }

    /// True while maintenance mode is on.
    pub fn maintenance(&self) -> bool {
        self.maintenance.load(Ordering::Relaxed)
    }

    /// Asks the proxy to re-read its TLS certificates (as SIGHUP does).
    pub fn reload_certificates(&self) {
        self.reload.notify_one();
    }

    /// Asks the access log to reopen its file by name (as SIGUSR1 does), after logrotate moved it.
    pub fn reopen_access_log(&self) {
        self.reopen_log.notify_one();
    }

    /// Certificate reloads so far: (succeeded, failed and kept the old certificates).
    pub fn certificate_reloads(&self) -> (u64, u64) {
        (self.reloads[0].load(Ordering::Relaxed), self.reloads[1].load(Ordering::Relaxed))
    }
}

/// Serves until `shutdown` is cancelled, then stops accepting, lets
/// in-flight requests finish within `shutdown_grace_secs`, and returns.
/// Never returns early because Redis or a backend is down.
pub async fn run(
    config: Config,
    listeners: Listeners,
    cache: RouteCache,
    metrics: Arc<Metrics>,
    handle: ProxyHandle,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let protection = protect::Protection::from_config(&config)?;
    let pages = pages::Pages::load(config.error_pages.as_deref())?;
    let access_log = access_log::AccessLog::open(
        &config.access_log,
        config.access_log_format,
        metrics.access_log_lost_lines(),
        handle.reopen_log.clone(),
    )?;
    let extra_headers = extra_headers::ExtraHeaders::new(
        config
            .extra_headers
            .iter()
            .filter_map(|(k, v)| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?)))
            .collect(),
    );

    let tls = match (config.tls_enabled(), &listeners.https) {
        (true, Some(_)) => {
            let provider = tls::provider();
            let pairs = config.tls_cert.iter().cloned().zip(config.tls_key.iter().cloned()).collect();
            let store = Arc::new(tls::CertStore::load(pairs, provider.clone())?);
            metrics.certificates(&store.not_after());
            Some((tls::TlsAcceptor::new(store.clone(), provider)?, store))
        }
        _ => None,
    };
    let https_port = match (&tls, &listeners.https) {
        (Some(_), Some(listener)) => listener.local_addr().ok().map(|a| a.port()),
        _ => None,
    };

    let hard_stop = CancellationToken::new();
    let close_idle = hard_stop.child_token();
    let tunnels = TaskTracker::new();
    let hold = hold::Hold::new(config.hold_secs, &cache, metrics.hold.clone());
    let shared = Arc::new(handler::Shared {
        hold,
        last_use: handle.last_use.clone(),
        router: route::Router::from_config(&config, cache.clone())?,
        pages,
        protection,
        maintenance: handle.maintenance.clone(),
        metrics: metrics.clone(),
        access_log,
        max_body: config.max_body_size,
        body_timeout: Config::secs(config.client_body_timeout_secs),
        extra_headers,
        gzip: config.gzip,
        https_port,
        tunnels: tunnels.clone(),
        hard_stop: hard_stop.clone(),
        outliers: outlier::Outliers::new(
            outlier::OutlierSettings {
                after_failures: config.backend_down_after_failures,
                first: Config::secs(config.backend_down_first_secs),
                max: Config::secs(config.backend_down_max_secs),
            },
            metrics.clone(),
        ),
        fair_share: fair_share::FairShare::new(
            config.tool_max_concurrent_requests,
            &config.tool_max_concurrent_requests_overrides,
        ),
        backend_limits: backend_limit::BackendLimits::new(backend_limit::BackendLimitSettings {
            max_per_backend: config.max_connections_per_backend,
            queue_timeout: Duration::from_millis(config.backend_queue_timeout_ms),
        }),
    });

    let tracker = TaskTracker::new();
    let settings = server::ServeSettings {
        header_timeout: Config::secs(config.header_timeout_secs),
        client_timeout: Config::secs(config.client_timeout_secs),
        handshake_timeout: Config::secs(config.tls_handshake_timeout_secs),
        keepalive_timeout: Config::secs(config.keepalive_timeout_secs),
        http2_idle_timeout: Config::secs(config.http2_idle_timeout_secs),
        send_timeout: Config::secs(config.send_timeout_secs),
        limit: Arc::new(Semaphore::new(config.max_connections)),
        per_client: client_limit::ClientLimit::new(config.max_connections_per_client),
        lingering_refusals: Arc::new(Semaphore::new(shed::MAX_LINGERING_REFUSALS)),
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
        close_idle: close_idle.clone(),
        hard_stop: hard_stop.clone(),
    };
    // Background chores (cache gauges, rate-limit sweep, certificate watch)
    // stop however `run` ends, as the event loops do.
    let background = CancellationToken::new();
    let _background_guard = background.clone().drop_guard();
    // Cancelled however `run` ends, even when its future is dropped, so the
    // event loop threads never outlive the proxy.
    let loops_stop = CancellationToken::new();
    let _loops_guard = loops_stop.clone().drop_guard();
    let upstream = upstream::UpstreamSettings {
        connect_timeout: Config::secs(config.connect_timeout_secs),
        read_timeout: Config::secs(config.read_timeout_secs),
        max_idle_per_backend: config.upstream_max_idle_per_backend,
        idle_timeout: Config::secs(config.upstream_idle_timeout_secs),
        egress: egress::Egress::new(
            config.denied_backend_networks()?,
            resolver::BackendResolver::new(&config.dns_servers()?),
        ),
        tls: backend_tls::BackendTls::load(config.backend_ca_file.as_deref(), tls::provider())?,
    };
    // One core is left to the kernel's network processing, the accept loops
    // and the Redis sync: on 2 cores, one loop served 39k req/s with p99
    // 3.3 ms where two served 32k with p99 23 ms (bench/RESULTS.md).
    let loops = config.event_loop_count();
    let workers = Arc::new(workers::Workers::start(loops, shared.clone(), settings.clone(), upstream, loops_stop));

    info!(http = ?listeners.http.local_addr().ok(), https = ?https_port, list = ?listeners.list.local_addr().ok(),
        domain = %config.canonical_domain, "proxy serving");
    tracker.spawn(server::accept_loop(listeners.http, shared.clone(), settings.clone(), None, workers.clone()));
    if let (Some((acceptor, store)), Some(listener)) = (tls, listeners.https) {
        tracker.spawn(server::accept_loop(listener, shared.clone(), settings.clone(), Some(acceptor), workers.clone()));
        tokio::spawn(watch_certificates(store, handle.clone(), metrics.clone(), background.clone()));
    }
    tracker.spawn(list::serve(
        listeners.list,
        cache.clone(),
        list::DetailSources { store: handle.sources.clone(), dead: handle.dead.clone() },
        tracker.clone(),
        shutdown.clone(),
        Config::secs(config.client_timeout_secs),
        list::MAX_LIST_CONNECTIONS,
    ));
    handle.serving.send_replace(true);
    tokio::spawn(access_log::reopen_on_sigusr1(handle.reopen_log.clone(), background.clone()));
    tokio::spawn(housekeeping(shared.clone(), cache, metrics, background.clone()));

    shutdown.cancelled().await;
    info!(grace_secs = config.shutdown_grace_secs, "shutting down: draining connections");
    if !handle.handed_over.load(Ordering::Relaxed) {
        // Nobody accepts after this process: idle clients are better told now.
        close_idle.cancel();
    }
    tracker.close();
    tunnels.close();
    let grace = Config::secs(config.shutdown_grace_secs);
    let drained = tokio::time::timeout(grace, async {
        tracker.wait().await;
        tunnels.wait().await;
    })
    .await;
    if drained.is_err() {
        warn!(open = tracker.len() + tunnels.len(), "grace period over: closing remaining connections");
        hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            tracker.wait().await;
            tunnels.wait().await;
        })
        .await;
    }
    background.cancel();
    info!("proxy stopped");
    Ok(())
}

/// Periodic chores: cache gauges and forgetting idle rate-limit entries.
async fn housekeeping(shared: Arc<handler::Shared>, cache: RouteCache, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        metrics.cache_status(&cache.status());
        metrics.cache_origin(&cache.origin().state());
        n += 1;
        if n.is_multiple_of(10) {
            shared.protection.sweep();
        }
    }
}

/// Reloads certificates when their files change (checked every second), on
/// SIGHUP, and when asked through [`ProxyHandle::reload_certificates`].
async fn watch_certificates(
    store: Arc<tls::CertStore>,
    handle: ProxyHandle,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            _ = poll.tick() => {
                if !store.changed_on_disk() {
                    continue;
                }
                "files changed"
            }
            _ = handle.reload.notified() => "reload requested",
            _ = async {
                match hup.as_mut() {
                    Some(s) => { s.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => "SIGHUP",
        };
        match store.reload() {
            Ok(()) => {
                handle.reloads[0].fetch_add(1, Ordering::Relaxed);
                metrics.certificates(&store.not_after());
                info!(reason = why, "TLS certificates reloaded");
            }
            Err(error) => {
                handle.reloads[1].fetch_add(1, Ordering::Relaxed);
                warn!(reason = why, %error, "TLS certificate reload failed; keeping the old certificates");
            }
        }
    }
}
