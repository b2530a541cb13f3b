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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use snakepit_core::wire::{self, Inbound};
use snakepit_core::{
    handshake, CloseReason, Codec, Connection, Error, Hello, HostCall, HostHandler, Payload, Ready,
    ReplyFuture, ReplySlot, Request, RequestId, SlotOwner, Transport, WorkerError, WorkerId, WorkerIo,
    DEFAULT_MAX_FRAME,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot, watch};

pub mod control;
mod outbox;
use outbox::Outbox;

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
}

/// Who waits for an id: a call (its reply slot), a ping (one reply) or a stream (chunks, then
/// the end).
enum Waiter {
    Slot { slot: Arc<ReplySlot>, command: Arc<str> },
    Call(oneshot::Sender<Reply>),
    Stream { tx: mpsc::Sender<StreamItem>, credit: Arc<Credit>, received: u64 },
}

/// The chunks a stream's consumer has allowed so far: the initial window plus every `credit`
/// granted. The reader counts chunks against the credit granted *before the read that brought
/// them in* (a worker cannot have seen a later grant), so a worker that overruns its credit is
/// caught whatever the speed of the consumer.
#[derive(Debug)]
struct Credit(Mutex<CreditState>);

#[derive(Debug)]
struct CreditState {
    /// Granted before the reads numbered above `recent_read`.
    visible: u64,
    /// Granted while `recent_read` was the last completed read: visible to later reads only.
    recent: u64,
    recent_read: u64,
}

impl Credit {
    fn new(window: u32) -> Self {
        Credit(Mutex::new(CreditState { visible: u64::from(window), recent: 0, recent_read: 0 }))
    }

    fn state(&self) -> MutexGuard<'_, CreditState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The consumer grants `n` more chunks; `reads` is the number of completed reads now.
    fn grant(&self, n: u32, reads: u64) {
        let mut st = self.state();
        st.settle(reads);
        st.recent += u64::from(n);
        st.recent_read = reads;
    }

    /// The credit a chunk brought in by read number `read` may use.
    fn allowed(&self, read: u64) -> u64 {
        let mut st = self.state();
        st.settle(read);
        st.visible
    }
}

impl CreditState {
    /// Credit granted before read `read` completed becomes visible to it.
    fn settle(&mut self, read: u64) {
        if self.recent_read < read {
            self.visible += std::mem::take(&mut self.recent);
        }
    }
}

/// How many idle reply slots a connection keeps for reuse (one per call it runs at once is
/// enough; more are freed).
const MAX_FREE_SLOTS: usize = 64;

/// What the reader hands a stream's consumer.
#[derive(Debug)]
enum StreamItem {
    Chunk(Payload),
    End,
    Err(WorkerError),
    Closed(CloseReason),
}

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
}

/// The most `host_call`s a worker may have outstanding on one connection (received, and their
/// `host_result` not yet written to its stdin); one more is a protocol violation.
pub const MAX_HOST_CALLS: usize = 64;

/// One outstanding `host_call`: released once its `host_result` is written to the worker's
/// stdin (or dropped).
struct HostCallPermit(Arc<AtomicUsize>);

