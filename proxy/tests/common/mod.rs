//! Test harness: a real redis-server, real backends, the proxy in-process on
//! ephemeral ports, and small clients.

#![allow(dead_code)]

pub mod pki;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dynamicproxy_proxy::{Config, Listeners, Metrics, ProxyHandle};
use dynamicproxy_redis::{CacheSyncConfig, RouteCache, run_cache_sync};
use dynamicproxy_test_support::{RedisServer, eventually};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> futures::future::BoxFuture<'static, Response<Full<Bytes>>> + Send + Sync>;

/// A real HTTP/1.1 backend on 127.0.0.1.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Backend {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A backend answering `200` with `name` and the request it received:
    /// `backend=<name>\nmethod=..\nuri=..\n` then one `name: value` line per header.
    pub async fn echo(name: &'static str) -> Backend {
        Backend::start(Arc::new(move |req: Request<Incoming>| {
            Box::pin(async move {
                let mut text = format!("backend={name}\nmethod={}\nuri={}\n", req.method(), req.uri());
                for (k, v) in req.headers() {
                    text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
                }
                let body = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                text.push_str(&format!("body-bytes={body}\n"));
                Response::new(Full::new(Bytes::from(text)))
            })
        }))
        .await
    }

    /// A backend running `handler` for each request.
    pub async fn start(handler: Handler) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (h, s) = (hits.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(p) => p, Err(_) => continue },
                };
                let handler = handler.clone();
                let hits = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Backend { addr, hits, stop }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The proxy under test, its Redis and its listeners.
pub struct Proxy {
    pub redis: RedisServer,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub list: SocketAddr,
    pub cache: RouteCache,
    pub handle: ProxyHandle,
    pub shutdown: CancellationToken,
    pub done: tokio::task::JoinHandle<Result<(), dynamicproxy_proxy::Error>>,
    pub registry: Arc<prometheus_client::registry::Registry>,
    sync_stop: CancellationToken,
}

impl Proxy {
    pub async fn start(config: Config) -> Proxy {
        Proxy::start_with(RedisServer::start(), config, |_| {}).await
    }

    /// Starts with `seed` applied to Redis before the proxy loads it.
    pub async fn start_with(redis: RedisServer, config: Config, seed: impl FnOnce(&mut redis::Connection)) -> Proxy {
        Proxy::start_on("127.0.0.1:0", redis, config, seed).await
    }

    /// Starts with the HTTP and HTTPS listeners bound to `bind` (e.g. `[::1]:0`).
    /// Test backends listen on loopback, which `denied_backend_networks`
    /// refuses by default: this allows every network (`[]`), as a development
    /// setup does. Tests of the policy itself use [`Proxy::start_enforcing`].
    pub async fn start_on(
        bind: &str,
        redis: RedisServer,
        mut config: Config,
        seed: impl FnOnce(&mut redis::Connection),
    ) -> Proxy {
        config.denied_backend_networks = Vec::new();
        Proxy::start_exactly(bind, redis, config, seed).await
    }

    /// Starts with `config` as given, `denied_backend_networks` included.
    pub async fn start_enforcing(config: Config, seed: impl FnOnce(&mut redis::Connection)) -> Proxy {
        Proxy::start_exactly("127.0.0.1:0", RedisServer::start(), config, seed).await
    }

