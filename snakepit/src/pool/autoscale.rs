//! Optional autoscaling ([`PoolBuilder::autoscale`](crate::PoolBuilder::autoscale)): a task that
//! looks at the pool every `interval` and grows it when calls wait for a worker, shrinks it when
//! most workers sit idle, with hysteresis on both sides. Its decisions are `autoscaled` events
//! (target `snakepit::worker`) and `snakepit_autoscale_total{direction}`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;

use super::Inner;

/// Autoscaling between `min` and `max` workers (off unless set).
///
/// Every `interval` the pool is looked at. A look is *hot* when calls waited for a worker
/// since the last one (or wait now), *cold* when none did and fewer than `idle_below` of the
/// workers are busy. `up_after` hot looks in a row add `step` workers (up to `max`);
/// `down_after` cold looks in a row remove `step` (down to `min`; removed workers finish their
/// calls first, as with [`Pool::resize`](crate::Pool::resize)). Any change starts both counts
/// again, so a pool does not flap: with the defaults it grows within 2 s of queueing and
/// shrinks after 30 s of low use.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Autoscale {
    /// Fewest workers (at least 1).
    pub min: usize,
    /// Most workers.
    pub max: usize,
    /// How often the pool is looked at (default 1 s).
    pub interval: Duration,
    /// Hot looks in a row before growing (default 2).
    pub up_after: u32,
    /// Cold looks in a row before shrinking (default 30).
    pub down_after: u32,
    /// The busy fraction below which a look with no waiting is cold (default 0.5).
    pub idle_below: f64,
    /// Workers added or removed at once (default 1).
    pub step: usize,
}

impl Autoscale {
    /// Between `min` and `max` workers, with the default timing.
    pub fn new(min: usize, max: usize) -> Self {
        Autoscale {
            min,
            max,
            interval: Duration::from_secs(1),
            up_after: 2,
            down_after: 30,
            idle_below: 0.5,
            step: 1,
        }
    }

    /// Sets how often the pool is looked at.
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = d;
        self
    }

    /// Sets the hot looks in a row before growing and the cold ones before shrinking.
    pub fn after(mut self, up: u32, down: u32) -> Self {
        self.up_after = up;
        self.down_after = down;
        self
    }

    /// What is wrong with these settings, if anything.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.min == 0 || self.max < self.min {
            return Err(format!("autoscale needs 1 <= min <= max (got {}..{})", self.min, self.max));
        }
        if self.interval.is_zero() || self.up_after == 0 || self.down_after == 0 || self.step == 0 {
            return Err("autoscale interval, up_after, down_after and step must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.idle_below) {
            return Err(format!("autoscale idle_below must be between 0 and 1 (got {})", self.idle_below));
        }
        Ok(())
    }
}

/// Which way a look points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    Hot,
    Cold,
    Neither,
}

/// The autoscaler's task: runs until the pool shuts down or is gone.
pub(crate) async fn run(pool: Weak<Inner>, cfg: Autoscale, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let (mut hot, mut cold) = (0u32, 0u32);
    let mut waited_before = pool.upgrade().map_or(0, |p| p.counters.waited.load(Ordering::Relaxed));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let Some(inner) = pool.upgrade() else { return };
        let waited = inner.counters.waited.load(Ordering::Relaxed);
        let (_, queued) = inner.queue_lengths();
        let size = inner.size();
        let busy = inner.counters.busy.load(Ordering::Relaxed);
        let look = if waited > waited_before || queued > 0 {
            Look::Hot
        } else if (busy as f64) < cfg.idle_below * size as f64 {
            Look::Cold
        } else {
            Look::Neither
        };
        waited_before = waited;
        (hot, cold) = match look {
            Look::Hot => (hot + 1, 0),
            Look::Cold => (0, cold + 1),
            Look::Neither => (0, 0),
        };
        let target = if hot >= cfg.up_after && size < cfg.max {
            Some(((size + cfg.step).min(cfg.max), "up", "calls waited for a worker"))
        } else if cold >= cfg.down_after && size > cfg.min {
            Some((size.saturating_sub(cfg.step).max(cfg.min), "down", "workers mostly idle"))
        } else {
            None
        };
        let Some((to, direction, why)) = target else { continue };
        (hot, cold) = (0, 0);
        // A resize waits for a reload in progress; shutting down does not wait for it.
        let resized = tokio::select! {
            r = inner.resize(to) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match resized {
            Ok(()) => {
                inner.metrics.autoscaled(direction);
                tracing::info!(
                    target: "snakepit::worker",
                    event = "autoscaled",
                    pool = &*inner.metrics.pool,
                    from = size,
                    to,
                    direction,
                    "{why}: {size} -> {to} workers"
                );
            }
            Err(e) => tracing::warn!(pool = &*inner.metrics.pool, to, "autoscale: cannot resize: {e}"),
        }
    }
}

impl Inner {
    /// Starts the autoscaler, if one is configured.
    pub(crate) fn spawn_autoscaler(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let cfg = self.cfg.autoscale.clone()?;
        Some(tokio::spawn(run(Arc::downgrade(self), cfg, self.shutdown.subscribe())))
    }
}
