//! The [`Transport`] and [`Connection`] traits and the types that cross them.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{Error, Payload, WorkerError};

/// Identifies one worker incarnation: its pool slot and how many times that slot has been
/// (re)started. Displayed as `worker SLOT.GENERATION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId {
    /// The pool slot (0-based).
    pub slot: usize,
    /// The slot's start count (0 for the first process).
    pub generation: u64,
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {}.{}", self.slot, self.generation)
    }
}

/// A request id, unique per connection. Ids stay below 2^53 so that every language's JSON
/// number holds them exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One call, as a transport sends it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Request {
    /// The id to send it under (from [`Connection::new_request_id`]); the transport assigns
    /// one when `None`.
    pub id: Option<RequestId>,
    /// The tool to run (shared: a pool hands out its catalog's copy of the name, so a call does
    /// not allocate for it).
    pub command: Arc<str>,
    /// Its arguments.
    pub args: Payload,
    /// When the caller stops waiting; the worker is told the remaining budget.
    pub deadline: Option<Instant>,
    /// The session this call belongs to, if any.
    pub session: Option<String>,
}

impl Request {
    /// A request for `command` with `args`, no deadline and no session.
    pub fn new(command: impl Into<Arc<str>>, args: Payload) -> Self {
        Request { id: None, command: command.into(), args, deadline: None, session: None }
    }

    /// Sets the session the request belongs to.
    pub fn with_session(mut self, session: Option<String>) -> Self {
        self.session = session;
        self
    }

    /// Sets the request id (see [`Connection::new_request_id`]).
    pub fn with_id(mut self, id: RequestId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the deadline.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }
}

/// A call from a worker to the host, made while one of its requests is in flight.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HostCall {
    /// The worker calling.
    pub worker: WorkerId,
    /// The request it is working on, if it said.
    pub request: Option<RequestId>,
    /// The host tool (or session operation: `session.get`, `session.set`, `session.delete`).
    pub name: String,
    /// Its arguments.
    pub args: Payload,
}

impl HostCall {
    /// A host call from `worker`, for `request`, to `name` with `args`.
    pub fn new(worker: WorkerId, request: Option<RequestId>, name: impl Into<String>, args: Payload) -> Self {
        HostCall { worker, request, name: name.into(), args }
    }
}

/// Answers workers' calls to the host (host tools, session variables).
#[async_trait]
pub trait HostHandler: Send + Sync + 'static {
    /// Runs one host call; an error is raised in the worker's code as an exception.
    async fn host_call(&self, call: HostCall) -> Result<Payload, WorkerError>;
}

/// What the host tells a worker first.
#[derive(Clone)]
#[non_exhaustive]
pub struct Hello {
    /// The worker being greeted.
    pub worker: WorkerId,
    /// Protocol versions the host speaks, newest first.
    pub versions: Vec<u32>,
    /// The largest frame body either side may send.
    pub max_frame: usize,
    /// Adapter configuration for the worker.
    pub config: serde_json::Value,
    /// Who answers the worker's calls to the host (none: they fail).
    pub host: Option<Arc<dyn HostHandler>>,
    /// How many calls the host may send the worker at once.
    pub max_in_flight: usize,
    /// Pipelining: how many calls the host may send a worker that runs one at a time (the
    /// next ones wait in the worker's input, in order, while it runs the first); 1: none.
    /// Offered only by a transport that supports it; see docs/protocol.md, "Pipelining".
    pub pipeline_depth: usize,
    /// Transport-specific settings for the worker (gRPC: socket path and token); `null` for stdio.
    pub transport: serde_json::Value,
    /// Busy-poll window: how long both ends poll for the next message before they sleep
    /// (zero: never). Trades CPU for the wake-up latency of a sleeping process.
    pub busy_poll: std::time::Duration,
    /// Whether the host will ping the worker while it runs calls (heartbeats of busy workers),
    /// if the worker announces it can answer then ([`Ready::busy_ping`]).
    pub busy_ping: bool,
    /// Whether the host offers binary segments (set by a transport that carries them; see
    /// [`Payload`] and docs/protocol.md).
    pub segments: bool,
    /// The shared-memory arena offered to the worker, if any (stdio; docs/protocol.md
    /// "Shared memory"). Made by the launcher before the worker starts, because the worker
    /// inherits its descriptor.
    pub shm: Option<ShmOffer>,
}

