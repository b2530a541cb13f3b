//! [`Lease`]: a worker checked out for one call, and the cancel ladder that runs when a call is
//! interrupted.

use std::sync::Arc;
use std::time::Instant;

use snakepit_core::RequestId;
use snakepit_supervisor::Member;

use super::{DropPolicy, Inner};

/// A worker checked out for one call. Dropping it returns the worker to the pool, or — when a
/// call was interrupted on it (deadline, dropped future) — cancels the call and keeps the worker
/// only if it answers within `cancel_grace` (or, detached, by the call's deadline), so a stuck or
/// half-answered worker never serves again.
pub(crate) struct Lease {
    worker: Arc<Member>,
    inner: Arc<Inner>,
    /// A call is running on the worker (counted in `busy`).
    in_call: bool,
    /// The running call's id and deadline (for cancel / detach).
    request: Option<(RequestId, Option<Instant>)>,
    /// The call's deadline passed (never detached: the worker is cancelled).
    timed_out: bool,
    /// The lease was never handed out: dropping it only gives the call slot back.
    undone: bool,
}

impl Lease {
    pub(crate) fn new(worker: Arc<Member>, inner: &Arc<Inner>) -> Self {
        worker.acquire();
        Lease { worker, inner: inner.clone(), in_call: false, request: None, timed_out: false, undone: false }
    }

    /// The leased worker.
    pub(crate) fn worker(&self) -> &Arc<Member> {
        &self.worker
    }

    /// Gives the call slot back without returning the worker to the queue (the caller it was
    /// sent to had gone; the check-in in progress decides what happens to the worker).
    pub(crate) fn undo(mut self) {
        self.undone = true;
    }

    /// A call starts on the worker: counted busy until it completes or is interrupted.
    pub(crate) fn begin(&mut self, id: RequestId, deadline: Option<Instant>) {
        if !self.in_call {
            self.inner.counters.call_started();
        }
        self.in_call = true;
        self.request = Some((id, deadline));
    }

    /// The call's deadline passed while the worker works on it.
    pub(crate) fn time_out(&mut self) {
        self.timed_out = true;
    }

    /// The worker answered: the call is over, counted for recycling.
    pub(crate) fn completed(&mut self) {
        if std::mem::take(&mut self.in_call) {
            self.inner.counters.call_done();
            self.worker.count_request();
        }
    }

    /// The worker is gone (crashed, broke the protocol): the call is over, nothing to cancel.
    pub(crate) fn lost(&mut self) {
        if std::mem::take(&mut self.in_call) {
            self.inner.counters.call_done();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let w = self.worker.clone();
        let inner = self.inner.clone();
        if self.undone {
            w.release();
            return;
        }
        if !self.in_call {
            w.release();
            inner.checkin(w);
            return;
        }
        // The call was interrupted (deadline or dropped future) while the worker works on it.
        let detach = !self.timed_out && inner.cfg.drop_policy == DropPolicy::Detach;
        let conn = w.connection().clone();
        let id = self.request.map(|(id, _)| id);
        // Queued in a pipelined worker behind another call (asked before the `cancel`, which
        // interrupts the call only if it runs).
        let queued = id.is_some_and(|id| conn.running(id).is_none());
        let deadline = self.request.and_then(|(_, d)| d);
        let grace = inner.cfg.cancel_grace;
        if !detach {
            if let Some(id) = id {
                w.cancel(id);
            }
        }
        let limit = if detach {
            self.request
                .and_then(|(_, d)| d)
                .map_or(inner.cfg.slot.drain_timeout, |d| d.saturating_duration_since(Instant::now()))
        } else {
            inner.cfg.cancel_grace
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait on: the safe choice is to kill.
            inner.counters.call_done();
            w.release();
            w.kill();
            return;
        };
        rt.spawn(async move {
            let answered = match id {
                Some(id) if queued && !detach => {
                    // The worker answers it without running it when it gets there: the grace
                    // counts from then, not while the calls ahead run. If the worker started
                    // it before reading the `cancel`, it is interrupted now that it runs.
                    conn.started(id).await;
                    w.interrupt(id);
                    tokio::time::timeout(limit, conn.answered(id)).await.is_ok()
                }
                Some(id) if queued => {
                    // Detached while queued: it runs when its turn comes, to its deadline (the
                    // calls ahead of it are other callers' and must not be killed for it). A
                    // deadline that passed meanwhile makes it a cancelled call.
                    conn.started(id).await;
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    match left {
                        Some(left) if left.is_zero() => {
                            w.cancel(id);
                            tokio::time::timeout(grace, conn.answered(id)).await.is_ok()
                        }
                        left => {
                            let left = left.unwrap_or(limit);
                            tokio::time::timeout(left, conn.answered(id)).await.is_ok()
                        }
                    }
                }
                Some(id) => tokio::time::timeout(limit, conn.answered(id)).await.is_ok(),
                None => tokio::time::timeout(limit, conn.idle()).await.is_ok(),
            } && w.is_alive();
            inner.counters.call_done();
            w.release();
            if answered {
                tracing::debug!(worker = %w.id(), detach, "interrupted call answered; worker kept");
                inner.checkin(w);
            } else {
                tracing::warn!(worker = %w.id(), ?limit, "interrupted call not answered in time; replacing the worker");
                w.kill();
            }
        });
    }
}
