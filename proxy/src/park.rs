//! Parking idle HTTP/1 connections: between requests a keep-alive connection
//! holds no HTTP machinery, only its socket and a small task.
//!
//! hyper keeps a connection's read buffer (8 KiB, reserved before every read)
//! and write buffer (8 KiB) for the connection's whole life, so 10,000 idle
//! keep-alive clients cost about 200 MiB. Instead, once a response is flushed
//! and the client has nothing more to send, [`ParkIo`] reports end of input to
//! hyper at a message boundary: hyper ends the connection gracefully, exactly
//! as if the client had closed between requests, but nothing is written and
//! the socket stays open (its shutdown is not forwarded). The server then waits
//! for the socket to become readable ([`ReadReady`]) and serves the next
//! request with a fresh hyper connection. Nothing changes on the wire: no
//! `Connection: close` is added, and pipelined requests already read are
//! parsed before hyper ever reads again.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::activity::Activity;
use crate::idle::IdleIo;
use crate::linger::Linger;
use crate::pace::Pace;
use crate::sniff::SniffIo;

/// A client socket that can say when input arrives without reading it.
pub trait ReadReady {
    /// Ready once the socket has something to read (or is closed); called only
    /// after a read found nothing, so nothing is buffered above the socket.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl ReadReady for TlsStream<TcpStream> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A read returned Pending only after rustls had no plaintext left and
        // the socket had no bytes, so the socket's readiness is the whole answer.
        self.get_ref().0.poll_read_ready(cx)
    }
}

/// The HTTP/1 client I/O stack, reporting end of input to hyper when the
/// connection is idle at a message boundary (see the module docs).
pub struct ParkIo<S> {
    inner: IdleIo<SniffIo<Linger<S>>>,
    activity: Arc<Activity>,
    /// Told of every write, so a response body waits for its previous chunk.
    pace: Arc<Pace>,
    /// Bytes hyper had read but not parsed when its connection ended; served
    /// first to the next one. Empty in practice: hyper parks only at a boundary.
    prefix: Bytes,
    /// No write since the last completed flush: no response byte waits in hyper.
    flushed: bool,
    /// A read found nothing while a response was still being flushed; the
    /// flush's end wakes the connection so that it parks.
    read_waiting: bool,
    /// End of input was reported to hyper without the client closing.
    parked: bool,
}

impl<S> ParkIo<S> {
    /// Wraps a connection's I/O; `activity` tells whether a request is in
    /// flight, and `pace` learns of every byte written.
    pub fn new(inner: IdleIo<SniffIo<Linger<S>>>, activity: Arc<Activity>, pace: Arc<Pace>) -> Self {
        ParkIo { inner, activity, pace, prefix: Bytes::new(), flushed: true, read_waiting: false, parked: false }
    }

    /// True when hyper's connection ended because this connection was parked,
    /// not because the client closed or an error occurred.
    pub fn is_parked(&self) -> bool {
        self.parked
    }

    /// Back to serving, with the bytes the previous hyper connection left unparsed.
    pub fn unpark(&mut self, unparsed: Bytes) {
        self.parked = false;
        self.prefix = unparsed;
    }

    /// Whether parking now would lose nothing: no request in flight, every
    /// byte read so far belongs to a complete request, and (checked by the
    /// caller) every response byte has been flushed.
    fn idle_at_boundary(&self) -> bool {
        self.activity.in_flight() == 0 && self.inner.get_ref().at_message_boundary()
    }
}

impl<S: ReadReady> ParkIo<S> {
    /// Ready once the client sends something (or closes) after parking.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.get_ref().get_ref().get_ref().poll_read_ready(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ParkIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if result.is_pending() && this.idle_at_boundary() {
            if this.flushed {
                // End of input at a boundary: hyper closes without writing,
                // and the server keeps the socket.
                this.parked = true;
                return Poll::Ready(Ok(()));
            }
            this.read_waiting = true;
        }
        result
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ParkIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = false;
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.pace.wrote(n);
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = false;
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            this.pace.wrote(n);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = result {
            this.flushed = true;
            if std::mem::take(&mut this.read_waiting) {
                // hyper waits on a read that would now park: poll it again.
                cx.waker().wake_by_ref();
            }
        }
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.parked {
            // hyper closing after the reported end of input: the socket stays.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
