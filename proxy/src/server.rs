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
//!
//! Between requests an HTTP/1 connection is parked (`park`): hyper's
//! connection object and buffers are dropped, and a new one serves the next
//! request once the socket is readable. While parked, the keep-alive timeout
//! (or the head timeout, if shorter: hyper's head timer used to run from the
//! same moment) closes it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, warn};

use crate::activity::{Activity, TrackedBody};
use crate::backend_limit::connection_slots;
use crate::buffers;
use crate::client_limit::{ClientGuard, ClientLimit};
use crate::clock::PollClockExecutor;
use crate::drain;
use crate::handler::{ConnInfo, Shared, handle};
use crate::idle::{IdleIo, IdleTimeout};
use crate::linger::{self, Linger};
use crate::metrics::Metrics;
use crate::pace::{Pace, Paced};
use crate::park::{ParkIo, ReadReady};
use crate::shed::{self, Refusal};
use crate::sniff::{SmuggleFlags, SniffIo};
use crate::tls::TlsAcceptor;
use crate::upstream::UpstreamClient;
use crate::wake_gate::WakeGate;
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
        // At debug level: a span is entered and left on every poll of the
        // connection's task (about 270 instructions a request, three polls),
        // and the events logged above debug in a connection name their client
        // themselves ("upstream failed").
        let span = debug_span!("conn", client.addr = %client);
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
    settings: Arc<ServeSettings>,
    tls: Option<TlsAcceptor>,
    pool: Arc<UpstreamClient>,
    slot: Slot,
) {
    let permit = Arc::new(slot);
    let _ = stream.set_nodelay(true);
    let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let port = HeaderValue::from(local_port);
    let client_ip = crate::headers::client_ip_value(client.ip());
    let info = move |tls: bool, smuggle: Option<Arc<SmuggleFlags>>| {
        // Only HTTP/2 (no smuggling flags) runs requests side by side.
        let upstream_slots = smuggle.is_none().then(connection_slots);
        Arc::new(ConnInfo { client, client_ip, port, tls, smuggle, pool, permit, upstream_slots })
    };
    // Each phase's future is boxed and built outside any await: a task is as
    // large as its largest state, and every idle connection would otherwise
    // pay for the handshake's state and for copies of the TLS stream.
    let serving: Pin<Box<dyn Future<Output = ()> + Send + '_>> = match tls {
        None => {
            let flags = Arc::new(SmuggleFlags::default());
            let io = http1_io(stream, flags.clone(), &settings);
            Box::pin(serve_http1(io, info(false, Some(flags)), shared, &settings))
        }
        Some(acceptor) => {
            let Some(tls_stream) = Box::pin(handshake(acceptor, stream, &shared, &settings)).await else { return };
            if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                let io = idle_io(Linger::new(tls_stream), &settings);
                Box::pin(serve_http2(io, info(true, None), shared, &settings))
            } else {
                let flags = Arc::new(SmuggleFlags::default());
                let io = http1_io(tls_stream, flags.clone(), &settings);
                Box::pin(serve_http1(io, info(true, Some(flags)), shared, &settings))
            }
        }
    };
    serving.await;
}

/// The TLS handshake, bounded by `tls_handshake_timeout_secs`; `None` when it
/// failed, timed out (counted) or the proxy is shutting down.
async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    shared: &Shared,
    settings: &ServeSettings,
) -> Option<TlsStream<TcpStream>> {
    let handshake = tokio::time::timeout(settings.handshake_timeout, acceptor.accept(stream));
    tokio::select! {
        result = handshake => match result {
            Ok(Ok(s)) => Some(s),
            Ok(Err(error)) => {
                debug!(%error, "TLS handshake failed");
                None
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                shared.metrics.connection_timeout("handshake");
                None
            }
        },
        _ = settings.shutdown.cancelled() => None,
    }
}

/// The client side's I/O: the long idle over the whole connection, and the
/// send timeout over blocked writes.
fn idle_io<I>(io: I, settings: &ServeSettings) -> IdleIo<I> {
    IdleIo::new(io, settings.client_timeout).with_send_timeout(settings.send_timeout)
}

/// An HTTP/1 client's I/O: smuggling guard, lingering close and the idle
/// timeouts over the socket.
fn http1_io<S>(stream: S, flags: Arc<SmuggleFlags>, settings: &ServeSettings) -> IdleIo<SniffIo<Linger<S>>> {
    idle_io(SniffIo::new(Linger::new(stream), flags), settings)
}

