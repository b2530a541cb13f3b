//! # snakepit-transport-stdio
//!
//! The framed stdio transport: every message is a `u32` big-endian length followed by a JSON
//! body (protocol v1, see `docs/protocol.md`). One [`StdioConnection`] multiplexes calls by
//! request id, so it is safe to use from many tasks at once.
//!
//! Guarantees:
//! * an outbound body over `max_frame` fails its caller with [`Error::FrameTooLarge`] before
//!   anything is written; the worker is untouched;
//! * an inbound frame over `max_frame`, a body that is not a valid message, or a frame whose body
//!   stops arriving for `frame_timeout` closes the connection with [`CloseReason::Protocol`] and
//!   fails every call in flight with [`Error::Protocol`];
//! * a reply for an id nobody waits for (its caller gave up) is dropped and logged, never handed
//!   to another caller;
//! * a dropped `call` future forgets its id; a frame is written whole (by its caller when the
//!   pipe has room and nothing is queued, else by the writer task), so a caller that goes away
//!   can never leave half a frame on the pipe.
//!
//! The handshake is [`snakepit_core::handshake`]'s, in frames. Another transport can keep the
//! worker's pipe for the handshake, heartbeats, shutdown and crash detection only: see
//! [`control`].

#![deny(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use snakepit_core::shm::{Arena, Region};
use snakepit_core::wire::{self, Inbound, SegEntry};
use snakepit_core::{
    handshake, CloseReason, Codec, Connection, Error, Hello, HostCall, HostHandler, Payload, Ready,
    ReplyFuture, ReplySlot, Request, RequestId, SlotOwner, Transport, WorkerError, WorkerId, WorkerIo,
    DEFAULT_MAX_FRAME,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot, watch};

pub mod control;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod host;
mod order;
mod outbox;
mod reader;
mod shm;
mod stream;
pub mod v0;

use frame::{frame, frame_segmented, segmented_json, segments_of, FrameReader, Placement, ReadOutcome};
use host::host_call;
pub use host::MAX_HOST_CALLS;
use order::CallOrder;
use outbox::Outbox;
use reader::{read_loop, LogLimit};
use shm::ShmState;
use stream::{Credit, ReplyStream, StreamItem};
pub use v0::SnakepitV0;

/// The default time a frame's body may stall once its header has arrived.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// The framed stdio transport. Cheap to clone; holds only its limits.
#[derive(Debug, Clone)]
pub struct StdioTransport {
    max_frame: usize,
    frame_timeout: Duration,
}

impl Default for StdioTransport {
    fn default() -> Self {
        StdioTransport { max_frame: DEFAULT_MAX_FRAME, frame_timeout: DEFAULT_FRAME_TIMEOUT }
    }
}

impl StdioTransport {
    /// A transport with the default limits (64 MiB frames, 10 s frame timeout).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the largest frame body either side may send.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes.max(64);
        self
    }

    /// Sets how long a frame's body may stall once its header has arrived.
    pub fn frame_timeout(mut self, t: Duration) -> Self {
        self.frame_timeout = t;
        self
    }
}

#[async_trait]
impl Transport for StdioTransport {
    async fn connect(&self, io: WorkerIo, hello: Hello) -> Result<(Arc<dyn Connection>, Ready), Error> {
        let (conn, ready) = StdioConnection::connect(io, hello, self.frame_timeout).await?;
        Ok((Arc::new(conn) as Arc<dyn Connection>, ready))
    }

    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn shared_memory(&self) -> bool {
        true
    }
}

/// Who waits for an id: a call (its reply slot), a ping (one reply) or a stream (chunks, then
/// the end).
enum Waiter {
    Slot { slot: Arc<ReplySlot>, command: Arc<str> },
    Call(oneshot::Sender<Reply>),
    Stream { tx: mpsc::Sender<StreamItem>, credit: Arc<Credit>, received: u64 },
}

/// How many idle reply slots a connection keeps for reuse (one per call it runs at once is
/// enough; more are freed).
const MAX_FREE_SLOTS: usize = 64;

