//! One request's life: checks in SPEC §3 order, routing, forwarding, and the
//! response policy; every failure becomes its error page here, at the top.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dynamicproxy_redis::BackendUrl;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::access_log::{AccessLog, Entry};
use crate::backend_limit::BackendLimits;
use crate::body::{LimitedBody, ProxyBody};
use crate::clock;
use crate::compress::{self, GzipBody};
use crate::error::ProxyError;
use crate::extra_headers::ExtraHeaders;
use crate::fair_share::{FairShare, Slot as ShareSlot};
use crate::headers::{self, Forwarded};
use crate::hold::{self, Hold};
use crate::host::{normalize_host, valid_percent_encoding};
use crate::metrics::Metrics;
use crate::outlier::{self, Admission, Outcome, Outliers};
use crate::pages::{Page, PageVars, Pages};
use crate::protect::{Protection, Verdict};
use crate::request_id::{self, X_REQUEST_ID};
use crate::route::{Decision, Router, Via};
use crate::server::Slot;
use crate::sniff::SmuggleFlags;
use crate::trace_context::TraceContext;
use crate::upgrade;
use crate::upstream::{UpstreamClient, classify};

/// The health check path answered on every host.
pub(crate) const HEALTHZ: &str = "/.well-known/healthz";
/// ACME HTTP-01 challenges must reach their backend over plain HTTP.
const ACME_PREFIX: &str = "/.well-known/acme-challenge/";
/// Names why the proxy itself answered (SPEC §3 reason codes).
pub(crate) const X_DYNAMICPROXY_REASON: HeaderName = HeaderName::from_static("x-dynamicproxy-reason");

/// Everything requests share, built once by `run`.
pub(crate) struct Shared {
    pub router: Router,
    /// Waits for a tool's route to come back (`hold_secs`).
    pub hold: Hold,
    pub pages: Pages,
    pub protection: Protection,
    pub maintenance: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub access_log: Option<AccessLog>,
    pub max_body: u64,
    /// Longest pause in a request body (`client_body_timeout_secs`).
    pub body_timeout: Duration,
    /// `extra_headers` and HSTS, added to every response.
    pub extra_headers: ExtraHeaders,
    pub gzip: bool,
    /// Set when HTTPS is configured: plain HTTP redirects to this port.
    pub https_port: Option<u16>,
    /// WebSocket and other upgraded tunnels, drained at shutdown.
    pub tunnels: TaskTracker,
    /// Cancelled when the shutdown grace period is over.
    pub hard_stop: CancellationToken,
    /// Backends marked down after repeated failures.
    pub outliers: Outliers,
    /// Last request per backend, so the prober leaves used routes alone.
    pub last_use: crate::last_use::LastUse,
    /// Requests in flight per tool, against `tool_max_concurrent_requests`.
    pub fair_share: Arc<FairShare>,
    /// Requests in flight per backend, across all event loops.
    pub backend_limits: Arc<BackendLimits>,
}

/// The client connection a request arrived on.
pub(crate) struct ConnInfo {
    pub client: SocketAddr,
    /// The client's address as `X-Forwarded-For` gives it, made once.
    pub client_ip: HeaderValue,
    /// `X-Forwarded-Port`: the port the client connected to.
    pub port: HeaderValue,
    pub tls: bool,
    /// HTTP/1 framing guard; `None` for HTTP/2.
    pub smuggle: Option<Arc<SmuggleFlags>>,
    /// The upstream pool of the event loop serving this connection: one pool
    /// per loop, so a request never waits on another thread's connections.
    pub pool: Arc<UpstreamClient>,
    /// This connection's place under `max_connections` and its client's
    /// count, shared with any tunnel the connection becomes: an upgraded
    /// connection still counts.
    pub permit: Arc<Slot>,
    /// Backend requests this HTTP/2 connection may have in flight
    /// ([`crate::backend_limit::PER_CONNECTION`]); `None` for HTTP/1, whose
    /// requests come one at a time.
    pub upstream_slots: Option<Arc<Semaphore>>,
}