/// A shared-memory arena offered to a worker in [`Hello`]: segments of at least `threshold`
/// bytes travel through it instead of the pipe.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ShmOffer {
    /// The arena (the host's mapping).
    pub arena: Arc<snakepit_shm::Arena>,
    /// The descriptor number at which a cold worker inherited it (`hello.shm.fd`); a worker
    /// forked by a zygote receives it with its fork request instead.
    pub fd: i32,
    /// The smallest segment that goes through the arena.
    pub threshold: usize,
}

impl ShmOffer {
    /// An offer of `arena`, inherited at descriptor `fd`, for segments of `threshold` bytes or
    /// more.
    pub fn new(arena: Arc<snakepit_shm::Arena>, fd: i32, threshold: usize) -> Self {
        ShmOffer { arena, fd, threshold }
    }
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("worker", &self.worker)
            .field("versions", &self.versions)
            .field("max_frame", &self.max_frame)
            .field("host", &self.host.is_some())
            .finish_non_exhaustive()
    }
}

impl Hello {
    /// A hello for `worker` offering [`crate::PROTOCOL_VERSIONS`].
    pub fn new(worker: WorkerId, max_frame: usize, config: serde_json::Value) -> Self {
        Hello {
            worker,
            versions: crate::PROTOCOL_VERSIONS.to_vec(),
            max_frame,
            config,
            host: None,
            max_in_flight: 1,
            pipeline_depth: 1,
            transport: serde_json::Value::Null,
            busy_poll: std::time::Duration::ZERO,
            busy_ping: false,
            segments: false,
            shm: None,
        }
    }

    /// Offers heartbeats while busy (see [`Hello::busy_ping`]).
    pub fn with_busy_ping(mut self, on: bool) -> Self {
        self.busy_ping = on;
        self
    }

    /// Offers a shared-memory arena (see [`Hello::shm`]).
    pub fn with_shm(mut self, shm: Option<ShmOffer>) -> Self {
        self.shm = shm;
        self
    }

    /// Offers binary segments (see [`Hello::segments`]).
    pub fn with_segments(mut self, on: bool) -> Self {
        self.segments = on;
        self
    }

    /// Sets the busy-poll window (see [`Hello::busy_poll`]).
    pub fn with_busy_poll(mut self, d: std::time::Duration) -> Self {
        self.busy_poll = d;
        self
    }

    /// Sets the transport-specific settings sent to the worker.
    pub fn with_transport(mut self, t: serde_json::Value) -> Self {
        self.transport = t;
        self
    }

    /// Sets how many calls the host may send at once.
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Offers pipelining up to `depth` calls (see [`Hello::pipeline_depth`]).
    pub fn with_pipeline_depth(mut self, depth: usize) -> Self {
        self.pipeline_depth = depth.max(1);
        self
    }

    /// Sets the handler of the worker's calls to the host.
    pub fn with_host(mut self, host: Option<Arc<dyn HostHandler>>) -> Self {
        self.host = host;
        self
    }
}

/// A tool a worker offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ToolInfo {
    /// Its command name.
    pub name: String,
    /// Its documentation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<String>,
    /// Whether it produces a stream (a generator).
    #[serde(default)]
    pub stream: bool,
}

