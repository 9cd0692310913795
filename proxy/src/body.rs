//! Body types: what the proxy sends (a backend's stream, its own page, or a
//! gzip stream) and the request body sent upstream with its size limit.
//! Enums rather than boxed trait objects: no allocation per request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::backend_limit::BackendPermit;
use crate::compress::GzipBody;
use crate::error::BoxError;
use crate::fair_share::Slot as ShareSlot;
use crate::upstream_pool::UpstreamBody;

/// A response body sent to a client.
pub enum ProxyBody {
    /// No body.
    Empty,
    /// A body the proxy made itself (pages, `/list`).
    Full(Option<Bytes>),
    /// The backend's body, streamed as it arrives.
    Upstream(UpstreamBody),
    /// The backend's body, gzip-compressed on the fly.
    Gzip(Box<GzipBody>),
    /// A backend's response holding its places until the body is sent or
    /// dropped: under the backend caps, because the backend connection is
    /// busy until then, and in its tool's share, because a response still
    /// streaming is a request still in flight.
    Held(Box<ProxyBody>, BackendPermit, Option<ShareSlot>),
}

impl ProxyBody {
    /// A body holding `bytes`.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(bytes.into()))
    }

    /// This body, keeping `permit` and `share` until it is sent or dropped.
    pub fn holding(self, permit: BackendPermit, share: Option<ShareSlot>) -> Self {
        ProxyBody::Held(Box::new(self), permit, share)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(incoming) => Pin::new(incoming).poll_frame(cx).map_err(Into::into),
            ProxyBody::Gzip(gzip) => Pin::new(gzip.as_mut()).poll_frame(cx),
            ProxyBody::Held(body, ..) => Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Upstream(incoming) => incoming.is_end_stream(),
            ProxyBody::Gzip(gzip) => gzip.is_end_stream(),
            ProxyBody::Held(body, ..) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Upstream(incoming) => incoming.size_hint(),
            ProxyBody::Gzip(_) => SizeHint::default(),
            ProxyBody::Held(body, ..) => body.size_hint(),
        }
    }
}

/// The request body sent upstream was larger than allowed.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

/// The client paused its request body for longer than `client_body_timeout_secs`.
#[derive(Debug, thiserror::Error)]
#[error("request body paused for more than {0:?}")]
pub struct BodyTimeout(pub Duration);

/// A client's request body on its way upstream, cut off with [`TooLarge`]
/// past the configured limit (for bodies whose length was not announced),
/// and with [`BodyTimeout`] when the client pauses too long between reads.
pub struct LimitedBody {
    /// `None` for a request sent again without a body (see [`LimitedBody::empty`]).
    inner: Option<Incoming>,
    remaining: u64,
    limit: u64,
    pause_limit: Option<Duration>,
    /// Armed while the upstream side waits for the client's next bytes: the
    /// pause is measured only while someone wants the body, so a backend
    /// slow to take it is not blamed on the client.
    pause: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl LimitedBody {
    /// Wraps `inner`, allowing at most `limit` bytes.
    pub fn new(inner: Incoming, limit: u64) -> Self {
        LimitedBody { inner: Some(inner), remaining: limit, limit, pause_limit: None, pause: None, waiting: false }
    }

    /// Fails the body once the client has sent nothing for `pause_limit`
    /// while its next bytes were wanted (nginx client_body_timeout).
    pub fn with_pause_limit(mut self, pause_limit: Duration) -> Self {
        self.pause_limit = Some(pause_limit);
        self
    }

    /// Called when the client has nothing to give: starts or checks the pause.
    fn poll_pause(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(limit) = self.pause_limit else { return Poll::Pending };
        let deadline = tokio::time::Instant::now() + limit;
        let timer = match &mut self.pause {
            Some(timer) => {
                if !self.waiting {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self.pause.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.waiting = true;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(limit))))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// No body: a bodiless request sent again after its first connection
    /// was refused (the client's empty body went with the first attempt).
    pub fn empty() -> Self {
        LimitedBody { inner: None, remaining: 0, limit: 0, pause_limit: None, pause: None, waiting: false }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        if polled.is_ready() {
            this.waiting = false;
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        return Poll::Ready(Some(Err(Box::new(TooLarge(this.limit)))));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => this.poll_pause(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or(SizeHint::with_exact(0), Incoming::size_hint)
    }
}
