//! The agent side: `snakepit.v1.Agent` (and the standard gRPC health service) over TCP, with
//! mutual TLS, in front of any [`Backend`] — a local snakepit pool in practice.
//!
//! Life of an agent: [`bind`] checks the settings and binds the listener (so `:0` gives the
//! real port before anything is announced); [`Listener::serve`] serves until its `shutdown`
//! future resolves, then drains: the health service says `NOT_SERVING`, the `Status` streams
//! say `draining`, new calls are refused with `shutting_down` (they never ran: a front end
//! takes it as `not_started`, sends them elsewhere, and retires its workers on this agent), the
//! calls in flight get up to `shutdown_grace` to finish, and the agent goes on refusing for one
//! more second before it closes its connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use snakepit_core::{Error as CoreError, HostCall, HostHandler, Payload, ToolInfo, WorkerError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::proto::agent_in::Msg as In;
use crate::proto::agent_out::Msg as Out;
use crate::proto::agent_server::{Agent, AgentServer};
use crate::proto::{self, AgentIn, AgentOut};
use crate::{tls::ServerTls, wire, Error};

/// How much an agent can take now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capacity {
    /// Live workers.
    pub workers: usize,
    /// Idle workers.
    pub free: usize,
    /// Calls waiting for a worker.
    pub queued: usize,
}

impl Capacity {
    /// A capacity of `workers` workers, `free` of them idle, `queued` calls waiting.
    pub fn new(workers: usize, free: usize, queued: usize) -> Self {
        Capacity { workers, free, queued }
    }
}

/// One call as a [`Backend`] receives it.
#[non_exhaustive]
pub struct BackendCall {
    /// The tool.
    pub command: String,
    /// Its arguments (forwarded as received).
    pub args: Payload,
    /// The front end's session, if any (the backend pins it to one of its workers).
    pub session: Option<String>,
    /// What is left of the call's budget.
    pub timeout: Option<Duration>,
    /// Answers the worker's host calls for this call: they travel back to the front end.
    pub host: Arc<dyn HostHandler>,
    /// A stream's window (chunks ahead of the consumer).
    pub window: u32,
}

impl std::fmt::Debug for BackendCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendCall")
            .field("command", &self.command)
            .field("session", &self.session)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What an agent serves: in practice a snakepit pool (`snakepit::agent`). Dropping a call's
/// future cancels the call.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The tools the workers offer.
    fn tools(&self) -> Vec<ToolInfo>;
    /// The workers' bridge (`python/0.1.0 (CPython 3.11)`), if known.
    fn bridge(&self) -> String {
        String::new()
    }
    /// How much it can take now.
    fn capacity(&self) -> Capacity;
    /// Runs one call.
    async fn call(&self, call: BackendCall) -> Result<Payload, CoreError>;
    /// Runs one streamed call.
    async fn stream(
        &self,
        call: BackendCall,
    ) -> Result<BoxStream<'static, Result<Payload, CoreError>>, CoreError>;
}

/// An agent's settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AgentOptions {
    /// Where to listen (`127.0.0.1:0`: a free port).
    pub listen: SocketAddr,
    /// Mutual TLS; `None` is plaintext, allowed on loopback addresses only.
    pub tls: Option<ServerTls>,
    /// How long calls in flight get to finish once the agent drains.
    pub shutdown_grace: Duration,
    /// HTTP/2 keepalive: a ping this often...
    pub keepalive_interval: Duration,
    /// ... which must be answered within this, or the connection (and its calls) is dropped.
    pub keepalive_timeout: Duration,
    /// A client that has not finished its TLS handshake by then is dropped.
    pub handshake_timeout: Duration,
}

impl AgentOptions {
    /// Listen on `listen` with `tls` (`None`: plaintext, loopback only); 10 s grace, keepalive
    /// every 2 s with a 3 s timeout.
    pub fn new(listen: SocketAddr, tls: Option<ServerTls>) -> Self {
        AgentOptions {
            listen,
            tls,
            shutdown_grace: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// Sets the drain grace.
    pub fn with_shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = d;
        self
    }
}

/// A bound agent, not serving yet.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    opts: AgentOptions,
    addr: SocketAddr,
}