impl Drop for HostCallPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// At most one log line a second for a repeated event, with the number left out meanwhile.
#[derive(Debug, Default)]
struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// Whether to log now; if so, with how many were suppressed since the last line.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < Duration::from_secs(1) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Option<Waiter>>> {
        // A panic while holding this lock cannot leave the map inconsistent: recover it.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection closed (first reason wins) and fails every pending call.
    fn close(&self, reason: CloseReason) {
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
        let drained: Vec<_> = self.pending().drain().collect();
        for (_, w) in drained {
            match w {
                Some(Waiter::Slot { slot, .. }) => slot.fill(Err(self.error_for(&reason))),
                Some(Waiter::Call(tx)) => {
                    let _ = tx.send(Reply::Closed(reason.clone()));
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

/// Reads length-delimited frames, failing a frame whose body stalls past `frame_timeout`.
///
/// A frame's header stays at the front of the buffer until its whole body has arrived, so what
/// a stalled or oversized frame announced is always read from its own header.
struct FrameReader {
    output: Box<dyn AsyncRead + Send + Unpin>,
    buf: BytesMut,
    max_frame: usize,
    frame_timeout: Duration,
    /// Counts completed reads (see [`Credit`]).
    reads: Arc<AtomicU64>,
}

enum ReadOutcome {
    Frame(Bytes),
    Eof,
    Broken(String),
}

/// The length of a frame header.
const HEADER: usize = 4;

impl FrameReader {
    fn new(
        output: Box<dyn AsyncRead + Send + Unpin>,
        max_frame: usize,
        frame_timeout: Duration,
        reads: Arc<AtomicU64>,
    ) -> Self {
        FrameReader { output, buf: BytesMut::with_capacity(64 * 1024), max_frame, frame_timeout, reads }
    }

    /// A whole frame from the front of the buffer, if one is there; an error for a header
    /// announcing more than `max_frame`.
    fn decode(&mut self) -> Result<Option<Bytes>, String> {
        let Some(n) = self.announced() else { return Ok(None) };
        if n > self.max_frame {
            return Err(format!(
                "inbound frame announces {n} bytes, over max_frame ({} bytes)",
                self.max_frame
            ));
        }
        if self.buf.len() < HEADER + n {
            return Ok(None);
        }
        self.buf.advance(HEADER);
        Ok(Some(self.buf.split_to(n).freeze()))
    }

    async fn next(&mut self) -> ReadOutcome {
        loop {
            match self.decode() {
                Ok(Some(frame)) => return ReadOutcome::Frame(frame),
                Ok(None) => {}
                Err(detail) => return ReadOutcome::Broken(detail),
            }
            if self.buf.capacity() - self.buf.len() < 8 * 1024 {
                let want =
                    self.announced().map_or(64 * 1024, |n| n + HEADER).clamp(8 * 1024, 4 * 1024 * 1024);
                self.buf.reserve(want);
            }
            let read = if self.buf.is_empty() {
                self.output.read_buf(&mut self.buf).await
            } else {
                match tokio::time::timeout(self.frame_timeout, self.output.read_buf(&mut self.buf)).await {
                    Ok(r) => r,
                    Err(_) => {
                        return ReadOutcome::Broken(match self.announced() {
                            Some(n) => format!(
                            "frame stalled: header announced {n} bytes, {} arrived, then nothing for {:?}",
                            self.buf.len().saturating_sub(HEADER),
                            self.frame_timeout
                        ),
                            None => format!(
                                "{} stray bytes, then nothing for {:?}",
                                self.buf.len(),
                                self.frame_timeout
                            ),
                        })
                    }
                }
            };
            match read {
                Ok(0) => return ReadOutcome::Eof,
                Ok(_) => {
                    self.reads.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) => return ReadOutcome::Broken(format!("read error: {e}")),
            }
        }
    }

    /// The length announced by the header at the front of the buffer, once all of it is there.
    fn announced(&self) -> Option<usize> {
        let h: [u8; HEADER] = self.buf.get(..HEADER)?.try_into().ok()?;
        Some(u32::from_be_bytes(h) as usize)
    }
}

/// Frames `body_fn`'s output: reserves 4 header bytes, appends the body, patches the length.
fn frame(capacity: usize, max_frame: usize, body_fn: impl FnOnce(&mut Vec<u8>)) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(capacity + 4);
    out.extend_from_slice(&[0; 4]);
    body_fn(&mut out);
    let len = out.len() - 4;
    if len > max_frame {
        return Err(Error::FrameTooLarge { size: len, max: max_frame });
    }
    let len32 = u32::try_from(len).map_err(|_| Error::FrameTooLarge { size: len, max: max_frame })?;
    out[..4].copy_from_slice(&len32.to_be_bytes());
    Ok(out)
}

/// The writer task: writes what callers queued when the pipe was full, and closes the worker's
/// stdin once the connection is done with it.
async fn write_loop(shared: Arc<Shared>) {
    if let Err(e) = std::future::poll_fn(|cx| shared.outbox.poll_drive(cx)).await {
        tracing::debug!(worker = %shared.worker, "write to worker failed: {e}");
        shared.close(CloseReason::Eof);
    }
}

async fn read_loop(mut reader: FrameReader, shared: Arc<Shared>) {
    loop {
        match reader.next().await {
            ReadOutcome::Frame(f) => {
                if let Err(detail) = dispatch(&shared, f) {
                    shared.close(CloseReason::Protocol(detail));
                    return;
                }
            }
            ReadOutcome::Eof => {
                shared.close(CloseReason::Eof);
                return;
            }
            ReadOutcome::Broken(detail) => {
                shared.close(CloseReason::Protocol(detail));
                return;
            }
        }
    }
}

fn dispatch(shared: &Arc<Shared>, frame: Bytes) -> Result<(), String> {
    let msg: Inbound<'_> = serde_json::from_slice(&frame).map_err(|e| format!("malformed message: {e}"))?;
    let payload = |raw: Option<&serde_json::value::RawValue>| match raw {
        Some(raw) => Payload::from_trusted(Codec::Json, frame.slice_ref(raw.get().as_bytes())),
        None => Payload::null(),
    };
    let tag = &*msg.t;
    if tag == "host_call" {
        return host_call(shared, &frame, msg);
    }
    if !matches!(tag, "result" | "error" | "pong" | "chunk" | "end") {
        tracing::debug!(worker = %shared.worker, tag, "ignoring message of unknown type");
        return Ok(());
    }
    let Some(id) = msg.id else {
        return Err(format!("`{tag}` message without an id"));
    };
    let error = || {
        msg.error.clone().unwrap_or_else(|| WorkerError {
            kind: "UnknownError".into(),
            message: "the worker sent an error without details".into(),
            traceback: None,
        })
    };
    let mut pending = shared.pending();
    match pending.get_mut(&id) {
        Some(Some(Waiter::Stream { tx, credit, received })) => {
            if matches!(tag, "chunk" | "result") {
                // Granted credit is added before the `credit` frame is sent, so a worker that
                // keeps to its credit never gets here.
                *received += 1;
                let allowed = credit.allowed(shared.reads.load(Ordering::Acquire));
                if *received > allowed {
                    return Err(format!(
                        "stream {id}: the worker sent more chunks than its credit ({allowed} granted)"
                    ));
                }
            }
            let item = match tag {
                "chunk" => StreamItem::Chunk(payload(msg.data)),
                // A plain result for a stream: one chunk, then the end.
                "result" => StreamItem::Chunk(payload(msg.ok)),
                "end" => StreamItem::End,
                "error" => StreamItem::Err(error()),
                _ => return Err(format!("`{tag}` sent for stream {id}")),
            };
            let last = !matches!(item, StreamItem::Chunk(_)) || tag == "result";
            match tx.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(format!("stream {id}: the worker sent more chunks than its credit"));
                }
                // The consumer is gone: keep a tombstone until the stream ends.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    pending.insert(id, None);
                }
            }
            if tag == "result" {
                let _ = match pending.get(&id) {
                    Some(Some(Waiter::Stream { tx, .. })) => tx.try_send(StreamItem::End),
                    _ => Ok(()),
                };
            }
            if last {
                pending.remove(&id);
            }
        }
        Some(Some(Waiter::Slot { .. })) => {
            if !matches!(tag, "result" | "error" | "pong") {
                return Err(format!("`{tag}` sent for call {id}"));
            }
            if let Some(Some(Waiter::Slot { slot, command })) = pending.remove(&id) {
                drop(pending);
                let worker = shared.worker;
                slot.fill(match tag {
                    "result" => Ok(payload(msg.ok)),
                    "error" => Err(Error::Worker { worker, command: command.to_string(), error: error() }),
                    _ => Err(Error::Protocol {
                        worker,
                        detail: format!("`pong` sent for call id {id}"),
                        source: None,
                    }),
                });
                shared.idle.notify_waiters();
                return Ok(());
            }
        }
        Some(Some(Waiter::Call(_))) => {
            let reply = match tag {
                "result" => Reply::NotPong("result"),
                "error" => Reply::NotPong("error"),
                "pong" => Reply::Pong,
                _ => return Err(format!("`{tag}` sent for call {id}")),
            };
            if let Some(Some(Waiter::Call(tx))) = pending.remove(&id) {
                if tx.send(reply).is_err() {
                    tracing::debug!(worker = %shared.worker, id, "caller went away; reply dropped");
                }
            }
        }
        Some(None) => {
            // An abandoned call or stream: drop what it sends; forget it at its last message.
            if tag != "chunk" {
                pending.remove(&id);
                tracing::debug!(worker = %shared.worker, id, "late reply for an abandoned call; dropped");
            }
        }
        None => {
            let admitted =
                shared.unknown_replies.lock().unwrap_or_else(|p| p.into_inner()).admit(Instant::now());
            if let Some(suppressed) = admitted {
                tracing::warn!(
                    worker = %shared.worker,
                    id,
                    tag,
                    suppressed,
                    "message for a request nobody waits for; dropped ({suppressed} more like it in the last second \
                     not logged)"
                )
            }
        }
    }
    drop(pending);
    // Wakes `idle()` and `answered()` waiters, who re-check the map.
    if tag != "chunk" {
        shared.idle.notify_waiters();
    }
    Ok(())
}

