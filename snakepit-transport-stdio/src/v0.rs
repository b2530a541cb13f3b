//! `snakepit-v0`: the stdio envelope of the original Elixir Snakepit, so that its bridge scripts
//! (Python, Node, Ruby, ...) run unchanged.
//!
//! Framing is protocol v1's (a 4-byte big-endian length, then a JSON body), on the worker's
//! stdin and stdout. The host sends `{"id": N, "command": C, "args": A, "timestamp": ISO8601}`;
//! the worker answers `{"id": N, "success": true, "result": R, ...}` or `{"id": N, "success":
//! false, "error": E, ...}`. There is no handshake message, no cancel, no streaming and no call
//! to the host:
//!
//! * start-up is a readiness probe, `ping` with id 0 and args `{"worker_id": "SLOT.GEN",
//!   "initialization": true}`, answered within the handshake timeout; heartbeats send the same
//!   `ping` command;
//! * `success: false` is [`Error::Worker`] of type `SnakepitV0Error` with `E` as its message, and
//!   so is `success: true` with a result object whose `"status"` is `"error"` (the original
//!   adapters' `process_response` convention), its message `R.error`; anything else is `R`;
//! * a worker runs one call at a time; a cancelled call (its deadline passed, its caller gone)
//!   closes the connection, so the worker is killed and replaced;
//! * a reply for an id nobody waits for is dropped and logged; a reply that is not a JSON object
//!   with an integer `id` and a boolean `success` is a protocol error (the worker is replaced).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde_json::Value;
use snakepit_core::{
    CloseReason, Connection, Error, Hello, InFlight, InFlightGuard, Payload, Ready, Request, RequestId,
    ToolInfo, Transport, WorkerError, WorkerId, WorkerIo, DEFAULT_MAX_FRAME,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};

use crate::frame::{FrameReader, ReadOutcome};
use crate::DEFAULT_FRAME_TIMEOUT;

/// The error type a v0 worker's failures are reported with.
pub const V0_ERROR_TYPE: &str = "SnakepitV0Error";

/// The `snakepit-v0` transport (see the module docs). Cheap to clone.
#[derive(Debug, Clone)]
pub struct SnakepitV0 {
    max_frame: usize,
    frame_timeout: Duration,
    tools: Option<Vec<String>>,
}

impl Default for SnakepitV0 {
    fn default() -> Self {
        SnakepitV0 { max_frame: DEFAULT_MAX_FRAME, frame_timeout: DEFAULT_FRAME_TIMEOUT, tools: None }
    }
}

impl SnakepitV0 {
    /// The transport with the default limits, any command allowed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the largest frame body either side may send.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Sets how long a frame's body may stall once its header has arrived.
    pub fn frame_timeout(mut self, t: Duration) -> Self {
        self.frame_timeout = t;
        self
    }

    /// Declares the worker's commands (a v0 worker does not list them): any other command then
    /// fails host-side with `unknown_command`. Without it, every command is sent.
    pub fn tools<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tools = Some(names.into_iter().map(Into::into).collect());
        self
    }
}

#[async_trait]
impl Transport for SnakepitV0 {
    async fn connect(&self, io: WorkerIo, hello: Hello) -> Result<(Arc<dyn Connection>, Ready), Error> {
        let worker = hello.worker;
        let conn = V0Connection::start(io, worker, self.max_frame.min(hello.max_frame), self.frame_timeout);
        let probe = serde_json::json!({"worker_id": worker.to_string(), "initialization": true});
        // The readiness probe is call 0; a refusal is as good as a crash: the worker is not ready.
        let id = conn.new_request_id();
        match conn.round_trip(id, "ping", &Payload::from(probe)).await {
            Ok(_) => {}
            Err(Error::Worker { error, .. }) => {
                return Err(Error::Protocol {
                    worker,
                    detail: format!("snakepit-v0 readiness probe (`ping`) failed: {}", error.message),
                    source: None,
                })
            }
            Err(e) => return Err(e),
        }
        let mut ready = Ready::new(1, 0).with_bridge("snakepit-v0");
        match &self.tools {
            Some(t) => ready = ready.with_tools(t.iter().map(ToolInfo::new).collect()),
            None => ready.open_tools = true,
        }
        Ok((Arc::new(conn) as Arc<dyn Connection>, ready))
    }

    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn protocol(&self) -> snakepit_core::Protocol {
        snakepit_core::Protocol::SnakepitV0
    }
}