/// What the reader hands a waiting `ping`.
#[derive(Debug)]
enum Reply {
    Pong,
    /// A `result` or `error` for a ping's id.
    NotPong(&'static str),
    Closed(CloseReason),
}

struct Shared {
    worker: WorkerId,
    max_frame: usize,
    /// Calls waiting for a reply. `None` is an abandoned call (its caller went away before
    /// the reply): the worker is still busy with it, so it counts as in flight until its reply
    /// arrives, which is then dropped.
    pending: Mutex<HashMap<u64, Option<Waiter>>>,
    closed: watch::Sender<Option<CloseReason>>,
    /// Notified whenever the pending map becomes empty.
    idle: tokio::sync::Notify,
    /// Answers the worker's `host_call`s.
    host: Option<Arc<dyn HostHandler>>,
    /// The worker's stdin.
    outbox: Outbox,
    /// Reply slots of finished calls, reused by the next ones.
    free_slots: Mutex<Vec<Arc<ReplySlot>>>,
    /// The worker's `host_call`s whose `host_result` is not yet written to its stdin.
    host_calls: Arc<AtomicUsize>,
    /// Completed reads from the worker's output (numbers them for stream credit checks).
    reads: Arc<AtomicU64>,
    /// Replies for ids nobody waits for, logged at most once a second.
    unknown_replies: Mutex<LogLimit>,
    /// Whether the worker announced binary segments (set once its `ready` is in).
    segments: AtomicBool,
    /// The shared-memory arena, when the worker mapped the one offered (set once its `ready`
    /// is in).
    shm: OnceLock<ShmState>,
    /// Whether the worker pipelines (its `ready.pipeline_depth` > 1; set once it is in): then
    /// `order` tracks the calls, and a crash fails the queued ones with `NotStarted`.
    pipelined: AtomicBool,
    /// A pipelined connection's calls in flight, in order. Lock order: `order`, then the outbox.
    order: Mutex<CallOrder>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Option<Waiter>>> {
        // A panic while holding this lock cannot leave the map inconsistent: recover it.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn order(&self) -> MutexGuard<'_, CallOrder> {
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_pipelined(&self) -> bool {
        self.pipelined.load(Ordering::Acquire)
    }

    /// Marks the connection closed (first reason wins) and fails every pending call with the
    /// close's error.
    fn close(&self, reason: CloseReason) {
        self.close_with(reason, false);
    }

    /// Like [`close`](Self::close), when the reader met the end of the worker's output: it has
    /// read every answer the worker wrote, so on a pipelined connection the oldest unanswered
    /// call is the one the worker ran, and the calls queued behind it fail with `NotStarted`.
    /// (Closed from elsewhere — a failed write, the host dropping the connection — answers may
    /// still be unread: no call is known not to have started.)
    fn close_at_eof(&self) {
        self.close_with(CloseReason::Eof, true);
    }

    fn close_with(&self, reason: CloseReason, exact_order: bool) {
        let mut first = false;
        self.closed.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(reason.clone());
                first = true;
                true
            } else {
                false
            }
        });
        let reason = self.closed.borrow().clone().unwrap_or(reason);
        if first {
            match &reason {
                CloseReason::Protocol(d) => tracing::warn!(worker = %self.worker, "protocol error: {d}"),
                r => tracing::debug!(worker = %self.worker, reason = ?r, "connection closed"),
            }
        }
        let running = self.order().oldest();
        let queued = |id: u64| exact_order && self.is_pipelined() && Some(id) != running;
        let drained: Vec<_> = self.pending().drain().collect();
        for (id, w) in drained {
            match w {
                Some(Waiter::Slot { slot, command }) if queued(id) => {
                    slot.fill(Err(Error::NotStarted { worker: self.worker, command: command.to_string() }))
                }
                Some(Waiter::Slot { slot, .. }) => slot.fill(Err(self.error_for(&reason))),
                Some(Waiter::Call(tx)) => {
                    let _ = tx.send(Reply::Closed(reason.clone()));
                }
                Some(Waiter::Stream { tx, .. }) if queued(id) => {
                    let _ = tx.try_send(StreamItem::NotStarted);
                }
                Some(Waiter::Stream { tx, .. }) => {
                    let _ = tx.try_send(StreamItem::Closed(reason.clone()));
                }
                None => {}
            }
        }
        self.idle.notify_waiters();
    }

    fn close_reason(&self) -> Option<CloseReason> {
        self.closed.borrow().clone()
    }

    fn error_for(&self, reason: &CloseReason) -> Error {
        match reason {
            CloseReason::Protocol(detail) => {
                Error::Protocol { worker: self.worker, detail: detail.clone(), source: None }
            }
            _ => Error::Disconnected { worker: self.worker },
        }
    }

    /// An empty reply slot: a reused one when there is one.
    fn take_slot(&self) -> Arc<ReplySlot> {
        self.free_slots.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default()
    }

    /// Forgets call `id` (if it is still pending) and notifies `idle()` waiters.
    fn forget(&self, id: u64) {
        self.pending().remove(&id);
        self.idle.notify_waiters();
    }
}

