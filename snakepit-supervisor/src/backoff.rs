//! Restart delays: exponential with jitter, reset after a worker has been healthy for a while.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays between restarts of one slot: exponential from `min` to `max`, with jitter, starting
/// over once a worker has stayed up for `reset_after`.
#[derive(Debug)]
pub struct RestartBackoff {
    builder: ExponentialBuilder,
    current: backon::ExponentialBackoff,
    reset_after: Duration,
}

impl RestartBackoff {
    /// A backoff from `min` to `max` that resets after `reset_after` of healthy uptime.
    pub fn new(min: Duration, max: Duration, reset_after: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        RestartBackoff { current: builder.build(), builder, reset_after }
    }

    /// The delay before the next start of a slot whose last worker started at `started`
    /// (`None` when it never became ready).
    pub fn next_delay(&mut self, started: Option<Instant>) -> Duration {
        if started.is_some_and(|s| s.elapsed() >= self.reset_after) {
            self.current = self.builder.build();
        }
        // `without_max_times` makes the iterator endless; fall back to the cap anyway.
        self.current.next().unwrap_or(Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_resets() {
        let mut b =
            RestartBackoff::new(Duration::from_millis(10), Duration::from_millis(100), Duration::ZERO);
        let first = b.next_delay(None);
        assert!(first >= Duration::from_millis(10) && first <= Duration::from_millis(20), "{first:?}");
        let mut last = first;
        for _ in 0..10 {
            last = b.next_delay(None);
        }
        assert!(last <= Duration::from_millis(200), "{last:?}");
        assert!(last >= Duration::from_millis(100), "{last:?}");
        let reset = b.next_delay(Some(Instant::now()));
        assert!(reset <= Duration::from_millis(20), "{reset:?}");
    }
}