/// What a worker answers to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Ready {
    /// The protocol version the worker chose.
    pub version: u32,
    /// The worker's process id as it sees it.
    pub pid: u32,
    /// The tools it offers.
    #[serde(default)]
    pub tools: Vec<ToolInfo>,
    /// How many calls it runs at once.
    #[serde(default = "one")]
    pub max_in_flight: usize,
    /// The bridge's name and version, e.g. `python/0.1.0 (CPython 3.11.7)`.
    #[serde(default)]
    pub bridge: String,
    /// A signal the worker wants sent to its pid after each `cancel`, to interrupt a running
    /// call even inside a blocking system call (the Python bridge: SIGUSR1).
    #[serde(default)]
    pub cancel_signal: Option<i32>,
    /// How many calls the worker accepts at once while running them one at a time, in order
    /// (at most [`Hello::pipeline_depth`]); 1: no pipelining.
    #[serde(default = "one")]
    pub pipeline_depth: usize,
    /// A pipelined worker's cancel signals: the call at position `p` on the connection (calls
    /// counted from 0 in the order sent) is interrupted with `cancel_signals[p % len]`, so a
    /// signal meant for a call that has just ended is ignored by the next ones. Used only when
    /// there are more than `pipeline_depth` of them (a signal sent for call `p` just as it is
    /// answered may land in any of the `pipeline_depth` calls sent after it);
    /// `cancel_signal` serves when not pipelining.
    #[serde(default)]
    pub cancel_signals: Vec<i32>,
    /// Whether the worker answers `ping` while it runs calls (only when the host offered
    /// [`Hello::busy_ping`]): the host then pings it busy or idle.
    #[serde(default)]
    pub busy_ping: bool,
    /// Where the worker serves its transport (gRPC: `unix:/path`), if not on the pipe.
    #[serde(default)]
    pub address: Option<String>,
    /// Whether the worker accepts (and may send) binary segments; only when the host offered
    /// them.
    #[serde(default)]
    pub segments: bool,
    /// Whether the worker mapped the shared-memory arena offered in `hello` (and may put
    /// segments there); only when the host offered one.
    #[serde(default)]
    pub shm: bool,
    /// The worker did not list its commands (a `snakepit-v0` worker without declared tools):
    /// the pool sends any command instead of refusing those not in [`tools`](Self::tools).
    /// Never on the wire: a transport sets it.
    #[serde(skip)]
    pub open_tools: bool,
}

fn one() -> usize {
    1
}

impl ToolInfo {
    /// A tool that answers with one result, without documentation.
    pub fn new(name: impl Into<String>) -> Self {
        ToolInfo { name: name.into(), doc: None, stream: false }
    }

    /// A tool that answers with a stream of items (a generator).
    pub fn stream(name: impl Into<String>) -> Self {
        ToolInfo { stream: true, ..ToolInfo::new(name) }
    }

    /// Sets its documentation.
    pub fn with_doc(mut self, doc: Option<String>) -> Self {
        self.doc = doc;
        self
    }
}

impl Ready {
    /// What a worker that chose protocol `version` and runs as `pid` answers, with no tools,
    /// one call at a time, no bridge name, no cancel signal and no address: a transport that
    /// builds its `Ready` itself (rather than with [`handshake::parse_ready`](crate::handshake::parse_ready))
    /// starts here.
    ///
    /// ```
    /// use snakepit_core::{Ready, ToolInfo};
    /// let ready = Ready::new(1, 4242)
    ///     .with_tools(vec![ToolInfo::new("echo"), ToolInfo::stream("count")])
    ///     .with_max_in_flight(8)
    ///     .with_bridge("rust/0.1.0");
    /// assert_eq!(ready.max_in_flight, 8);
    /// assert!(ready.tools[1].stream);
    /// ```
    pub fn new(version: u32, pid: u32) -> Self {
        Ready {
            version,
            pid,
            tools: Vec::new(),
            max_in_flight: 1,
            bridge: String::new(),
            cancel_signal: None,
            pipeline_depth: 1,
            cancel_signals: Vec::new(),
            busy_ping: false,
            address: None,
            segments: false,
            shm: false,
            open_tools: false,
        }
    }

    /// Sets the pipeline depth the worker accepts (see [`Ready::pipeline_depth`]).
    pub fn with_pipeline_depth(mut self, depth: usize) -> Self {
        self.pipeline_depth = depth.max(1);
        self
    }

    /// Sets whether the worker answers pings while busy (see [`Ready::busy_ping`]).
    pub fn with_busy_ping(mut self, on: bool) -> Self {
        self.busy_ping = on;
        self
    }

    /// Sets a pipelined worker's cancel signals (see [`Ready::cancel_signals`]).
    pub fn with_cancel_signals(mut self, signals: Vec<i32>) -> Self {
        self.cancel_signals = signals;
        self
    }

