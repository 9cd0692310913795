//! How busy the event loop's current turn is: the tasks it has polled since
//! it last went to sleep.
//!
//! A request's task can write to its backend as soon as the request is
//! ready. When the loop has nothing else to do, that is the fastest way.
//! When it is serving a burst, writing each request at once wakes the
//! backend once per request, and on loopback the proxy pays for that wake-up
//! in its own system call. Holding the write until the turn's other ready
//! tasks have run sends the burst together, as hyper's client did by
//! running each backend connection as a task of its own. bench/RESULTS.md
//! has the measurements.

use std::cell::Cell;

thread_local! {
    static POLLS: Cell<u32> = const { Cell::new(0) };
}

/// Counts a task poll on this thread; called by [`crate::clock::PollClock`].
pub fn polled() {
    POLLS.with(|polls| polls.set(polls.get().saturating_add(1)));
}

/// Ends the turn: the loop is about to sleep. The event loops' runtimes call
/// it from `on_thread_park`.
pub fn slept() {
    POLLS.with(|polls| polls.set(0));
}

/// Lets the turn's other ready tasks run first when there are likely some:
/// when this turn has already polled a task before this one.
pub async fn after_others() {
    if POLLS.with(Cell::get) > 1 {
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    #[test]
    fn a_task_alone_in_its_turn_goes_on_and_one_in_a_busy_turn_yields() {
        let mut cx = Context::from_waker(Waker::noop());
        slept();
        polled();
        assert!(pin!(after_others()).poll(&mut cx).is_ready(), "alone in the turn");
        polled();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let mut yielded = pin!(after_others());
            let pending = std::future::poll_fn(|cx| Poll::Ready(yielded.as_mut().poll(cx).is_pending())).await;
            assert!(pending, "a busy turn yields");
        });
        slept();
        polled();
        assert!(pin!(after_others()).poll(&mut cx).is_ready(), "a new turn after sleeping");
    }
}
