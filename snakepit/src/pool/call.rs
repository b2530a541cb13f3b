//! The call path. Every call — plain or streamed — goes through the same front half:
//! [`Inner::admit`] (known command, the adapter's validation, quarantine, deadline), then
//! [`Inner::acquire`] (session routing, checkout, rehydration), and is counted once by
//! [`Inner::finish`]. This file also holds the plain call's back half.

use std::sync::Arc;
use std::time::{Duration, Instant};

use snakepit_core::{Error, ExitInfo, Payload, Request};
use snakepit_supervisor::{Member, SessionCall};

use super::lease::Lease;
use super::metrics::CommandMetrics;
use super::queue::Pin;
use super::{CallOptions, Inner, Pool};

/// A call that passed admission: the command's shared name, its deadline, its identity for
/// quarantine, and where it is reported (its metric handles and its span).
pub(crate) struct Admission {
    pub(crate) name: Arc<str>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) started: Instant,
    /// The request's key, when quarantine is on.
    pub(crate) poison: Option<u64>,
    pub(crate) metrics: Arc<CommandMetrics>,
    /// `snakepit.call`: the call's span (disabled, and free, without a subscriber).
    pub(crate) span: tracing::Span,
}

impl Admission {
    /// Reports the call's end once: counters, metrics, span and the `call ended` event.
    pub(crate) fn end(&self, inner: &Inner, outcome: Result<(), &Error>) {
        let took = now().saturating_duration_since(self.started);
        inner.finish(&self.metrics, Some(took), self.poison, outcome);
        let kind = outcome.err().map_or("ok", Error::kind);
        self.span.record("outcome", kind);
        tracing::debug!(parent: &self.span, outcome = kind, duration_us = took.as_micros() as u64, "call ended");
    }
}

/// A checked-out call: its lease (the worker) and, for a session call, the guard that defers
/// the worker's recycling until the call ends.
pub(crate) struct Acquired {
    pub(crate) lease: Lease,
    pub(crate) session_call: Option<SessionCall>,
    /// The session's record already names this worker (of this front end): nothing to record
    /// after the call (a store round trip saved per session call).
    pub(crate) pinned_here: bool,
}

/// Awaits a future inside a span, wrapping it only when the span is enabled: the wrapper moves
/// the future (a copy of its whole state per call), which a pool without a subscriber should
/// not pay for.
macro_rules! in_span {
    ($span:expr, $fut:expr) => {{
        let span: &tracing::Span = $span;
        if span.is_disabled() {
            $fut.await
        } else {
            tracing::Instrument::instrument($fut, span.clone()).await
        }
    }};
}
pub(crate) use in_span;

/// A session-store operation within the call's deadline: a slow shared store fails the call
/// with `Timeout` at its deadline, as any other step would.
pub(crate) async fn within<T>(
    adm: &Admission,
    op: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match adm.deadline {
        Some(d) => match tokio::time::timeout_at(d.into(), op).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                command: adm.name.to_string(),
                worker: None,
                after: d.saturating_duration_since(adm.started),
            }),
        },
        None => op.await,
    }
}

/// Now, on the runtime's clock: deadlines are awaited with tokio's timers, so they are taken
/// from the same clock (the same as `Instant::now()` unless a test paused the clock).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The default quarantine key: a hash of the command and the encoded arguments, binary
/// segments included (with quarantine on only).
fn request_key(command: &str, args: &Payload) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    command.hash(&mut h);
    args.bytes().hash(&mut h);
    args.segments().hash(&mut h);
    h.finish()
}

