//! Worker lifecycle inside the pool: one supervising task per slot that restarts crashed
//! workers with backoff and an intensity limit, pings idle workers, and recycles workers by
//! request count or age (drain-then-replace).

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snakepit_core::{ExitInfo, WorkerId};
use snakepit_supervisor::{RestartBackoff, Worker};
use tokio::sync::{watch, Notify};

use crate::pool::{Config, Inner, Slot};

/// What a pool slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum SlotState {
    /// Its worker is being started (first start or after a clean exit).
    Starting = 0,
    /// Its worker is ready (idle or busy).
    Ready = 1,
    /// Its worker died; it waits before restarting.
    Backoff = 2,
    /// Its last start attempt failed; it keeps retrying with backoff.
    Failing = 3,
    /// It crashed more than `max_restarts` times in `restart_window` and pauses for a window.
    Failed = 4,
    /// The pool is shutting down.
    Stopped = 5,
}

impl SlotState {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            0 => SlotState::Starting,
            1 => SlotState::Ready,
            2 => SlotState::Backoff,
            3 => SlotState::Failing,
            4 => SlotState::Failed,
            _ => SlotState::Stopped,
        }
    }
}

/// A worker as a member of the pool: the process plus its recycling bookkeeping.
pub(crate) struct Member {
    worker: Worker,
    served: AtomicU64,
    request_limit: u64,
    retiring: AtomicBool,
    /// Calls running on the worker (its leases).
    leases: std::sync::atomic::AtomicUsize,
    /// How many calls it may run at once (1 = process profile).
    capacity: usize,
    released: Notify,
    session_calls: std::sync::atomic::AtomicUsize,
}

/// Counts a session call in flight on a member (for deferred recycling).
pub(crate) struct SessionCall(Arc<Member>);

impl Drop for SessionCall {
    fn drop(&mut self) {
        if self.0.session_calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.released.notify_waiters();
        }
    }
}

impl Deref for Member {
    type Target = Worker;
    fn deref(&self) -> &Worker {
        &self.worker
    }
}

/// `base` shortened by a random fraction of up to `jitter`.
fn jittered(base: f64, jitter: f64) -> f64 {
    base * (1.0 - jitter * fastrand::f64())
}

