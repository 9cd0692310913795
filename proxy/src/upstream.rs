//! The client side: HTTP/1.1 exchanges with backends over keep-alive
//! connections from this event loop's [`IdlePool`], connect and idle
//! timeouts, TLS to `https://` backends, and the classification of upstream
//! failures into 502 and 504.
//!
//! Each connection is driven by a task on the loop that opened it, and a
//! request goes straight to it: no pool-wide lock, no key parsing from a
//! URI, no task per request to return the connection (its body does that).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dynamicproxy_redis::{BackendUrl, Scheme};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::backend_tls::{BackendTls, untrusted_cause};
use crate::body::{LimitedBody, TooLarge};
use crate::clock::PollClock;
use crate::egress::{Egress, denied_cause};
use crate::error::{BoxError, ProxyError};
use crate::idle::IdleIo;
use crate::upstream_pool::{IdlePool, Lease, Sender, UpstreamBody, sweep_until_dropped};

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
    http1: http1::Builder,
}

/// Why a backend exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be opened (resolution, denied network, refused,
    /// timeout, TLS).
    #[error("cannot connect to the backend")]
    Connect(#[source] io::Error),
    /// The exchange on an open connection failed.
    #[error("backend exchange failed")]
    Exchange(#[source] hyper::Error),
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
        let mut http1 = http1::Builder::new();
        http1
            .max_buf_size(crate::buffers::UPSTREAM_MAX_BUF)
            // Body chunks are queued, not copied into a growing buffer.
            .writev(true);
        let connector = Connector {
            connect_timeout: settings.connect_timeout,
            read_timeout: settings.read_timeout,
            egress: settings.egress,
            tls: settings.tls,
        };
        UpstreamClient { pool, connector, http1 }
    }

    /// Sends `req` (origin-form URI) to `backend`, on an idle connection if
    /// there is one. A request that an idle connection gives back unsent (the
    /// backend closed it as we sent) goes out on a new connection.
    pub async fn request(
        &self,
        backend: &BackendUrl,
        mut req: Request<LimitedBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        while let Some(mut sender) = self.pool.take(backend) {
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(self.lend(response, backend, sender)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(UpstreamError::Exchange(error.into_error())),
                },
            }
        }
        // Boxed: opening a connection (connect, TLS, handshake) is rare on a
        // warm pool, and its 1.7 KiB state inlined here made every request's
        // future, which hyper moves at least twice, that much larger.
        let mut sender = Box::pin(self.open(backend)).await?;
        match sender.try_send_request(req).await {
            Ok(response) => Ok(self.lend(response, backend, sender)),
            Err(error) => Err(UpstreamError::Exchange(error.into_error())),
        }
    }

    /// The response, with a body that returns the connection to the pool at
    /// its end (a switched protocol keeps it: the tunnel owns it now).
    fn lend(&self, response: Response<Incoming>, backend: &BackendUrl, sender: Sender) -> Response<UpstreamBody> {
        let lease = (response.status() != StatusCode::SWITCHING_PROTOCOLS)
            .then(|| Lease::new(self.pool.clone(), backend.clone(), sender));
        response.map(|incoming| UpstreamBody::new(incoming, lease))
    }

    /// A new connection to `backend`, its task started on this loop.
    async fn open(&self, backend: &BackendUrl) -> Result<Sender, UpstreamError> {
        let io = self.connector.connect(backend).await.map_err(UpstreamError::Connect)?;
        let (sender, connection) = self.http1.handshake(io).await.map_err(UpstreamError::Exchange)?;
        tokio::spawn(PollClock::new(async move {
            if let Err(error) = connection.with_upgrades().await {
                debug!(%error, "backend connection ended with an error");
            }
        }));
        Ok(sender)
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
    Plain(TokioIo<IdleIo<TcpStream>>),
    /// `https://` (boxed: the TLS state is large and the plain case is the common one).
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<IdleIo<TcpStream>>>>),
}

/// Forwards a hyper I/O call to whichever connection `$io` (`&mut Inner`) holds.
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

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        each!(&mut self.get_mut().0, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each!(&mut self.get_mut().0, io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(&mut self.get_mut().0, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(&mut self.get_mut().0, io => Pin::new(io).poll_shutdown(cx))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            Inner::Plain(io) => io.is_write_vectored(),
            Inner::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(&mut self.get_mut().0, io => Pin::new(io).poll_write_vectored(cx, bufs))
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
            return Ok(UpstreamIo(Inner::Plain(TokioIo::new(stream))));
        }
        let tls = tokio::time::timeout(self.connect_timeout, self.tls.handshake(host, stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(UpstreamIo(Inner::Tls(Box::new(TokioIo::new(tls)))))
    }
}

/// Maps a failed upstream exchange to what the client is told: our own body
/// limit → 413, a broken client body → 400, a timeout anywhere → 504, anything
/// else the backend did (refused, reset, garbage) → 502.
pub fn classify(error: UpstreamError) -> ProxyError {
    let mut timeout = false;
    let mut client_body = false;
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
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && h.is_user()
            && !error.is_connect()
        {
            client_body = true;
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
