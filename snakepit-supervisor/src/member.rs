//! [`Member`]: a worker as the occupant of a pool slot — the worker handle plus the
//! bookkeeping that lending and recycling need.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use snakepit_core::WorkerHandle;
use tokio::sync::Notify;

use crate::slot::SlotConfig;

/// A worker in a slot: its handle (through `Deref`), how many calls hold it, how many it has
/// served, and whether it is retiring.
///
/// The pool lends a member with [`acquire`](Member::acquire) / [`release`](Member::release) and
/// reports each answered call with [`count_request`](Member::count_request); the slot's task
/// recycles it when a limit is reached and waits for its leases to drain before stopping it.
pub struct Member {
    worker: Box<dyn WorkerHandle>,
    served: AtomicU64,
    request_limit: u64,
    retiring: AtomicBool,
    /// Calls running on the worker (its leases).
    leases: AtomicUsize,
    /// How many calls it may hold at once: run at once (thread profile), or run one at a
    /// time with the others queued in its pipeline (process profile, pipelined); else 1.
    capacity: usize,
    /// Notified when a lease or a session call ends.
    released: Notify,
    session_calls: AtomicUsize,
    /// Notified when the worker reaches its request limit.
    pub(crate) recycle_due: Notify,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("worker", &self.worker.id())
            .field("leases", &self.leases())
            .field("capacity", &self.capacity)
            .field("retiring", &self.is_retiring())
            .finish_non_exhaustive()
    }
}

impl Deref for Member {
    type Target = dyn WorkerHandle;
    fn deref(&self) -> &Self::Target {
        &*self.worker
    }
}

/// `base` shortened by a random fraction of up to `jitter`.
pub(crate) fn jittered(base: f64, jitter: f64) -> f64 {
    base * (1.0 - jitter * fastrand::f64())
}

impl Member {
    /// Wraps a started worker with the slot's limits: it holds at most
    /// `min(cfg.max_in_flight, ready.max_in_flight)` calls at once, or `ready.pipeline_depth`
    /// when it pipelines (the host offered no more than `cfg.pipeline_depth`), and is due for
    /// recycling after about `cfg.max_requests` calls (minus jitter).
    pub fn new(worker: Box<dyn WorkerHandle>, cfg: &SlotConfig) -> Self {
        let ready = worker.ready();
        let capacity = if ready.pipeline_depth > 1 {
            ready.pipeline_depth.min(cfg.pipeline_depth)
        } else {
            ready.max_in_flight.min(cfg.max_in_flight)
        }
        .max(1);
        let request_limit = cfg
            .max_requests
            .map_or(u64::MAX, |n| (jittered(n as f64, cfg.recycle_jitter).round() as u64).max(1));
        Member {
            worker,
            served: AtomicU64::new(0),
            request_limit,
            retiring: AtomicBool::new(false),
            leases: AtomicUsize::new(0),
            capacity,
            released: Notify::new(),
            session_calls: AtomicUsize::new(0),
            recycle_due: Notify::new(),
        }
    }

    /// Whether the worker can serve: not retiring, not exited, connection open.
    pub fn is_alive(&self) -> bool {
        !self.is_retiring() && self.exit_info().is_none() && !self.connection().is_closed()
    }

    /// Whether the worker is being recycled (it serves no new calls).
    pub fn is_retiring(&self) -> bool {
        self.retiring.load(Ordering::Acquire)
    }

    pub(crate) fn set_retiring(&self) {
        self.retiring.store(true, Ordering::Release);
    }

    /// Takes one of the worker's call slots; returns the number now in use.
    pub fn acquire(&self) -> usize {
        self.leases.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Gives back a call slot.
    pub fn release(&self) {
        self.leases.fetch_sub(1, Ordering::AcqRel);
        self.released.notify_waiters();
    }

    /// Calls holding the worker.
    pub fn leases(&self) -> usize {
        self.leases.load(Ordering::Acquire)
    }

    /// How many calls the worker runs at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the worker can take another call.
    pub fn has_room(&self) -> bool {
        self.leases() < self.capacity
    }

    /// Calls the worker has answered.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Counts one answered call; at the request limit, the slot recycles the worker.
    pub fn count_request(&self) {
        if self.served.fetch_add(1, Ordering::Relaxed) + 1 == self.request_limit {
            self.recycle_due.notify_one();
        }
    }

    /// Marks a session call in flight until the guard drops: recycling waits for it, so a
    /// session does not lose its worker in the middle of a call.
    pub fn session_call(self: &Arc<Self>) -> SessionCall {
        self.session_calls.fetch_add(1, Ordering::AcqRel);
        SessionCall(self.clone())
    }

    /// Waits (at most `limit`) until no session call is in flight on the worker.
    pub(crate) async fn sessions_quiet(&self, limit: Duration) {
        self.wait_until(limit, || self.session_calls.load(Ordering::Acquire) == 0).await;
    }

    /// Waits until no call holds the worker, for at most `limit`. Returns whether it drained.
    pub(crate) async fn drained(&self, limit: Duration) -> bool {
        self.wait_until(limit, || self.leases() == 0).await
    }

    async fn wait_until(&self, limit: Duration, done: impl Fn() -> bool) -> bool {
        // A limit past what an `Instant` holds means no limit (a year is as good).
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(limit).unwrap_or(now + Duration::from_secs(365 * 86_400));
        loop {
            let released = self.released.notified();
            if done() {
                return true;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return done();
            }
        }
    }
}

/// A session call in flight on a member (see [`Member::session_call`]).
#[derive(Debug)]
pub struct SessionCall(Arc<Member>);

impl Drop for SessionCall {
    fn drop(&mut self) {
        if self.0.session_calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.released.notify_waiters();
        }
    }
}
