//! The admin API of each daemon (SPEC §7): metrics, server info, readiness,
//! runtime switches, and the proxy's `/explain`. Bound to 127.0.0.1 by default; every request passes
//! [`crate::admin_guard`] first, so nothing proxied reaches a handler.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use dynamicproxy_redis::{RedisEndpoint, RouteCache};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin_guard::{self, AdminConn, AdminGuard};
use crate::telemetry::LogControl;

/// Tells whether the daemon is ready to take traffic (for `GET /ready`);
/// `Ok` may carry a note on how (e.g. serving a snapshot), `Err` carries the
/// reason it is not.
pub type ReadyCheck = Arc<dyn Fn() -> Result<Option<String>, String> + Send + Sync>;

/// Turns maintenance mode on or off (for `POST /maintenance`).
pub type MaintenanceSwitch = Arc<dyn Fn(bool) + Send + Sync>;

/// What the admin API reports on and controls.
#[derive(Clone)]
pub struct AdminState {
    /// Which daemon this is (`proxy`, `registrar`, `kube-sync`, `all`).
    pub component: &'static str,
    /// Metrics of every component in this process.
    pub registry: Arc<Registry>,
    /// The route cache, for daemons that hold one.
    pub cache: Option<RouteCache>,
    /// Where Redis is, for `/server_info`.
    pub redis: RedisEndpoint,
    /// Process start, for uptime.
    pub started: Instant,
    /// Runtime log filter.
    pub log: LogControl,
    /// Maintenance switch, for daemons that have one (the proxy).
    pub maintenance: Option<MaintenanceSwitch>,
    /// Registrations the proxy's prober found dead, for daemons that probe (the proxy).
    pub dead: Option<dynamicproxy_proxy::DeadRegistrations>,
    /// Readiness.
    pub ready: ReadyCheck,
    /// Explains a URL's routing against the proxy's own route cache (`GET /explain`); the proxy only.
    pub explainer: Option<dynamicproxy_proxy::explain::Explainer>,
}

/// Serves the admin API on `listener` until `shutdown` is cancelled; `guard`
/// decides which requests reach the handlers.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    guard: AdminGuard,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // The guard wraps the finished router, so an endpoint added to `routes` can never skip it.
    let app = routes().with_state(state).layer(middleware::from_fn_with_state(guard, admin_guard::enforce));
    // The guard needs both ends of each connection: the peer, and the local address it was dialled on.
    axum::serve(listener, app.into_make_service_with_connect_info::<AdminConn>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Every admin endpoint (SPEC §7).
fn routes() -> Router<AdminState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/server_info", get(server_info))
        .route("/ready", get(ready))
        .route("/dead", get(dead))
        .route("/logging", post(logging))
        .route("/maintenance", post(maintenance))
        .route("/explain", get(explain))
}

async fn metrics(State(state): State<AdminState>, headers: axum::http::HeaderMap) -> Response {
    use crate::metrics_format::{OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, to_text_0_0_4, wants_openmetrics};
    let mut body = String::new();
    if let Err(e) = encode(&mut body, &state.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}\n")).into_response();
    }
    // Plain text unless the scraper asks for OpenMetrics (SPEC §7): text consumers reject OpenMetrics.
    if wants_openmetrics(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok())) {
        return ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response();
    }
    ([(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)], to_text_0_0_4(&body)).into_response()
}

async fn server_info(State(state): State<AdminState>) -> Response {
    let cache = state.cache.as_ref().map(|cache| {
        let status = cache.status();
        let origin = cache.origin().state();
        let unix = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).ok();
        json!({
            "routes": status.tools,
            "redis_connected": status.redis_connected,
            "age_seconds": status.age.map(|a| a.as_secs_f64()),
            "full_loads": status.full_loads,
            "redis_server": origin.server,
            "redis_server_changes": origin.server_changes,
            "last_server_change": origin.last_change.as_ref().map(|(at, from)| json!({
                "unix_time": unix(*at),
                "seconds_ago": at.elapsed().map(|d| d.as_secs()).ok(),
                "from": from,
            })),
            "problem": origin.problem,
            "serving_snapshot": origin.snapshot_written_at.is_some(),
            "snapshot_age_seconds": origin.snapshot_age().map(|a| a.as_secs()),
        })
    });
    axum::Json(json!({
        "component": state.component,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "redis": state.redis.to_string(),
        "route_cache": cache,
        "ready": (state.ready)().is_ok(),
        "dead_registrations": state.dead.as_ref().map(|dead| dead.count()),
    }))
    .into_response()
}

/// Registrations whose backend failed every probe for `dead_after_secs`, and
/// whether this proxy's prober is the one acting (`active`) or stands by.
async fn dead(State(state): State<AdminState>) -> Response {
    match &state.dead {
        Some(dead) => axum::Json(dead.to_json()).into_response(),
        None => (StatusCode::NOT_FOUND, "this daemon has no prober\n").into_response(),
    }
}

async fn ready(State(state): State<AdminState>) -> Response {
    match (state.ready)() {
        Ok(None) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Some(note)) => (StatusCode::OK, format!("ready: {note}\n")).into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")).into_response(),
    }
}

#[derive(Deserialize)]
struct LoggingQuery {
    level: Option<String>,
}

async fn logging(State(state): State<AdminState>, Query(query): Query<LoggingQuery>) -> Response {
    let Some(level) = query.level else {
        return (StatusCode::BAD_REQUEST, "missing ?level=FILTER (e.g. info, debug, dynamicproxy_proxy=trace)\n")
            .into_response();
    };
    match state.log.set_filter(&level) {
        Ok(()) => {
            tracing::info!(filter = level, "log filter changed through the admin API");
            (StatusCode::OK, format!("log filter set to {level}\n")).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

#[derive(Deserialize)]
struct MaintenanceQuery {
    enabled: Option<String>,
}

async fn maintenance(State(state): State<AdminState>, Query(query): Query<MaintenanceQuery>) -> Response {
    let Some(switch) = &state.maintenance else {
        return (StatusCode::NOT_FOUND, "this daemon has no maintenance mode\n").into_response();
    };
    let enabled = match query.enabled.as_deref() {
        Some("true") => true,
        Some("false") => false,
        _ => return (StatusCode::BAD_REQUEST, "expected ?enabled=true or ?enabled=false\n").into_response(),
    };
    switch(enabled);
    tracing::warn!(enabled, "maintenance mode changed through the admin API");
    (StatusCode::OK, format!("maintenance {}\n", if enabled { "on" } else { "off" })).into_response()
}

#[derive(Deserialize)]
struct ExplainQuery {
    url: Option<String>,
}

/// `GET /explain?url=URL`: plain text, one fact per line; JSON when the client asks for it.
async fn explain(
    State(state): State<AdminState>,
    headers: axum::http::HeaderMap,
    Query(query): Query<ExplainQuery>,
) -> Response {
    let Some(explainer) = &state.explainer else {
        return (StatusCode::NOT_FOUND, "this daemon routes nothing; ask the proxy's admin API\n").into_response();
    };
    let Some(url) = query.url.filter(|u| !u.trim().is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            "missing ?url=URL, percent-encoded (curl -G --data-urlencode url=https://mytool.toolforge.org/x)\n",
        )
            .into_response();
    };
    let explanation = match explainer.explain(&url).await {
        Ok(explanation) => explanation,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if accept.contains("application/json") {
        return axum::Json(explanation).into_response();
    }
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], explanation.to_text()).into_response()
}
