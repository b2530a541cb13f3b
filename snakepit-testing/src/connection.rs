//! One fake worker: its [`Connection`] and its [`WorkerHandle`], on tokio tasks only.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use snakepit_core::{
    CloseReason, Connection, Error, ExitInfo, InFlight, Payload, Ready, Request, RequestId, WorkerError,
    WorkerHandle, WorkerId,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use crate::control::FakeControl;
use crate::worker::{raise, Spec, Tool};

/// The state of one fake worker, shared by its connection, its handle and its running calls.
#[derive(Debug)]
pub(crate) struct Link {
    worker: WorkerId,
    spec: Arc<Spec>,
    control: FakeControl,
    exit: watch::Sender<Option<ExitInfo>>,
    /// Calls and streams running (each task holds its guard, so an aborted one leaves too).
    in_flight: InFlight,
    /// How to cancel each running call.
    pending: Mutex<HashMap<u64, AbortHandle>>,
    next_id: AtomicU64,
    /// Pipelining: the worker runs one call at a time, the others wait their turn in order.
    pipelined: bool,
    turns: Mutex<Turns>,
    /// Notified when the running call changes.
    turn_changed: tokio::sync::Notify,
}

/// A pipelined fake worker's calls: the one it runs, and the others in the order sent, each
/// with the sender that starts it.
#[derive(Debug, Default)]
struct Turns {
    running: Option<u64>,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Link {
    pub(crate) fn new(worker: WorkerId, spec: Arc<Spec>, control: FakeControl, pipelined: bool) -> Arc<Self> {
        Arc::new(Link {
            worker,
            spec,
            control,
            exit: watch::channel(None).0,
            in_flight: InFlight::new(),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            pipelined,
            turns: Mutex::new(Turns::default()),
            turn_changed: tokio::sync::Notify::new(),
        })
    }

    fn turns(&self) -> std::sync::MutexGuard<'_, Turns> {
        self.turns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Call `id` takes its place in line: `None` when it runs at once (not pipelined, or
    /// nothing runs), else what starts it.
    fn take_turn(&self, id: u64) -> Option<oneshot::Receiver<()>> {
        if !self.pipelined {
            return None;
        }
        let mut t = self.turns();
        if t.running.is_none() {
            t.running = Some(id);
            return None;
        }
        let (tx, rx) = oneshot::channel();
        t.waiting.push_back((id, tx));
        Some(rx)
    }

    /// Call `id` is over (answered, cancelled or aborted): out of line; if it was running,
    /// the next live one starts.
    fn end_turn(&self, id: u64) {
        if !self.pipelined {
            return;
        }
        let mut t = self.turns();
        if t.running == Some(id) {
            t.running = None;
            while let Some((next, tx)) = t.waiting.pop_front() {
                if tx.send(()).is_ok() {
                    t.running = Some(next);
                    break;
                }
            }
        } else {
            t.waiting.retain(|(w, _)| *w != id);
        }
        drop(t);
        self.turn_changed.notify_waiters();
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AbortHandle>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn exit(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Ends the worker (first reason wins): its running calls stop, its callers see it gone.
    pub(crate) fn end(&self, exit: ExitInfo) {
        self.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(exit);
                true
            } else {
                false
            }
        });
        let running: Vec<_> = self.pending().drain().collect();
        for (_, h) in running {
            h.abort();
        }
    }

    async fn ended(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        let r = rx.wait_for(Option::is_some).await.map(|e| *e);
        r.ok().flatten().unwrap_or(ExitInfo::Unknown)
    }

    fn gone(&self) -> Error {
        Error::Disconnected { worker: self.worker }
    }

    /// Runs `task` as call `id` (pipelined: when its turn comes; `started` is set then):
    /// registered until it ends (or is aborted by `cancel`/`end`).
    fn spawn(
        self: &Arc<Self>,
        id: u64,
        started: Arc<AtomicBool>,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let done = Done(self.clone(), id);
        let guard = self.in_flight.enter(RequestId(id));
        let turn = self.take_turn(id);
        let link = self.clone();
        // Spawned and registered under the lock: `end` (which takes the lock after setting the
        // exit) either finds the task registered and aborts it, or ran before and is seen below.
        let mut pending = self.pending();
        let handle = tokio::spawn(async move {
            let _done = (done, guard);
            if let Some(turn) = turn {
                // A turn handed over while `end` aborts the calls one by one: the worker is
                // dead, and this call never starts.
                if turn.await.is_err() || link.exit().is_some() {
                    return;
                }
            }
            started.store(true, Ordering::Release);
            task.await;
        });
        pending.insert(id, handle.abort_handle());
        drop(pending);
        if self.exit().is_some() {
            handle.abort();
        }
    }
}

/// Forgets a call when its task ends, however it ends.
struct Done(Arc<Link>, u64);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.pending().remove(&self.1);
        self.0.end_turn(self.1);
    }
}