    /// The signal that interrupts the call at `position` on the connection, if the worker
    /// announced one: `cancel_signal` without pipelining, else one of `cancel_signals` (none
    /// when it announced no more than its depth: a signal could then reach the wrong call).
    pub fn cancel_signal_for(&self, position: u64) -> Option<i32> {
        if self.pipeline_depth <= 1 {
            return self.cancel_signal;
        }
        let n = self.cancel_signals.len();
        (n > self.pipeline_depth).then(|| self.cancel_signals[(position % n as u64) as usize])
    }

    /// Sets whether the worker accepts binary segments (see [`Ready::segments`]).
    pub fn with_segments(mut self, on: bool) -> Self {
        self.segments = on;
        self
    }

    /// Sets the tools the worker offers.
    pub fn with_tools(mut self, tools: Vec<ToolInfo>) -> Self {
        self.tools = tools;
        self
    }

    /// Sets how many calls the worker runs at once (at least 1).
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Sets the bridge's name and version.
    pub fn with_bridge(mut self, bridge: impl Into<String>) -> Self {
        self.bridge = bridge.into();
        self
    }

    /// Sets the signal to send the worker after each `cancel` (see [`Ready::cancel_signal`]).
    pub fn with_cancel_signal(mut self, signal: Option<i32>) -> Self {
        self.cancel_signal = signal;
        self
    }

    /// Sets where the worker serves its transport (see [`Ready::address`]).
    pub fn with_address(mut self, address: Option<String>) -> Self {
        self.address = address;
        self
    }
}

/// The pipes of a started worker process, as the supervisor hands them to a transport.
pub struct WorkerIo {
    /// The worker this is.
    pub worker: WorkerId,
    /// Host → worker bytes (the worker's stdin).
    pub input: Box<dyn AsyncWrite + Send + Unpin>,
    /// Worker → host bytes (the worker's protocol output).
    pub output: Box<dyn AsyncRead + Send + Unpin>,
}

impl fmt::Debug for WorkerIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerIo").field("worker", &self.worker).finish_non_exhaustive()
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The worker's output reached end-of-file (it exited or closed its side).
    Eof,
    /// The worker broke the protocol; every call in flight failed with [`Error::Protocol`].
    ///
    /// A text, not an error value: the reason is cloned into the error of every call in flight
    /// (and of every later one), and the errors behind it (`serde_json`, I/O) are not `Clone`;
    /// the text carries their message.
    Protocol(String),
    /// The host closed the connection.
    Closed,
}

/// Turns a started worker's pipes into a [`Connection`], doing the handshake.
///
/// # Writing a transport
///
/// A transport in its own crate needs only this crate:
///
/// * the handshake: send the body [`handshake::encode_hello`](crate::handshake::encode_hello)
///   writes, in whatever framing the transport uses, read the worker's first message and hand its
///   body to [`handshake::parse_ready`](crate::handshake::parse_ready), which turns `refuse`,
///   malformed messages and unoffered versions into the errors the pool expects;
/// * [`Connection::idle`] and [`Connection::answered`]: an [`InFlight`](crate::InFlight) set
///   that each call enters for as long as it runs;
/// * [`Connection::start`]: its default boxes [`Connection::call`]; override it only to answer
///   through a reused [`ReplySlot`](crate::ReplySlot).
///
/// A transport that keeps the worker's stdio pipe for the handshake, heartbeats and crash
/// detection (as the gRPC transport does) can use the stdio crate's control channel
/// (`snakepit_transport_stdio::control`) instead of its own handshake.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Sends `hello`, waits for `ready` and returns the live connection. The caller bounds this
    /// with the adapter's handshake timeout and watches the process for an early exit.
    async fn connect(&self, io: WorkerIo, hello: Hello) -> Result<(Arc<dyn Connection>, Ready), Error>;

    /// The largest frame body this transport sends or accepts.
    fn max_frame(&self) -> usize;

    /// The protocol this transport speaks (default: v1); see [`crate::Protocol`].
    fn protocol(&self) -> crate::Protocol {
        crate::Protocol::V1
    }

    /// Whether this transport can use a shared-memory arena ([`Hello::shm`]); a launcher makes
    /// one for each worker only if so. `false` unless overridden.
    fn shared_memory(&self) -> bool {
        false
    }
}