impl ConnInfo {
    fn proto(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// HTTP/1: the connection's writer puts `extra_headers` and HSTS into
    /// every response head itself (`server::serve_parked`).
    pub fn writes_extra_headers(&self) -> bool {
        self.smuggle.is_some()
    }
}

/// Per-request state gathered along the way, for the log, metrics and the
/// response policy.
struct RequestContext {
    start: Instant,
    upstream: Option<BackendUrl>,
    upstream_time: Option<Duration>,
    /// Normalised Host, kept only when the access log is on.
    host: Option<String>,
    /// This request's place in its tool's share; a tunnel takes it over.
    share: Option<ShareSlot>,
    /// What the backend exchange showed about the backend's health.
    outcome: Outcome,
    /// `X-Request-Id`: sent to the backend, returned, logged, shown on pages.
    request_id: HeaderValue,
    /// The W3C trace the request belongs to.
    trace: TraceContext,
    /// The names to strip the request carries, found when it arrived.
    carried: headers::Carried,
}

/// Handles one request; never fails (errors become pages).
pub(crate) async fn handle(shared: Arc<Shared>, conn: Arc<ConnInfo>, req: Request<Incoming>) -> Response<ProxyBody> {
    let carried = headers::Carried::of(req.headers());
    let mut ctx = RequestContext {
        start: clock::now(),
        upstream: None,
        upstream_time: None,
        host: None,
        share: None,
        outcome: Outcome::Neutral,
        request_id: if carried.request_id() { request_id::of(req.headers()) } else { request_id::new() },
        trace: if carried.traceparent() { TraceContext::from_headers(req.headers()) } else { TraceContext::start() },
        carried,
    };
    let logged = shared.access_log.as_ref().map(|_| (req.method().clone(), req.uri().clone()));
    // Kept (cheap clones of shared bytes) to name the tool on an error page.
    let asked = (req.uri().clone(), req.headers().get(header::HOST).cloned());
    let mut response = match respond(&shared, &conn, req, &mut ctx).await {
        Ok(response) => response,
        Err(error) => {
            if error.is_upstream() {
                shared.metrics.upstream_error(match &error {
                    ProxyError::DeniedBackend(_) => "denied",
                    _ if error.status() == StatusCode::GATEWAY_TIMEOUT => "timeout",
                    _ => "unreachable",
                });
                warn!(client = %conn.client, upstream = ?ctx.upstream.as_ref().map(|u| u.to_string()),
                    error = %error_chain(&error), "upstream failed");
            } else {
                debug!(client = %conn.client, error = %error_chain(&error), "request refused");
            }
            let tool = page_tool(&shared.router, &asked.0, asked.1.as_ref());
            let vars = PageVars {
                reason: error.reason(),
                tool: tool.as_deref().unwrap_or("-"),
                request_id: ctx.request_id.to_str().unwrap_or("-"),
                hint: error.hint(),
            };
            error_response(&shared.pages, &error, &vars)
        }
    };
    response.headers_mut().insert(X_REQUEST_ID, request_id::never_indexed(&ctx.request_id));
    apply_policy(&shared, &conn, &mut response);
    shared.metrics.response(response.status().as_u16());
    if let (Some(log), Some((method, uri))) = (&shared.access_log, logged) {
        let host = ctx.host.as_deref().unwrap_or("-");
        let tool = shared.router.tool_of(host, uri.path());
        let trace_id = ctx.trace.trace_id();
        log.log(&Entry {
            client: conn.client_ip.to_str().unwrap_or("-"),
            host,
            method: method.as_str(),
            uri: uri.path_and_query().map_or("/", |pq| pq.as_str()),
            status: response.status().as_u16(),
            bytes: http_body::Body::size_hint(response.body()).exact(),
            upstream: ctx.upstream.as_ref().map(|u| u as &dyn std::fmt::Display),
            upstream_time: ctx.upstream_time,
            total_time: clock::now().saturating_duration_since(ctx.start),
            tool,
            request_id: ctx.request_id.to_str().unwrap_or("-"),
            trace_id: Some(trace_id.as_str()),
        });
    }
    response
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// SPEC §3 in order; returns the response or the error to show.
async fn respond(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<Incoming>,
    ctx: &mut RequestContext,
) -> Result<Response<ProxyBody>, ProxyError> {
    if let Some(flags) = &conn.smuggle
        && flags.next_request_is_ambiguous()
    {
        return Err(ProxyError::BadRequest("both Content-Length and Transfer-Encoding"));
    }
    // 1. Health check, on any host.
    if req.uri().path() == HEALTHZ && matches!(*req.method(), Method::GET | Method::HEAD) {
        return Ok(text_response(StatusCode::OK, "proxy ok!"));
    }
    // 2. Host, and the request's own well-formedness.
    let raw_host = request_host(&req)?;
    let raw_host_str = raw_host.to_str().map_err(|_| ProxyError::BadRequest("bad Host"))?;
    let host = normalize_host(raw_host_str).map_err(|_| ProxyError::BadRequest("bad Host"))?;
    let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    // The path only, as nginx: a query is passed on as the client wrote it
    // (`?q=100%` is common in hand-made links and reached tools before).
    if !valid_percent_encoding(req.uri().path()) {
        return Err(ProxyError::BadRequest("bad percent-encoding"));
    }
    if shared.access_log.is_some() {
        ctx.host = Some(host.to_string());
    }
    // Plain HTTP next to HTTPS: everything but health and ACME moves to HTTPS.
    if !conn.tls
        && let Some(port) = shared.https_port
        && !req.uri().path().starts_with(ACME_PREFIX)
        && req.uri().path() != HEALTHZ
    {
        let status = if matches!(*req.method(), Method::GET | Method::HEAD) {
            StatusCode::MOVED_PERMANENTLY
        } else {
            StatusCode::PERMANENT_REDIRECT
        };
        let location = if port == 443 {
            format!("https://{host}{path_and_query}")
        } else {
            format!("https://{host}:{port}{path_and_query}")
        };
        return Ok(redirect_response(status, &location));
    }
    // 3-4. Protection rules.
    match shared.protection.check(conn.client.ip(), req.headers()) {
        Verdict::Allow => {}
        Verdict::Banned => return Err(ProxyError::Banned),
        Verdict::NoUserAgent => return Err(ProxyError::NoUserAgent),
        Verdict::Blocked => return Err(ProxyError::Blocked),
        Verdict::RateLimited => return Err(ProxyError::RateLimited),
    }
    // 5. Maintenance.
    if shared.maintenance.load(Ordering::Relaxed) {
        return Err(ProxyError::Maintenance);
    }
    if let Some(new_host) = shared.router.host_redirect(&host) {
        let location = format!("{}://{new_host}{path_and_query}", conn.proto());
        return Ok(redirect_response(StatusCode::MOVED_PERMANENTLY, &location));
    }
    if let Some(length) = req.headers().get(header::CONTENT_LENGTH)
        && length.to_str().ok().and_then(|l| l.parse::<u64>().ok()).is_none_or(|l| l > shared.max_body)
    {
        return Err(ProxyError::BodyTooLarge);
    }
    // 6-8. Routing.
    let decision = shared.router.route(&host, req.uri().path(), req.uri().query());
    let request = (&*host, req.uri().path(), req.uri().query());
    match shared.hold.route(&shared.router, request, decision, &shared.hard_stop).await {
        Decision::Proxy(backend, via) => {
            ctx.upstream = Some(backend.clone());
            if via != Via::Default {
                shared.last_use.touch(&backend);
            }
            // A clone of the URI shares its bytes, where an owned path would allocate.
            let uri = req.uri().clone();
            let routes = || outlier::routes_of(&shared.router, &host, uri.path(), via);
            if shared.outliers.admit(&backend, routes) == Admission::Down {
                return Err(ProxyError::BackendDown);
            }
            if let Some(tool) = shared.router.tool_of(&host, req.uri().path()) {
                ctx.share = Some(shared.fair_share.try_acquire(tool).ok_or(ProxyError::OverCapacity)?);
            }
            let permit = shared.backend_limits.acquire(conn.upstream_slots.as_ref(), &backend).await?;
            let result = forward(shared, conn, req, &backend, &host, (&raw_host, raw_host_str), ctx).await;
            shared.outliers.record(&backend, ctx.outcome, routes);
            Ok(result?.map(|body| body.holding(permit, ctx.share.take())))
        }
        Decision::Redirect(status, location) => Ok(redirect_response(status, &location)),
        Decision::NoWebservice => Err(ProxyError::NoWebservice),
    }
}

/// The Host a request names: the `Host` header for HTTP/1, `:authority` for
/// HTTP/2, where a `host` header that names another host is refused (a
/// backend reading `Host` must not see a different host than we routed).
fn request_host(req: &Request<Incoming>) -> Result<HeaderValue, ProxyError> {
    if req.version() == Version::HTTP_2
        && let Some(authority) = req.uri().authority()
    {
        if let Some(host) = req.headers().get(header::HOST)
            && !crate::host::same_host(host.as_bytes(), authority.as_str())
        {
            return Err(ProxyError::BadRequest("host header disagrees with :authority"));
        }
        return HeaderValue::from_str(authority.as_str()).map_err(|_| ProxyError::BadRequest("bad Host"));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => Ok(host.clone()),
        (None, _) => Err(ProxyError::BadRequest("missing Host")),
        (Some(_), Some(_)) => Err(ProxyError::BadRequest("several Host headers")),
    }
}

/// Sends the request to `backend` and shapes the response for the client.
async fn forward(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<Incoming>,
    backend: &BackendUrl,
    host: &str,
    (raw_host_value, raw_host): (&HeaderValue, &str),
    ctx: &mut RequestContext,
) -> Result<Response<ProxyBody>, ProxyError> {
    let default_file = match req.uri().path() {
        "/favicon.ico" => Some(Page::Favicon),
        "/robots.txt" => Some(Page::Robots),
        _ => None,
    };
    let is_head = req.method() == Method::HEAD;
    let gzip_ok = shared.gzip && compress::accepts_gzip(req.headers());
    // Built outside this future: what a function borrows while it builds
    // stays in its future's state across the exchange below.
    let Upstream { request, added, replay, client_upgrade } =
        upstream_request(shared, conn, req, host, raw_host_value, ctx)?;

    let sent = clock::now();
    let mut result = conn.pool.request(backend, request, &added).await;
    if let Some(replay) = replay
        && result.as_ref().is_err_and(hold::refused)
    {
        let (uri, method, headers) = *replay;
        let request = (host, uri.path(), uri.query());
        if let Some(next) = shared.hold.after_refusal(&shared.router, request, backend, &shared.hard_stop).await {
            let mut again = Request::new(LimitedBody::empty());
            *again.method_mut() = method;
            *again.headers_mut() = headers;
            *again.uri_mut() = uri;
            result = conn.pool.request(&next, again, &added).await;
            ctx.upstream = Some(next);
        }
    }
    ctx.outcome = outlier::outcome(&result);
    let elapsed = clock::now().saturating_duration_since(sent);
    ctx.upstream_time = Some(elapsed);
    let response = result.map_err(classify)?;
    shared.metrics.upstream(elapsed.as_secs_f64());

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ProxyError::UnaskedUpgrade);
        };
        let (parts, body) = response.into_parts();
        let Some(mut upstream_io) = body.into_tunnel() else {
            return Err(ProxyError::UnaskedUpgrade);
        };
        let hard_stop = shared.hard_stop.clone();
        let client = conn.client;
        let permit = conn.permit.clone();
        // The tunnel keeps its tool's place until it closes.
        let share = ctx.share.take();
        shared.tunnels.spawn(async move {
            let _permit = permit;
            let _share = share;
            let client_io = match client_upgrade.await {
                Ok(io) => io,
                Err(error) => {
                    debug!(%client, %error, "upgrade did not complete");
                    return;
                }
            };
            let mut client_io = TokioIo::new(client_io);
            tokio::select! {
                result = tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io) => {
                    if let Err(error) = result {
                        debug!(%client, %error, "tunnel closed with an error");
                    }
                }
                _ = hard_stop.cancelled() => {}
            }
        });
        return Ok(Response::from_parts(parts, ProxyBody::Empty));
    }

    let (mut parts, body) = response.into_parts();
    // The client's side of the exchange is the proxy's, whatever the backend
    // speaks: an HTTP/1.0 backend must not turn the reply to a keep-alive
    // HTTP/1.1 client into HTTP/1.0, which closes its connection after every
    // response. hyper answers an HTTP/1.0 client in HTTP/1.0 by itself.
    parts.version = Version::HTTP_11;
    // Hop-by-hop headers were left out as the head was read (`headers::dropped_from_response`).
    headers::rewrite_location(&mut parts.headers, raw_host, conn.proto());
    headers::rewrite_location(&mut parts.headers, host, conn.proto());
    if parts.status == StatusCode::NOT_FOUND
        && let Some(page) = default_file
    {
        let mut response = page_response(&shared.pages, StatusCode::OK, page);
        if is_head {
            *response.body_mut() = ProxyBody::Empty;
        }
        return Ok(response);
    }
    // With gzip off the proxy never makes the body depend on Accept-Encoding.
    if shared.gzip {
        compress::vary_on_encoding(&mut parts.headers);
    }
    if gzip_ok && !is_head && compress::should_compress(parts.status, &parts.headers) {
        compress::mark_compressed(&mut parts.headers);
        return Ok(Response::from_parts(parts, ProxyBody::Gzip(Box::new(GzipBody::new(body)))));
    }
    Ok(Response::from_parts(parts, ProxyBody::Upstream(body)))
}