impl SlotOwner for Shared {
    fn release(&self, id: RequestId, slot: Arc<ReplySlot>, answered: bool) {
        if !answered {
            // The caller went away before its reply: leave a tombstone, so that the worker counts
            // as busy until the reply comes, and the reply is then dropped.
            if let Some(w) = self.pending().get_mut(&id.0) {
                *w = None;
            }
        }
        // Reusable once nobody else holds it (the reader drops its reference after filling).
        if Arc::strong_count(&slot) == 1 {
            slot.reset();
            let mut free = self.free_slots.lock().unwrap_or_else(|p| p.into_inner());
            if free.len() < MAX_FREE_SLOTS {
                free.push(slot);
            }
        }
    }
}

/// Closes the worker's stdin and stops the writer task when a handshake fails.
struct Abandon<'a> {
    shared: &'a Shared,
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl Abandon<'_> {
    /// The handshake succeeded: the connection owns the writer from now on.
    fn disarm(mut self) {
        self.writer = None;
    }
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            self.shared.outbox.close();
            w.abort();
        }
    }
}

/// A live framed-stdio connection to one worker.
pub struct StdioConnection {
    shared: Arc<Shared>,
    /// How long a caller polls for its reply before it sleeps.
    busy_poll: Duration,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for StdioConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdioConnection").field("worker", &self.shared.worker).finish_non_exhaustive()
    }
}

impl Drop for StdioConnection {
    fn drop(&mut self) {
        self.reader.abort();
        self.shared.close(CloseReason::Closed);
        // The writer task drains what is queued, then closes the worker's stdin.
        self.shared.outbox.close();
    }
}

/// When a caller goes away before its reply, leaves a tombstone for its id: the reply is
/// dropped when it comes, and the worker counts as busy until then.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut pending = self.shared.pending();
        if let Some(slot) = pending.get_mut(&self.id) {
            *slot = None;
        }
    }
}

/// The writer task: writes what callers queued when the pipe was full, and closes the worker's
/// stdin once the connection is done with it.
async fn write_loop(shared: Arc<Shared>) {
    if let Err(e) = std::future::poll_fn(|cx| shared.outbox.poll_drive(cx)).await {
        tracing::debug!(worker = %shared.worker, "write to worker failed: {e}");
        if shared.is_pipelined() {
            // The worker is most likely gone: let the reader take the answers it wrote first and
            // close at their end, so that which call ran and which never started is exact.
            let mut closed = shared.closed.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(1), closed.wait_for(Option::is_some)).await;
        }
        shared.close(CloseReason::Eof);
    }
}

