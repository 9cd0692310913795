//! The client side: HTTP/1.1 exchanges with backends over keep-alive
//! connections from this event loop's [`IdlePool`], connect and idle
//! timeouts, TLS to `https://` backends, and the classification of upstream
//! failures into 502 and 504.
//!
//! Each exchange runs in the task of the request it serves
//! ([`crate::backend_conn`]): no pool-wide lock, no key parsing from a URI,
//! no task per connection, and no task per request to return the
//! connection (its body does that).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dynamicproxy_redis::{BackendUrl, Scheme};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::backend_conn::{BackendConn, BodyReader, Failed, Outgoing};
use crate::backend_tls::{BackendTls, untrusted_cause};
use crate::body::{LimitedBody, TooLarge};
use crate::egress::{Egress, denied_cause};
use crate::error::{BoxError, ProxyError};
use crate::idle::IdleIo;
use crate::loop_turn;
use crate::upstream_pool::{IdlePool, Lease, UpstreamBody, sweep_until_dropped};

/// Settings of the upstream client.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// TCP connect timeout; for `https://` backends the TLS handshake has
    /// as long again.
    pub connect_timeout: Duration,
    /// Idle read/write timeout of a backend connection.
    pub read_timeout: Duration,
    /// Idle keep-alive connections kept per backend.
    pub max_idle_per_backend: usize,
    /// How long an idle keep-alive connection is kept.
    pub idle_timeout: Duration,
    /// Name resolution and denied networks, checked on every new connection.
    pub egress: Egress,
    /// Certificate verification and SNI for `https://` backends.
    pub tls: BackendTls,
}

/// One event loop's client for every backend.
pub struct UpstreamClient {
    pool: Arc<IdlePool>,
    connector: Connector,
}

