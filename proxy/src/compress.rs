//! On-the-fly gzip of text responses (SPEC §3): only when the client accepts
//! it, the backend did not encode the body, and the type is a text type.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::upstream_pool::UpstreamBody;
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http::header::{self, HeaderMap, HeaderValue};
use http_body::{Body, Frame};

use crate::error::BoxError;

/// Content types compressed, as nginx's `gzip_types` in production.
const GZIP_TYPES: [&str; 7] = [
    "text/plain",
    "text/css",
    "text/xml",
    "text/html",
    "application/json",
    "application/javascript",
    "text/javascript",
];

/// Bodies announced smaller than this are not worth compressing.
const MIN_LENGTH: u64 = 256;

/// True when the request's `Accept-Encoding` allows gzip.
pub fn accepts_gzip(request: &HeaderMap) -> bool {
    request.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q == 0.0))
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        },
    )
}

/// True when a response with these headers should be gzipped.
pub fn should_compress(status: http::StatusCode, response: &HeaderMap) -> bool {
    if status != http::StatusCode::OK || response.contains_key(header::CONTENT_ENCODING) {
        return false;
    }
    if let Some(len) = response.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len < MIN_LENGTH
    {
        return false;
    }
    is_compressible_type(response)
}

/// True when the response's content type is one the proxy gzips.
pub fn is_compressible_type(response: &HeaderMap) -> bool {
    let Some(content_type) = response.get(header::CONTENT_TYPE) else {
        return false;
    };
    let value = content_type.as_bytes();
    let essence = match memchr::memchr(b';', value) {
        Some(end) => &value[..end],
        None => value,
    }
    .trim_ascii();
    // Bytes, not `str`: `to_str` checked every byte only for the value to be
    // compared with ASCII names, and a slice comparison looks at the lengths
    // first, which tell most types apart.
    GZIP_TYPES.iter().any(|t| essence.eq_ignore_ascii_case(t.as_bytes()))
}

/// Adds `Vary: Accept-Encoding` to a response of a compressible type,
/// compressed or not (SPEC §3): the same URL is answered gzipped to one
/// client and plain to another, so a shared cache that stored the plain copy
/// without `Vary` would serve it to everyone (and REDbot flags it). A `Vary`
/// the backend sent is kept; `Accept-Encoding` is not added twice, nor next
/// to `*`.
pub fn vary_on_encoding(response: &mut HeaderMap) {
    if !is_compressible_type(response) {
        return;
    }
    let covered =
        response.get_all(header::VARY).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|item| {
            let item = item.trim();
            item == "*" || item.eq_ignore_ascii_case("accept-encoding")
        });
    if !covered {
        response.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

/// Adjusts response headers for a gzipped body.
pub fn mark_compressed(response: &mut HeaderMap) {
    vary_on_encoding(response);
    response.remove(header::CONTENT_LENGTH);
    response.remove(header::ACCEPT_RANGES);
    response.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    if let Some(etag) = response.get(header::ETAG).and_then(|v| v.to_str().ok())
        && !etag.starts_with("W/")
        && let Ok(weak) = HeaderValue::from_str(&format!("W/{etag}"))
    {
        response.insert(header::ETAG, weak);
    }
}

/// A backend body compressed as it streams; each chunk is flushed so slow
/// streams (progress pages, logs) still reach the client promptly.
pub struct GzipBody {
    inner: UpstreamBody,
    encoder: Option<GzEncoder<Vec<u8>>>,
}

impl GzipBody {
    /// Compresses `inner`.
    pub fn new(inner: UpstreamBody) -> Self {
        GzipBody { inner, encoder: Some(GzEncoder::new(Vec::with_capacity(8192), Compression::new(5))) }
    }
}

impl Body for GzipBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(encoder) = this.encoder.as_mut() else { return Poll::Ready(None) };
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue }; // trailers are dropped
                    if let Err(e) = encoder.write_all(&data).and_then(|_| encoder.flush()) {
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                    let out = std::mem::take(encoder.get_mut());
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
                Poll::Ready(None) => {
                    let Some(encoder) = this.encoder.take() else { return Poll::Ready(None) };
                    return match encoder.finish() {
                        Ok(out) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(out))))),
                        Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(accepts_gzip(&h("gzip, deflate, br")));
        assert!(accepts_gzip(&h("br;q=1.0, GZIP;q=0.5")));
        assert!(accepts_gzip(&h("*")));
        assert!(!accepts_gzip(&h("gzip;q=0")));
        assert!(!accepts_gzip(&h("br")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn compressible_responses() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
            }
            m
        };
        let ok = http::StatusCode::OK;
        assert!(should_compress(ok, &h(&[("content-type", "text/html; charset=utf-8")])));
        assert!(should_compress(ok, &h(&[("content-type", "application/json")])));
        assert!(!should_compress(ok, &h(&[("content-type", "image/png")])));
        assert!(!should_compress(ok, &h(&[("content-type", "text/html"), ("content-encoding", "br")])));
        assert!(!should_compress(ok, &h(&[("content-type", "text/html"), ("content-length", "10")])));
        assert!(!should_compress(http::StatusCode::PARTIAL_CONTENT, &h(&[("content-type", "text/html")])));
    }

    #[test]
    fn vary_is_added_once_to_compressible_types_only() {
        let vary = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
            }
            vary_on_encoding(&mut m);
            m.get_all(header::VARY).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(vary(&[("content-type", "text/html")]), ["Accept-Encoding"]);
        assert!(vary(&[("content-type", "image/png")]).is_empty());
        assert_eq!(vary(&[("content-type", "text/css"), ("vary", "Cookie")]), ["Cookie", "Accept-Encoding"]);
        assert_eq!(
            vary(&[("content-type", "text/css"), ("vary", "Cookie, accept-encoding")]),
            ["Cookie, accept-encoding"]
        );
        assert_eq!(vary(&[("content-type", "text/css"), ("vary", "*")]), ["*"]);
        let mut m = HeaderMap::new();
        m.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        vary_on_encoding(&mut m);
        mark_compressed(&mut m);
        assert_eq!(m.get_all(header::VARY).iter().count(), 1, "gzipped responses carry it once");
    }
}
