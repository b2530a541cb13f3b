//! A remote worker: one worker's worth of an agent's capacity, and its connection (each call
//! one `Agent.Call` stream on the agent's HTTP/2 connection).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use snakepit_core::{
    CloseReason, Connection, Error, ExitInfo, HostCall, HostHandler, InFlight, Payload, Ready, Request,
    RequestId, StartOptions, WorkerHandle, WorkerId,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::agents::{Host, Live, LiveState};
use crate::proto::agent_in::Msg as In;
use crate::proto::agent_out::Msg as Out;
use crate::proto::{self, AgentIn, AgentOut};
use crate::wire;

/// A remote worker as the pool sees it.
pub(crate) struct RemoteWorker {
    conn: Arc<RemoteConnection>,
    dyn_conn: Arc<dyn Connection>,
    ready: Ready,
    started: Instant,
}

impl std::fmt::Debug for RemoteWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteWorker")
            .field("worker", &self.conn.worker)
            .field("agent", &self.conn.host.name)
            .finish_non_exhaustive()
    }
}

impl RemoteWorker {
    pub(crate) fn new(opts: StartOptions, host: Arc<Host>, live: Arc<Live>, ready: Ready) -> Self {
        let conn = Arc::new_cyclic(|me| RemoteConnection {
            me: me.clone(),
            worker: opts.worker,
            client: live.client.clone(),
            live,
            host,
            handler: opts.host,
            ids: AtomicU64::new(1),
            inflight: InFlight::new(),
            calls: Mutex::new(HashMap::new()),
            closed: watch::channel(None).0,
        });
        let dyn_conn: Arc<dyn Connection> = conn.clone();
        RemoteWorker { conn, dyn_conn, ready, started: Instant::now() }
    }
}