/// Checks the settings (TLS files, plaintext only on loopback) and binds the listener.
pub async fn bind(opts: AgentOptions) -> Result<Listener, Error> {
    let tls = match &opts.tls {
        Some(t) => Some(t.config()?),
        None if opts.listen.ip().is_loopback() => None,
        None => return Err(Error::InsecureNotLoopback { addr: opts.listen.to_string() }),
    };
    crate::tls::install_crypto_provider();
    let tcp = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| Error::Bind { addr: opts.listen.to_string(), source })?;
    let addr = tcp.local_addr().map_err(|source| Error::Bind { addr: opts.listen.to_string(), source })?;
    Ok(Listener { tcp, tls, opts, addr })
}

impl Listener {
    /// The address it listens on (the real port when `:0` was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `backend` until `shutdown` resolves, then drains (see the module's doc) and
    /// returns once the calls in flight have ended or the grace ran out.
    pub async fn serve<F>(self, backend: Arc<dyn Backend>, shutdown: F) -> Result<(), Error>
    where
        F: std::future::Future<Output = ()> + Send,
    {
        let Listener { tcp, tls, opts, addr } = self;
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<AgentServer<Service>>().await;
        reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
        let (draining, _) = watch::channel(false);
        let (stopping, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            backend,
            draining: draining.clone(),
            stopping: stopping.clone(),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        });
        let (conns, incoming) = mpsc::channel::<Result<Io, std::io::Error>>(64);
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let accept = tokio::spawn(accept_loop(tcp, acceptor, conns, opts.handshake_timeout));
        let (stop_server, server_stopped) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(opts.keepalive_interval))
            .http2_keepalive_timeout(Some(opts.keepalive_timeout))
            .max_concurrent_streams(Some(MAX_STREAMS))
            .add_service(health)
            .add_service(
                AgentServer::new(Service { shared: shared.clone() })
                    .max_decoding_message_size(crate::MAX_MESSAGE)
                    .max_encoding_message_size(crate::MAX_MESSAGE),
            )
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async {
                let _ = server_stopped.await;
            });
        let mut server = tokio::spawn(server);
        tracing::info!(%addr, tls = opts.tls.is_some(), "agent serving");
        let failed = tokio::select! {
            _ = shutdown => None,
            r = &mut server => Some(r),
        };
        if let Some(r) = failed {
            accept.abort();
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Error::Serve(e.to_string())),
                Err(e) => Err(Error::Serve(e.to_string())),
            };
        }
        // Drain: refuse new calls, tell the front ends, let the running calls finish.
        draining.send_replace(true);
        reporter.set_not_serving::<AgentServer<Service>>().await;
        reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        let running = shared.in_flight.load(Ordering::Acquire);
        tracing::info!(running, grace = ?opts.shutdown_grace, "draining: no new calls; waiting for the running ones");
        let quiet = async {
            loop {
                let notified = shared.idle.notified();
                if shared.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(opts.shutdown_grace, quiet).await.is_err() {
            tracing::warn!(
                still_running = shared.in_flight.load(Ordering::Acquire),
                "calls still running after the shutdown grace; stopping anyway"
            );
        }
        // A moment more, still refusing: a call a front end sent before it saw `draining` is
        // refused (and sent elsewhere) rather than cut off by the connection's close.
        tokio::time::sleep(DRAIN_NOTICE).await;
        stopping.send_replace(true);
        accept.abort();
        let _ = stop_server.send(());
        if tokio::time::timeout(Duration::from_secs(3), &mut server).await.is_err() {
            server.abort();
        }
        Ok(())
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    conns: mpsc::Sender<Result<Io, std::io::Error>>,
    handshake_timeout: Duration,
) {
    let mut handshakes = tokio::task::JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, peer) = tokio::select! {
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: report, breathe, go on.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
        };
        let _ = stream.set_nodelay(true);
        match &acceptor {
            None => {
                if conns.send(Ok(Io::Plain(stream))).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let conns = conns.clone();
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                handshakes.spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = conns.send(Ok(Io::Tls(Box::new(tls)))).await;
                        }
                        Ok(Err(e)) => tracing::warn!(%peer, "refused a client: TLS handshake failed: {e}"),
                        Err(_) => tracing::warn!(%peer, "refused a client: no TLS handshake within {handshake_timeout:?}"),
                    }
                });
            }
        }
    }
}

