//! Pacing an HTTP/1 response body to what the client takes: the next chunk of
//! a backend's body is read only once the previous one has been written to
//! the client's connection (its TLS layer or socket).
//!
//! hyper's HTTP/1 server asks the body for more while less than its
//! `max_buf_size` (32 KiB, see `buffers::CLIENT_WRITE_BUF`) waits unwritten,
//! and each chunk it holds keeps the backend read buffer it was cut from. For
//! a client that stops reading (slowhttptest's slow read), that was about
//! 70 KiB of backend buffers per connection on top of the TLS layer's own.
//! With pacing, at most one chunk waits above the connection (and one more in
//! hyper's body channel), so the backend read stops as soon as the client
//! stops reading: back-pressure reaches the backend after a few KiB.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};

/// Response bytes handed to hyper and not yet written, shared by one
/// connection's I/O (which counts writes) and its response bodies.
#[derive(Default)]
pub struct Pace {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Body bytes handed to hyper and not yet written (response heads and
    /// chunk framing are written too and only bring it to zero sooner).
    queued: usize,
    /// The body waiting for those bytes to be written.
    waiter: Option<Waker>,
}

impl Pace {
    /// A connection with nothing queued.
    pub fn new() -> Arc<Self> {
        Arc::new(Pace::default())
    }

    /// Called by the connection's I/O when `written` bytes were accepted
    /// by the layer below (TLS or socket): wakes a body waiting for room.
    pub fn wrote(&self, written: usize) {
        if written == 0 {
            return;
        }
        let waker = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.queued = state.queued.saturating_sub(written);
            if state.queued == 0 { state.waiter.take() } else { None }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Bytes handed to hyper and not yet written.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).queued
    }

    /// Ready once everything handed so far has been written.
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.queued == 0 {
            return Poll::Ready(());
        }
        // hyper writes what it holds before waiting on the body again, and
        // every write either makes progress (and wakes this) or blocks under
        // the send timeout: the wait cannot outlive the connection's limits.
        match &mut state.waiter {
            Some(waker) => waker.clone_from(cx.waker()),
            None => state.waiter = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn handed(&self, len: usize) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).queued += len;
    }
}

/// A response body polled only when the previous chunk has been written.
pub struct Paced<B> {
    inner: B,
    pace: Arc<Pace>,
}

impl<B> Paced<B> {
    /// `inner`, paced by `pace`, the connection's write progress.
    pub fn new(inner: B, pace: Arc<Pace>) -> Self {
        Paced { inner, pace }
    }
}

impl<B> Drop for Paced<B> {
    fn drop(&mut self) {
        // hyper writes less than it was handed when it stops a response early
        // (a body longer than its Content-Length, an error): the next
        // response must not wait for bytes that will never be written.
        self.pace.state.lock().unwrap_or_else(PoisonError::into_inner).queued = 0;
    }
}

impl<B: Body + Unpin> Body for Paced<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        if this.pace.poll_room(cx).is_pending() {
            return Poll::Pending;
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.pace.handed(data.remaining());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Either, StreamBody};
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncWriteExt;

    use crate::activity::{Activity, TrackedBody};
    use crate::idle::IdleIo;
    use crate::linger::Linger;
    use crate::park::ParkIo;
    use crate::sniff::{SmuggleFlags, SniffIo};

    #[tokio::test]
    async fn the_next_chunk_waits_for_the_previous_one_to_be_written() {
        let chunks = [Bytes::from_static(b"first"), Bytes::from_static(b"second")];
        let stream = futures::stream::iter(chunks.map(|c| Ok::<_, Infallible>(Frame::data(c))));
        let pace = Pace::new();
        let mut body = Paced::new(StreamBody::new(stream), pace.clone());
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "first");
        assert_eq!(pace.queued(), 5);
        let next = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
        assert!(next.is_err(), "second chunk handed while the first was unwritten");
        pace.wrote(3);
        assert_eq!(pace.queued(), 2);
        // A head written with the body's last bytes does not carry credit over.
        pace.wrote(200);
        assert_eq!(pace.queued(), 0);
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "second");
        // A response dropped with bytes never written does not hold up the next.
        assert_eq!(pace.queued(), 6);
        drop(body);
        assert_eq!(pace.queued(), 0);
    }

    const CHUNK: usize = 4 * 1024;

    /// Body bytes a real hyper HTTP/1 server, with the client connection's
    /// I/O stack and buffer settings, takes from an endless backend body
    /// while its client reads nothing (the connection holds 1 KiB).
    async fn read_ahead(paced: bool) -> usize {
        let (mut client, server) = tokio::io::duplex(1024);
        let activity = Activity::new();
        let pace = Pace::new();
        let io =
            IdleIo::new(SniffIo::new(Linger::new(server), Arc::new(SmuggleFlags::default())), Duration::from_secs(60));
        let io = ParkIo::new(io, activity.clone(), pace.clone());
        let pulled = Arc::new(AtomicUsize::new(0));
        let counter = pulled.clone();
        let service = service_fn(move |_req| {
            let counter = counter.clone();
            let in_flight = activity.begin();
            let pace = pace.clone();
            async move {
                let chunks = futures::stream::repeat_with(move || {
                    counter.fetch_add(CHUNK, Ordering::SeqCst);
                    Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; CHUNK])))
                });
                let body = TrackedBody::new(StreamBody::new(chunks), in_flight);
                let body = if paced { Either::Left(Paced::new(body, pace)) } else { Either::Right(body) };
                Ok::<_, Infallible>(hyper::Response::new(body))
            }
        });
        let connection = http1::Builder::new()
            .max_buf_size(crate::buffers::CLIENT_WRITE_BUF)
            .writev(true)
            .serve_connection(TokioIo::new(io), service);
        let served = tokio::spawn(connection);
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        // The client never reads: whatever hyper will take, it takes now.
        tokio::time::sleep(Duration::from_millis(200)).await;
        served.abort();
        pulled.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_stops_the_backend_read_after_one_chunk() {
        // Without pacing, hyper queues up to its 32 KiB buffer before it waits.
        let unpaced = read_ahead(false).await;
        assert!(unpaced >= crate::buffers::CLIENT_WRITE_BUF - CHUNK, "hyper read only {unpaced} bytes ahead unpaced");
        // Paced: the chunk being written, and the next one only once it is.
        let paced = read_ahead(true).await;
        assert!(paced <= CHUNK, "{paced} bytes read ahead of a client that reads nothing");
    }
}
