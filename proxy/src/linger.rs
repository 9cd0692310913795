//! Lingering close, as nginx's `lingering_close`: when the proxy closes a
//! connection the client may still be sending on (a 413 before the body was
//! read, a 400, a refusal at accept), closing at once would make the kernel
//! answer the unread bytes with a RST, and a RST can destroy the answer
//! before the client has read it. So the proxy sends its FIN, then reads and
//! discards what still comes, for a bounded time and size, and only then
//! closes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Longest pause in the client's data while lingering (nginx lingering_timeout: 5 s).
/// A client that has received the answer stops sending and closes within a
/// round trip or two, so 2 s is ample even on slow mobile links.
pub const LINGER_IDLE: Duration = Duration::from_secs(2);
/// Longest time a connection lingers in all (nginx lingering_time: 30 s);
/// shorter here because every lingering connection holds its place.
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// Most bytes discarded while lingering: a client still uploading at full
/// speed after that has not looked at the answer, and costs bandwidth.
pub const LINGER_BYTES: usize = 16 << 20;

enum State {
    Open,
    Lingering { timer: Pin<Box<Sleep>>, until: Instant, discarded: usize },
    Closed,
}

/// `T` whose shutdown lingers: FIN first, then read and discard until the
/// client closes, pauses for [`LINGER_IDLE`], or [`LINGER_TIME`] or
/// [`LINGER_BYTES`] are reached. Reads and writes pass straight through.
pub struct Linger<T> {
    inner: T,
    state: State,
}

impl<T> Linger<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Linger { inner, state: State::Open }
    }

    /// The wrapped I/O object.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Linger<T> {
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Open => {
                    if ready!(Pin::new(&mut self.inner).poll_shutdown(cx)).is_err() {
                        self.state = State::Closed;
                        continue;
                    }
                    let now = Instant::now();
                    let timer = Box::pin(tokio::time::sleep_until(now + LINGER_IDLE));
                    self.state = State::Lingering { timer, until: now + LINGER_TIME, discarded: 0 };
                }
                State::Lingering { timer, until, discarded } => {
                    let mut scratch = [0u8; 16 * 1024];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            *discarded += buf.filled().len();
                            if *discarded >= LINGER_BYTES {
                                self.state = State::Closed;
                                continue;
                            }
                            let next = (Instant::now() + LINGER_IDLE).min(*until);
                            timer.as_mut().reset(next);
                        }
                        // EOF or an error: the client is done.
                        Poll::Ready(_) => self.state = State::Closed,
                        Poll::Pending => {
                            ready!(timer.as_mut().poll(cx));
                            self.state = State::Closed;
                        }
                    }
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Linger<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Linger<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    /// Sends FIN, then lingers; never fails (the connection is going away anyway).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_linger(cx)
    }
}