    async fn start_exactly(
        bind: &str,
        redis: RedisServer,
        mut config: Config,
        seed: impl FnOnce(&mut redis::Connection),
    ) -> Proxy {
        let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
        seed(&mut redis.client());
        let cache = RouteCache::new();
        let sync_stop = CancellationToken::new();
        let endpoint = redis.url().parse().unwrap();
        let mut sync = CacheSyncConfig::new(endpoint);
        sync.ping_interval = Duration::from_millis(200);
        tokio::spawn(run_cache_sync(sync, cache.clone(), sync_stop.clone()));
        let http = TcpListener::bind(bind).await.unwrap();
        let list = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let https = if config.tls_enabled() { Some(TcpListener::bind(bind).await.unwrap()) } else { None };
        let (http_addr, list_addr) = (http.local_addr().unwrap(), list.local_addr().unwrap());
        let https_addr = https.as_ref().map(|l| l.local_addr().unwrap());
        config.http_listen = http_addr;
        let handle = ProxyHandle::new(&config);
        let shutdown = CancellationToken::new();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let done = tokio::spawn(dynamicproxy_proxy::run(
            config,
            Listeners { http, https, list },
            cache.clone(),
            metrics,
            handle.clone(),
            shutdown.clone(),
        ));
        let c = cache.clone();
        eventually(Duration::from_secs(10), "route cache loaded", || {
            let c = c.clone();
            async move { c.is_loaded().then_some(()) }
        })
        .await;
        Proxy {
            redis,
            http: http_addr,
            https: https_addr,
            list: list_addr,
            cache,
            handle,
            shutdown,
            done,
            registry: Arc::new(registry),
            sync_stop,
        }
    }

    /// The metrics in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    pub fn redis(&self) -> redis::Connection {
        self.redis.client()
    }

    /// Sets a route and waits until the proxy's cache has it.
    pub async fn set_route(&self, tool: &str, pattern: &str, backend: &str) {
        let mut c = self.redis();
        redis::cmd("HSET").arg(format!("prefix:{tool}")).arg(pattern).arg(backend).query::<()>(&mut c).unwrap();
        self.wait_for(tool, |r| r.is_some_and(|r| r.routes().iter().any(|x| x.pattern.as_str() == pattern))).await;
    }

    pub async fn wait_for(&self, tool: &str, cond: impl Fn(Option<&dynamicproxy_redis::ToolRoutes>) -> bool) {
        eventually(Duration::from_secs(5), &format!("cache update for {tool}"), || {
            let found = cond(self.cache.tool(tool).as_deref());
            async move { found.then_some(()) }
        })
        .await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.sync_stop.cancel();
    }
}

/// A plain HTTP/1.1 client that sends whatever Host it is told.
pub fn client() -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// A response read whole, for assertions.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The value of an echoed request header (`name: value` line).
    pub fn echoed(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name}: ");
        self.body.lines().find_map(|l| l.strip_prefix(prefix.as_str()))
    }

    pub fn echoed_all(&self, name: &str) -> Vec<&str> {
        let prefix = format!("{name}: ");
        self.body.lines().filter_map(|l| l.strip_prefix(prefix.as_str())).collect()
    }
}

/// GET `path` from `addr` with `Host: host` and extra headers.
pub async fn get(addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    send(addr, "GET", host, path, headers, Bytes::new()).await
}

pub async fn send(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Got {
    let mut req = Request::builder().method(method).uri(format!("http://{addr}{path}")).header("host", host);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("user-agent")) {
        req = req.header("user-agent", "proxy-tests/1");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = tokio::time::timeout(Duration::from_secs(30), client().request(req.body(Full::new(body)).unwrap()))
        .await
        .expect("response within 30 s")
        .expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    Got { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// Writes `raw` to `addr` and reads until the server closes or `timeout`.
pub async fn raw(addr: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn status_of(raw_response: &str) -> u16 {
    raw_response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A WebSocket handshake request for `ws.toolforge.org/socket` through `proxy`'s HTTP listener.
pub fn websocket_request(proxy: &Proxy) -> http::Request<()> {
    http::Request::builder()
        .uri(format!("ws://{}/socket", proxy.http))
        .header("host", "ws.toolforge.org")
        .header("user-agent", "t")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", tokio_tungstenite::tungstenite::handshake::client::generate_key())
        .body(())
        .unwrap()
}

/// A real WebSocket echo backend on 127.0.0.1.
pub async fn websocket_echo_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else { return };
                while let Some(Ok(msg)) = futures::StreamExt::next(&mut ws).await {
                    if (msg.is_text() || msg.is_binary()) && futures::SinkExt::send(&mut ws, msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}