/// Serves HTTP/1.1 on one connection. Each stretch of requests gets its own
/// hyper connection; between them the connection is parked (see `park`): it
/// waits for the client's next bytes holding only its socket, and is closed
/// once idle for the keep-alive timeout.
fn serve_http1<S>(
    io: IdleIo<SniffIo<Linger<S>>>,
    conn: Arc<ConnInfo>,
    shared: Arc<Shared>,
    settings: &ServeSettings,
) -> impl Future<Output = ()> + Send + '_
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + Sync + 'static,
{
    // Wrapped here, outside the future, which then holds one copy of the I/O.
    let activity = Activity::new();
    let pace = Pace::new();
    let io = ParkIo::new(io, activity.clone(), pace.clone());
    serve_parked(io, activity, pace, conn, shared, settings)
}

/// The body of [`serve_http1`]: hyper connections in turn, parked in between.
async fn serve_parked<S>(
    mut io: ParkIo<S>,
    activity: Arc<Activity>,
    pace: Arc<Pace>,
    conn: Arc<ConnInfo>,
    shared: Arc<Shared>,
    settings: &ServeSettings,
) where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + Sync + 'static,
{
    let metrics = shared.metrics.clone();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(buffers::CLIENT_WRITE_BUF)
        .writev(true)
        .keep_alive(true)
        .response_head_lines(shared.extra_headers.head_lines(conn.tls));
    // Polled on every wake-up of the connection: a child token's lock is this
    // connection's own, where the shared token's lock is taken by every
    // connection on every core.
    let shutdown = settings.shutdown.child_token();
    let mut draining = false;
    loop {
        let (requests, shared, conn, pace) = (activity.clone(), shared.clone(), conn.clone(), pace.clone());
        let drain_token = settings.shutdown.clone();
        let service = service_fn(move |req| {
            let in_flight = requests.begin();
            let shared = shared.clone();
            let conn = conn.clone();
            let drain_token = drain_token.clone();
            let pace = pace.clone();
            async move {
                let mut response = handle(shared, conn, req).await;
                drain::close_when_draining(&mut response, &drain_token);
                Ok::<_, Infallible>(response.map(|body| Paced::new(TrackedBody::new(body, in_flight), pace)))
            }
        });
        // Boxed: while parked, the task keeps none of hyper's state.
        let mut connection = Box::pin(builder.serve_connection(TokioIo::new(io), service).with_upgrades());
        loop {
            // Gated: the connection's task is polled several times per
            // request, and none of these has fired on almost all of them.
            let side = WakeGate::new(side_event(&shutdown, draining, settings, &activity));
            tokio::select! {
                biased;
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        return ended(Err(error), &metrics);
                    }
                    break;
                }
                event = side => match event {
                    // Draining: keep serving (responses now say `Connection: close`, see `drain`);
                    // an idle connection is closed at its keep-alive timeout or by `close_idle`.
                    SideEvent::Draining => draining = true,
                    SideEvent::CloseIdle => {
                        connection.as_mut().graceful_shutdown();
                        return finish(connection, settings).await;
                    }
                    SideEvent::KeepaliveTimeout => {
                        metrics.connection_timeout("keepalive");
                        connection.as_mut().graceful_shutdown();
                        return finish(connection, settings).await;
                    }
                },
            }
        }
        // Upgraded (the tunnel owns the socket now) or closed by either side.
        let Some((parked, unparsed)) = reclaim(connection) else { return };
        io = parked;
        // Parked while draining: a client may be sending its next request right
        // now, so the connection stays until `close_idle` (at once on a plain
        // stop, at the end of the grace after a hand-over).
        if let Err(phase) = wait_for_request(&io, &activity, settings, &settings.close_idle).await {
            if let Some(phase) = phase {
                metrics.connection_timeout(phase);
            }
            io.unpark(Bytes::new());
            // Lingering close, as hyper's graceful close of an idle connection did.
            let _ = tokio::time::timeout(linger::LINGER_TIME * 2, io.shutdown()).await;
            return;
        }
        io.unpark(unparsed);
    }
}

/// What, beside the connection itself, ends a turn of an HTTP/1 connection's loop.
enum SideEvent {
    /// The proxy has begun to drain.
    Draining,
    /// Draining, and idle connections are to close now.
    CloseIdle,
    /// Between requests but not parked (a pipelined partial head, a flush
    /// the client is slow to take) for the keep-alive timeout.
    KeepaliveTimeout,
}

/// The first [`SideEvent`] to happen.
async fn side_event(
    shutdown: &CancellationToken,
    draining: bool,
    settings: &ServeSettings,
    activity: &Activity,
) -> SideEvent {
    tokio::select! {
        _ = shutdown.cancelled(), if !draining => SideEvent::Draining,
        _ = settings.close_idle.cancelled(), if draining => SideEvent::CloseIdle,
        _ = activity.idle_for(settings.keepalive_timeout) => SideEvent::KeepaliveTimeout,
    }
}