impl StdioConnection {
    /// Performs the handshake on `io` ([`handshake::encode_hello`], then
    /// [`handshake::parse_ready`] on the first frame) and returns the connection and the
    /// worker's `ready`. A frame whose body stalls for `frame_timeout` once its header has
    /// arrived breaks the connection ([`DEFAULT_FRAME_TIMEOUT`] is the transport's default).
    ///
    /// Fails with what [`handshake::parse_ready`] reports, with [`Error::Disconnected`] when the
    /// worker's output ends first, and with [`Error::Protocol`] when its first frame is broken;
    /// the worker's stdin is then closed. To use the pipe only as another transport's control
    /// channel, see [`control::connect`].
    pub async fn connect(
        io: WorkerIo,
        hello: Hello,
        frame_timeout: Duration,
    ) -> Result<(Self, Ready), Error> {
        let worker = io.worker;
        let max_frame = hello.max_frame;
        let (closed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            worker,
            max_frame,
            pending: Mutex::new(HashMap::new()),
            closed,
            idle: tokio::sync::Notify::new(),
            host: hello.host.clone(),
            outbox: Outbox::new(io.input),
            free_slots: Mutex::new(Vec::new()),
            host_calls: Arc::new(AtomicUsize::new(0)),
            reads: Arc::new(AtomicU64::new(0)),
            unknown_replies: Mutex::new(LogLimit::default()),
            segments: AtomicBool::new(false),
            shm: OnceLock::new(),
            pipelined: AtomicBool::new(false),
            order: Mutex::new(CallOrder::default()),
        });
        // This transport carries binary segments: offer them.
        let hello = hello.with_segments(true);
        let hello_frame = frame(256, max_frame, |out| handshake::encode_hello(out, &hello))?;
        let _ = shared.outbox.push(hello_frame);
        let writer = tokio::spawn(write_loop(shared.clone()));
        // Until the handshake succeeds, any return closes the worker's stdin and stops the writer.
        let guard = Abandon { shared: &shared, writer: Some(writer) };
        let mut reader = FrameReader::new(io.output, max_frame, frame_timeout, shared.reads.clone());
        let first = match reader.next().await {
            ReadOutcome::Frame(f, false) => f,
            ReadOutcome::Frame(_, true) => {
                return Err(Error::Protocol {
                    worker,
                    detail: "during handshake: a segmented frame before `ready`".into(),
                    source: None,
                })
            }
            ReadOutcome::Eof => return Err(Error::Disconnected { worker }),
            ReadOutcome::Broken(d) => {
                return Err(Error::Protocol {
                    worker,
                    detail: format!("during handshake: {d}"),
                    source: None,
                })
            }
        };
        let ready = handshake::parse_ready(&hello, &first)?;
        shared.segments.store(ready.segments, Ordering::Release);
        shared.pipelined.store(ready.pipeline_depth > 1, Ordering::Release);
        if let (true, Some(offer)) = (ready.shm && ready.segments, &hello.shm) {
            let _ = shared.shm.set(ShmState::new(offer.arena.clone(), offer.threshold));
        }
        guard.disarm();
        let reader = tokio::spawn(read_loop(reader, shared.clone()));
        let conn = StdioConnection {
            shared,
            busy_poll: effective_busy_poll(hello.busy_poll),
            next_id: AtomicU64::new(1),
            reader,
        };
        Ok((conn, ready))
    }

    fn send(&self, frame: Vec<u8>) -> Result<(), Error> {
        self.shared.outbox.push(frame).map_err(|_| self.closed_error())
    }

    /// Sends call `id`'s frame; on a pipelined connection, records its place in the order
    /// under the same lock, so that positions follow the pipe.
    fn send_call_frame(&self, id: u64, frame: Vec<u8>) -> Result<(), Error> {
        if !self.shared.is_pipelined() {
            return self.send(frame);
        }
        let mut order = self.shared.order();
        self.send(frame)?;
        order.sent(id);
        Ok(())
    }

    fn closed_error(&self) -> Error {
        let reason = self.shared.close_reason().unwrap_or(CloseReason::Closed);
        self.shared.error_for(&reason)
    }

    /// Checks a request's arguments (unless an encoder made them) and encodes its `call` frame
    /// (`window`: as a stream). Returns the request id, the frame and the arena regions its
    /// large segments went to.
    fn call_frame(&self, req: &Request, window: Option<u32>) -> Result<(u64, Vec<u8>, Vec<Region>), Error> {
        let args = req.args.bytes();
        if !req.args.is_trusted() {
            serde_json::from_slice::<serde::de::IgnoredAny>(args).map_err(|e| {
                Error::BadRequest(format!("arguments of `{}` are not valid JSON: {e}", req.command))
            })?;
        }
        let id = req.id.map_or_else(|| self.next_id(), |id| id.0);
        let timeout_ms = req
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()).as_millis().min(u64::MAX as u128) as u64);
        let encode = |out: &mut Vec<u8>| {
            wire::encode_call(out, id, &req.command, args, timeout_ms, window, req.session.as_deref())
        };
        let capacity = args.len() + req.command.len() + 80;
        let f = if req.args.has_segments() {
            if !self.shared.segments.load(Ordering::Acquire) {
                return Err(Error::BadRequest(format!(
                    "arguments of `{}` carry binary segments, and this worker does not accept them (its `ready` \
                     did not announce `segments`)",
                    req.command
                )));
            }
            let placement = self.shared.shm.get().map(ShmState::placement);
            frame_segmented(capacity, self.shared.max_frame, req.args.segments(), placement, encode)?
        } else {
            (frame(capacity, self.shared.max_frame, encode)?, Vec::new())
        };
        Ok((id, f.0, f.1))
    }

    /// Records the arena regions of call `id` (freed when it is answered).
    fn lease(&self, id: u64, regions: Vec<Region>) {
        if let Some(shm) = self.shared.shm.get() {
            shm.lease(id, regions);
        }
    }

    /// Frees the regions leased to call `id`, whose frame could not be sent.
    fn settle_unsent(&self, id: u64) {
        if let Some(shm) = self.shared.shm.get() {
            shm.settle(id, false);
        }
    }

    /// Frees the arena regions of a call that was never sent.
    fn unsent(&self, regions: Vec<Region>) {
        if let Some(shm) = self.shared.shm.get() {
            shm.unsent(regions);
        }
    }

    /// Encodes and sends a call; its reply comes through a (reused) slot, so the call allocates
    /// nothing but its frame.
    fn send_call(&self, req: Request) -> Result<ReplyFuture<'static>, Error> {
        let (id, frame, regions) = self.call_frame(&req, None)?;
        if let Some(reason) = self.shared.close_reason() {
            self.unsent(regions);
            return Err(self.shared.error_for(&reason));
        }
        let slot = self.shared.take_slot();
        self.shared.pending().insert(id, Some(Waiter::Slot { slot: slot.clone(), command: req.command }));
        // The reader may have closed between the check and the insert: re-check.
        if let Some(reason) = self.shared.close_reason() {
            self.shared.forget(id);
            self.unsent(regions);
            return Err(self.shared.error_for(&reason));
        }
        // Before the frame goes out: the answer may come (and settle them) at once.
        self.lease(id, regions);
        if let Err(e) = self.send_call_frame(id, frame) {
            self.shared.forget(id);
            self.settle_unsent(id);
            return Err(e);
        }
        // Busy-poll: the caller re-polls (yielding to the runtime, which polls the pipe without
        // sleeping) until the reply is in or the window is over; a sleeping thread would pay the
        // CPU's wake-up latency instead. Only on a current-thread runtime: on a multi-thread one
        // the reply's readiness may go to another, parked, runtime thread, and spinning here
        // would only take a CPU from it and from the worker.
        let spin_until = (!self.busy_poll.is_zero() && on_current_thread_runtime())
            .then(|| Instant::now() + self.busy_poll);
        let owner: Arc<dyn SlotOwner> = self.shared.clone();
        Ok(ReplyFuture::slot(slot, owner, RequestId(id), spin_until))
    }

    async fn round_trip(&self, id: u64, frame: Vec<u8>) -> Result<Reply, Error> {
        if let Some(reason) = self.shared.close_reason() {
            return Err(self.shared.error_for(&reason));
        }
        let (tx, rx) = oneshot::channel();
        self.shared.pending().insert(id, Some(Waiter::Call(tx)));
        let _guard = PendingGuard { shared: &self.shared, id };
        // The reader may have closed between the check and the insert: re-check.
        if let Some(reason) = self.shared.close_reason() {
            return Err(self.shared.error_for(&reason));
        }
        self.send(frame)?;
        match rx.await {
            Ok(Reply::Closed(reason)) => Err(self.shared.error_for(&reason)),
            Ok(r) => Ok(r),
            Err(_) => Err(self.closed_error()),
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

fn on_current_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}

/// The busy-poll window, or zero when this process may run on one CPU only: polling there
/// would keep the CPU from the worker it waits for.
fn effective_busy_poll(d: Duration) -> Duration {
    if d.is_zero() || std::thread::available_parallelism().map_or(1, |n| n.get()) <= 1 {
        Duration::ZERO
    } else {
        d
    }
}

/// Resolves when no call is pending (abandoned ones included) or the connection is closed.
fn wait_idle(shared: Arc<Shared>) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        loop {
            let notified = shared.idle.notified();
            if shared.pending().is_empty() || shared.close_reason().is_some() {
                return;
            }
            notified.await;
        }
    })
}

