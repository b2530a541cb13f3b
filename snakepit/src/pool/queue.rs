//! The bounded FIFO queue: idle workers, waiting calls, and strict session calls waiting for
//! their own worker.
//!
//! FIFO holds because check-in serves the oldest live waiter first: while any caller waits, no
//! worker is idle, so a newcomer never overtakes a waiter.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use snakepit_core::{Error, WorkerId};
use snakepit_supervisor::Member;
use tokio::sync::oneshot;

use super::lease::Lease;
use super::{Affinity, Inner};

/// The queue's state, behind one lock.
pub(crate) struct Queue {
    state: Mutex<State>,
}

struct State {
    /// Workers with room for another call.
    idle: Vec<Arc<Member>>,
    /// Calls waiting for any worker, oldest first.
    waiters: VecDeque<oneshot::Sender<Lease>>,
    /// Per slot: strict session calls waiting for that slot's worker (the one named).
    pinned: Vec<VecDeque<(WorkerId, oneshot::Sender<Lease>)>>,
    closed: bool,
}

/// A session call's wish to run on a given worker.
#[derive(Clone, Copy)]
pub(crate) struct Pin<'a> {
    pub(crate) session: &'a str,
    pub(crate) worker: WorkerId,
    pub(crate) mode: Affinity,
}