/// A client connection: plain TCP (loopback) or TLS.
type Io = crate::io::MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

impl tonic::transport::server::Connected for Io {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

struct Shared {
    backend: Arc<dyn Backend>,
    draining: watch::Sender<bool>,
    stopping: watch::Sender<bool>,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Counts a call in flight until dropped.
struct Running(Arc<Shared>);

impl Running {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        Running(shared.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

struct Service {
    shared: Arc<Shared>,
}

type OutSender = mpsc::Sender<Result<AgentOut, Status>>;

fn out(msg: Out) -> Result<AgentOut, Status> {
    Ok(AgentOut { msg: Some(msg) })
}

/// How long a drained agent keeps refusing calls before it closes its connections.
const DRAIN_NOTICE: Duration = Duration::from_secs(1);

/// TLS handshakes in progress at once (more wait for their turn).
const MAX_HANDSHAKES: usize = 256;

/// Streams (calls) one front end's connection may have open at once.
const MAX_STREAMS: u32 = 4096;

#[tonic::async_trait]
impl Agent for Service {
    type CallStream = ReceiverStream<Result<AgentOut, Status>>;
    type StatusStream = ReceiverStream<Result<proto::AgentStatus, Status>>;

    async fn call(&self, request: Request<Streaming<AgentIn>>) -> Result<Response<Self::CallStream>, Status> {
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(AgentIn { msg: Some(In::Call(call)) }))) => call,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message of a call must be `call`")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no `call` within 10 s")),
        };
        let (tx, rx) = mpsc::channel(16);
        // Counted before the check, so that a drain cannot find the agent idle and stop while
        // this call slips in.
        let running = Running::new(&self.shared);
        if *self.shared.draining.borrow() {
            // Never ran: the front end sends it elsewhere (and learns that this agent drains).
            let _ = tx.try_send(out(Out::Error(wire::call_error(&CoreError::ShuttingDown))));
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let backend = self.shared.backend.clone();
        tokio::spawn(async move {
            run_call(backend, first, inbound, tx).await;
            drop(running);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _request: Request<proto::StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut draining = shared.draining.subscribe();
            let mut stopping = shared.stopping.subscribe();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let status = status_of(&shared);
                if tx.send(Ok(status)).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    r = draining.changed() => if r.is_err() { return },
                    _ = stopping.wait_for(|s| *s) => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn ping(&self, _request: Request<proto::AgentPing>) -> Result<Response<proto::AgentPing>, Status> {
        Ok(Response::new(proto::AgentPing {}))
    }
}

fn status_of(shared: &Shared) -> proto::AgentStatus {
    let cap = shared.backend.capacity();
    let draining = *shared.draining.borrow();
    proto::AgentStatus {
        workers: cap.workers as u32,
        free: cap.free as u32,
        queued: cap.queued as u32,
        draining,
        tools: shared
            .backend
            .tools()
            .into_iter()
            .map(|t| proto::AgentTool { name: t.name, doc: t.doc.unwrap_or_default(), stream: t.stream })
            .collect(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        bridge: shared.backend.bridge(),
    }
}

/// The front end's side of a call's host calls: sent on the call's stream, answered by its
/// `host_result`s.
struct CallHost {
    out: OutSender,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<proto::HostResult>>>,
}

impl CallHost {
    fn complete(&self, r: proto::HostResult) {
        let waiter = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&r.id);
        if let Some(w) = waiter {
            let _ = w.send(r);
        }
    }
}

fn werr(kind: &str, message: &str) -> WorkerError {
    WorkerError { kind: kind.into(), message: message.into(), traceback: None }
}

#[async_trait]
impl HostHandler for CallHost {
    async fn host_call(&self, call: HostCall) -> Result<Payload, WorkerError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let msg = proto::AgentHostCall { id, name: call.name, args: Some(wire::value(&call.args)) };
        if self.out.send(out(Out::HostCall(msg))).await.is_err() {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(werr("HostUnavailable", "the front end that made this call is gone"));
        }
        let r = rx.await.map_err(|_| werr("HostUnavailable", "the front end that made this call is gone"))?;
        match r.outcome {
            Some(proto::host_result::Outcome::Ok(v)) => Ok(wire::payload(v)),
            Some(proto::host_result::Outcome::Error(e)) => Err(wire::from_worker_error(e)),
            None => Err(werr("ProtocolError", "an empty host_result")),
        }
    }
}

/// What the front end said on the call's stream.
enum Said {
    Cancel,
    Credit(u32),
    Nothing,
}

fn said(m: Result<Option<AgentIn>, Status>, host: &CallHost) -> Said {
    match m {
        Ok(Some(AgentIn { msg: Some(In::HostResult(r)) })) => {
            host.complete(r);
            Said::Nothing
        }
        Ok(Some(AgentIn { msg: Some(In::Credit(n)) })) => Said::Credit(n),
        Ok(Some(AgentIn { msg: Some(In::Cancel(true)) })) => Said::Cancel,
        // The front end closed its side or went away: nobody waits for this call any more.
        Ok(None) | Err(_) => Said::Cancel,
        Ok(Some(_)) => Said::Nothing,
    }
}

async fn run_call(
    backend: Arc<dyn Backend>,
    first: proto::AgentCall,
    mut inbound: Streaming<AgentIn>,
    tx: OutSender,
) {
    let host =
        Arc::new(CallHost { out: tx.clone(), next: AtomicU64::new(1), pending: Mutex::new(HashMap::new()) });
    let command = first.command.clone();
    let call = BackendCall {
        command: first.command,
        args: first.args.map(wire::payload).unwrap_or_else(Payload::null),
        session: (!first.session.is_empty()).then_some(first.session),
        timeout: (first.timeout_ms > 0).then(|| Duration::from_millis(first.timeout_ms)),
        host: host.clone(),
        window: first.window.max(1),
    };
    let cancelled = || CoreError::Cancelled { command: command.clone() };
    if !first.stream {
        let fut = backend.call(call);
        tokio::pin!(fut);
        let r = loop {
            tokio::select! {
                r = &mut fut => break r,
                m = inbound.message() => if let Said::Cancel = said(m, &host) { break Err(cancelled()) },
            }
        };
        let msg = match r {
            Ok(p) => Out::Ok(wire::value(&p)),
            Err(e) => Out::Error(wire::call_error(&e)),
        };
        let _ = tx.send(out(msg)).await;
        return;
    }
    let mut credit = u64::from(call.window);
    let opened = {
        let fut = backend.stream(call);
        tokio::pin!(fut);
        loop {
            tokio::select! {
                r = &mut fut => break r,
                m = inbound.message() => match said(m, &host) {
                    Said::Cancel => break Err(cancelled()),
                    Said::Credit(n) => credit = credit.saturating_add(u64::from(n)),
                    Said::Nothing => {}
                },
            }
        }
    };
    let mut items = match opened {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(out(Out::Error(wire::call_error(&e)))).await;
            return;
        }
    };
    loop {
        // Wait for credit (answering host calls meanwhile), then for the next item.
        while credit == 0 {
            match said(inbound.message().await, &host) {
                Said::Cancel => {
                    let _ = tx.send(out(Out::Error(wire::call_error(&cancelled())))).await;
                    return;
                }
                Said::Credit(n) => credit = credit.saturating_add(u64::from(n)),
                Said::Nothing => {}
            }
        }
        let item = tokio::select! {
            i = items.next() => i,
            m = inbound.message() => {
                match said(m, &host) {
                    Said::Cancel => {
                        drop(items);
                        let _ = tx.send(out(Out::Error(wire::call_error(&cancelled())))).await;
                        return;
                    }
                    Said::Credit(n) => credit = credit.saturating_add(u64::from(n)),
                    Said::Nothing => {}
                }
                continue;
            }
        };
        let msg = match item {
            Some(Ok(p)) => {
                credit -= 1;
                Out::Chunk(wire::value(&p))
            }
            Some(Err(e)) => Out::Error(wire::call_error(&e)),
            None => Out::End(true),
        };
        let last = !matches!(msg, Out::Chunk(_));
        if tx.send(out(msg)).await.is_err() || last {
            return;
        }
    }
}