impl Drop for RemoteWorker {
    fn drop(&mut self) {
        // Its calls end (their streams are dropped, so the agent cancels them) and its place
        // on the agent is free again.
        self.conn.close(CloseReason::Closed);
        self.conn.live.bound.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl WorkerHandle for RemoteWorker {
    fn id(&self) -> WorkerId {
        self.conn.worker
    }

    fn connection(&self) -> &Arc<dyn Connection> {
        &self.dyn_conn
    }

    fn ready(&self) -> &Ready {
        &self.ready
    }

    fn started(&self) -> Instant {
        self.started
    }

    fn exit_info(&self) -> Option<ExitInfo> {
        self.conn.is_gone().then_some(ExitInfo::Unknown)
    }

    async fn exited(&self) -> ExitInfo {
        self.conn.gone().await;
        ExitInfo::Unknown
    }

    fn kill(&self) {
        self.conn.close(CloseReason::Closed);
    }

    async fn shutdown(&self, _grace: Duration) -> ExitInfo {
        // The slot drained it before: nothing runs on it any more.
        self.conn.close(CloseReason::Closed);
        ExitInfo::Code(0)
    }

    fn leaving(&self) -> BoxFuture<'static, ()> {
        let live = self.conn.live.clone();
        Box::pin(async move { live.leaving().await })
    }
}

/// The connection of one remote worker.
pub(crate) struct RemoteConnection {
    me: std::sync::Weak<RemoteConnection>,
    worker: WorkerId,
    host: Arc<Host>,
    live: Arc<Live>,
    client: proto::agent_client::AgentClient<tonic::transport::Channel>,
    handler: Option<Arc<dyn HostHandler>>,
    ids: AtomicU64,
    inflight: InFlight,
    /// The sending side of each call's stream, for `cancel`.
    calls: Mutex<HashMap<u64, mpsc::Sender<AgentIn>>>,
    /// Set when the pool closed this worker.
    closed: watch::Sender<Option<CloseReason>>,
}

/// Forgets a call's sender when the call ends.
struct Forget<'a>(&'a RemoteConnection, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.calls.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

impl RemoteConnection {
    fn close(&self, why: CloseReason) {
        self.closed.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(why);
                true
            } else {
                false
            }
        });
    }

    fn is_gone(&self) -> bool {
        self.closed.borrow().is_some() || self.live.state() == LiveState::Lost
    }

    /// Resolves when this worker is closed or its agent lost.
    fn gone(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let live = self.live.clone();
        let mut closed = self.closed.subscribe();
        async move {
            tokio::select! {
                _ = live.lost() => {}
                _ = closed.wait_for(Option::is_some) => {}
            }
        }
    }

    fn lost(&self, command: &str) -> Error {
        Error::AgentLost { agent: self.host.name.to_string(), command: command.to_owned() }
    }

    /// Runs one call on its own `Agent.Call` stream; a stream's chunks go to `chunks` (the
    /// agent gets one credit back for each chunk the consumer has room for).
    async fn exchange(
        &self,
        id: RequestId,
        first: proto::AgentCall,
        chunks: Option<&mpsc::Sender<Result<Payload, Error>>>,
    ) -> Result<Payload, Error> {
        let command = first.command.clone();
        let window = first.window.max(1) as usize;
        if self.is_gone() {
            return Err(self.lost(&command));
        }
        let running = self.inflight.enter(id);
        let (tx, rx) = mpsc::channel::<AgentIn>(16);
        let _ = tx.try_send(AgentIn { msg: Some(In::Call(first)) });
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).insert(id.0, tx.clone());
        let _forget = Forget(self, id.0);
        let gone = self.gone();
        tokio::pin!(gone);
        let consumer_gone = async {
            match chunks {
                Some(c) => c.closed().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(consumer_gone);
        let mut client = self.client.clone();
        let mut stream = tokio::select! {
            r = client.call(ReceiverStream::new(rx)) => match r {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    tracing::debug!(agent = %self.host.name, "call refused by the connection: {status}");
                    return Err(self.lost(&command));
                }
            },
            _ = &mut gone => return Err(self.lost(&command)),
        };
        let mut hosts = tokio::task::JoinSet::new();
        // A stream's chunks not yet taken by the consumer: the call's HTTP/2 stream is always
        // read (a slow consumer must not hold the connection's flow-control window, which the
        // agent's other calls and its status share); the credit bounds this buffer.
        let mut pending: VecDeque<Payload> = VecDeque::new();
        // Credit earned by chunks the consumer took, not sent yet (sent without ever blocking
        // the reading of the call's stream).
        let mut owed = 0u32;
        loop {
            let m = tokio::select! {
                m = stream.message() => m,
                permit = reserve(chunks), if !pending.is_empty() => {
                    let Ok(permit) = permit else { return Err(Error::Cancelled { command }) };
                    if let Some(item) = pending.pop_front() {
                        permit.send(Ok(item));
                        owed += 1;
                    }
                    continue;
                }
                permit = tx.reserve(), if owed > 0 => {
                    if let Ok(permit) = permit {
                        permit.send(AgentIn { msg: Some(In::Credit(std::mem::take(&mut owed))) });
                    }
                    continue;
                }
                _ = &mut gone => return Err(self.lost(&command)),
                _ = &mut consumer_gone => return Err(Error::Cancelled { command }),
                Some(_) = hosts.join_next(), if !hosts.is_empty() => continue,
            };
            let msg = match m {
                Ok(Some(AgentOut { msg: Some(msg) })) => msg,
                Ok(Some(AgentOut { msg: None })) => continue,
                Ok(None) => return Err(self.lost(&command)),
                Err(status) => {
                    tracing::debug!(agent = %self.host.name, "call stream broke: {status}");
                    return Err(self.lost(&command));
                }
            };
            match msg {
                Out::Ok(v) => return Ok(wire::payload(v)),
                Out::Error(e) => {
                    if e.kind == "shutting_down" {
                        // The agent drains: its workers leave now, before their next call.
                        let changed = self.live.state.send_if_modified(|s| {
                            let up = *s == LiveState::Up;
                            if up {
                                *s = LiveState::Draining;
                            }
                            up
                        });
                        if changed {
                            tracing::info!(agent = %self.host.name, "agent drains (it refused a call); its workers leave");
                        }
                    }
                    // Answered: the worker is free whatever the consumer does with the rest.
                    drop(running);
                    if e.kind != "cancelled" {
                        tokio::select! {
                            _ = flush(chunks, &mut pending) => {}
                            _ = &mut gone => {}
                        }
                    }
                    return Err(wire::from_call_error(e, self.worker, &command, &self.host.name));
                }
                Out::End(_) => {
                    drop(running);
                    let delivered = tokio::select! {
                        ok = flush(chunks, &mut pending) => ok,
                        _ = &mut gone => false,
                    };
                    if !delivered {
                        return Err(Error::Cancelled { command });
                    }
                    return Ok(Payload::null());
                }
                Out::Chunk(v) => {
                    if chunks.is_none() || pending.len() >= window {
                        let why = if chunks.is_none() {
                            "a chunk for a plain call"
                        } else {
                            "more chunks than its credit"
                        };
                        return Err(Error::Protocol {
                            worker: self.worker,
                            detail: format!("agent {} sent {why}", self.host.name),
                            source: None,
                        });
                    }
                    pending.push_back(wire::payload(v));
                }
                Out::HostCall(h) if hosts.len() >= MAX_HOST_CALLS => {
                    let r = proto::HostResult {
                        id: h.id,
                        outcome: Some(proto::host_result::Outcome::Error(proto::RemoteWorkerError {
                            r#type: "TooManyHostCalls".into(),
                            message: format!("more than {MAX_HOST_CALLS} host calls at once in one call"),
                            traceback: String::new(),
                        })),
                    };
                    let tx = tx.clone();
                    // Never blocks the reading of the call's stream (ends with the call).
                    tokio::spawn(async move {
                        let _ = tx.send(AgentIn { msg: Some(In::HostResult(r)) }).await;
                    });
                }
                Out::HostCall(h) => {
                    let tx = tx.clone();
                    let handler = self.handler.clone();
                    let call = HostCall::new(
                        self.worker,
                        Some(id),
                        h.name,
                        h.args.map(wire::payload).unwrap_or_else(Payload::null),
                    );
                    hosts.spawn(async move {
                        let outcome = match handler {
                            Some(handler) => match handler.host_call(call).await {
                                Ok(p) => proto::host_result::Outcome::Ok(wire::value(&p)),
                                Err(e) => proto::host_result::Outcome::Error(wire::worker_error(&e)),
                            },
                            None => proto::host_result::Outcome::Error(proto::RemoteWorkerError {
                                r#type: "UnknownHostTool".into(),
                                message: "this pool answers no host calls".into(),
                                traceback: String::new(),
                            }),
                        };
                        let r = proto::HostResult { id: h.id, outcome: Some(outcome) };
                        let _ = tx.send(AgentIn { msg: Some(In::HostResult(r)) }).await;
                    });
                }
            }
        }
    }
}

