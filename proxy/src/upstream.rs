//! The client side: keep-alive connection pools per backend (hyper-util's
//! pooled client, keyed by scheme and authority, so `http://` and `https://`
//! backends are pooled alike), connect and idle timeouts, TLS to `https://`
//! backends, and the classification of upstream failures into 502 and 504.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::backend_tls::{BackendTls, untrusted_cause};
use crate::body::{LimitedBody, TooLarge};
use crate::egress::{Egress, denied_cause};
use crate::error::{BoxError, ProxyError};
use crate::idle::IdleIo;

/// The pooled HTTP/1.1 client used for every backend.
pub type UpstreamClient = Client<Connector, LimitedBody>;

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

/// Builds the pooled client.
pub fn client(settings: UpstreamSettings) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.idle_timeout)
        .pool_max_idle_per_host(settings.max_idle_per_backend)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http1_max_buf_size(crate::buffers::UPSTREAM_MAX_BUF)
        // Body chunks are queued, not copied into a growing buffer.
        .http1_writev(true)
        .build(Connector {
            connect_timeout: settings.connect_timeout,
            read_timeout: settings.read_timeout,
            egress: settings.egress,
            tls: settings.tls,
        })
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

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
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

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<UpstreamIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let https = match uri.scheme_str() {
                Some("http") => false,
                Some("https") => true,
                _ => return Err(io::Error::new(io::ErrorKind::Unsupported, "only http:// and https:// backends")),
            };
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            // Resolution and the denied-network check happen here, on every
            // new connection: a cached or pooled answer is never trusted past it.
            let stream = tokio::time::timeout(this.connect_timeout, this.egress.connect(host, port))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            let _ = stream.set_nodelay(true);
            let stream = IdleIo::new(stream, this.read_timeout);
            if !https {
                return Ok(UpstreamIo(Inner::Plain(TokioIo::new(stream))));
            }
            let tls = tokio::time::timeout(this.connect_timeout, this.tls.handshake(host, stream))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
            Ok(UpstreamIo(Inner::Tls(Box::new(TokioIo::new(tls)))))
        })
    }
}

/// Maps a failed upstream exchange to what the client is told: our own body
/// limit → 413, a broken client body → 400, a timeout anywhere → 504, anything
/// else the backend did (refused, reset, garbage) → 502.
pub fn classify(error: hyper_util::client::legacy::Error) -> ProxyError {
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