/// A live, multiplexed link to one worker, usable from many tasks at once.
///
/// A dropped `call` future leaves the connection consistent: its id is abandoned, a late reply
/// for it is dropped, never handed to another caller, and [`Connection::idle`] waits for it.
///
/// Nine methods are required; [`start`](Connection::start) and
/// [`is_closed`](Connection::is_closed) have defaults written with
/// [`call`](Connection::call) and [`closed`](Connection::closed).
#[async_trait]
pub trait Connection: Send + Sync + 'static {
    /// Sends one request and waits for its reply.
    async fn call(&self, req: Request) -> Result<Payload, Error>;

    /// Sends one request and returns the future of its reply: what [`call`](Connection::call)
    /// does, as a concrete type. The default boxes `call`'s future; a transport that can should
    /// answer through a reused [`ReplySlot`](crate::ReplySlot) instead, so that a call costs no
    /// allocation beyond its frame. Dropping the future abandons the call, as with `call`.
    fn start(&self, req: Request) -> crate::ReplyFuture<'_> {
        crate::ReplyFuture::boxed(self.call(req))
    }

    /// Sends one request as a stream: the worker sends its items as chunks, at most `window`
    /// ahead of the consumer (credit-based flow control), then ends. Dropping the stream
    /// abandons the call (send a [`cancel`](Connection::cancel) to stop the worker's side).
    async fn stream(
        &self,
        req: Request,
        window: u32,
    ) -> Result<BoxStream<'static, Result<Payload, Error>>, Error>;

    /// Round-trips a `ping`; returns the time it took.
    async fn ping(&self) -> Result<Duration, Error>;

    /// Asks the worker to exit and closes the host's side of the connection.
    async fn shutdown(&self);

    /// Resolves when the connection is gone, with the reason.
    fn closed(&self) -> BoxFuture<'static, CloseReason>;

    /// Whether the worker can take no more calls: the connection is gone, or (a remote worker)
    /// it is leaving ([`WorkerHandle::leaving`](crate::WorkerHandle::leaving)) and finishes only
    /// the calls it has; [`closed`](Connection::closed) resolves only in the first case. The default polls
    /// [`closed`](Connection::closed) once, which allocates; the pool asks on every check-in, so
    /// a transport with a cheaper answer should give it.
    fn is_closed(&self) -> bool {
        futures::FutureExt::now_or_never(self.closed()).is_some()
    }

    /// A fresh request id, so that a caller can later [`cancel`](Connection::cancel) its call.
    fn new_request_id(&self) -> RequestId;

    /// Asks the worker to stop working on `id` (the call's future may already be gone). The
    /// worker still answers it (with a result or a `Cancelled` error), which is then dropped.
    fn cancel(&self, id: RequestId);

    /// Resolves when the worker has answered every call sent to it, abandoned ones included
    /// (or the connection is gone).
    fn idle(&self) -> BoxFuture<'static, ()>;

    /// Resolves when the worker has answered call `id` (or the connection is gone).
    fn answered(&self, id: RequestId) -> BoxFuture<'static, ()>;

    /// Where call `id` stands on a pipelined connection (a worker that runs its calls one at a
    /// time, in the order sent, the later ones waiting in its input): `Some(position)` while the
    /// worker runs it — it is the oldest call not yet answered — `position` being its index
    /// among the calls sent on this connection (from 0); `None` while it waits behind another
    /// call, or once it is answered. The host's view may lag the worker's by the answers in
    /// transit, which is why a pipelined worker's cancel signals depend on the position (see
    /// [`Ready::cancel_signals`]). The default, for a connection whose calls all run at once:
    /// `Some(0)`.
    fn running(&self, _id: RequestId) -> Option<u64> {
        Some(0)
    }

    /// Resolves once call `id` runs (see [`running`](Connection::running)), is answered, or
    /// the connection is gone. The default resolves at once.
    fn started(&self, _id: RequestId) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    /// A private directory this connection created (the gRPC transport's socket directory)
    /// and removes when dropped. A host killed by SIGKILL cannot remove it, so the process
    /// launcher records it in the run registry, whose `reap` removes it. Default: none.
    fn private_dir(&self) -> Option<&std::path::Path> {
        None
    }
}