/// What a fake call produced.
type Outcome = Result<Payload, Error>;

async fn run_tool(link: &Arc<Link>, command: &str, args: Payload) -> Outcome {
    let worker = link.worker;
    let err = |error: WorkerError| Error::Worker { worker, command: command.to_owned(), error };
    if let Some(d) = link.spec.delays.get(command) {
        tokio::time::sleep(*d).await;
    }
    match link.spec.tools.get(command) {
        // The closure is called inside the guarded future, so a panic before its first await is
        // caught too.
        Some(Tool::Call(f)) => {
            let args: Value = args.to_value()?;
            match AssertUnwindSafe(async move { f(args).await }).catch_unwind().await {
                Ok(Ok(v)) => Ok(Payload::from(v)),
                Ok(Err(e)) => Err(err(e)),
                Err(panic) => Err(err(raise("panic", panic_message(&*panic)))),
            }
        }
        Some(Tool::Payload(f)) => match AssertUnwindSafe(async move { f(args).await }).catch_unwind().await {
            Ok(r) => r.map_err(err),
            Err(panic) => Err(err(raise("panic", panic_message(&*panic)))),
        },
        Some(Tool::Fail(e)) => Err(err(e.clone())),
        Some(Tool::Crash) => {
            link.end(ExitInfo::Signal(9));
            std::future::pending().await
        }
        Some(Tool::Stream(_)) => Err(err(raise("TypeError", format!("`{command}` is a stream tool")))),
        None => Err(err(raise("UnknownCommand", format!("no tool `{command}`")))),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the tool panicked".into())
}

/// The fake worker's side of the pool's connection.
#[derive(Debug)]
pub(crate) struct FakeConnection(pub(crate) Arc<Link>);

#[async_trait]
impl Connection for FakeConnection {
    async fn call(&self, req: Request) -> Result<Payload, Error> {
        let link = &self.0;
        if link.exit().is_some() {
            return Err(link.gone());
        }
        let id = req.id.map_or_else(|| link.next_id.fetch_add(1, Ordering::Relaxed), |i| i.0);
        let command = req.command.clone();
        link.control.count_call(&command);
        let args = req.args;
        let (tx, rx) = oneshot::channel();
        let task_link = link.clone();
        let cmd = command.clone();
        let started = Arc::new(AtomicBool::new(false));
        link.spawn(id, started.clone(), async move {
            let _ = tx.send(run_tool(&task_link, &cmd, args).await);
        });
        // The worker died: the call it ran crashed with it; one still waiting in its pipeline
        // never started.
        let died = || match started.load(Ordering::Acquire) {
            true => link.gone(),
            false => Error::NotStarted { worker: link.worker, command: command.to_string() },
        };
        tokio::select! {
            biased;
            r = rx => match r {
                Ok(outcome) => outcome,
                // The task was aborted: by `end` (the worker died) or by `cancel`.
                Err(_) if link.exit().is_some() => Err(died()),
                Err(_) => Err(Error::Worker {
                    worker: link.worker,
                    command: command.to_string(),
                    error: raise("Cancelled", "the call was cancelled"),
                }),
            },
            _ = link.ended() => Err(died()),
        }
    }

    async fn stream(
        &self,
        req: Request,
        window: u32,
    ) -> Result<BoxStream<'static, Result<Payload, Error>>, Error> {
        let link = self.0.clone();
        if link.exit().is_some() {
            return Err(link.gone());
        }
        let id = req.id.map_or_else(|| link.next_id.fetch_add(1, Ordering::Relaxed), |i| i.0);
        let command = req.command.to_string();
        link.control.count_call(&command);
        let args = req.args.to_value()?;
        // The channel's bound is the credit window: a fast producer waits for the consumer.
        let (tx, rx) = mpsc::channel::<Result<Value, WorkerError>>(window.max(1) as usize);
        let task_link = link.clone();
        let cmd = command.clone();
        let started = Arc::new(AtomicBool::new(false));
        link.spawn(id, started.clone(), async move {
            let items = match task_link.spec.tools.get(&cmd) {
                Some(Tool::Stream(f)) => match std::panic::catch_unwind(AssertUnwindSafe(|| f(args))) {
                    Ok(items) => items,
                    Err(panic) => {
                        let e = raise("panic", panic_message(&*panic));
                        futures::stream::once(async move { Err(e) }).boxed()
                    }
                },
                _ => {
                    let one = run_tool(&task_link, &cmd, Payload::from(args)).await;
                    let item = match one {
                        Ok(p) => p.to_value().map_err(|e| raise("CodecError", e.to_string())),
                        Err(Error::Worker { error, .. }) => Err(error),
                        Err(_) => return,
                    };
                    futures::stream::once(async move { item }).boxed()
                }
            };
            let mut items = AssertUnwindSafe(items).catch_unwind();
            while let Some(item) = items.next().await {
                let item = item.unwrap_or_else(|panic| Err(raise("panic", panic_message(&*panic))));
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        let worker = link.worker;
        let items = futures::stream::unfold(Some((rx, link)), move |st| {
            let command = command.clone();
            let started = started.clone();
            async move {
                let (mut rx, link) = st?;
                match rx.recv().await {
                    Some(Ok(v)) => Some((Ok(Payload::from(v)), Some((rx, link)))),
                    Some(Err(error)) => Some((Err(Error::Worker { worker, command, error }), None)),
                    None if link.exit().is_some() && !started.load(Ordering::Acquire) => {
                        Some((Err(Error::NotStarted { worker, command }), None))
                    }
                    None if link.exit().is_some() => Some((Err(link.gone()), None)),
                    None => None,
                }
            }
        });
        Ok(items.boxed())
    }

    async fn ping(&self) -> Result<Duration, Error> {
        let link = &self.0;
        if link.control.state.hang_pings.load(Ordering::SeqCst) {
            link.ended().await;
            return Err(link.gone());
        }
        match link.exit() {
            Some(_) => Err(link.gone()),
            None => Ok(Duration::from_micros(1)),
        }
    }

    async fn shutdown(&self) {
        self.0.end(ExitInfo::Code(0));
    }

    fn closed(&self) -> BoxFuture<'static, CloseReason> {
        let link = self.0.clone();
        Box::pin(async move {
            link.ended().await;
            CloseReason::Eof
        })
    }

    fn is_closed(&self) -> bool {
        self.0.exit().is_some()
    }

    fn new_request_id(&self) -> RequestId {
        RequestId(self.0.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn cancel(&self, id: RequestId) {
        // Cloned out first: the aborted task's guard takes the same lock when it is dropped.
        let handle = self.0.pending().get(&id.0).cloned();
        if let Some(h) = handle {
            h.abort();
        }
    }

    fn idle(&self) -> BoxFuture<'static, ()> {
        Box::pin(self.0.in_flight.idle())
    }

    fn answered(&self, id: RequestId) -> BoxFuture<'static, ()> {
        Box::pin(self.0.in_flight.answered(id))
    }

    fn running(&self, id: RequestId) -> Option<u64> {
        let link = &self.0;
        (!link.pipelined || link.turns().running == Some(id.0)).then_some(0)
    }

    fn started(&self, id: RequestId) -> BoxFuture<'static, ()> {
        let link = self.0.clone();
        Box::pin(async move {
            loop {
                let changed = link.turn_changed.notified();
                let waiting = link.turns().waiting.iter().any(|(w, _)| *w == id.0);
                if !link.pipelined || !waiting || link.exit().is_some() {
                    return;
                }
                changed.await;
            }
        })
    }
}

/// A started fake worker, as the pool holds it. Dropping it ends the worker.
pub(crate) struct FakeHandle {
    pub(crate) link: Arc<Link>,
    pub(crate) conn: Arc<dyn Connection>,
    pub(crate) ready: Ready,
    pub(crate) started: Instant,
}

impl std::fmt::Debug for FakeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeHandle").field("worker", &self.link.worker).finish_non_exhaustive()
    }
}

impl Drop for FakeHandle {
    fn drop(&mut self) {
        self.link.end(ExitInfo::Signal(9));
    }
}

#[async_trait]
impl WorkerHandle for FakeHandle {
    fn id(&self) -> WorkerId {
        self.link.worker
    }

    fn connection(&self) -> &Arc<dyn Connection> {
        &self.conn
    }

    fn ready(&self) -> &Ready {
        &self.ready
    }

    fn started(&self) -> Instant {
        self.started
    }

    fn exit_info(&self) -> Option<ExitInfo> {
        self.link.exit()
    }

    async fn exited(&self) -> ExitInfo {
        self.link.ended().await
    }

    fn kill(&self) {
        self.link.end(ExitInfo::Signal(9));
    }

    async fn shutdown(&self, _grace: Duration) -> ExitInfo {
        self.link.end(ExitInfo::Code(0));
        self.link.ended().await
    }

    fn memory(&self) -> Option<u64> {
        self.link.control.memory()
    }
}