/// The client's request as its backend gets it, and what `forward` keeps
/// of it for after the exchange.
struct Upstream {
    request: Request<LimitedBody>,
    /// The header lines the proxy adds to the request's head.
    added: Vec<u8>,
    /// The head again, for a bodiless request a refusing backend lets the
    /// proxy send elsewhere (`hold_secs`); boxed, as it is rarely there.
    replay: Option<Box<(Uri, Method, http::HeaderMap)>>,
    /// The client's side of an upgrade the backend may accept.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// Rewrites the client's request for its backend (SPEC §3 "Request to upstream").
fn upstream_request(
    shared: &Shared,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
    host: &str,
    raw_host_value: &HeaderValue,
    ctx: &mut RequestContext,
) -> Result<Upstream, ProxyError> {
    let upgrade = if req.version() == Version::HTTP_11 && ctx.carried.upgrade() {
        upgrade::tunnelled_upgrade(req.headers())
    } else {
        None
    };
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // Usually the client's Host is normalised already: its bytes are shared.
    let upstream_host = if raw_host_value.as_bytes() == host.as_bytes() {
        raw_host_value.clone()
    } else {
        HeaderValue::from_str(host).map_err(|_| ProxyError::BadRequest("bad Host"))?
    };
    let original_uri = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let fwd = Forwarded {
        client_ip: &conn.client_ip,
        host: &upstream_host,
        port: &conn.port,
        proto: conn.proto(),
        original_uri,
        request_id: &ctx.request_id,
        traceparent: &ctx.trace.traceparent(),
        keep_tracestate: ctx.trace.keeps_tracestate(),
    };
    let added = headers::to_upstream(&mut parts.headers, ctx.carried, &fwd, upgrade);
    if parts.version == Version::HTTP_2 {
        headers::join_cookies(&mut parts.headers);
    }
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
    // A bodiless request can be sent again if its backend refuses (hold_secs).
    let replay = (shared.hold.enabled() && http_body::Body::is_end_stream(&body))
        .then(|| Box::new((parts.uri.clone(), parts.method.clone(), parts.headers.clone())));
    let request =
        Request::from_parts(parts, LimitedBody::new(body, shared.max_body).with_pause_limit(shared.body_timeout));
    Ok(Upstream { request, added, replay, client_upgrade })
}

/// The request line's target as the backend gets it: the path and query
/// only. An HTTP/1 request's URI usually is that already, and is kept as it
/// is (no copy); an HTTP/2 request's carries the scheme and authority.
fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    uri.path_and_query().cloned().map_or_else(|| Uri::from_static("/"), Uri::from)
}