/// A call sent and not yet answered: where its reply goes, and its place in the in-flight set
/// (held until the reply comes or the connection closes, not merely while its caller waits:
/// `idle` and `answered` follow the worker, not the callers).
type Waiter = (oneshot::Sender<Result<Payload, Error>>, InFlightGuard);

struct Shared {
    worker: WorkerId,
    max_frame: usize,
    input: tokio::sync::Mutex<Option<Box<dyn AsyncWrite + Send + Unpin>>>,
    waiting: Mutex<HashMap<u64, Waiter>>,
    closed: watch::Sender<Option<CloseReason>>,
}

impl Shared {
    fn error_for(&self, reason: &CloseReason) -> Error {
        match reason {
            CloseReason::Protocol(detail) => {
                Error::Protocol { worker: self.worker, detail: detail.clone(), source: None }
            }
            _ => Error::Disconnected { worker: self.worker },
        }
    }

    /// Closes the connection once: every waiting call fails with the reason.
    fn close(&self, reason: CloseReason) {
        let first = self.closed.send_if_modified(|r| {
            if r.is_some() {
                return false;
            }
            *r = Some(reason.clone());
            true
        });
        if first {
            let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
            for (_, (tx, _guard)) in waiting {
                let _ = tx.send(Err(self.error_for(&reason)));
            }
        }
    }

    fn close_reason(&self) -> Option<CloseReason> {
        self.closed.borrow().clone()
    }
}

/// A connection to one `snakepit-v0` worker.
pub struct V0Connection {
    shared: Arc<Shared>,
    next_id: AtomicU64,
    inflight: InFlight,
}

impl std::fmt::Debug for V0Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V0Connection").field("worker", &self.shared.worker).finish_non_exhaustive()
    }
}

impl V0Connection {
    /// Starts the reader task over `io`; calls can be sent at once.
    fn start(io: WorkerIo, worker: WorkerId, max_frame: usize, frame_timeout: Duration) -> Self {
        let shared = Arc::new(Shared {
            worker,
            max_frame,
            input: tokio::sync::Mutex::new(Some(io.input)),
            waiting: Mutex::new(HashMap::new()),
            closed: watch::channel(None).0,
        });
        let reader = FrameReader::new(io.output, max_frame, frame_timeout, Arc::new(AtomicU64::new(0)));
        tokio::spawn(read_loop(reader, shared.clone()));
        V0Connection { shared, next_id: AtomicU64::new(0), inflight: InFlight::new() }
    }

    /// Sends `command` with `args` as call `id` and waits for its reply.
    async fn round_trip(&self, id: RequestId, command: &str, args: &Payload) -> Result<Payload, Error> {
        if args.has_segments() {
            return Err(Error::BadRequest(format!(
                "`{command}`: snakepit-v0 workers take JSON only (no binary segments)"
            )));
        }
        let body = encode_request(id.0, command, args)?;
        if body.len() > self.shared.max_frame {
            return Err(Error::FrameTooLarge { size: body.len(), max: self.shared.max_frame });
        }
        if let Some(reason) = self.shared.close_reason() {
            return Err(self.shared.error_for(&reason));
        }
        let (tx, rx) = oneshot::channel();
        let guard = self.inflight.enter(id);
        self.shared.waiting.lock().unwrap_or_else(|p| p.into_inner()).insert(id.0, (tx, guard));
        // A close between the check above and the insert has already drained the map.
        if let Some(reason) = self.shared.close_reason() {
            self.shared.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id.0);
            return Err(self.shared.error_for(&reason));
        }
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(&body);
        {
            let mut input = self.shared.input.lock().await;
            let written = match input.as_mut() {
                Some(w) => w.write_all(&frame).await.and(w.flush().await),
                None => Err(std::io::ErrorKind::BrokenPipe.into()),
            };
            if written.is_err() {
                drop(input);
                self.shared.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id.0);
                return Err(Error::Disconnected { worker: self.shared.worker });
            }
        }
        // Dropping this future (the caller gave up) leaves the call in flight until its reply or
        // the close; a v0 worker cannot be told to stop, so `cancel` closes the connection.
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.shared.error_for(&self.shared.close_reason().unwrap_or(CloseReason::Closed))),
        }
    }
}