impl Queue {
    pub(crate) fn new(size: usize) -> Self {
        Queue {
            state: Mutex::new(State {
                idle: Vec::new(),
                waiters: VecDeque::new(),
                pinned: (0..size).map(|_| VecDeque::new()).collect(),
                closed: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The worker with the fewest calls, the most recently returned among equals (its caches are
/// warm): an idle worker before one with calls queued in its pipeline or running on its threads.
fn least_loaded(idle: &[Arc<Member>]) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, w) in idle.iter().enumerate().rev() {
        let load = w.leases();
        if load == 0 {
            return Some(i);
        }
        if best.map_or(true, |(_, b)| load < b) {
            best = Some((i, load));
        }
    }
    best.map(|(i, _)| i)
}

impl State {
    fn queued(&self) -> usize {
        self.waiters.len() + self.pinned.iter().map(VecDeque::len).sum::<usize>()
    }
}

impl Inner {
    /// Returns a worker to the pool: to the oldest live waiter, else to the idle stack.
    pub(crate) fn checkin(self: &Arc<Self>, worker: Arc<Member>) {
        let mut st = self.queue.lock();
        let pos = st.idle.iter().position(|w| Arc::ptr_eq(w, &worker));
        if !worker.is_alive() {
            if let Some(i) = pos {
                st.idle.remove(i);
            }
            return;
        }
        if st.closed {
            if pos.is_none() {
                st.idle.push(worker);
            }
            return;
        }
        let slot = worker.id().slot;
        // Hand free call slots to waiters: this worker's strict session calls first, then the
        // generic queue (oldest first).
        while worker.has_room() {
            let next = match st.pinned.get_mut(slot).and_then(|q| q.pop_front()) {
                Some((want, tx)) if want == worker.id() => tx,
                // Waiting for an earlier worker of this slot: it is gone (dropping `tx` tells
                // the caller its session lost its worker).
                Some(_) => continue,
                None => match st.waiters.pop_front() {
                    Some(tx) => tx,
                    None => break,
                },
            };
            if let Err(lease) = next.send(Lease::new(worker.clone(), self)) {
                // That caller gave up: undo the lease without running its drop.
                lease.undo();
            }
        }
        match (worker.has_room(), pos) {
            (true, None) => st.idle.push(worker),
            (false, Some(i)) => {
                st.idle.remove(i);
            }
            _ => {}
        }
        drop(st);
        self.counters.bump();
    }

    /// Fails the strict session calls waiting for `slot`'s worker (it is gone).
    pub(crate) fn fail_pinned(&self, slot: usize) {
        let waiters = self.queue.lock().pinned.get_mut(slot).map(std::mem::take);
        drop(waiters);
    }

    pub(crate) fn remove_idle(&self, id: WorkerId) {
        self.queue.lock().idle.retain(|w| w.id() != id);
    }

    /// Takes the worker out of the idle stack if it is there and holds no call.
    pub(crate) fn take_idle(&self, id: WorkerId) -> Option<Arc<Member>> {
        let mut st = self.queue.lock();
        let i = st.idle.iter().position(|w| w.id() == id && w.leases() == 0)?;
        Some(st.idle.remove(i))
    }

    /// Idle workers and queued calls (live ones).
    pub(crate) fn queue_lengths(&self) -> (usize, usize) {
        let st = self.queue.lock();
        let idle = st.idle.iter().filter(|w| w.is_alive()).count();
        let queued = st.waiters.iter().filter(|w| !w.is_closed()).count()
            + st.pinned.iter().flatten().filter(|(_, w)| !w.is_closed()).count();
        (idle, queued)
    }

    /// Refuses new calls and fails the queued ones (shutdown).
    pub(crate) fn close_queue(&self) {
        let waiters = {
            let mut st = self.queue.lock();
            st.closed = true;
            let pinned: Vec<_> = st.pinned.iter_mut().map(std::mem::take).collect();
            (std::mem::take(&mut st.waiters), pinned)
        };
        drop(waiters);
    }

    /// Makes room for `n` slots' strict session waiters; those of removed slots are failed
    /// (their callers get `SessionLost`).
    pub(crate) fn resize_pinned(&self, n: usize) {
        let dropped: Vec<_> = {
            let mut st = self.queue.lock();
            let gone = if st.pinned.len() > n { st.pinned.split_off(n) } else { Vec::new() };
            st.pinned.resize_with(n, VecDeque::new);
            gone
        };
        drop(dropped);
    }

    /// Empties the idle stack (shutdown), returning what was in it.
    pub(crate) fn drain_idle(&self) -> Vec<Arc<Member>> {
        std::mem::take(&mut self.queue.lock().idle)
    }

    /// Whether `id` is the live current worker of its slot.
    fn is_current(&self, id: WorkerId) -> bool {
        self.slots().get(id.slot).and_then(|s| s.current()).is_some_and(|m| m.id() == id && m.is_alive())
    }

    /// True when every slot is failing to start or has given up: calls fail fast.
    pub(crate) fn circuit_open(&self) -> bool {
        self.slots().iter().all(|s| s.state().is_failing())
    }

    /// Called when a slot enters a failing state: if the circuit is now open, fail the queue.
    pub(crate) fn check_circuit(&self) {
        let open = self.circuit_open();
        if self.circuit_was_open.swap(open, std::sync::atomic::Ordering::AcqRel) != open {
            let pool = &*self.metrics.pool;
            if open {
                tracing::error!(target: "snakepit::worker", event = "circuit_open", pool, "every worker is failing to start: calls fail fast with `unavailable`");
            } else {
                tracing::info!(target: "snakepit::worker", event = "circuit_closed", pool, "a worker started again: calls are served");
            }
        }
        if open {
            let waiters = std::mem::take(&mut self.queue.lock().waiters);
            if !waiters.is_empty() {
                tracing::error!(
                    queued = waiters.len(),
                    "every worker is failing to start; failing queued calls"
                );
            }
            drop(waiters);
        }
        self.counters.bump();
    }

    fn unavailable(&self) -> Error {
        let last = self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Error::Unavailable(format!(
            "all {} workers are failing to start (circuit open){}",
            self.size(),
            last.map(|e| format!("; last error: {e}")).unwrap_or_default()
        ))
    }

    /// Takes a worker for a call: an idle one (the session's, for a pinned call), else waits in
    /// the queue until `deadline` or the queue timeout, whichever comes first.
    pub(crate) async fn checkout(
        self: &Arc<Self>,
        command: &str,
        deadline: Option<Instant>,
        pin: Option<Pin<'_>>,
    ) -> Result<Lease, Error> {
        let strict = pin.as_ref().is_some_and(|p| p.mode != Affinity::Hint);
        let lost = |p: &Pin<'_>| Error::SessionLost { session: p.session.to_owned(), worker: p.worker };
        let rx = {
            let mut st = self.queue.lock();
            if st.closed {
                return Err(Error::ShuttingDown);
            }
            if let Some(p) = &pin {
                if let Some(i) = st.idle.iter().position(|w| w.id() == p.worker && w.is_alive()) {
                    let w = st.idle[i].clone();
                    let lease = Lease::new(w.clone(), self);
                    if !w.has_room() {
                        st.idle.remove(i);
                    }
                    return Ok(lease);
                }
                if strict {
                    drop(st);
                    if !self.is_current(p.worker) {
                        return Err(lost(p));
                    }
                    if p.mode == Affinity::StrictFailFast {
                        return Err(Error::WorkerBusy { session: p.session.to_owned(), worker: p.worker });
                    }
                    st = self.queue.lock();
                }
            }
            if !strict {
                // Only the chosen worker's liveness is checked; a dead one is dropped from the
                // stack as it is met, and the next best taken.
                while let Some(i) = least_loaded(&st.idle) {
                    let w = st.idle[i].clone();
                    if !w.is_alive() {
                        st.idle.remove(i);
                        continue;
                    }
                    let lease = Lease::new(w.clone(), self);
                    if !w.has_room() {
                        st.idle.remove(i);
                    }
                    return Ok(lease);
                }
            }
            if self.circuit_open() {
                drop(st);
                return Err(self.unavailable());
            }
            if st.queued() >= self.cfg.max_queue {
                st.waiters.retain(|tx| !tx.is_closed());
                for q in st.pinned.iter_mut() {
                    q.retain(|(_, tx)| !tx.is_closed());
                }
                if st.queued() >= self.cfg.max_queue {
                    return Err(Error::PoolSaturated { max_queue: self.cfg.max_queue });
                }
            }
            let (tx, rx) = oneshot::channel();
            match &pin {
                Some(p) if strict => match st.pinned.get_mut(p.worker.slot) {
                    Some(q) => q.push_back((p.worker, tx)),
                    None => return Err(lost(p)),
                },
                _ => st.waiters.push_back(tx),
            }
            rx
        };
        self.counters.bump();
        let start = Instant::now();
        let queue_deadline = start + self.cfg.queue_timeout;
        let (limit, is_call_deadline) = match deadline {
            Some(d) if d < queue_deadline => (d, true),
            _ => (queue_deadline, false),
        };
        let r = tokio::time::timeout_at(limit.into(), rx).await;
        // Only calls that found no free worker are samples (one served at once costs no
        // histogram record).
        self.metrics.queue_wait.record(start.elapsed().as_secs_f64());
        self.counters.waited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match r {
            Ok(Ok(lease)) => Ok(lease),
            Ok(Err(_)) if self.queue.lock().closed => Err(Error::ShuttingDown),
            Ok(Err(_)) => match pin {
                Some(p) if strict => Err(lost(&p)),
                _ => Err(self.unavailable()),
            },
            // Dropping `rx` withdraws the call: a worker sent meanwhile comes back via the
            // lease's drop, and the call is never run.
            Err(_) if is_call_deadline => {
                Err(Error::Timeout { command: command.into(), worker: None, after: start.elapsed() })
            }
            Err(_) => Err(Error::QueueTimeout { command: command.into(), waited: start.elapsed() }),
        }
    }
}
