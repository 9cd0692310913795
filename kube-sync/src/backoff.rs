//! Exponential backoff with jitter, for retrying Redis and relists without
//! every replica retrying in lockstep.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `initial` up to `max`, each scaled by a random
/// factor in [0.5, 1.0).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, current: initial }
    }

    /// The next delay to wait.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        base.mul_f64(rand::rng().random_range(0.5..1.0))
    }

    /// Back to the initial delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] < Duration::from_millis(100));
        assert!(delays[7] >= Duration::from_millis(500) && delays[7] < Duration::from_secs(1));
        backoff.reset();
        assert!(backoff.next_delay() < Duration::from_millis(100));
    }
}
