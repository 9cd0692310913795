//! A deadline timer for deadlines that move later with traffic: the idle
//! and send timeouts of the I/O wrappers, which look at theirs on every read
//! that waits (several times per request), the park delay of a keep-alive
//! connection, and a connection's keep-alive idle close.
//!
//! A tokio `Sleep` costs a timer-wheel removal and insertion per `reset`,
//! and a waker registration per poll. Here the `Sleep` is re-armed only
//! when it fires before the current deadline (which is read only then) or
//! the deadline is brought forward, and it is polled only when it fired or
//! the task polling it changed. A deadline that keeps moving later (the end
//! of the last request plus a timeout) costs one timer expiry per timeout.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

/// A timer for a deadline that may move: re-armed only when it fires early
/// or the deadline is brought forward.
#[derive(Debug)]
pub struct Deadline {
    sleep: Pin<Box<Sleep>>,
    /// The waker `sleep` holds, while it holds one: polling it again with the
    /// same waker before it fires changes nothing.
    armed_for: Option<Waker>,
}

impl Deadline {
    /// A timer armed for `deadline`.
    pub fn new(deadline: Instant) -> Self {
        Deadline { sleep: Box::pin(tokio::time::sleep_until(deadline)), armed_for: None }
    }

    /// Re-arms the timer for `deadline` if it is armed for later: a
    /// deadline that moves earlier must be told here.
    pub fn bring_forward(&mut self, deadline: Instant) {
        if deadline < self.sleep.deadline() {
            self.sleep.as_mut().reset(deadline);
            // A timer that fired has given its waker away.
            self.armed_for = None;
        }
    }

    /// Ready once the deadline `current` gives has passed; until then, the
    /// task is woken at or before it. `current` is asked only when the timer
    /// fires, so it may only have moved later since the last call, or been
    /// told to [`Deadline::bring_forward`].
    pub fn poll_until(&mut self, cx: &mut Context<'_>, current: impl Fn() -> Instant) -> Poll<()> {
        loop {
            let same_task = self.armed_for.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if same_task && !self.sleep.is_elapsed() {
                return Poll::Pending;
            }
            // Outside the task's budget: a poll refused for budget would
            // leave the timer without this waker, yet be taken as armed.
            let mut sleep = tokio::task::unconstrained(self.sleep.as_mut());
            if Pin::new(&mut sleep).poll(cx).is_pending() {
                if !same_task {
                    self.armed_for = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            self.armed_for = None;
            let deadline = current();
            if self.sleep.deadline() >= deadline {
                return Poll::Ready(());
            }
            // Fired for an earlier deadline: wait on for the current one.
            self.sleep.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use super::*;

    fn at(ms: u64, start: Instant) -> Instant {
        start + Duration::from_millis(ms)
    }

    /// Waits at most 5 s for `until` to be ready: the timer must fire.
    async fn fired(until: impl Future<Output = ()>) {
        tokio::time::timeout(Duration::from_secs(5), until).await.expect("the timer never fired");
    }

    #[tokio::test]
    async fn fires_at_the_deadline_it_is_polled_with() {
        let start = Instant::now();
        let mut timer = Deadline::new(at(100, start));
        fired(poll_fn(|cx| timer.poll_until(cx, || at(100, start)))).await;
        assert!(Instant::now() >= at(100, start));
    }

    #[tokio::test]
    async fn a_later_deadline_is_waited_for_after_the_armed_one_fires() {
        let start = Instant::now();
        let mut timer = Deadline::new(at(100, start));
        // The deadline moves on while the timer is armed for 100 ms.
        fired(poll_fn(|cx| timer.poll_until(cx, || at(250, start)))).await;
        assert!(Instant::now() >= at(250, start));
    }

    #[tokio::test]
    async fn an_earlier_deadline_rearms_the_timer() {
        let start = Instant::now();
        let mut timer = Deadline::new(at(10_000, start));
        timer.bring_forward(at(30, start));
        fired(poll_fn(|cx| timer.poll_until(cx, || at(30, start)))).await;
        assert!(Instant::now() >= at(30, start));
    }

    #[tokio::test]
    async fn polled_again_after_firing_it_waits_for_the_next_deadline() {
        let start = Instant::now();
        let mut timer = Deadline::new(at(50, start));
        fired(poll_fn(|cx| timer.poll_until(cx, || at(50, start)))).await;
        fired(poll_fn(|cx| timer.poll_until(cx, || at(120, start)))).await;
        assert!(Instant::now() >= at(120, start));
    }
}
