//! The time, read once per poll of a connection's task.
//!
//! A proxied request read the clock about eighteen times: activity stamps on
//! each read and write, its start, its backend's answer, the idle pool, the
//! rate limiter, the keep-alive bookkeeping. Each read is a vDSO call, slow under
//! a hypervisor. The reads made within one poll of a task are microseconds
//! apart, far below any timeout or any time the logs and metrics show, so the
//! time read when the poll began serves them all, as nginx reads its clock
//! once per turn of its event loop.
//!
//! [`PollClock`] wraps a task's future; within each of its polls, [`now`]
//! reads the clock at its first call and returns that time from then on (a
//! poll that never asks reads nothing). Outside a poll it reads the clock
//! every time. [`PollClockExecutor`] wraps the tasks hyper spawns for HTTP/2
//! streams. Time never goes backwards on a thread: each poll reads afresh, and
//! a poll nested in another (rare) reads afresh too and gives the outer one
//! its own time back when it ends.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// Where this thread is, for [`now`].
#[derive(Clone, Copy)]
enum PollTime {
    /// In no [`PollClock`] poll.
    Outside,
    /// In a poll that has not asked for the time yet.
    Unread,
    /// In a poll that read the clock at this time.
    Read(Instant),
}

thread_local! {
    static POLL_TIME: Cell<PollTime> = const { Cell::new(PollTime::Outside) };
}

/// The time: inside a [`PollClock`] poll, the clock as read at the poll's
/// first call; the clock itself outside one.
pub fn now() -> Instant {
    POLL_TIME.with(|time| match time.get() {
        PollTime::Outside => Instant::now(),
        PollTime::Unread => {
            let now = Instant::now();
            time.set(PollTime::Read(now));
            now
        }
        PollTime::Read(now) => now,
    })
}

/// [`now`] as a tokio timer instant.
pub fn tokio_now() -> tokio::time::Instant {
    tokio::time::Instant::from_std(now())
}

pin_project_lite::pin_project! {
    /// A future whose polls each read the time at most once, for [`now`].
    pub struct PollClock<F> {
        #[pin]
        inner: F,
    }
}

impl<F> PollClock<F> {
    /// Wraps a task's future.
    pub fn new(inner: F) -> Self {
        PollClock { inner }
    }
}

impl<F: Future> Future for PollClock<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Put back on drop: a poll that panics (the runtime catches it) must
        // not leave the thread reading a time that no longer moves.
        struct Restore(PollTime);
        impl Drop for Restore {
            fn drop(&mut self) {
                POLL_TIME.with(|time| time.set(self.0));
            }
        }
        let _restore = Restore(POLL_TIME.with(|time| time.replace(PollTime::Unread)));
        crate::loop_turn::polled();
        self.project().inner.poll(cx)
    }
}

/// hyper's executor for HTTP/2 streams: each stream's task reads the time
/// once per poll, as a connection's does.
#[derive(Debug, Clone, Copy)]
pub struct PollClockExecutor;

impl<F> hyper::rt::Executor<F> for PollClockExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(PollClock::new(future));
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use super::*;

    #[test]
    fn outside_a_poll_the_clock_moves() {
        let first = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() >= first + Duration::from_millis(2));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn within_a_poll_the_time_holds_and_the_next_poll_reads_again() {
        let mut seen = Vec::new();
        let mut polls = 0;
        PollClock::new(poll_fn(|cx| {
            let first = now();
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(now(), first, "one time per poll");
            seen.push(first);
            polls += 1;
            if polls < 2 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        }))
        .await;
        assert!(seen[1] >= seen[0] + Duration::from_millis(2), "{seen:?}");
        // After the poll the clock is read again.
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() >= seen[1] + Duration::from_millis(2));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_nested_poll_reads_afresh_and_gives_the_outer_time_back() {
        PollClock::new(async {
            let outer = now();
            std::thread::sleep(Duration::from_millis(2));
            let inner = PollClock::new(async { now() }).await;
            assert!(inner >= outer + Duration::from_millis(2));
            assert_eq!(now(), outer);
        })
        .await;
    }

    #[test]
    fn a_poll_that_panics_leaves_the_clock_moving() {
        let panicked = std::panic::catch_unwind(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(PollClock::new(async { panic!("in the poll") }))
        });
        assert!(panicked.is_err());
        let first = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() >= first + Duration::from_millis(2), "the poll's time was left behind");
    }
}