impl Inner {
    /// Checks a call before it may take a worker. Refusals cost no round trip and count as
    /// failed calls. `session` only names the call's span.
    pub(crate) fn admit(
        &self,
        session: Option<&str>,
        command: &str,
        args: &Payload,
        opts: &CallOptions,
    ) -> Result<Admission, Error> {
        let span = tracing::info_span!(
            "snakepit.call",
            pool = &*self.metrics.pool,
            command,
            session,
            worker = tracing::field::Empty,
            attempt = 1u32,
            outcome = tracing::field::Empty,
        );
        let (name, metrics) = match self.known_tool(command) {
            Ok(t) => t,
            Err(e) => {
                self.finish(&self.metrics.unknown, None, None, Err(&e));
                span.record("outcome", e.kind());
                return Err(e);
            }
        };
        self.check(command, args, opts, name, metrics.clone(), span.clone()).inspect_err(|e| {
            self.finish(&metrics, None, None, Err(e));
            span.record("outcome", e.kind());
        })
    }

    fn check(
        &self,
        command: &str,
        args: &Payload,
        opts: &CallOptions,
        name: Arc<str>,
        metrics: Arc<CommandMetrics>,
        span: tracing::Span,
    ) -> Result<Admission, Error> {
        let source = self.source();
        source.adapter.validate(command, args)?;
        let poison = match self.cfg.quarantine {
            Some(limit) => {
                let key = opts.key.unwrap_or_else(|| request_key(command, args));
                let poison = self.poison.lock().unwrap_or_else(|p| p.into_inner());
                let crashes = poison.get(&key).copied().unwrap_or(0);
                if crashes >= limit {
                    return Err(Error::Quarantined { command: command.into(), crashes });
                }
                Some(key)
            }
            None => None,
        };
        let started = now();
        let timeout =
            opts.timeout.or_else(|| source.adapter.timeout_for(command)).or(self.cfg.default_timeout);
        // An absurd timeout (past what an `Instant` holds) is no deadline, not a panic.
        let deadline = match (timeout.and_then(|t| started.checked_add(t)), opts.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(Admission { name, deadline, started, poison, metrics, span })
    }

    /// The deadline of a call sent to its worker now: its own, or `max_call_time` from now if
    /// that comes first.
    pub(crate) fn running_deadline(&self, adm: &Admission) -> Option<Instant> {
        let cap = self.cfg.max_call_time.and_then(|m| now().checked_add(m));
        match (adm.deadline, cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Counts a finished call (or stream) once — in the pool's stats and its command's
    /// metrics, `took` since admission (`None`: refused at admission) — and a crash against its
    /// request.
    pub(crate) fn finish(
        &self,
        metrics: &CommandMetrics,
        took: Option<Duration>,
        poison: Option<u64>,
        outcome: Result<(), &Error>,
    ) {
        self.counters.finished(outcome);
        metrics.record(outcome, took);
        if let (Some(key), Err(Error::WorkerCrashed { .. } | Error::Protocol { .. })) = (poison, outcome) {
            let mut poison = self.poison.lock().unwrap_or_else(|p| p.into_inner());
            if poison.len() >= 10_000 {
                poison.clear(); // bounded memory; a real poison request is caught again quickly
            }
            *poison.entry(key).or_default() += 1;
        }
    }

    /// Checks a call out: the session's pin (and rehydration when its worker is lost), then a
    /// leased worker.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        session: Option<&str>,
        adm: &Admission,
        opts: &CallOptions,
    ) -> Result<Acquired, Error> {
        let command = &*adm.name;
        let record = match session {
            Some(sid) => match within(adm, self.store.get(sid)).await? {
                Some(rec) => Some(rec),
                None if self.cfg.create_sessions_on_use => {
                    Some(within(adm, self.store.create(sid, serde_json::Value::Null)).await?)
                }
                None => return Err(Error::SessionNotFound { id: sid.into() }),
            },
            None => None,
        };
        let mode = opts.affinity.unwrap_or(self.cfg.affinity);
        // A worker recorded by another front end sharing the store is not one of ours.
        let foreign = record
            .as_ref()
            .is_some_and(|r| r.worker.is_some() && r.front.as_deref() != self.store.front_end());
        let pin = match (session, &record) {
            (Some(sid), Some(rec)) if !foreign => rec.worker.map(|worker| Pin { session: sid, worker, mode }),
            _ => None,
        };
        let first = match (session, &record) {
            (Some(sid), Some(rec)) if foreign && mode != super::Affinity::Hint => {
                let worker = rec.worker.unwrap_or(snakepit_core::WorkerId { slot: 0, generation: 0 });
                Err(Error::SessionLost { session: sid.to_owned(), worker })
            }
            _ => self.checkout(command, adm.deadline, pin).await,
        };
        let mut rehydrate = None;
        let mut lease = match first {
            Err(Error::SessionLost { session: sid, worker: lost }) => match (&self.rehydrate, &record) {
                (Some(hook), Some(rec)) => {
                    tracing::info!(session = sid, %lost, "session lost its worker; rehydrating on another");
                    rehydrate = hook(rec);
                    self.checkout(command, adm.deadline, None).await?
                }
                _ => return Err(Error::SessionLost { session: sid, worker: lost }),
            },
            r => r?,
        };
        let session_call = session.map(|_| lease.worker().session_call());
        if let Some((cmd, rargs)) = rehydrate {
            let worker = lease.worker().clone();
            let id = worker.connection().new_request_id();
            lease.begin(id, adm.deadline);
            let req = Request::new(cmd.clone(), rargs)
                .with_deadline(adm.deadline)
                .with_id(id)
                .with_session(session.map(str::to_owned));
            // In the session, as the call it prepares: its host calls see the session's
            // variables (and, on an agent, go back to the front end).
            let _scope = session.map(|sid| self.host.enter(worker.id(), id, sid));
            let _forward = opts.host.as_ref().map(|to| self.host.forward(worker.id(), id, to));
            let call = worker.connection().start(req);
            let r = match adm.deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), call).await {
                    Ok(r) => r,
                    Err(_) => {
                        lease.time_out();
                        let after = d.saturating_duration_since(adm.started);
                        return Err(Error::Timeout { command: cmd, worker: Some(worker.id()), after });
                    }
                },
                None => call.await,
            };
            // On success the lease stays in its call (busy, not counted as a served request):
            // the session's own call follows on the same worker.
            if let Err(e) = r {
                return Err(self.failed(&mut lease, &cmd, e).await);
            }
        }
        let here = lease.worker().id();
        let pinned_here = record.as_ref().is_some_and(|r| r.worker == Some(here) && !foreign);
        Ok(Acquired { lease, session_call, pinned_here })
    }

    /// Ends a call on its lease according to its outcome.
    pub(crate) async fn settle(
        &self,
        lease: &mut Lease,
        command: &str,
        result: Result<Payload, Error>,
    ) -> Result<Payload, Error> {
        match result {
            Ok(p) => {
                lease.completed();
                Ok(p)
            }
            Err(e) => Err(self.failed(lease, command, e).await),
        }
    }

    /// Ends a failed call on its lease: a worker error completes it (the worker is fine); a
    /// vanished connection becomes `WorkerCrashed` with the worker's exit status; a call that
    /// was queued in a dead worker's pipeline stays `NotStarted`.
    pub(crate) async fn failed(&self, lease: &mut Lease, command: &str, e: Error) -> Error {
        match e {
            Error::Worker { .. } => {
                lease.completed();
                e
            }
            Error::Disconnected { .. } => {
                lease.lost();
                let worker = lease.worker();
                let exit = tokio::time::timeout(Duration::from_secs(3), worker.exited()).await;
                crashed(worker, command, exit.unwrap_or(ExitInfo::Unknown))
            }
            e => {
                lease.lost();
                e
            }
        }
    }
}

