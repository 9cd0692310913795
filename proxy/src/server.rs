//! Accepting and serving client connections: the accept loop (errors are
//! logged and retried, never fatal), the connection limits (overall and per
//! client, refused at once by `shed`), the optional TLS handshake, and
//! HTTP/1.1 or HTTP/2 serving with per-phase timeouts and graceful shutdown.
//!
//! The timeouts by phase: TLS handshake (`tls_handshake_timeout_secs`),
//! request head (`header_timeout_secs`, hyper), request body pauses
//! (`client_body_timeout_secs`, `body::LimitedBody`), a client not reading the
//! response (`send_timeout_secs`, `idle::IdleIo`), no request in flight
//! (`keepalive_timeout_secs` / `http2_idle_timeout_secs`, `activity`), and the
//! long idle (`client_timeout_secs`) while a request waits on its backend or a
//! tunnel is open.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn};

use crate::activity::{Activity, TrackedBody};
use crate::backend_limit::connection_slots;
use crate::buffers;
use crate::client_limit::{ClientGuard, ClientLimit};
use crate::drain;
use crate::handler::{ConnInfo, Shared, handle};
use crate::idle::{IdleIo, IdleTimeout};
use crate::linger::Linger;
use crate::metrics::Metrics;
use crate::shed::{self, Refusal};
use crate::sniff::{SmuggleFlags, SniffIo};
use crate::tls::TlsAcceptor;
use crate::upstream::UpstreamClient;
use crate::workers::{Accepted, Workers};

/// Connection-level settings shared by the listeners.
#[derive(Clone)]
pub(crate) struct ServeSettings {
    pub header_timeout: Duration,
    pub client_timeout: Duration,
    pub handshake_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub http2_idle_timeout: Duration,
    pub send_timeout: Duration,
    pub limit: Arc<Semaphore>,
    pub per_client: ClientLimit,
    /// Refused plain-HTTP connections lingering at once (`shed::MAX_LINGERING_REFUSALS`).
    pub lingering_refusals: Arc<Semaphore>,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    /// Closes idle HTTP/1 connections while draining: at once on a plain stop,
    /// only at the end of the grace after a hand-over (see `drain`).
    pub close_idle: CancellationToken,
    pub hard_stop: CancellationToken,
}

/// Accepts on `listener` until shutdown; each connection is served in a
/// tracked task. With `tls`, connections are TLS (HTTP/2 by ALPN).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    settings: ServeSettings,
    tls: Option<TlsAcceptor>,
    workers: Arc<Workers>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = settings.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, client) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(error) => {
                // Usually EMFILE: wait for connections to close instead of spinning.
                warn!(%error, "accept failed; retrying");
                tokio::select! {
                    _ = settings.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = settings.limit.clone().try_acquire_owned() else {
            refuse(stream, Refusal::MaxConnections, &shared, &settings, tls.is_some());
            continue;
        };
        let Some(client_guard) = settings.per_client.try_acquire(client.ip()) else {
            drop(permit);
            refuse(stream, Refusal::PerClient, &shared, &settings, tls.is_some());
            continue;
        };
        let slot = Slot { _permit: permit, _client: client_guard, _tracked: settings.tracker.token() };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                debug!(%error, "cannot hand the connection over");
                continue;
            }
        };
        let span = info_span!("conn", client.addr = %client);
        workers.dispatch(Accepted { stream, client, tls: tls.clone(), slot, span });
    }
}

/// A connection's places under `max_connections` and
/// `max_connections_per_client`, held until it (or its tunnel) closes.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    _client: ClientGuard,
    /// Counts the connection in the drain from accept on, so one still queued
    /// for an event loop is served, not dropped (and reset) when the drain ends.
    _tracked: tokio_util::task::task_tracker::TaskTrackerToken,
}

fn refuse(stream: TcpStream, refusal: Refusal, shared: &Shared, settings: &ServeSettings, tls: bool) {
    shared.metrics.connection_refused(refusal.label());
    debug!(reason = refusal.label(), "connection refused at accept");
    shed::refuse(stream, refusal, tls, &settings.lingering_refusals);
}