#[async_trait]
impl Connection for StdioConnection {
    async fn call(&self, req: Request) -> Result<Payload, Error> {
        self.start(req).await
    }

    fn start(&self, req: Request) -> ReplyFuture<'_> {
        match self.send_call(req) {
            Ok(reply) => reply,
            Err(e) => ReplyFuture::ready(Err(e)),
        }
    }

    async fn stream(
        &self,
        req: Request,
        window: u32,
    ) -> Result<BoxStream<'static, Result<Payload, Error>>, Error> {
        let window = window.max(1);
        let (id, f, regions) = self.call_frame(&req, Some(window))?;
        if let Some(reason) = self.shared.close_reason() {
            self.unsent(regions);
            return Err(self.shared.error_for(&reason));
        }
        self.lease(id, regions);
        // Room for a full window of chunks plus the end (or an error, or a close).
        let (tx, rx) = mpsc::channel(window as usize + 2);
        let credit = Arc::new(Credit::new(window));
        self.shared.pending().insert(id, Some(Waiter::Stream { tx, credit: credit.clone(), received: 0 }));
        let stream = ReplyStream::new(rx, self.shared.clone(), credit, id, req.command.to_string(), window);
        // If the send fails, the stream's drop leaves a tombstone; the close drains it.
        if let Err(e) = self.send_call_frame(id, f) {
            self.settle_unsent(id);
            return Err(e);
        }
        Ok(Box::pin(stream))
    }

    async fn ping(&self) -> Result<Duration, Error> {
        let id = self.next_id();
        let frame = frame(32, self.shared.max_frame, |out| wire::encode_simple(out, "ping", Some(id)))?;
        let start = Instant::now();
        match self.round_trip(id, frame).await? {
            Reply::Pong => Ok(start.elapsed()),
            Reply::NotPong(tag) => Err(Error::Protocol {
                worker: self.shared.worker,
                detail: format!("ping {id} answered by `{tag}`"),
                source: None,
            }),
            Reply::Closed(reason) => Err(self.shared.error_for(&reason)),
        }
    }

    async fn shutdown(&self) {
        if let Ok(f) = frame(32, self.shared.max_frame, |out| wire::encode_simple(out, "shutdown", None)) {
            let _ = self.send(f);
        }
        // The writer task drains what is queued, then closes the worker's stdin.
        self.shared.outbox.close();
    }

    fn closed(&self) -> BoxFuture<'static, CloseReason> {
        when_closed(&self.shared.closed)
    }

    fn is_closed(&self) -> bool {
        self.shared.close_reason().is_some()
    }

    fn new_request_id(&self) -> RequestId {
        RequestId(self.next_id())
    }

    fn cancel(&self, id: RequestId) {
        if let Ok(f) = frame(40, self.shared.max_frame, |out| wire::encode_simple(out, "cancel", Some(id.0)))
        {
            let _ = self.send(f);
        }
    }

    fn idle(&self) -> BoxFuture<'static, ()> {
        wait_idle(self.shared.clone())
    }

    fn running(&self, id: RequestId) -> Option<u64> {
        if !self.shared.is_pipelined() {
            return Some(0);
        }
        self.shared.order().running(id.0)
    }

    fn started(&self, id: RequestId) -> BoxFuture<'static, ()> {
        let shared = self.shared.clone();
        Box::pin(async move {
            loop {
                let notified = shared.idle.notified();
                if !shared.is_pipelined()
                    || shared.order().running(id.0).is_some()
                    || !shared.pending().contains_key(&id.0)
                    || shared.close_reason().is_some()
                {
                    return;
                }
                notified.await;
            }
        })
    }

    fn answered(&self, id: RequestId) -> BoxFuture<'static, ()> {
        let shared = self.shared.clone();
        Box::pin(async move {
            loop {
                let notified = shared.idle.notified();
                if !shared.pending().contains_key(&id.0) || shared.close_reason().is_some() {
                    return;
                }
                notified.await;
            }
        })
    }
}

/// Resolves with the reason once `closed` holds one (a connection's close signal).
pub(crate) fn when_closed(closed: &watch::Sender<Option<CloseReason>>) -> BoxFuture<'static, CloseReason> {
    let mut rx = closed.subscribe();
    Box::pin(async move {
        match rx.wait_for(|r| r.is_some()).await {
            Ok(r) => r.clone().unwrap_or(CloseReason::Closed),
            Err(_) => CloseReason::Closed,
        }
    })
}

#[cfg(test)]
mod tests;
