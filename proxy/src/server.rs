//! Accepting and serving client connections: the accept loop (errors are
//! logged and retried, never fatal), the connection limit, the optional TLS
//! handshake, and HTTP/1.1 or HTTP/2 serving with graceful shutdown.

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

use crate::backend_limit::connection_slots;
use crate::buffers;
use crate::handler::{ConnInfo, Shared, handle};
use crate::idle::IdleIo;
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
    pub limit: Arc<Semaphore>,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
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
            shared.metrics.connection_refused();
            drop(stream);
            continue;
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                debug!(%error, "cannot hand the connection over");
                continue;
            }
        };
        let span = info_span!("conn", client.addr = %client);
        workers.dispatch(Accepted { stream, client, tls: tls.clone(), permit, span });
    }
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
    permit: OwnedSemaphorePermit,
) {
    let permit = Arc::new(permit);
    let _ = stream.set_nodelay(true);
    let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let port = HeaderValue::from(local_port);
    match tls {
        None => {
            let flags = Arc::new(SmuggleFlags::default());
            let io = IdleIo::new(SniffIo::new(stream, flags.clone()), settings.client_timeout);
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
                        return;
                    }
                },
                _ = settings.shutdown.cancelled() => return,
            };
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            if h2 {
                let io = IdleIo::new(tls_stream, settings.client_timeout);
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
                let io = IdleIo::new(SniffIo::new(tls_stream, flags.clone()), settings.client_timeout);
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

async fn serve_http1<I>(io: I, conn: Arc<ConnInfo>, shared: Arc<Shared>, settings: &ServeSettings)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(shared, conn, req).await) }
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
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(%error, "connection ended with an error");
            }
            return;
        }
        _ = shutdown.cancelled() => connection.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = settings.hard_stop.cancelled() => {}
    }
}

async fn serve_http2<I>(io: I, conn: Arc<ConnInfo>, shared: Arc<Shared>, settings: &ServeSettings)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(shared, conn, req).await) }
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
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(%error, "connection ended with an error");
            }
            return;
        }
        _ = shutdown.cancelled() => connection.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = settings.hard_stop.cancelled() => {}
    }
}