/// Extra headers (replacing the backend's copies) and HSTS. An HTTP/1
/// connection's writer adds them to the head: the response only loses its
/// own copies.
fn apply_policy(shared: &Shared, conn: &ConnInfo, response: &mut Response<ProxyBody>) {
    if conn.writes_extra_headers() {
        shared.extra_headers.remove_copies(response.headers_mut(), conn.tls);
    } else {
        shared.extra_headers.insert_into(response.headers_mut(), conn.tls);
    }
}

/// The tool a failed request was for, to name it on the page: from the Host
/// (or HTTP/2 `:authority`) and the path, as the access log names it.
fn page_tool(router: &crate::route::Router, uri: &Uri, host: Option<&HeaderValue>) -> Option<String> {
    let raw = match uri.authority() {
        Some(authority) => authority.as_str(),
        None => host?.to_str().ok()?,
    };
    let host = normalize_host(raw).ok()?;
    router.tool_of(&host, uri.path()).map(str::to_owned)
}

/// The response for an error: its page (naming the reason, the tool and the
/// request id), or a short text, with its reason code.
pub(crate) fn error_response(pages: &Pages, error: &ProxyError, vars: &PageVars<'_>) -> Response<ProxyBody> {
    let mut response = match error.page() {
        Some(page) => {
            let mut response = page_response(pages, error.status(), page);
            *response.body_mut() = ProxyBody::full(pages.render(page, vars));
            response
        }
        None => text_response(error.status(), error.text()),
    };
    response.headers_mut().insert(X_DYNAMICPROXY_REASON, HeaderValue::from_static(error.reason()));
    if error.closes_connection() {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn page_response(pages: &Pages, status: StatusCode, page: Page) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(pages.body(page)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(page.content_type()));
    if status.is_client_error() || status.is_server_error() {
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A plain-text response.
pub(crate) fn text_response(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn redirect_response(status: StatusCode, location: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::Empty);
    *response.status_mut() = status;
    match HeaderValue::from_str(location) {
        Ok(value) => {
            response.headers_mut().insert(header::LOCATION, value);
        }
        Err(_) => *response.status_mut() = StatusCode::BAD_REQUEST,
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_keeps_path_and_query_only() {
        for (uri, sent) in [
            ("/a/b?c=d", "/a/b?c=d"),
            ("https://foo.toolforge.org/a/b?c=d", "/a/b?c=d"),
            ("http://foo.toolforge.org", "/"),
            ("*", "*"),
        ] {
            assert_eq!(origin_form(&uri.parse().unwrap()).to_string(), sent, "{uri}");
        }
    }
}
