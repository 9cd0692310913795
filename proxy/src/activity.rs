//! Which phase a client connection is in, as far as its idle timeout goes:
//! the requests in flight on it (from the head's arrival until the response
//! body is sent or dropped) and since when it has had none. A connection with
//! a request in flight is bounded by the per-phase timeouts (body, send,
//! request idle); one without is merely kept alive, and is closed
//! gracefully after `keepalive_timeout_secs` (HTTP/1) or
//! `http2_idle_timeout_secs` (HTTP/2, no open stream).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::deadline::Deadline;

#[derive(Clone, Copy)]
struct State {
    in_flight: usize,
    idle_since: Instant,
}

/// The requests in flight on one connection.
///
/// A lock over two fields, and nothing to wake: requests begin and end
/// without telling anyone, and [`Activity::idle_for`] reads the state when
/// its timer fires. Every open connection has one, and every request passes
/// through it twice.
pub struct Activity {
    state: Mutex<State>,
}

impl Activity {
    /// A connection that has just been accepted: idle from now.
    pub fn new() -> Arc<Self> {
        Arc::new(Activity { state: Mutex::new(State { in_flight: 0, idle_since: Instant::now() }) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is two plain fields, whole after any panic.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A request has arrived; it is in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        // No wake-up: a waiter sleeping toward the idle deadline finds the
        // request when it wakes, and waits for the end instead.
        self.state().in_flight += 1;
        InFlight(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.state().in_flight
    }

    /// Since when the connection has had no request in flight (its start, or
    /// the end of its last request); meaningful while none is in flight.
    pub fn idle_since(&self) -> Instant {
        self.state().idle_since
    }

    /// Resolves once the connection has had no request in flight for `timeout`.
    ///
    /// One timer, re-armed when it fires early, instead of a wake-up at the
    /// end of every request: a busy connection costs it one timer expiry per
    /// `timeout`, and the deadline is still exact (the end of the last
    /// request plus `timeout`).
    pub async fn idle_for(&self, timeout: Duration) {
        let mut timer = Deadline::new(self.due(timeout));
        std::future::poll_fn(|cx| timer.poll_until(cx, || self.due(timeout))).await
    }

    /// When the connection becomes idle for `timeout` if nothing changes; a
    /// request in flight pushes that a whole `timeout` past now.
    fn due(&self, timeout: Duration) -> Instant {
        let state = *self.state();
        if state.in_flight > 0 { crate::clock::tokio_now() + timeout } else { state.idle_since + timeout }
    }
}

/// One request's place in [`Activity`].
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // Only the last request's end restarts the idle clock.
        let mut state = self.0.state();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = crate::clock::tokio_now();
        }
    }
}

/// A response body that keeps its request in flight until it is sent.
pub struct TrackedBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> TrackedBody<B> {
    /// `inner`, keeping `in_flight` until this body is dropped.
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        TrackedBody { inner, _in_flight: in_flight }
    }
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
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

    #[tokio::test]
    async fn idle_only_counts_time_without_requests() {
        let ms = Duration::from_millis;
        let activity = Activity::new();
        let request = activity.begin();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(ms(200)).await }
        });
        tokio::time::sleep(ms(400)).await;
        assert!(!idle.is_finished(), "idle while a request was in flight");
        drop(request);
        assert_eq!(activity.in_flight(), 0);
        tokio::time::sleep(ms(100)).await;
        assert!(!idle.is_finished(), "idle counted from before the request ended");
        tokio::time::timeout(ms(2000), idle).await.unwrap().unwrap();

        // A request that begins while the waiter sleeps holds the connection open.
        drop(activity.begin());
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(ms(200)).await }
        });
        tokio::time::sleep(ms(50)).await;
        let request = activity.begin();
        tokio::time::sleep(ms(400)).await;
        assert!(!idle.is_finished(), "idle while a request that began later was in flight");
        drop(request);
        tokio::time::timeout(ms(2000), idle).await.unwrap().unwrap();
    }
}