/// Runs a worker's call to the host on its own task (the worker waits for the answer while
/// its request is in flight, so the reader must not), then sends `host_result`.
fn host_call(shared: &Arc<Shared>, frame: &Bytes, msg: Inbound<'_>) -> Result<(), String> {
    let Some(id) = msg.id else { return Err("`host_call` without an id".into()) };
    let permit = HostCallPermit(shared.host_calls.clone());
    if shared.host_calls.fetch_add(1, Ordering::AcqRel) >= MAX_HOST_CALLS {
        return Err(format!(
            "the worker has more than {MAX_HOST_CALLS} `host_call`s outstanding (sent, their `host_result` not \
             yet taken)"
        ));
    }
    let args = match msg.args {
        Some(raw) => Payload::from_trusted(Codec::Json, frame.slice_ref(raw.get().as_bytes())),
        None => Payload::null(),
    };
    let call = HostCall::new(shared.worker, msg.call.map(RequestId), msg.name.unwrap_or_default(), args);
    let shared = shared.clone();
    tokio::spawn(async move {
        let result = match &shared.host {
            Some(h) => h.host_call(call).await,
            None => Err(WorkerError {
                kind: "UnknownHostTool".into(),
                message: "this pool has no host tools".into(),
                traceback: None,
            }),
        };
        let mut f = frame_result(shared.max_frame, id, result.as_ref().map(|p| p.bytes().as_ref()));
        if let Err(Error::FrameTooLarge { size, max }) = &f {
            let e = WorkerError {
                kind: "FrameTooLarge".into(),
                message: format!("host result of {size} bytes exceeds max_frame {max}"),
                traceback: None,
            };
            f = frame_result(shared.max_frame, id, Err(&e));
        }
        if let Ok(f) = f {
            // Outstanding until written: a worker that does not read its stdin cannot make the
            // host queue answers without bound.
            let _ = shared.outbox.push_held(f, Some(Box::new(permit)));
        }
    });
    Ok(())
}

