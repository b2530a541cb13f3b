//! The pool's counters and [`PoolStats`], their snapshot; [`Pool::wait_stats`] waits on them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use snakepit_core::Error;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::{Inner, Pool};

/// A snapshot of the pool's state and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Configured number of workers.
    pub size: usize,
    /// Workers alive and ready (idle or busy).
    pub ready: usize,
    /// Workers idle right now.
    pub idle: usize,
    /// Calls running right now (with a thread profile, several per worker).
    pub busy: usize,
    /// Calls waiting for a worker.
    pub queued: usize,
    /// Workers that ended without being recycled or shut down — crashed, exited, or killed (by
    /// the OS, a missed heartbeat, an unanswered cancel) — since the pool started.
    pub crashes: u64,
    /// Workers restarted after such an end (counted once the replacement is ready).
    pub restarts: u64,
    /// Calls that returned a result (a stream: that ended without an error).
    pub calls_ok: u64,
    /// Calls that returned an error (a stream: that an error ended).
    pub calls_failed: u64,
    /// Calls that waited for a worker longer than the queue timeout (`queue_timeout` errors).
    pub queue_timeouts: u64,
    /// Calls refused because the queue was full (`pool_saturated` errors).
    pub saturated: u64,
    /// Failed calls by error [kind](snakepit_core::Error::kind) (they add up to
    /// `calls_failed`).
    pub errors: BTreeMap<&'static str, u64>,
    /// Workers replaced by recycling (request count, age or memory).
    pub recycled: u64,
    /// Workers killed for missing heartbeats.
    pub unresponsive: u64,
    /// Heartbeat pings answered.
    pub heartbeats: u64,
    /// Some slot crashed too often and stopped restarting for a while.
    pub degraded: bool,
    /// Every slot is failing to start: calls fail fast with `Unavailable`.
    pub circuit_open: bool,
}

/// The pool's counters, and the signals observers wait on.
pub(crate) struct Counters {
    pub(crate) crashes: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) recycled: AtomicU64,
    pub(crate) unresponsive: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) calls_ok: AtomicU64,
    pub(crate) calls_failed: AtomicU64,
    /// Failed calls by error kind.
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Calls that found no free worker and waited in the queue (the autoscaler's signal).
    pub(crate) waited: AtomicU64,
    /// Calls holding a worker right now.
    pub(crate) busy: AtomicUsize,
    /// Notified when `busy` drops to zero.
    pub(crate) all_idle: Notify,
    /// Bumped on every change observers may wait for (see [`Pool::wait_stats`]).
    pub(crate) changes: watch::Sender<u64>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            crashes: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            recycled: AtomicU64::new(0),
            unresponsive: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            calls_ok: AtomicU64::new(0),
            calls_failed: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            waited: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            all_idle: Notify::new(),
            changes: watch::channel(0).0,
        }
    }
}

impl Counters {
    /// Wakes stats observers; free when nobody observes.
    pub(crate) fn bump(&self) {
        if self.changes.receiver_count() > 0 {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Adds one to `counter` and wakes observers.
    pub(crate) fn add(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.bump();
    }

    /// A call took a worker.
    pub(crate) fn call_started(&self) {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.bump();
    }

    /// A call gave its worker back (or left it to be killed).
    pub(crate) fn call_done(&self) {
        if self.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_idle.notify_waiters();
        }
        self.bump();
    }

    /// A call (or stream) finished: counted once, as a success or a failure (by kind).
    pub(crate) fn finished(&self, outcome: Result<(), &Error>) {
        match outcome {
            Ok(()) => self.add(&self.calls_ok),
            Err(e) => {
                *self.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(e.kind()).or_default() += 1;
                self.add(&self.calls_failed);
            }
        }
    }
}

impl Inner {
    pub(crate) fn stats(&self) -> PoolStats {
        let c = &self.counters;
        let slots = self.slots();
        let ready = slots.iter().filter(|s| s.current().is_some_and(|w| w.is_alive())).count();
        let (idle, queued) = self.queue_lengths();
        let errors = c.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        PoolStats {
            size: slots.len(),
            ready,
            idle,
            busy: c.busy.load(Ordering::Relaxed),
            queued,
            crashes: c.crashes.load(Ordering::Relaxed),
            restarts: c.restarts.load(Ordering::Relaxed),
            recycled: c.recycled.load(Ordering::Relaxed),
            unresponsive: c.unresponsive.load(Ordering::Relaxed),
            heartbeats: c.heartbeats.load(Ordering::Relaxed),
            degraded: slots.iter().any(|s| s.state() == snakepit_supervisor::SlotState::Failed),
            circuit_open: self.circuit_open(),
            calls_ok: c.calls_ok.load(Ordering::Relaxed),
            calls_failed: c.calls_failed.load(Ordering::Relaxed),
            queue_timeouts: errors.get("queue_timeout").copied().unwrap_or(0),
            saturated: errors.get("pool_saturated").copied().unwrap_or(0),
            errors,
        }
    }
}

impl Pool {
    /// A snapshot of the pool's counters.
    pub fn stats(&self) -> PoolStats {
        self.inner.stats()
    }

    /// Waits until the pool's stats satisfy `cond`, re-checking on every change (checkout,
    /// check-in, queueing, call completion, crash, restart), for at most `timeout`. Returns the
    /// stats that satisfied it, or the last ones seen when the time ran out.
    pub async fn wait_stats(
        &self,
        mut cond: impl FnMut(&PoolStats) -> bool,
        timeout: Duration,
    ) -> Result<PoolStats, PoolStats> {
        let mut rx = self.inner.counters.changes.subscribe();
        let deadline = tokio::time::Instant::now().checked_add(timeout).unwrap_or_else(super::far_future);
        loop {
            rx.borrow_and_update();
            let stats = self.stats();
            if cond(&stats) {
                return Ok(stats);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(self.stats()),
            }
        }
    }
}