/// The I/O of a hyper connection that ended because it was parked, with the
/// bytes it had read but not parsed; `None` when it was upgraded or closed.
fn reclaim<S, Svc>(
    connection: Pin<Box<http1::UpgradeableConnection<TokioIo<ParkIo<S>>, Svc>>>,
) -> Option<(ParkIo<S>, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin,
    Svc: hyper::service::HttpService<hyper::body::Incoming>,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    Svc::ResBody: 'static,
    <Svc::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let parts = Pin::into_inner(connection).into_parts()?;
    let io = parts.io.into_inner();
    // Copied: even empty, hyper's buffer holds its whole allocation.
    io.is_parked().then(|| (io, Bytes::copy_from_slice(&parts.read_buf)))
}

/// Finishes a connection being closed gracefully (shutdown or idle), unless
/// the hard stop comes first.
async fn finish<F: Future + Unpin>(mut connection: F, settings: &ServeSettings) {
    tokio::select! {
        _ = &mut connection => {}
        _ = settings.hard_stop.cancelled() => {}
    }
}

/// Waits, parked, for the client's next request: `Ok` once the socket is
/// readable, `Err` with the timeout's phase when the connection has been idle
/// too long, or `Err(None)` once `close` fires.
async fn wait_for_request<S: ReadReady>(
    io: &ParkIo<S>,
    activity: &Activity,
    settings: &ServeSettings,
    close: &CancellationToken,
) -> Result<(), Option<&'static str>> {
    // hyper's head timer used to run from the same moment as the keep-alive
    // clock; whichever is shorter still closes a silent connection.
    let (limit, phase) = if settings.keepalive_timeout <= settings.header_timeout {
        (settings.keepalive_timeout, "keepalive")
    } else {
        (settings.header_timeout, "header")
    };
    let deadline = activity.idle_since() + limit;
    tokio::select! {
        // An error shows up again on the next read, where hyper handles it.
        _ = std::future::poll_fn(|cx| io.poll_read_ready(cx)) => Ok(()),
        _ = tokio::time::sleep_until(deadline) => Err(Some(phase)),
        _ = close.cancelled() => Err(None),
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

/// Serves HTTP/2 on one connection until the client closes it, it has no
/// open stream for `http2_idle_timeout`, or the proxy shuts down.
fn serve_http2<I>(
    io: I,
    conn: Arc<ConnInfo>,
    shared: Arc<Shared>,
    settings: &ServeSettings,
) -> impl Future<Output = ()> + Send + '_
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
        // Boxed: hyper moves each stream's future into a task of its own,
        // several times on the way, and a request's future is kilobytes.
        Box::pin(async move {
            let response = handle(shared, conn, req).await;
            Ok::<_, Infallible>(response.map(|body| TrackedBody::new(body, in_flight)))
        })
    });
    let mut builder = http2::Builder::new(PollClockExecutor);
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(buffers::H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(buffers::MAX_HEAD_BYTES as u32)
        .initial_stream_window_size(buffers::H2_STREAM_WINDOW)
        .initial_connection_window_size(buffers::H2_CONNECTION_WINDOW)
        .max_send_buf_size(buffers::H2_MAX_SEND_BUF)
        .max_pending_accept_reset_streams(buffers::H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(buffers::H2_MAX_LOCAL_ERROR_RESET_STREAMS);
    // Built and boxed here, outside the future that drives it: an async fn
    // keeps room for its arguments in every state, so an idle connection's
    // future held `io` and the builder (1.4 KiB) beside the connection made of them.
    let mut connection = Box::pin(builder.serve_connection(TokioIo::new(io), service));
    async move {
        let shutdown = settings.shutdown.child_token();
        // Gated as in `serve_parked`: the task is polled on every frame.
        let shutting = WakeGate::new(shutdown.cancelled());
        let idle = WakeGate::new(activity.idle_for(settings.http2_idle_timeout));
        tokio::select! {
            biased;
            result = connection.as_mut() => return ended(result, &metrics),
            _ = shutting => connection.as_mut().graceful_shutdown(),
            // No open stream for the idle timeout: GOAWAY, and the client reconnects when it needs to.
            _ = idle => {
                metrics.connection_timeout("http2-idle");
                connection.as_mut().graceful_shutdown();
            }
        }
        tokio::select! {
            _ = connection.as_mut() => {}
            _ = settings.hard_stop.cancelled() => {}
        }
    }
}