/// Host calls one call may have outstanding on the front end (more are answered with an error).
const MAX_HOST_CALLS: usize = 64;

/// A slot in the consumer's channel (never, for a plain call).
async fn reserve(
    chunks: Option<&mpsc::Sender<Result<Payload, Error>>>,
) -> Result<mpsc::Permit<'_, Result<Payload, Error>>, mpsc::error::SendError<()>> {
    match chunks {
        Some(c) => c.reserve().await,
        None => std::future::pending().await,
    }
}

/// Hands the consumer the chunks still buffered; false if it went away.
async fn flush(
    chunks: Option<&mpsc::Sender<Result<Payload, Error>>>,
    pending: &mut VecDeque<Payload>,
) -> bool {
    let Some(c) = chunks else { return true };
    for item in pending.drain(..) {
        if c.send(Ok(item)).await.is_err() {
            return false;
        }
    }
    true
}

fn agent_call(req: &Request, stream: bool, window: u32) -> proto::AgentCall {
    let timeout_ms = req.deadline.map_or(0, |d| {
        // At least 1 ms: 0 means no deadline.
        (d.saturating_duration_since(Instant::now()).as_millis() as u64).max(1)
    });
    proto::AgentCall {
        command: req.command.to_string(),
        args: Some(wire::value(&req.args)),
        session: req.session.clone().unwrap_or_default(),
        timeout_ms,
        stream,
        window,
    }
}

