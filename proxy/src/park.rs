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
//!
//! A client in steady use is not parked between every two requests: building
//! a new hyper connection for each request cost about 5 % of the proxy's CPU
//! under keep-alive load. Once a client's next request has come within
//! [`HOT_GAP`] of the previous response, its connection waits [`PARK_AFTER`]
//! of silence before parking. A client that sends one request and goes quiet,
//! the idle case whose memory this module bounds, still parks at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use crate::activity::Activity;
use crate::deadline::Deadline;
use crate::idle::IdleIo;
use crate::linger::Linger;
use crate::pace::Pace;
use crate::sniff::SniffIo;

/// A next request that comes within this of the previous response marks
/// the client as in steady use.
pub const HOT_GAP: Duration = Duration::from_millis(50);
/// How long the connection of a client in steady use stays unparked
/// without a request: short, so that a burst of such clients going quiet
/// holds hyper's buffers briefly.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

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
    /// Since when the connection has waited for the client at a boundary.
    waiting_since: Option<Instant>,
    /// A response byte has been written: only a wait after a response says
    /// how busy the client is (a new client's first request is no sign).
    responded: bool,
    /// The client's last request came within [`HOT_GAP`]: park only after
    /// [`PARK_AFTER`] of silence.
    hot: bool,
    /// The [`PARK_AFTER`] deadline of a hot connection's current wait; armed
    /// once, and moved on only when it fires, not at every request.
    park_timer: Option<Deadline>,
}

impl<S> ParkIo<S> {
    /// Wraps a connection's I/O; `activity` tells whether a request is in
    /// flight, and `pace` learns of every byte written.
    pub fn new(inner: IdleIo<SniffIo<Linger<S>>>, activity: Arc<Activity>, pace: Arc<Pace>) -> Self {
        ParkIo {
            inner,
            activity,
            pace,
            prefix: Bytes::new(),
            flushed: true,
            read_waiting: false,
            parked: false,
            waiting_since: None,
            responded: false,
            hot: false,
            park_timer: None,
        }
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

    /// Ready once a hot connection has waited [`PARK_AFTER`] since `since`;
    /// until then the timer wakes the connection to look again.
    fn wait_before_parking(&mut self, since: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = || since + PARK_AFTER;
        self.park_timer.get_or_insert_with(|| Deadline::new(deadline())).poll_until(cx, deadline)
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
        let filled = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if result.is_ready() && buf.filled().len() > filled {
            if let Some(since) = this.waiting_since.take()
                && this.responded
            {
                this.hot = crate::clock::tokio_now().saturating_duration_since(since) < HOT_GAP;
            }
        } else if result.is_pending() && this.idle_at_boundary() {
            let since = *this.waiting_since.get_or_insert_with(crate::clock::tokio_now);
            if this.flushed {
                if this.hot && this.wait_before_parking(since, cx).is_pending() {
                    return Poll::Pending;
                }
                // End of input at a boundary: hyper closes without writing,
                // and the server keeps the socket.
                this.parked = true;
                this.park_timer = None;
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
            this.responded |= n > 0;
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
            this.responded |= n > 0;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

    fn park_io(server: DuplexStream) -> ParkIo<DuplexStream> {
        let stack = IdleIo::new(SniffIo::new(Linger::new(server), Arc::default()), Duration::from_secs(3600));
        ParkIo::new(stack, Activity::new(), Pace::new())
    }

    /// One exchange as hyper does it: read the request, write and flush the response.
    async fn exchange(io: &mut ParkIo<DuplexStream>, client: &mut DuplexStream) {
        client.write_all(REQUEST).await.unwrap();
        let mut buf = [0u8; 256];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], REQUEST);
        io.write_all(RESPONSE).await.unwrap();
        io.flush().await.unwrap();
    }

    /// Reads as hyper does between requests: true when the read reported
    /// the end of input because the connection parked.
    async fn parks_within(io: &mut ParkIo<DuplexStream>, wait: Duration) -> bool {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(wait, io.read(&mut buf)).await {
            Ok(Ok(0)) => io.is_parked(),
            _ => false,
        }
    }

    #[tokio::test]
    async fn a_client_in_steady_use_parks_only_after_a_quiet_second_and_a_new_one_at_once() {
        let (mut client, server) = duplex(4096);
        let mut io = park_io(server);

        // A new client's first request is no sign of steady use: it parks at once.
        exchange(&mut io, &mut client).await;
        assert!(parks_within(&mut io, Duration::ZERO).await, "a first exchange parks at once");
        io.unpark(Bytes::new());

        // Its next request came at once: in steady use, it stays unparked for a while...
        exchange(&mut io, &mut client).await;
        assert!(!parks_within(&mut io, PARK_AFTER - Duration::from_millis(100)).await, "a busy client stays unparked");
        // ...and parks once the client has been quiet for PARK_AFTER.
        assert!(parks_within(&mut io, Duration::from_millis(600)).await, "parked after a quiet second");
        io.unpark(Bytes::new());

        // A request after a long pause is not steady use: the next wait parks at once again.
        tokio::time::sleep(HOT_GAP * 3).await;
        exchange(&mut io, &mut client).await;
        assert!(parks_within(&mut io, Duration::ZERO).await, "a client back from a pause parks at once");
    }
}
