//! Streamed calls: [`CallStream`] owns the lease of a generator tool's call; its end completes
//! the call, dropping it early cancels it like a dropped call future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::stream::BoxStream;
use snakepit_core::{Error, ExitInfo, Payload, Request};
use snakepit_supervisor::SessionCall;

use super::call::{crashed, Acquired, Admission};
use super::lease::Lease;
use super::{CallOptions, Inner, Pool};

/// The items of a streamed call, in order, then `None`. An error item (the tool raised
/// midway, the worker crashed, the deadline passed) ends the stream.
///
/// A stream counts as one call in [`PoolStats`](crate::PoolStats): in `calls_ok` when it ends
/// normally, in `calls_failed` when an error ends it (a stream dropped before its end counts in
/// neither, as a dropped call future).
///
/// Dropping it before the end cancels the call: the worker is sent `cancel` (the Python bridge
/// closes the generator, so its `finally` runs) and returns to the pool once it has answered.
pub struct CallStream {
    stream: BoxStream<'static, Result<Payload, Error>>,
    /// The worker, until the stream ends (then it goes back to the pool at once, even if the
    /// `CallStream` is kept).
    lease: Option<Lease>,
    worker: snakepit_core::WorkerId,
    inner: Arc<Inner>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    adm: Admission,
    done: bool,
    _session_call: Option<SessionCall>,
    _scope: Option<crate::host::SessionScope>,
    _forward: Option<crate::host::ForwardScope>,
}

impl std::fmt::Debug for CallStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream").field("command", &self.adm.name).field("worker", &self.worker).finish()
    }
}

impl CallStream {
    /// The next item decoded as JSON, or `None` at the end.
    pub async fn next_json(&mut self) -> Option<Result<serde_json::Value, Error>> {
        use futures::StreamExt;
        self.next().await.map(|r| r.and_then(|p| p.to_value()))
    }

    /// Ends the stream: counted once, the error (if any) recorded against the request, and the
    /// worker released (returned, or cancelled if the stream timed out).
    fn finish(&mut self, outcome: Result<(), &Error>) {
        self.done = true;
        self.adm.end(&self.inner, outcome);
        self.lease = None;
    }
}

impl futures::Stream for CallStream {
    type Item = Result<Payload, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(lease) = this.lease.as_mut().filter(|_| !this.done) else {
            return Poll::Ready(None);
        };
        if let Some(d) = this.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                // The lease stays in its call: its drop cancels the generator.
                lease.time_out();
                let e = Error::Timeout {
                    command: this.adm.name.to_string(),
                    worker: Some(this.worker),
                    after: this.adm.started.elapsed(),
                };
                this.finish(Err(&e));
                return Poll::Ready(Some(Err(e)));
            }
        }
        let e = match this.stream.as_mut().poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(p))) => {
                this.inner.metrics.stream_chunks.increment(1);
                return Poll::Ready(Some(Ok(p)));
            }
            Poll::Ready(None) => {
                lease.completed();
                this.finish(Ok(()));
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e @ Error::Worker { .. }))) => {
                lease.completed();
                e
            }
            Poll::Ready(Some(Err(Error::Disconnected { .. }))) => {
                lease.lost();
                let worker = lease.worker();
                crashed(worker, &this.adm.name, worker.exit_info().unwrap_or(ExitInfo::Unknown))
            }
            Poll::Ready(Some(Err(e))) => {
                lease.lost();
                e
            }
        };
        this.finish(Err(&e));
        Poll::Ready(Some(Err(e)))
    }
}

impl Pool {
    /// The stream path: the same admission, routing and counting as a plain call.
    pub(crate) async fn stream_call(
        &self,
        session: Option<&str>,
        command: &str,
        args: Payload,
        opts: CallOptions,
    ) -> Result<CallStream, Error> {
        let inner = &self.inner;
        let adm = inner.admit(session, command, &args, &opts)?;
        let span = adm.span.clone();
        super::call::in_span!(&span, self.open_stream(session, adm, args, &opts))
    }

    async fn open_stream(
        &self,
        session: Option<&str>,
        adm: Admission,
        args: Payload,
        opts: &CallOptions,
    ) -> Result<CallStream, Error> {
        let inner = &self.inner;
        let fail = |e| {
            adm.end(inner, Err(&e));
            e
        };
        let waiting = tracing::debug_span!(parent: &adm.span, "snakepit.queue_wait");
        let acquired = inner.acquire(session, &adm, opts).await;
        drop(waiting);
        let Acquired { mut lease, session_call, pinned_here } = acquired.map_err(fail)?;
        let worker = lease.worker().clone();
        adm.span.record("worker", tracing::field::display(worker.id()));
        let id = worker.connection().new_request_id();
        let deadline = inner.running_deadline(&adm);
        lease.begin(id, deadline);
        let req = Request::new(adm.name.clone(), args)
            .with_deadline(deadline)
            .with_id(id)
            .with_session(session.map(str::to_owned));
        let scope = session.map(|sid| inner.host.enter(worker.id(), id, sid));
        let forward = opts.host.as_ref().map(|to| inner.host.forward(worker.id(), id, to));
        let stream = match worker.connection().stream(req, inner.cfg.stream_window).await {
            Ok(s) => s,
            Err(e) => return Err(fail(inner.failed(&mut lease, &adm.name, e).await)),
        };
        if let (Some(sid), false) = (session, pinned_here) {
            if let Err(e) = super::call::within(&adm, inner.store.set_worker(sid, Some(worker.id()))).await {
                tracing::debug!(session = sid, "cannot record the session's worker: {e}");
            }
        }
        Ok(CallStream {
            stream,
            lease: Some(lease),
            worker: worker.id(),
            inner: inner.clone(),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
            adm,
            done: false,
            _session_call: session_call,
            _scope: scope,
            _forward: forward,
        })
    }
}