/// A connection handle that a spawned stream task can own.
struct Owned(Arc<RemoteConnection>);

#[async_trait]
impl Connection for RemoteConnection {
    async fn call(&self, req: Request) -> Result<Payload, Error> {
        let id = req.id.unwrap_or_else(|| self.new_request_id());
        self.exchange(id, agent_call(&req, false, 0), None).await
    }

    async fn stream(
        &self,
        req: Request,
        window: u32,
    ) -> Result<BoxStream<'static, Result<Payload, Error>>, Error> {
        if self.is_gone() {
            return Err(self.lost(&req.command));
        }
        let id = req.id.unwrap_or_else(|| self.new_request_id());
        let window = window.max(1);
        let (tx, rx) = mpsc::channel(window as usize);
        let first = agent_call(&req, true, window);
        let Some(me) = self.me.upgrade().map(Owned) else { return Err(self.lost(&req.command)) };
        tokio::spawn(async move {
            if let Err(e) = me.0.exchange(id, first, Some(&tx)).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(ReceiverStream::new(rx).boxed())
    }

    async fn ping(&self) -> Result<Duration, Error> {
        if self.is_gone() {
            return Err(Error::Disconnected { worker: self.worker });
        }
        let t = Instant::now();
        let mut client = self.client.clone();
        match client.ping(proto::AgentPing {}).await {
            Ok(_) => Ok(t.elapsed()),
            Err(_) => Err(Error::Disconnected { worker: self.worker }),
        }
    }

    async fn shutdown(&self) {
        self.close(CloseReason::Closed);
    }

    fn closed(&self) -> BoxFuture<'static, CloseReason> {
        let gone = self.gone();
        let closed = self.closed.subscribe();
        Box::pin(async move {
            gone.await;
            let why = closed.borrow().clone();
            why.unwrap_or(CloseReason::Eof)
        })
    }

    fn is_closed(&self) -> bool {
        // A worker of a draining agent takes no new call (the slot retires it).
        self.is_gone() || self.live.state() != LiveState::Up
    }

    fn new_request_id(&self) -> RequestId {
        RequestId(self.ids.fetch_add(1, Ordering::Relaxed))
    }

    fn cancel(&self, id: RequestId) {
        let tx = self.calls.lock().unwrap_or_else(|p| p.into_inner()).get(&id.0).cloned();
        if let Some(tx) = tx {
            let cancel = AgentIn { msg: Some(In::Cancel(true)) };
            if let Err(mpsc::error::TrySendError::Full(cancel)) = tx.try_send(cancel) {
                // A full outbox must not lose the cancel (the send ends with the call).
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = tx.send(cancel).await;
                    });
                }
            }
        }
    }

    fn idle(&self) -> BoxFuture<'static, ()> {
        let idle = self.inflight.idle();
        let gone = self.gone();
        Box::pin(async move {
            tokio::select! {
                _ = idle => {}
                _ = gone => {}
            }
        })
    }

    fn answered(&self, id: RequestId) -> BoxFuture<'static, ()> {
        let answered = self.inflight.answered(id);
        let gone = self.gone();
        Box::pin(async move {
            tokio::select! {
                _ = answered => {}
                _ = gone => {}
            }
        })
    }
}