fn frame_result(max_frame: usize, id: u64, r: Result<&[u8], &WorkerError>) -> Result<Vec<u8>, Error> {
    let len = r.as_ref().map_or(256, |b| b.len() + 48);
    frame(len, max_frame, |out| wire::encode_host_result(out, id, r))
}

/// The consumer side of a streamed call: yields chunks, grants credit as it goes, and leaves a
/// tombstone for the id when dropped early.
struct ReplyStream {
    rx: mpsc::Receiver<StreamItem>,
    shared: Arc<Shared>,
    /// What the reader checks the worker's chunks against.
    credit: Arc<Credit>,
    id: u64,
    command: String,
    refill: u32,
    taken: u32,
    done: bool,
}

impl futures::Stream for ReplyStream {
    type Item = Result<Payload, Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        let item = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(i) => i,
        };
        let this = &mut *self;
        match item {
            Some(StreamItem::Chunk(p)) => {
                this.taken += 1;
                if this.taken >= this.refill {
                    let n = std::mem::take(&mut this.taken);
                    // Granted before it is sent: the worker may use it once it reads the frame.
                    this.credit.grant(n, this.shared.reads.load(Ordering::Acquire));
                    if let Ok(f) =
                        frame(48, this.shared.max_frame, |out| wire::encode_credit(out, this.id, n))
                    {
                        let _ = this.shared.outbox.push(f);
                    }
                }
                Poll::Ready(Some(Ok(p)))
            }
            Some(StreamItem::End) => {
                this.done = true;
                Poll::Ready(None)
            }
            Some(StreamItem::Err(error)) => {
                this.done = true;
                Poll::Ready(Some(Err(Error::Worker {
                    worker: this.shared.worker,
                    command: std::mem::take(&mut this.command),
                    error,
                })))
            }
            Some(StreamItem::Closed(reason)) => {
                this.done = true;
                Poll::Ready(Some(Err(this.shared.error_for(&reason))))
            }
            None => {
                this.done = true;
                let reason = this.shared.close_reason().unwrap_or(CloseReason::Closed);
                Poll::Ready(Some(Err(this.shared.error_for(&reason))))
            }
        }
    }
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        if !self.done {
            let mut pending = self.shared.pending();
            if let Some(w) = pending.get_mut(&self.id) {
                *w = None;
            }
        }
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
        });
        let hello_frame = frame(256, max_frame, |out| handshake::encode_hello(out, &hello))?;
        let _ = shared.outbox.push(hello_frame);
        let writer = tokio::spawn(write_loop(shared.clone()));
        // Until the handshake succeeds, any return closes the worker's stdin and stops the writer.
        let guard = Abandon { shared: &shared, writer: Some(writer) };
        let mut reader = FrameReader::new(io.output, max_frame, frame_timeout, shared.reads.clone());
        let first = match reader.next().await {
            ReadOutcome::Frame(f) => f,
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

    fn closed_error(&self) -> Error {
        let reason = self.shared.close_reason().unwrap_or(CloseReason::Closed);
        self.shared.error_for(&reason)
    }

    /// Checks a request's arguments (unless an encoder made them) and encodes its `call` frame
    /// (`window`: as a stream). Returns the request id and the frame.
    fn call_frame(&self, req: &Request, window: Option<u32>) -> Result<(u64, Vec<u8>), Error> {
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
        let f = frame(args.len() + req.command.len() + 80, self.shared.max_frame, |out| {
            wire::encode_call(out, id, &req.command, args, timeout_ms, window, req.session.as_deref())
        })?;
        Ok((id, f))
    }

    /// Encodes and sends a call; its reply comes through a (reused) slot, so the call allocates
    /// nothing but its frame.
    fn send_call(&self, req: Request) -> Result<ReplyFuture<'static>, Error> {
        let (id, frame) = self.call_frame(&req, None)?;
        if let Some(reason) = self.shared.close_reason() {
            return Err(self.shared.error_for(&reason));
        }
        let slot = self.shared.take_slot();
        self.shared.pending().insert(id, Some(Waiter::Slot { slot: slot.clone(), command: req.command }));
        // The reader may have closed between the check and the insert: re-check.
        if let Some(reason) = self.shared.close_reason() {
            self.shared.forget(id);
            return Err(self.shared.error_for(&reason));
        }
        if let Err(e) = self.send(frame) {
            self.shared.forget(id);
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
        let (id, f) = self.call_frame(&req, Some(window))?;
        if let Some(reason) = self.shared.close_reason() {
            return Err(self.shared.error_for(&reason));
        }
        // Room for a full window of chunks plus the end (or an error, or a close).
        let (tx, rx) = mpsc::channel(window as usize + 2);
        let credit = Arc::new(Credit::new(window));
        self.shared.pending().insert(id, Some(Waiter::Stream { tx, credit: credit.clone(), received: 0 }));
        let stream = ReplyStream {
            rx,
            shared: self.shared.clone(),
            credit,
            id,
            command: req.command.to_string(),
            refill: (window / 2).max(1),
            taken: 0,
            done: false,
        };
        // If the send fails, the stream's drop leaves a tombstone; the close drains it.
        self.send(f)?;
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
        let mut rx = self.shared.closed.subscribe();
        Box::pin(async move {
            match rx.wait_for(|r| r.is_some()).await {
                Ok(r) => r.clone().unwrap_or(CloseReason::Closed),
                Err(_) => CloseReason::Closed,
            }
        })
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

#[cfg(test)]
mod tests;
