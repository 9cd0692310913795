//! A side future of a `select!` that is polled only when it asked to be.
//!
//! A connection's task is polled several times per request, and each poll
//! of its `select!` polled every branch: the shutdown token (a lock in
//! tokio's `Notify`) and the keep-alive timer, although neither had fired.
//! Wrapped in a [`WakeGate`], such a branch gets a waker of its own; the
//! gate polls it only after that waker fired, and otherwise answers
//! `Pending` at the cost of one atomic swap.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

/// `inner`, polled on its first poll and then only once its waker fired.
pub struct WakeGate<F> {
    inner: Pin<Box<F>>,
    signal: Arc<Signal>,
    /// The waker `inner` is polled with: built once, so that a future which
    /// keeps the waker it was given (`will_wake`) need not replace it.
    waker: Waker,
    polled: bool,
}

/// What the gate's own waker records: that it fired, and the task to wake.
struct Signal {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WakeGate<F> {
    /// Gates `inner`. Boxed, so that the gate is `Unpin` whatever `inner` is.
    pub fn new(inner: F) -> Self {
        let signal = Arc::new(Signal { fired: AtomicBool::new(false), task: AtomicWaker::new() });
        let waker = Waker::from(signal.clone());
        WakeGate { inner: Box::pin(inner), signal, waker, polled: false }
    }
}

impl<F: Future> Future for WakeGate<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a wake-up in between is then
        // either seen in the flag or delivered to this task.
        this.signal.task.register(cx.waker());
        if this.polled && !this.signal.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.polled = true;
        this.inner.as_mut().poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// Counts its polls, and is ready on its `ready_on`th.
    struct Counted<'a> {
        polls: &'a AtomicUsize,
        ready_on: usize,
        wake_each_poll: bool,
    }

    impl Future for Counted<'_> {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let n = self.polls.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= self.ready_on {
                return Poll::Ready(());
            }
            if self.wake_each_poll {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    }

    fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        Pin::new(future).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn inner_is_polled_only_after_its_waker_fired() {
        let polls = AtomicUsize::new(0);
        let mut gate = WakeGate::new(Counted { polls: &polls, ready_on: 3, wake_each_poll: false });
        assert!(poll_once(&mut gate).is_pending());
        assert!(poll_once(&mut gate).is_pending());
        assert!(poll_once(&mut gate).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled although nothing woke it");

        gate.waker.wake_by_ref();
        assert!(poll_once(&mut gate).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        assert!(poll_once(&mut gate).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2, "one wake-up, one poll");

        gate.waker.wake_by_ref();
        assert!(poll_once(&mut gate).is_ready());
    }

    #[test]
    fn a_wake_during_its_poll_is_not_lost() {
        let polls = AtomicUsize::new(0);
        let mut gate = WakeGate::new(Counted { polls: &polls, ready_on: 3, wake_each_poll: true });
        assert!(poll_once(&mut gate).is_pending());
        assert!(poll_once(&mut gate).is_pending());
        assert!(poll_once(&mut gate).is_ready());
    }

    #[tokio::test]
    async fn a_gated_timer_and_token_still_fire() {
        let token = tokio_util::sync::CancellationToken::new();
        let cancelled = WakeGate::new(token.clone().cancelled_owned());
        let timer = WakeGate::new(tokio::time::sleep(Duration::from_millis(50)));
        tokio::spawn({
            let token = token.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                token.cancel();
            }
        });
        let first = tokio::select! {
            _ = cancelled => "token",
            _ = timer => "timer",
        };
        assert_eq!(first, "timer");
        let cancelled = WakeGate::new(token.clone().cancelled_owned());
        tokio::time::timeout(Duration::from_secs(5), cancelled).await.expect("the gated token fired");
    }
}