/// Serves one accepted connection (TLS handshake first when `tls`), sending
/// its requests through `pool`.
pub(crate) async fn serve_tcp(
    stream: TcpStream,
    client: std::net::SocketAddr,
    shared: Arc<Shared>,
    settings: ServeSettings,
    tls: Option<TlsAcceptor>,
    pool: UpstreamClient,
    slot: Slot,
) {
    let permit = Arc::new(slot);
    let _ = stream.set_nodelay(true);
    let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let port = HeaderValue::from(local_port);
    match tls {
        None => {
            let flags = Arc::new(SmuggleFlags::default());
            let io = idle_io(SniffIo::new(Linger::new(stream), flags.clone()), &settings);
            let conn = Arc::new(ConnInfo {
                client,
                port,
                tls: false,
                smuggle: Some(flags),
                pool,
                permit,
                upstream_slots: connection_slots(),
            });
            serve_http1(io, conn, shared, &settings).await;
        }
        Some(acceptor) => {
            let handshake = tokio::time::timeout(settings.handshake_timeout, acceptor.accept(stream));
            let tls_stream = tokio::select! {
                result = handshake => match result {
                    Ok(Ok(s)) => s,
                    Ok(Err(error)) => {
                        debug!(%error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!("TLS handshake timed out");
                        shared.metrics.connection_timeout("handshake");
                        return;
                    }
                },
                _ = settings.shutdown.cancelled() => return,
            };
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            if h2 {
                let io = idle_io(Linger::new(tls_stream), &settings);
                let conn = Arc::new(ConnInfo {
                    client,
                    port,
                    tls: true,
                    smuggle: None,
                    pool,
                    permit,
                    upstream_slots: connection_slots(),
                });
                serve_http2(io, conn, shared, &settings).await;
            } else {
                let flags = Arc::new(SmuggleFlags::default());
                let io = idle_io(SniffIo::new(Linger::new(tls_stream), flags.clone()), &settings);
                let conn = Arc::new(ConnInfo {
                    client,
                    port,
                    tls: true,
                    smuggle: Some(flags),
                    pool,
                    permit,
                    upstream_slots: connection_slots(),
                });
                serve_http1(io, conn, shared, &settings).await;
            }
        }
    }
}

/// The client side's I/O: the long idle over the whole connection, and the
/// send timeout over blocked writes.
fn idle_io<I>(io: I, settings: &ServeSettings) -> IdleIo<I> {
    IdleIo::new(io, settings.client_timeout).with_send_timeout(settings.send_timeout)
}

async fn serve_http1<I>(io: I, conn: Arc<ConnInfo>, shared: Arc<Shared>, settings: &ServeSettings)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let requests = activity.clone();
    let metrics = shared.metrics.clone();
    let draining = settings.shutdown.clone();
    let service = service_fn(move |req| {
        let in_flight = requests.begin();
        let shared = shared.clone();
        let conn = conn.clone();
        let draining = draining.clone();
        async move {
            let mut response = handle(shared, conn, req).await;
            drain::close_when_draining(&mut response, &draining);
            Ok::<_, Infallible>(response.map(|body| TrackedBody::new(body, in_flight)))
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(buffers::CLIENT_WRITE_BUF)
        .writev(true)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(connection);
    // Polled on every wake-up of the connection: a child token's lock is this
    // connection's own, where the shared token's lock is taken by every
    // connection on every core.
    let shutdown = settings.shutdown.child_token();
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => return ended(result, &metrics),
            // Draining: keep serving (responses now say `Connection: close`, see `drain`);
            // an idle connection is closed at its keep-alive timeout or by `close_idle`.
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                continue;
            }
            _ = settings.close_idle.cancelled(), if draining => connection.as_mut().graceful_shutdown(),
            // Between requests: closed once idle for the keep-alive timeout.
            _ = activity.idle_for(settings.keepalive_timeout) => {
                metrics.connection_timeout("keepalive");
                connection.as_mut().graceful_shutdown();
            }
        }
        break;
    }
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = settings.hard_stop.cancelled() => {}
    }
}

/// Logs how a connection ended and counts the timeouts among the causes.
fn ended(result: Result<(), hyper::Error>, metrics: &Metrics) {
    let Err(error) = result else { return };
    let phase = match IdleTimeout::find(&error) {
        Some(IdleTimeout::Send) => Some("send"),
        Some(IdleTimeout::Idle) => Some("idle"),
        None if error.is_timeout() => Some("header"),
        None => None,
    };
    if let Some(phase) = phase {
        metrics.connection_timeout(phase);
    }
    debug!(%error, "connection ended with an error");
}

async fn serve_http2<I>(io: I, conn: Arc<ConnInfo>, shared: Arc<Shared>, settings: &ServeSettings)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let streams = activity.clone();
    let metrics = shared.metrics.clone();
    let service = service_fn(move |req| {
        let in_flight = streams.begin();
        let shared = shared.clone();
        let conn = conn.clone();
        async move {
            let response = handle(shared, conn, req).await;
            Ok::<_, Infallible>(response.map(|body| TrackedBody::new(body, in_flight)))
        }
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(buffers::H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(buffers::MAX_HEAD_BYTES as u32)
        .initial_stream_window_size(buffers::H2_STREAM_WINDOW)
        .initial_connection_window_size(buffers::H2_CONNECTION_WINDOW)
        .max_send_buf_size(buffers::H2_MAX_SEND_BUF)
        .max_pending_accept_reset_streams(buffers::H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(buffers::H2_MAX_LOCAL_ERROR_RESET_STREAMS);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let shutdown = settings.shutdown.child_token();
    tokio::select! {
        result = connection.as_mut() => return ended(result, &metrics),
        _ = shutdown.cancelled() => connection.as_mut().graceful_shutdown(),
        // No open stream for the idle timeout: GOAWAY, and the client reconnects when it needs to.
        _ = activity.idle_for(settings.http2_idle_timeout) => {
            metrics.connection_timeout("http2-idle");
            connection.as_mut().graceful_shutdown();
        }
    }
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = settings.hard_stop.cancelled() => {}
    }
}