/// `{"id": id, "command": command, "args": args, "timestamp": now}`.
fn encode_request(id: u64, command: &str, args: &Payload) -> Result<Vec<u8>, Error> {
    let raw = args.bytes();
    let args: &[u8] = if raw.is_empty() { b"null" } else { raw };
    let mut out = Vec::with_capacity(64 + command.len() + args.len());
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(id.to_string().as_bytes());
    out.extend_from_slice(b",\"command\":");
    serde_json::to_writer(&mut out, command).map_err(|e| Error::BadRequest(e.to_string()))?;
    out.extend_from_slice(b",\"args\":");
    out.extend_from_slice(args);
    out.extend_from_slice(b",\"timestamp\":\"");
    out.extend_from_slice(iso8601(SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\"}");
    Ok(out)
}

/// `t` as an ISO 8601 UTC timestamp with milliseconds (`2026-11-30T23:59:59.123Z`).
fn iso8601(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// What one reply body says.
#[derive(Debug, PartialEq)]
pub(crate) enum V0Reply {
    /// Call `id` succeeded with this result.
    Ok(u64, Value),
    /// Call `id` failed with this message.
    Failed(u64, String),
}

/// Reads a reply body: a JSON object with an integer `id` and a boolean `success`, else a
/// protocol violation (the text says what was wrong).
pub(crate) fn parse_reply(body: &[u8]) -> Result<V0Reply, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("a snakepit-v0 reply that is not JSON: {e}"))?;
    let Value::Object(mut m) = v else { return Err("a snakepit-v0 reply that is not a JSON object".into()) };
    let id = m.get("id").and_then(Value::as_u64).ok_or("a snakepit-v0 reply without an integer `id`")?;
    let success =
        m.get("success").and_then(Value::as_bool).ok_or("a snakepit-v0 reply without a boolean `success`")?;
    if !success {
        return Ok(V0Reply::Failed(id, message_of(m.remove("error").unwrap_or(Value::Null))));
    }
    let result = m.remove("result").unwrap_or(Value::Null);
    if let Value::Object(r) = &result {
        if r.get("status").and_then(Value::as_str) == Some("error") {
            return Ok(V0Reply::Failed(id, message_of(r.get("error").cloned().unwrap_or(Value::Null))));
        }
    }
    Ok(V0Reply::Ok(id, result))
}

/// An error value as a message: a string as is, anything else as its JSON.
fn message_of(e: Value) -> String {
    match e {
        Value::String(s) => s,
        Value::Null => "no error message given".into(),
        other => other.to_string(),
    }
}

async fn read_loop(mut reader: FrameReader, shared: Arc<Shared>) {
    let mut closed = shared.closed.subscribe();
    loop {
        let outcome = tokio::select! {
            o = reader.next() => o,
            // The host closed the connection (a cancel): stop reading.
            _ = closed.wait_for(|r| r.is_some()) => return,
        };
        let body = match outcome {
            ReadOutcome::Frame(_, true) => {
                return shared.close(CloseReason::Protocol(
                    "a snakepit-v0 worker sent a frame with the top bit of its length set".into(),
                ))
            }
            ReadOutcome::Frame(body, false) => body,
            ReadOutcome::Eof => return shared.close(CloseReason::Eof),
            ReadOutcome::Broken(detail) => return shared.close(CloseReason::Protocol(detail)),
        };
        let (id, outcome) = match parse_reply(&body) {
            Ok(V0Reply::Ok(id, v)) => (id, Ok(Payload::from(v))),
            Ok(V0Reply::Failed(id, message)) => {
                let error = WorkerError { kind: V0_ERROR_TYPE.into(), message, traceback: None };
                (id, Err(error))
            }
            Err(detail) => return shared.close(CloseReason::Protocol(detail)),
        };
        let waiter = shared.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        let outcome =
            outcome.map_err(|error| Error::Worker { worker: shared.worker, command: String::new(), error });
        match waiter {
            // The guard drops with the entry: the call is answered.
            Some((tx, _guard)) => {
                if tx.send(outcome).is_err() {
                    tracing::debug!(worker = %shared.worker, id, "dropping a snakepit-v0 reply: its caller went away");
                }
            }
            None => {
                tracing::debug!(worker = %shared.worker, id, "dropping a snakepit-v0 reply nobody waits for")
            }
        }
    }
}

