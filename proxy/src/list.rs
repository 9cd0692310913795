//! The `/list` API (SPEC §4) read by the reconciliation monitor, answered
//! from the route cache with its age; `/list?detail=1` adds each route with
//! who wrote it and when, for operators.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use dynamicproxy_redis::{RouteCache, RouteStore};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::body::ProxyBody;
use crate::dead::DeadRegistrations;
use crate::explain::RouteFacts;
use crate::idle::IdleIo;

/// `X-Route-Table-Age`: whole seconds since the cache last matched Redis.
static ROUTE_TABLE_AGE: http::HeaderName = http::HeaderName::from_static("x-route-table-age");

/// True for `/list?detail=1` (or `detail=true`).
fn wants_detail<B>(req: &Request<B>) -> bool {
    req.uri().query().is_some_and(|q| q.split('&').any(|pair| pair == "detail=1" || pair == "detail=true"))
}

/// What `/list?detail=1` adds to the table, and where it reads it.
#[derive(Debug, Clone, Default)]
pub struct DetailSources {
    /// Who wrote each route; without it, that is left out.
    pub store: Option<Arc<RouteStore>>,
    /// Registrations the prober found dead.
    pub dead: DeadRegistrations,
}

/// Answers one request of the list listener: [`respond`], or
/// [`respond_detail`] for `GET /list?detail=1`.
pub async fn answer(cache: &RouteCache, detail: &DetailSources, req: &Request<Incoming>) -> Response<ProxyBody> {
    if req.uri().path() == "/list" && *req.method() == Method::GET && wants_detail(req) {
        return respond_detail(cache, detail).await;
    }
    respond(cache, req)
}

/// `/list?detail=1`: as `/list`, and each tool's routes as the proxy holds
/// them, in match order, with who wrote each and how long ago, and since
/// when the prober has found its backend dead
/// ([`RouteFacts`]; `null`s when not recorded or Redis cannot say).
/// Plain `/list` never reads Redis and stays exactly as the monitor expects.
pub async fn respond_detail(cache: &RouteCache, detail: &DetailSources) -> Response<ProxyBody> {
    let status = cache.status();
    let Some(age) = status.age.filter(|_| cache.is_loaded()) else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "Route table not loaded yet\n");
    };
    let provenance = match detail.store.as_deref() {
        Some(store) => match store.all_provenance().await {
            Ok(all) => all,
            Err(error) => {
                debug!(%error, "/list?detail=1: who wrote the routes is unknown");
                Default::default()
            }
        },
        None => Default::default(),
    };
    let now = std::time::SystemTime::now();
    // One look at the prober's findings for the whole listing.
    let dead: HashMap<(String, String), std::time::SystemTime> = detail
        .dead
        .snapshot()
        .into_iter()
        .map(|d| ((d.registration.tool.to_string(), d.registration.pattern), d.dead_since))
        .collect();
    let mut tools = serde_json::Map::new();
    for tool in cache.tools_with_routes() {
        let Some(entry) = cache.tool(tool.as_str()) else { continue };
        let written = provenance.get(tool.as_str());
        let routes: Vec<RouteFacts> = entry
            .routes()
            .iter()
            .map(|route| {
                RouteFacts::new(tool.as_str(), route, written.and_then(|w| w.get(route.pattern.as_str())), now)
                    .with_dead_since(dead.get(&(tool.to_string(), route.pattern.as_str().to_string())).copied(), now)
            })
            .collect();
        tools.insert(tool.to_string(), serde_json::json!({"status": "active", "routes": routes}));
    }
    let mut response = Response::new(ProxyBody::full(Bytes::from(serde_json::Value::Object(tools).to_string())));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(ROUTE_TABLE_AGE.clone(), HeaderValue::from(age.as_secs()));
    response
}

/// Answers one request of the list listener.
pub fn respond(cache: &RouteCache, req: &Request<Incoming>) -> Response<ProxyBody> {
    if req.uri().path() != "/list" {
        return text(StatusCode::NOT_FOUND, "Page not found\n");
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed\n");
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let status = cache.status();
    let Some(age) = status.age.filter(|_| cache.is_loaded()) else {
        // An empty answer would read as "every tool is gone".
        return text(StatusCode::SERVICE_UNAVAILABLE, "Route table not loaded yet\n");
    };
    let tools = cache.tools_with_routes();
    let mut json = String::with_capacity(2 + tools.len() * 32);
    json.push('{');
    for (i, tool) in tools.iter().enumerate() {
        if i > 0 {
            json.push_str(", ");
        }
        // Tool names are [a-z0-9_-]: nothing to escape, but let serde say so.
        json.push_str(&serde_json::Value::from(tool.as_str()).to_string());
        json.push_str(": {\"status\": \"active\"}");
    }
    json.push('}');
    let mut response = Response::new(ProxyBody::full(Bytes::from(json)));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(ROUTE_TABLE_AGE.clone(), HeaderValue::from(age.as_secs()));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Connections the list listener serves at once. Its one client is the
/// reconciliation monitor; past this, new connections are closed at once
/// instead of each holding a task and a socket for the idle timeout.
pub(crate) const MAX_LIST_CONNECTIONS: usize = 64;

/// Serves the list API on `listener` until `shutdown`, `max_connections` at once.
pub(crate) async fn serve(
    listener: TcpListener,
    cache: RouteCache,
    detail: DetailSources,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    read_timeout: std::time::Duration,
    max_connections: usize,
) {
    let limit = Arc::new(Semaphore::new(max_connections));
    loop {
        let (stream, client) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    warn!(%error, "list listener: accept failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                    }
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            debug!(%client, "list listener: too many connections; closing");
            continue;
        };
        let cache = cache.clone();
        let detail = detail.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let (cache, detail) = (cache.clone(), detail.clone());
                async move { Ok::<_, Infallible>(answer(&cache, &detail, &req).await) }
            });
            let io = TokioIo::new(IdleIo::new(stream, read_timeout));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30))
                .serve_connection(io, service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        debug!(%client, %error, "list connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), connection).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn get_list(addr: std::net::SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn connections_are_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let server = tokio::spawn(serve(
            listener,
            RouteCache::new(),
            DetailSources::default(),
            tracker.clone(),
            shutdown.clone(),
            Duration::from_secs(60),
            1,
        ));
        let idle = TcpStream::connect(addr).await.unwrap();
        // The idle connection holds the only place: the next one is closed unanswered.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tracker.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "the idle connection was never served");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(get_list(addr).await, "");
        drop(idle);
        loop {
            if get_list(addr).await.starts_with("HTTP/1.1 404") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the place was never given back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
        server.await.unwrap();
    }
}
