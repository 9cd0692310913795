//! Body types: what the proxy sends (a backend's stream, its own page, or a
//! gzip stream) and the request body sent upstream with its size limit.
//! Enums rather than boxed trait objects: no allocation per request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::compress::GzipBody;
use crate::error::BoxError;

/// A response body sent to a client.
pub enum ProxyBody {
    /// No body.
    Empty,
    /// A body the proxy made itself (pages, `/list`).
    Full(Option<Bytes>),
    /// The backend's body, streamed as it arrives.
    Upstream(Incoming),
    /// The backend's body, gzip-compressed on the fly.
    Gzip(Box<GzipBody>),
}

impl ProxyBody {
    /// A body holding `bytes`.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(bytes.into()))
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Upstream(incoming) => incoming.is_end_stream(),
            ProxyBody::Gzip(gzip) => gzip.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Upstream(incoming) => incoming.size_hint(),
            ProxyBody::Gzip(_) => SizeHint::default(),
        }
    }
}

/// The request body sent upstream was larger than allowed.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

/// A client's request body on its way upstream, cut off with [`TooLarge`]
/// past the configured limit (for bodies whose length was not announced).
pub struct LimitedBody {
    /// `None` for a request sent again without a body (see [`LimitedBody::empty`]).
    inner: Option<Incoming>,
    remaining: u64,
    limit: u64,
}

impl LimitedBody {
    /// Wraps `inner`, allowing at most `limit` bytes.
    pub fn new(inner: Incoming, limit: u64) -> Self {
        LimitedBody { inner: Some(inner), remaining: limit, limit }
    }

    /// No body: a bodiless request sent again after its first connection
    /// was refused (the client's empty body went with the first attempt).
    pub fn empty() -> Self {
        LimitedBody { inner: None, remaining: 0, limit: 0 }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
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
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or(SizeHint::with_exact(0), Incoming::size_hint)
    }
}