/// Why a backend exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be opened (resolution, denied network, refused,
    /// timeout, TLS).
    #[error("cannot connect to the backend")]
    Connect(#[source] io::Error),
    /// The exchange on an open connection failed: writing, reading, or an
    /// answer that is not HTTP/1.1 (`InvalidData`).
    #[error("backend exchange failed")]
    Exchange(#[source] io::Error),
    /// The client's request body failed on its way to the backend.
    #[error("the client's request body failed")]
    ClientBody(#[source] BoxError),
}

impl UpstreamError {
    /// True when nothing was sent: the connection itself failed.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

impl UpstreamClient {
    /// A client with an empty pool; must be called on the event loop that
    /// will use it, where its sweeper runs.
    pub fn new(settings: UpstreamSettings) -> Self {
        let pool = IdlePool::new(settings.max_idle_per_backend, settings.idle_timeout);
        let every = (settings.idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        tokio::spawn(sweep_until_dropped(Arc::downgrade(&pool), every));
        let connector = Connector {
            connect_timeout: settings.connect_timeout,
            read_timeout: settings.read_timeout,
            egress: settings.egress,
            tls: settings.tls,
        };
        UpstreamClient { pool, connector }
    }

    /// Sends `req` (origin-form URI), with the header lines `added` after
    /// its own, to `backend`, on an idle connection if there is one. A
    /// repeatable request that a reused connection fails before any answer
    /// (the backend closed it as it was taken) goes out once more, on a new
    /// connection.
    pub async fn request(
        &self,
        backend: &BackendUrl,
        req: Request<LimitedBody>,
        added: &[u8],
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut out = Outgoing::new(req, added);
        loop_turn::after_others().await;
        if let Some(conn) = self.pool.take(backend) {
            match conn.exchange(&mut out).await {
                Ok((parts, reader)) => return Ok(self.lend(parts, reader, backend)),
                // Once only, on a new connection: a backend that closes on
                // this request every time (one that crashes on it) must not
                // get it again and again. Closed idle connections were
                // already passed over by `take`.
                Err(Failed { retry: true, error }) => {
                    debug!(%error, "reused backend connection was closed; sending again")
                }
                Err(Failed { error, .. }) => return Err(error),
            }
        }
        // Boxed: opening a connection (connect, TLS) is rare on a warm pool,
        // and its state inlined here made every request's future that much larger.
        let conn = Box::pin(self.open(backend)).await?;
        match conn.exchange(&mut out).await {
            Ok((parts, reader)) => Ok(self.lend(parts, reader, backend)),
            Err(Failed { error, .. }) => Err(error),
        }
    }

    /// The response, with a body that returns the connection to the pool at
    /// its end (a switched protocol keeps it: the tunnel owns it now).
    fn lend(&self, parts: http::response::Parts, reader: BodyReader, backend: &BackendUrl) -> Response<UpstreamBody> {
        let lease =
            (parts.status != StatusCode::SWITCHING_PROTOCOLS).then(|| Lease::new(self.pool.clone(), backend.clone()));
        Response::from_parts(parts, UpstreamBody::new(reader, lease))
    }

    /// A new connection to `backend`.
    async fn open(&self, backend: &BackendUrl) -> Result<Box<BackendConn>, UpstreamError> {
        let io = self.connector.connect(backend).await.map_err(UpstreamError::Connect)?;
        Ok(BackendConn::new(io))
    }
}

/// Opens TCP (and for `https://`, TLS) connections to backends, with timeouts.
#[derive(Debug, Clone)]
pub struct Connector {
    connect_timeout: Duration,
    read_timeout: Duration,
    egress: Egress,
    tls: BackendTls,
}

/// A backend connection. The idle timer sits under TLS, on the socket, so
/// it sees the same traffic for both schemes.
pub struct UpstreamIo(Inner);

/// The two kinds of backend connection.
enum Inner {
    /// `http://`.
    Plain(IdleIo<TcpStream>),
    /// `https://` (boxed: the TLS state is large and the plain case is the common one).
    Tls(Box<tokio_rustls::client::TlsStream<IdleIo<TcpStream>>>),
}

/// Forwards an I/O call to whichever connection `$io` (`&mut Inner`) holds.
macro_rules! each {
    ($io:expr, $inner:ident => $call:expr) => {
        match $io {
            Inner::Plain($inner) => $call,
            Inner::Tls(boxed) => {
                let $inner = boxed.as_mut();
                $call
            }
        }
    };
}

impl UpstreamIo {
    /// The socket under any TLS.
    fn tcp(&mut self) -> &mut IdleIo<TcpStream> {
        match &mut self.0 {
            Inner::Plain(io) => io,
            Inner::Tls(tls) => tls.get_mut().0,
        }
    }

    /// Starts the idle timeout afresh: time spent idle in the pool is not
    /// an exchange stalling.
    pub fn touch(&mut self) {
        self.tcp().touch();
    }

    /// Whether the socket has become readable since its last read hit the
    /// end of what was there (data, or the backend closing).
    pub fn poll_tcp_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp().get_ref().poll_read_ready(cx)
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each!(&mut self.get_mut().0, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each!(&mut self.get_mut().0, io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(&mut self.get_mut().0, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(&mut self.get_mut().0, io => Pin::new(io).poll_shutdown(cx))
    }
}

impl Connector {
    /// Resolves, checks and connects to `backend` (and for `https://`,
    /// shakes hands), each step bounded by the connect timeout.
    async fn connect(&self, backend: &BackendUrl) -> io::Result<UpstreamIo> {
        let https = backend.scheme() == Scheme::Https;
        let host = backend.host().trim_start_matches('[').trim_end_matches(']');
        // Resolution and the denied-network check happen here, on every
        // new connection: a cached or pooled answer is never trusted past it.
        let stream = tokio::time::timeout(self.connect_timeout, self.egress.connect(host, backend.port()))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = stream.set_nodelay(true);
        let stream = IdleIo::new(stream, self.read_timeout);
        if !https {
            return Ok(UpstreamIo(Inner::Plain(stream)));
        }
        let tls = tokio::time::timeout(self.connect_timeout, self.tls.handshake(host, stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(UpstreamIo(Inner::Tls(Box::new(tls))))
    }
}

/// Maps a failed upstream exchange to what the client is told: our own body
/// limit → 413, a broken client body → 400, a timeout anywhere → 504, anything
/// else the backend did (refused, reset, garbage) → 502.
pub fn classify(error: UpstreamError) -> ProxyError {
    let mut timeout = false;
    let client_body = matches!(error, UpstreamError::ClientBody(_));
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if e.is::<TooLarge>() {
            return ProxyError::BodyTooLarge;
        }
        if let Some(denied) = e.downcast_ref::<io::Error>().and_then(denied_cause) {
            return ProxyError::DeniedBackend(denied.clone());
        }
        if let Some(untrusted) = e.downcast_ref::<io::Error>().and_then(untrusted_cause) {
            return ProxyError::UntrustedBackend(untrusted.clone());
        }
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::TimedOut
        {
            timeout = true;
        }
        source = e.source();
    }
    let boxed: BoxError = Box::new(error);
    if timeout {
        ProxyError::UpstreamTimeout(boxed)
    } else if client_body {
        ProxyError::ClientBody(boxed)
    } else {
        ProxyError::UpstreamUnreachable(boxed)
    }
}