#[async_trait]
impl Connection for V0Connection {
    async fn call(&self, req: Request) -> Result<Payload, Error> {
        let id = req.id.unwrap_or_else(|| self.new_request_id());
        match self.round_trip(id, &req.command, &req.args).await {
            Err(Error::Worker { worker, error, .. }) => {
                Err(Error::Worker { worker, command: req.command.to_string(), error })
            }
            other => other,
        }
    }

    async fn stream(
        &self,
        req: Request,
        _window: u32,
    ) -> Result<BoxStream<'static, Result<Payload, Error>>, Error> {
        Err(Error::BadRequest(format!("`{}`: snakepit-v0 workers do not stream", req.command)))
    }

    async fn ping(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        let id = self.new_request_id();
        let args = serde_json::json!({"worker_id": self.shared.worker.to_string()});
        self.round_trip(id, "ping", &Payload::from(args)).await.map(|_| start.elapsed())
    }

    async fn shutdown(&self) {
        // No shutdown message in v0: closing its stdin is the request to exit.
        if let Some(mut w) = self.shared.input.lock().await.take() {
            let _ = w.shutdown().await;
        }
        self.shared.close(CloseReason::Closed);
    }

    fn closed(&self) -> BoxFuture<'static, CloseReason> {
        crate::when_closed(&self.shared.closed)
    }

    fn is_closed(&self) -> bool {
        self.shared.close_reason().is_some()
    }

    fn new_request_id(&self) -> RequestId {
        RequestId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// A v0 worker cannot be told to stop: the connection is closed, so the worker is killed
    /// and replaced.
    fn cancel(&self, id: RequestId) {
        if self.shared.waiting.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&id.0) {
            tracing::debug!(worker = %self.shared.worker, id = id.0, "snakepit-v0 has no cancel: replacing the worker");
            self.shared.close(CloseReason::Closed);
        }
    }

    fn idle(&self) -> BoxFuture<'static, ()> {
        let calls = self.inflight.clone();
        let mut rx = self.shared.closed.subscribe();
        Box::pin(async move {
            tokio::select! {
                _ = calls.idle() => {}
                _ = rx.wait_for(|r| r.is_some()) => {}
            }
        })
    }

    fn answered(&self, id: RequestId) -> BoxFuture<'static, ()> {
        let answered = self.inflight.answered(id);
        let mut rx = self.shared.closed.subscribe();
        Box::pin(async move {
            tokio::select! {
                _ = answered => {}
                _ = rx.wait_for(|r| r.is_some()) => {}
            }
        })
    }
}

#[cfg(test)]
mod v0_tests {
    use super::*;

    #[test]
    fn replies_map_to_results_and_worker_errors() {
        assert_eq!(
            parse_reply(br#"{"id":3,"success":true,"result":{"a":1}}"#),
            Ok(V0Reply::Ok(3, serde_json::json!({"a":1})))
        );
        assert_eq!(
            parse_reply(br#"{"id":3,"success":false,"error":"boom"}"#),
            Ok(V0Reply::Failed(3, "boom".into()))
        );
        assert_eq!(
            parse_reply(
                br#"{"id":4,"success":true,"result":{"status":"error","error":"Unknown command: x"}}"#
            ),
            Ok(V0Reply::Failed(4, "Unknown command: x".into()))
        );
        assert_eq!(parse_reply(br#"{"id":5,"success":true}"#), Ok(V0Reply::Ok(5, Value::Null)));
        for bad in [
            &b"[]"[..],
            b"{}",
            br#"{"id":"1","success":true}"#,
            br#"{"id":1,"success":"yes"}"#,
            b"not json",
            br#"{"id":-1,"success":true}"#,
        ] {
            assert!(parse_reply(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn requests_carry_id_command_args_and_an_iso_timestamp() {
        let body = encode_request(7, "process_data", &Payload::from(serde_json::json!({"data": "x"})))
            .expect("encode");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["id"], 7);
        assert_eq!(v["command"], "process_data");
        assert_eq!(v["args"], serde_json::json!({"data": "x"}));
        let ts = v["timestamp"].as_str().expect("timestamp");
        assert_eq!(ts.len(), "2026-11-30T23:59:59.123Z".len(), "{ts}");
        assert_eq!(iso8601(UNIX_EPOCH + Duration::from_millis(951_782_400_007)), "2000-02-29T00:00:00.007Z");
        assert_eq!(iso8601(UNIX_EPOCH + Duration::from_secs(1_796_083_199)), "2026-11-30T23:59:59.000Z");
    }
}