/// The error a caller sees when its worker died under its call.
pub(crate) fn crashed(worker: &Member, command: &str, exit: ExitInfo) -> Error {
    Error::WorkerCrashed {
        worker: worker.id(),
        command: Some(command.into()),
        exit,
        stderr_tail: worker.stderr_tail(),
    }
}

impl Pool {
    /// The plain call path: admission, checkout, the round trip, counted once.
    pub(crate) async fn call(
        &self,
        session: Option<&str>,
        command: &str,
        args: Payload,
        opts: CallOptions,
    ) -> Result<Payload, Error> {
        let inner = &self.inner;
        let adm = inner.admit(session, command, &args, &opts)?;
        let retry = (opts.retry_not_started || inner.cfg.retry_not_started).then(|| args.clone());
        let mut r = in_span!(&adm.span, self.round_trip(session, &adm, args, &opts));
        if let (Err(Error::NotStarted { worker, .. }), Some(args)) = (&r, retry) {
            // It never ran: once more, on whichever worker is free (the dead one is not).
            tracing::info!(parent: &adm.span, %worker, command, "call queued on a worker that died before it started; retrying once");
            adm.span.record("attempt", 2u32);
            r = in_span!(&adm.span, self.round_trip(session, &adm, args, &opts));
        }
        adm.end(inner, r.as_ref().map(|_| ()));
        r
    }

