//! An I/O wrapper that fails a connection silent for too long, or whose
//! writes have been blocked for too long (a client that stopped reading the
//! response: nginx's send_timeout). The deadlines are checked lazily: traffic
//! only records a timestamp, and the timer is re-armed when it fires early, so
//! busy connections pay almost nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

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
    timer: Pin<Box<Sleep>>,
    /// The waker `timer` holds, while it holds one: polling the timer again
    /// with the same waker before it fires changes nothing, and a busy
    /// connection's reads wait several times per request.
    armed_for: Option<Waker>,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`; it fails with `TimedOut` after `timeout` without
    /// progress either way.
    pub fn new(inner: T, timeout: Duration) -> Self {
        let now = Instant::now();
        IdleIo {
            inner,
            timeout,
            send_timeout: timeout,
            last_activity: now,
            write_blocked_since: None,
            timer: Box::pin(tokio::time::sleep_until(now + timeout)),
            armed_for: None,
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

    /// Records progress, or, while the inner I/O waits, fails it once the
    /// connection has been idle for too long.
    fn track<R>(&mut self, cx: &mut Context<'_>, progress: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match progress {
            Poll::Ready(result) => {
                self.last_activity = Instant::now();
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }

    /// As `track`, for writes: also starts or ends the write stall.
    fn track_write<R>(&mut self, cx: &mut Context<'_>, progress: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match progress {
            Poll::Ready(_) => self.write_blocked_since = None,
            Poll::Pending => {
                if self.write_blocked_since.is_none() {
                    let now = Instant::now();
                    self.write_blocked_since = Some(now);
                    // The timer may be set for the far longer idle deadline.
                    if now + self.send_timeout < self.timer.deadline() {
                        self.timer.as_mut().reset(now + self.send_timeout);
                        // A timer that fired has given its waker away.
                        self.armed_for = None;
                    }
                }
            }
        }
        self.track(cx, progress)
    }

    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if !self.timer.is_elapsed() && self.armed_for.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return Poll::Pending;
            }
            // Outside the task's budget: a poll refused for budget would
            // leave the timer without this waker, yet be taken as armed.
            let mut timer = tokio::task::unconstrained(self.timer.as_mut());
            if Pin::new(&mut timer).poll(cx).is_pending() {
                if !self.armed_for.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    self.armed_for = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            // Fired: its waker is spent, and the reset below re-arms it
            // for the next turn of the loop to register again.
            self.armed_for = None;
            let now = Instant::now();
            if let Some(since) = self.write_blocked_since
                && since + self.send_timeout <= now
            {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, IdleTimeout::Send));
            }
            let deadline = self.last_activity + self.timeout;
            if deadline <= now {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, IdleTimeout::Idle));
            }
            let next = match self.write_blocked_since {
                Some(since) => deadline.min(since + self.send_timeout),
                None => deadline,
            };
            self.timer.as_mut().reset(next);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let progress = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.track(cx, progress)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let progress = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.track_write(cx, progress)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let progress = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.track_write(cx, progress)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TLS flush writes the records it holds: blocked like a write.
        let this = self.get_mut();
        let progress = Pin::new(&mut this.inner).poll_flush(cx);
        this.track_write(cx, progress)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