impl Member {
    pub(crate) fn new(worker: Worker, cfg: &Config) -> Self {
        let capacity = worker.ready().max_in_flight.min(cfg.max_in_flight).max(1);
        let request_limit = cfg
            .max_requests
            .map_or(u64::MAX, |n| (jittered(n as f64, cfg.recycle_jitter).round() as u64).max(1));
        Member {
            worker,
            served: AtomicU64::new(0),
            request_limit,
            retiring: AtomicBool::new(false),
            leases: std::sync::atomic::AtomicUsize::new(0),
            capacity,
            released: Notify::new(),
            session_calls: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Marks a session call in flight until the guard drops.
    pub(crate) fn session_call(self: &Arc<Self>) -> SessionCall {
        self.session_calls.fetch_add(1, Ordering::AcqRel);
        SessionCall(self.clone())
    }

    /// Waits (at most `limit`) until no session call is in flight on the worker.
    async fn sessions_quiet(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let released = self.released.notified();
            if self.session_calls.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn is_retiring(&self) -> bool {
        self.retiring.load(Ordering::Acquire)
    }

    /// Takes one of the worker's call slots; returns the number now in use.
    pub(crate) fn acquire(&self) -> usize {
        self.leases.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Gives back a call slot.
    pub(crate) fn release(&self) {
        self.leases.fetch_sub(1, Ordering::AcqRel);
        self.released.notify_waiters();
    }

    /// Calls running on the worker.
    pub(crate) fn leases(&self) -> usize {
        self.leases.load(Ordering::Acquire)
    }

    /// Whether the worker can take another call.
    pub(crate) fn has_room(&self) -> bool {
        self.leases() < self.capacity
    }

    /// Counts one answered call; asks the slot to recycle the worker at its limit.
    pub(crate) fn count_request(&self, slot: &Slot) {
        if self.served.fetch_add(1, Ordering::Relaxed) + 1 == self.request_limit {
            slot.recycle.notify_one();
        }
    }

    /// Waits until no call holds the worker, for at most `limit`. Returns whether it drained.
    async fn drained(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let released = self.released.notified();
            if self.leases() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return false;
            }
        }
    }
}

/// Resolves once the pool is shutting down (holds no guard across awaits).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

enum Event {
    Exited(ExitInfo),
    Recycle(&'static str),
    Shutdown,
}

impl Inner {
    fn set_state(&self, slot: usize, s: SlotState) {
        self.slots[slot].state.store(s as u8, Ordering::Release);
        if matches!(s, SlotState::Failing | SlotState::Failed) {
            self.check_circuit();
        } else {
            self.bump();
        }
    }

    /// Publishes a ready worker in its slot and offers it to the queue.
    fn publish(self: &Arc<Self>, slot: usize, m: &Arc<Member>) {
        self.slots[slot].publish(m);
        self.register(m);
        self.set_state(slot, SlotState::Ready);
        self.checkin(m.clone());
    }
}

/// Serves with `member` until it dies, is due for recycling, or the pool shuts down; pings it
/// while idle.
async fn serve(
    inner: &Arc<Inner>,
    slot: usize,
    member: &Arc<Member>,
    shutdown: &mut watch::Receiver<bool>,
) -> Event {
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let age_due = inner.cfg.max_age.map_or(far, |age| {
        let age = Duration::from_secs_f64(jittered(age.as_secs_f64(), inner.cfg.recycle_jitter));
        tokio::time::Instant::from_std(member.started() + age)
    });
    let hb = inner.cfg.heartbeat;
    let mut ticker = tokio::time::interval(hb.map_or(Duration::from_secs(3600), |h| h.interval));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate
    let mut missed = 0u32;
    let mut hb_on = hb.is_some();
    let mem_limit = inner.cfg.max_memory.map(|b| jittered(b as f64, inner.cfg.recycle_jitter) as u64);
    let mut mem_ticker = tokio::time::interval(inner.cfg.memory_check);
    mem_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    mem_ticker.tick().await;
    loop {
        tokio::select! {
            e = member.exited() => return Event::Exited(e),
            _ = stopped(shutdown) => return Event::Shutdown,
            _ = tokio::time::sleep_until(age_due) => return Event::Recycle("age"),
            _ = inner.slots[slot].recycle.notified() => return Event::Recycle("request count"),
            _ = mem_ticker.tick(), if mem_limit.is_some() => {
                let limit = mem_limit.unwrap_or(u64::MAX);
                if let Some(rss) = snakepit_supervisor::tree_rss(member.pid()) {
                    if rss > limit {
                        tracing::info!(worker = %member.id(), rss, limit, "over its memory limit");
                        return Event::Recycle("memory");
                    }
                }
            }
            _ = ticker.tick(), if hb_on => {
                let Some(hb) = hb else { continue };
                // Only idle workers are pinged; a worker that already missed one stays out of
                // the idle stack until it answers again.
                if missed == 0 && inner.take_idle(member.id()).is_none() {
                    continue;
                }
                #[cfg(feature = "chaos")]
                let dropped = inner.cfg.chaos.as_ref().is_some_and(|c| c.take_heartbeat_drop());
                #[cfg(not(feature = "chaos"))]
                let dropped = false;
                let pong = async {
                    if dropped {
                        Err(snakepit_core::Error::Unavailable("heartbeat dropped by chaos".into()))
                    } else {
                        member.connection().ping().await
                    }
                };
                match tokio::time::timeout(hb.timeout, pong).await {
                    Ok(Ok(_)) => {
                        missed = 0;
                        inner.checkin(member.clone());
                    }
                    _ => {
                        missed += 1;
                        tracing::warn!(worker = %member.id(), missed, "missed a heartbeat");
                        if missed >= hb.max_missed {
                            tracing::error!(worker = %member.id(), "unresponsive; killing and replacing it");
                            inner.unresponsive.fetch_add(1, Ordering::Relaxed);
                            hb_on = false;
                            member.kill();
                        }
                    }
                }
            }
        }
    }
}

/// Starts a worker for `slot`, retrying with backoff until it is ready or the pool stops.
async fn start_with_retry(
    inner: &Arc<Inner>,
    slot: usize,
    generation: &mut u64,
    backoff: &mut RestartBackoff,
    mut last_started: Option<Instant>,
    shutdown: &mut watch::Receiver<bool>,
    mut first_delay: bool,
) -> Option<Arc<Member>> {
    loop {
        if first_delay {
            let delay = backoff.next_delay(last_started.take());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(shutdown) => return None,
            }
        }
        first_delay = true;
        let id = WorkerId { slot, generation: *generation };
        *generation += 1;
        let attempt = tokio::select! {
            r = inner.start(id) => r,
            _ = stopped(shutdown) => return None,
        };
        match attempt {
            Ok(m) => return Some(m),
            Err(e) => {
                tracing::error!(%id, "start failed: {e}");
                *inner.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                inner.set_state(slot, SlotState::Failing);
            }
        }
    }
}

/// Lets `old` finish its in-flight call, then stops it gracefully.
async fn retire(inner: Arc<Inner>, old: Arc<Member>, drain: Duration, grace: Duration) {
    if !old.drained(drain).await {
        tracing::warn!(worker = %old.id(), "still busy after the drain timeout; stopping it anyway");
    }
    old.shutdown(grace).await;
    inner.unregister(&old);
}

/// Supervises one slot for the pool's lifetime.
pub(crate) async fn run_slot(inner: Arc<Inner>, slot: usize, first: Arc<Member>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut backoff =
        RestartBackoff::new(inner.cfg.restart_min, inner.cfg.restart_max, Duration::from_secs(30));
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    let mut member = first;
    let mut generation = member.id().generation + 1;
    loop {
        match serve(&inner, slot, &member, &mut shutdown).await {
            Event::Shutdown => {
                inner.slots[slot].state.store(SlotState::Stopped as u8, Ordering::Release);
                return;
            }
            Event::Recycle(why) => {
                // A worker serving a session call keeps it to the end before it is recycled
                // (bounded by the drain timeout): its pinned sessions lose it only afterwards.
                member.sessions_quiet(inner.cfg.drain_timeout).await;
                tracing::info!(worker = %member.id(), "recycling ({why}); starting its replacement first");
                let Some(next) =
                    start_with_retry(&inner, slot, &mut generation, &mut backoff, None, &mut shutdown, false)
                        .await
                else {
                    return;
                };
                // The replacement is ready: only now does the old worker leave the pool.
                member.retiring.store(true, Ordering::Release);
                inner.remove_idle(member.id());
                inner.fail_pinned(slot);
                inner.publish(slot, &next);
                inner.recycled.fetch_add(1, Ordering::Relaxed);
                let old = std::mem::replace(&mut member, next);
                tokio::spawn(retire(inner.clone(), old, inner.cfg.drain_timeout, inner.cfg.shutdown_grace));
            }
            Event::Exited(exit) => {
                inner.remove_idle(member.id());
                inner.fail_pinned(slot);
                inner.unregister(&member);
                if *shutdown.borrow() {
                    return;
                }
                let now = Instant::now();
                crashes.push_back(now);
                while crashes.front().is_some_and(|t| now.duration_since(*t) > inner.cfg.restart_window) {
                    crashes.pop_front();
                }
                if crashes.len() > inner.cfg.max_restarts {
                    tracing::error!(
                        slot,
                        crashes = crashes.len(),
                        window = ?inner.cfg.restart_window,
                        "worker keeps crashing; slot paused for one restart window (pool degraded)"
                    );
                    inner.set_state(slot, SlotState::Failed);
                    tokio::select! {
                        _ = tokio::time::sleep(inner.cfg.restart_window) => {}
                        _ = stopped(&mut shutdown) => return,
                    }
                    crashes.clear();
                } else {
                    tracing::warn!(worker = %member.id(), "worker exited ({exit}); restarting");
                    inner.set_state(slot, SlotState::Backoff);
                }
                let started = Some(member.started());
                let Some(next) = start_with_retry(
                    &inner,
                    slot,
                    &mut generation,
                    &mut backoff,
                    started,
                    &mut shutdown,
                    true,
                )
                .await
                else {
                    return;
                };
                inner.restarts.fetch_add(1, Ordering::Relaxed);
                member = next;
                inner.publish(slot, &member);
            }
        }
    }
}