    async fn round_trip(
        &self,
        session: Option<&str>,
        adm: &Admission,
        args: Payload,
        opts: &CallOptions,
    ) -> Result<Payload, Error> {
        let inner = &self.inner;
        let command = &*adm.name;
        let waiting = tracing::debug_span!(parent: &adm.span, "snakepit.queue_wait");
        let Acquired { mut lease, session_call: _session_call, pinned_here } =
            inner.acquire(session, adm, opts).await?;
        drop(waiting);
        let worker = lease.worker().clone();
        adm.span.record("worker", tracing::field::display(worker.id()));
        let id = worker.connection().new_request_id();
        let deadline = inner.running_deadline(adm);
        lease.begin(id, deadline);
        let req = Request::new(adm.name.clone(), args)
            .with_deadline(deadline)
            .with_id(id)
            .with_session(session.map(str::to_owned));
        let _scope = session.map(|sid| inner.host.enter(worker.id(), id, sid));
        let _forward = opts.host.as_ref().map(|to| inner.host.forward(worker.id(), id, to));
        #[cfg(feature = "chaos")]
        let chaos_n = match &inner.cfg.chaos {
            Some(c) => {
                let (n, kill) = c.before_call();
                if kill {
                    worker.kill();
                    // Let the kill land before the call is sent.
                    let _ = worker.connection().closed().await;
                }
                Some(n)
            }
            None => None,
        };
        // The steps' spans are not entered: each opens now and closes when dropped, so its
        // duration is the step's.
        let round_trip = tracing::debug_span!(parent: &adm.span, "snakepit.round_trip");
        let call = worker.connection().start(req);
        let result = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), call).await {
                Ok(r) => r,
                Err(_) => {
                    // The lease stays in its call: dropping it cancels the call and gives the
                    // worker `cancel_grace` to answer before it is replaced.
                    lease.time_out();
                    tracing::warn!(worker = %worker.id(), command, "call timed out; cancelling it");
                    let after = d.saturating_duration_since(adm.started);
                    return Err(Error::Timeout { command: command.into(), worker: Some(worker.id()), after });
                }
            },
            None => call.await,
        };
        drop(round_trip);
        #[cfg(feature = "chaos")]
        if let (Some(c), Some(n), Ok(_)) = (&inner.cfg.chaos, chaos_n, &result) {
            if c.after_reply(n) {
                worker.kill();
            }
        }
        if let (Some(sid), Ok(_) | Err(Error::Worker { .. }), false) = (session, &result, pinned_here) {
            // The session's worker-side state now lives on this worker (recorded within the
            // call's deadline: the answer is not held back by a slow store).
            if let Err(e) = within(adm, inner.store.set_worker(sid, Some(worker.id()))).await {
                tracing::debug!(session = sid, "cannot record the session's worker: {e}");
            }
        }
        inner.settle(&mut lease, command, result).await
    }
}
