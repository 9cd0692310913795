//! What an HTTP/1 connection does while the proxy drains (after SIGTERM or a
//! hand-over to a new process): it keeps serving, and every response it
//! still sends says `Connection: close`, so the client opens its next
//! connection to whichever process accepts now. An idle keep-alive
//! connection is not closed at the start of the drain, because its client
//! may be sending a request at that very moment and would see the
//! connection close under it; it is closed at its keep-alive timeout or at
//! the end of `shutdown_grace_secs`, whichever comes first. HTTP/2 gets
//! GOAWAY instead, which has no such race (the client learns which streams
//! were taken).

use http::header::{CONNECTION, HeaderValue};
use http::{Response, StatusCode};
use tokio_util::sync::CancellationToken;

/// Adds `Connection: close` to `response` once `draining` is cancelled.
/// A `101 Switching Protocols` answer is left alone: the tunnel it opens is
/// the connection's last use anyway, and `close` would contradict `Upgrade`.
pub fn close_when_draining<B>(response: &mut Response<B>, draining: &CancellationToken) {
    if draining.is_cancelled() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_only_while_draining_and_never_on_upgrades() {
        let token = CancellationToken::new();
        let mut ok = Response::new(());
        close_when_draining(&mut ok, &token);
        assert!(ok.headers().get(CONNECTION).is_none());

        token.cancel();
        close_when_draining(&mut ok, &token);
        assert_eq!(ok.headers()[CONNECTION], "close");

        let mut upgrade = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS).body(()).unwrap();
        close_when_draining(&mut upgrade, &token);
        assert!(upgrade.headers().get(CONNECTION).is_none());
    }
}
