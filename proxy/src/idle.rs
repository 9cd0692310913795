//! An I/O wrapper that fails a connection silent for too long, or whose
//! writes have been blocked for too long (a client that stopped reading the
//! response: nginx's send_timeout). The deadlines are checked lazily: traffic
//! only records a timestamp, and the timer is re-armed when it fires early, so
//! busy connections pay almost nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::deadline::Deadline;

/// Which limit of [`IdleIo`] ended a connection; the source of its `TimedOut` error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdleTimeout {
    /// No traffic either way for the idle timeout.
    #[error("connection idle for too long")]
    Idle,
    /// A write waited for the send timeout without progress.
    #[error("client not reading the response")]
    Send,
}

impl IdleTimeout {
    /// The limit behind `error`, searched along its sources.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<IdleTimeout> {
        let mut source = Some(error);
        while let Some(e) = source {
            if let Some(found) = e.downcast_ref::<IdleTimeout>() {
                return Some(*found);
            }
            if let Some(found) =
                e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()?.downcast_ref::<IdleTimeout>())
            {
                return Some(*found);
            }
            source = e.source();
        }
        None
    }
}

/// `T` with an idle timeout over reads and writes together, and a stall
/// timeout over blocked writes.
pub struct IdleIo<T> {
    inner: T,
    timeout: Duration,
    send_timeout: Duration,
    last_activity: Instant,
    /// Since when a write (or flush) has been waiting for the client to read.
    write_blocked_since: Option<Instant>,
    /// Bytes were written since the last flush that completed: only such a
    /// flush moves anything, and counts as activity.
    unflushed: bool,
    timer: Deadline,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`; it fails with `TimedOut` after `timeout` without
    /// progress either way.
    pub fn new(inner: T, timeout: Duration) -> Self {
        let now = crate::clock::tokio_now();
        IdleIo {
            inner,
            timeout,
            send_timeout: timeout,
            last_activity: now,
            write_blocked_since: None,
            unflushed: false,
            timer: Deadline::new(now + timeout),
        }
    }

    /// Also fails after `send_timeout` with a write waiting and no write
    /// progress, however busy the other direction is.
    pub fn with_send_timeout(mut self, send_timeout: Duration) -> Self {
        self.send_timeout = send_timeout;
        self
    }

    /// The wrapped I/O object.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Counts from now: a connection taken from a pool starts its exchange
    /// with the whole timeout, however long it lay idle.
    pub fn touch(&mut self) {
        self.last_activity = crate::clock::tokio_now();
        self.write_blocked_since = None;
    }

    /// Records progress when bytes `moved`, or, while the inner I/O waits,
    /// fails it once the connection has been idle for too long. Only moved
    /// bytes count: an empty flush, done each time the connection is polled,
    /// would otherwise put the deadline off at every wake of its own timer.
    fn track<R>(&mut self, cx: &mut Context<'_>, progress: Poll<io::Result<R>>, moved: bool) -> Poll<io::Result<R>> {
        match progress {
            Poll::Ready(result) => {
                // Stamped now, not when the connection next waits: that may
                // be long after, when the timer wakes it.
                if moved {
                    self.last_activity = crate::clock::tokio_now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }

    /// As `track`, for writes: also starts or ends the write stall.
    fn track_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        progress: Poll<io::Result<R>>,
        moved: bool,
    ) -> Poll<io::Result<R>> {
        match progress {
            Poll::Ready(_) => self.write_blocked_since = None,
            Poll::Pending => {
                if self.write_blocked_since.is_none() {
                    let now = crate::clock::tokio_now();
                    self.write_blocked_since = Some(now);
                    // The timer may be set for the far longer idle deadline.
                    self.timer.bring_forward(now + self.send_timeout);
                }
            }
        }
        self.track(cx, progress, moved)
    }

    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let (last_activity, timeout) = (self.last_activity, self.timeout);
        let send = self.write_blocked_since.map(|since| since + self.send_timeout);
        let idle = || last_activity + timeout;
        ready!(self.timer.poll_until(cx, || send.map_or_else(idle, |send| send.min(idle()))));
        let timeout = if send.is_some_and(|send| send <= idle()) { IdleTimeout::Send } else { IdleTimeout::Idle };
        Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, timeout))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let progress = Pin::new(&mut this.inner).poll_read(cx, buf);
        let moved = buf.filled().len() > before;
        this.track(cx, progress, moved)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let progress = Pin::new(&mut this.inner).poll_write(cx, buf);
        let moved = matches!(progress, Poll::Ready(Ok(n)) if n > 0);
        this.unflushed |= moved;
        this.track_write(cx, progress, moved)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let progress = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        let moved = matches!(progress, Poll::Ready(Ok(n)) if n > 0);
        this.unflushed |= moved;
        this.track_write(cx, progress, moved)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TLS flush writes the records it holds: blocked like a write.
        let this = self.get_mut();
        let progress = Pin::new(&mut this.inner).poll_flush(cx);
        let moved = progress.is_ready() && std::mem::take(&mut this.unflushed);
        this.track_write(cx, progress, moved)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    /// A peer that never sends, and whose flushes always complete at once.
    struct Silent;

    impl AsyncRead for Silent {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Silent {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_however_often_the_connection_flushes_nothing() {
        let mut io = IdleIo::new(Silent, Duration::from_millis(200));
        let start = Instant::now();
        // Each wake flushes first, then reads, as a connection task may.
        let waited = poll_fn(|cx| {
            let mut io = Pin::new(&mut io);
            assert!(io.as_mut().poll_flush(cx).is_ready());
            let mut space = [0u8; 16];
            io.poll_read(cx, &mut ReadBuf::new(&mut space))
        });
        let result = tokio::time::timeout(Duration::from_secs(5), waited).await.expect("the idle timeout never fired");
        let error = result.expect_err("a silent peer sent nothing");
        assert_eq!(IdleTimeout::find(&error), Some(IdleTimeout::Idle));
        assert!(start.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_flush_after_a_write_counts_as_activity() {
        let mut io = IdleIo::new(Silent, Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let written = Instant::now();
        poll_fn(|cx| Pin::new(&mut io).poll_write(cx, b"x")).await.unwrap();
        poll_fn(|cx| Pin::new(&mut io).poll_flush(cx)).await.unwrap();
        let mut space = [0u8; 16];
        let read = poll_fn(|cx| Pin::new(&mut io).poll_read(cx, &mut ReadBuf::new(&mut space)));
        let error = tokio::time::timeout(Duration::from_secs(5), read).await.expect("timed out").unwrap_err();
        assert_eq!(IdleTimeout::find(&error), Some(IdleTimeout::Idle));
        // Measured from the write, not from the connection's start.
        assert!(written.elapsed() >= Duration::from_millis(300), "{:?}", written.elapsed());
    }
}
