//! The one error type every snakepit crate returns to callers.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::transport::WorkerId;

/// Shorthand for `Result<T, snakepit_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExitInfo {
    /// The process exited with this status code.
    Code(i32),
    /// The process was killed by this signal number.
    Signal(i32),
    /// The process is gone but its status could not be collected (yet).
    Unknown,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit code {c}"),
            ExitInfo::Signal(s) => write!(f, "killed by signal {s}"),
            ExitInfo::Unknown => f.write_str("unknown exit status"),
        }
    }
}

/// An exception raised by the worker's code, as the worker reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerError {
    /// The exception's type name, e.g. `ValueError`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The exception's message.
    #[serde(default)]
    pub message: String,
    /// The formatted traceback, when the worker sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// Everything that can go wrong between a caller and a worker.
///
/// Each variant names the worker and the command where it knows them, and its message says
/// what to do about it. [`Error::kind`] gives a stable snake_case name for logs and JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The queue already holds `max_queue` waiting calls; the call was refused at once.
    #[error(
        "pool saturated: {max_queue} calls are already queued; retry later, add workers or raise max_queue"
    )]
    PoolSaturated {
        /// The queue bound that was hit.
        max_queue: usize,
    },
    /// No worker became free within the queue timeout; the call was never sent and never will be.
    #[error("call `{command}` waited {waited:?} for a free worker (queue_timeout); add workers or raise queue_timeout")]
    QueueTimeout {
        /// The command that waited.
        command: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The call did not complete within its timeout or deadline.
    #[error("call `{command}` timed out after {after:?}{}", on_worker(.worker))]
    Timeout {
        /// The command that timed out.
        command: String,
        /// The worker that was running it, if it had reached one.
        worker: Option<WorkerId>,
        /// The time budget that ran out.
        after: Duration,
    },
    /// The call was cancelled before it completed.
    #[error("call `{command}` was cancelled")]
    Cancelled {
        /// The command that was cancelled.
        command: String,
    },
    /// The worker process died while it held the call.
    #[error("{worker} crashed ({exit}) while running `{}`{}", .command.as_deref().unwrap_or("?"), tail(.stderr_tail))]
    WorkerCrashed {
        /// The worker that died.
        worker: WorkerId,
        /// The command it was running.
        command: Option<String>,
        /// How it ended.
        exit: ExitInfo,
        /// The last lines it wrote to stderr.
        stderr_tail: String,
    },
    /// The call was queued in a pipelined worker (sent, waiting behind the call it ran) when
    /// that worker died: it never started, so running it again elsewhere cannot repeat a side
    /// effect. The pool retries it once on another worker when the call opts in
    /// (`CallOptions::retry_not_started`); never silently otherwise.
    #[error("`{command}` was queued on {worker}, which died before the call started; it never ran")]
    NotStarted {
        /// The worker that died.
        worker: WorkerId,
        /// The command that did not start.
        command: String,
    },
    /// The worker's code raised an exception; the worker itself is fine.
    #[error("`{command}` raised {error} on {worker}")]
    Worker {
        /// The worker that ran the call.
        worker: WorkerId,
        /// The command that raised.
        command: String,
        /// The exception.
        error: WorkerError,
    },
    /// The command is not one of the tools the workers announced; nothing was sent.
    #[error("unknown command `{command}`; the workers offer: {}", .available.join(", "))]
    UnknownCommand {
        /// The command asked for.
        command: String,
        /// The commands the workers announced in their handshake.
        available: Vec<String>,
    },
    /// The request itself is invalid (arguments that cannot be encoded, rejected by the adapter...).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A message is larger than the frame limit; when outbound, nothing was written and the
    /// worker is untouched.
    #[error("frame of {size} bytes exceeds max_frame ({max} bytes); send less or raise max_frame")]
    FrameTooLarge {
        /// The message size in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The worker broke the wire protocol (garbage, an oversized or stalled frame, a malformed
    /// message); every call in flight on it fails with this and the worker is replaced.
    ///
    /// `source` holds the underlying error when one value of this error owns it (a malformed
    /// `ready`, a failed connect). A protocol error found by a transport's reader fails every
    /// call in flight at once, through a shared (cloned) [`CloseReason`](crate::CloseReason), so
    /// there the cause is only in `detail`.
    #[error("protocol error from {worker}: {detail}{}", cause(.source))]
    Protocol {
        /// The offending worker.
        worker: WorkerId,
        /// What was wrong.
        detail: String,
        /// The underlying error (a JSON parse error, a failed connect...), if there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// The connection to the worker closed (its output reached EOF). The pool turns this into
    /// [`Error::WorkerCrashed`] once it knows the exit status.
    #[error("connection to {worker} closed")]
    Disconnected {
        /// The worker whose connection closed.
        worker: WorkerId,
    },
    /// The worker process could not be started (missing interpreter, bad cwd, ...).
    #[error("cannot start {worker} (`{program}`): {reason}{}", cause(.source))]
    Spawn {
        /// The slot that was being started.
        worker: WorkerId,
        /// The program that failed to start.
        program: String,
        /// What failed, with advice where there is some (a missing program: "is the interpreter
        /// installed and on PATH?").
        reason: String,
        /// The OS error behind it, when there is one (the message repeats it).
        #[source]
        source: Option<std::io::Error>,
    },
    /// The transport could not set up what it needs for a worker before the handshake (a
    /// socket directory, a listening socket, a socket path that does not fit `sun_path`...).
    #[error("cannot set up the {transport} transport for {worker}: {reason}: {source}")]
    TransportSetup {
        /// The worker being started.
        worker: WorkerId,
        /// The transport's name (`grpc`, ...).
        transport: &'static str,
        /// What failed (names the path involved).
        reason: String,
        /// The OS error (the message repeats it); a path too long for a Unix socket is
        /// [`std::io::ErrorKind::InvalidInput`].
        #[source]
        source: std::io::Error,
    },
    /// The worker process exited before it finished the handshake (an import error, a syntax
    /// error in the script, a bad argument...).
    #[error("{worker} exited during start-up ({exit}){}", tail(.stderr_tail))]
    StartupFailed {
        /// The worker that exited.
        worker: WorkerId,
        /// How it ended.
        exit: ExitInfo,
        /// The last lines it wrote to stderr (usually the traceback).
        stderr_tail: String,
    },
    /// The worker did not answer `hello` with `ready` within the adapter's handshake timeout.
    #[error("{worker} did not complete the handshake within {after:?}; raise the adapter's handshake_timeout if start-up is slow{}", tail(.stderr_tail))]
    HandshakeTimeout {
        /// The worker that stayed silent.
        worker: WorkerId,
        /// The handshake timeout.
        after: Duration,
        /// The last lines it wrote to stderr.
        stderr_tail: String,
    },
    /// The worker refused every protocol version the host offered (or chose one it did not
    /// offer). The message names both sides' versions: the host's protocol versions and crate
    /// version, the worker's protocol versions and, in its reason, its bridge and version.
    #[error(
        "{worker} refused the handshake: the host (snakepit {}) offered protocol versions {offered:?}, the worker speaks {}: {reason}",
        env!("CARGO_PKG_VERSION"),
        versions_text(.speaks)
    )]
    #[non_exhaustive]
    VersionMismatch {
        /// The worker.
        worker: WorkerId,
        /// The versions the host offered.
        offered: Vec<u32>,
        /// The versions the worker speaks, as its `refuse` listed them (empty if it did not).
        speaks: Vec<u32>,
        /// The worker's reason.
        reason: String,
    },
    /// The pool is shutting down and takes no new calls.
    #[error("the pool is shutting down")]
    ShuttingDown,
    /// A typed result could not be decoded, or typed arguments could not be encoded.
    #[error("codec error: {context}: {source}")]
    Codec {
        /// What was being encoded or decoded, e.g. `cannot decode result as the requested type`.
        context: &'static str,
        /// The serde error (the message repeats it).
        #[source]
        source: serde_json::Error,
    },
    /// The pool has no live worker to run the call (all slots are down or restarting).
    #[error("no worker is available: {0}")]
    Unavailable(String),
    /// The remote worker host (`snakepit agent`) running the call was lost: its connection
    /// broke (the agent died, or a partition outlasted the HTTP/2 keepalive timeout) or it
    /// stopped answering. Whether the call ran there is unknown.
    #[error("agent {agent} was lost while it ran `{command}`")]
    AgentLost {
        /// The agent (its URL, or the address it was resolved to).
        agent: String,
        /// The command that was running.
        command: String,
    },
    /// No session with that id exists (or it expired).
    #[error("session `{id}` does not exist (or it expired)")]
    SessionNotFound {
        /// The session id.
        id: String,
    },
    /// The session store is full.
    #[error("session quota exceeded: {max} sessions exist; close some or raise max_sessions")]
    SessionQuotaExceeded {
        /// The quota.
        max: usize,
    },
    /// The worker a strict session call was pinned to is gone (crashed or recycled) and no
    /// rehydrate hook is set; its per-session state is lost.
    #[error("session `{session}` lost its worker {worker}; its worker-side state is gone")]
    SessionLost {
        /// The session id.
        session: String,
        /// The worker it was pinned to.
        worker: WorkerId,
    },
    /// The session's worker is busy and the call asked not to wait (`StrictFailFast`).
    #[error("{worker}, pinned by session `{session}`, is busy")]
    WorkerBusy {
        /// The session id.
        session: String,
        /// The busy worker.
        worker: WorkerId,
    },
    /// The session store could not be reached or answered an error (a shared store such as
    /// Redis is down, slow past the operation timeout, or refused the command). Calls outside
    /// sessions are not affected; the store is used again as soon as it answers.
    #[error("session store: {message}{}", cause(.source))]
    SessionStore {
        /// What failed.
        message: String,
        /// The store's own error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// A session variable write does not fit the variable's declared type.
    #[error("session variable `{name}`: {reason}")]
    InvalidVariable {
        /// The variable.
        name: String,
        /// Why the value does not fit.
        reason: String,
    },
    /// A signal could not be sent to a worker's process group.
    #[error("cannot signal process group {pgid}: {source}")]
    Signal {
        /// The process group.
        pgid: i32,
        /// The OS error (the message repeats it).
        #[source]
        source: std::io::Error,
    },
    /// This exact request (command and arguments, or the caller's key) has already crashed
    /// `crashes` workers; it is refused instead of killing more.
    #[error("`{command}` is quarantined: this request crashed {crashes} workers already")]
    Quarantined {
        /// The command.
        command: String,
        /// How many workers it crashed.
        crashes: u32,
    },
    /// A configuration (`snakepit::config`: a file, `SNAKEPIT_CFG_*` variables, or one built
    /// in code) is invalid, or a pool it describes could not start. Displayed as
    /// `FILE:LINE: key 'x.y': reason`, each part left out when unknown.
    #[error("{}{}", config_place(.origin, *.line, .key), config_reason(.reason, .source))]
    Config {
        /// Where the value came from: the file's path, or the environment variable's name
        /// (`SNAKEPIT_CFG_SIZE`); `None` for a configuration built in code.
        origin: Option<String>,
        /// The line of the key in the file (1-based), when known.
        line: Option<usize>,
        /// The dotted key (`heartbeat.interval`, `pools.gpu.size`); empty when the error
        /// concerns no key (a TOML syntax error, an unreadable file).
        key: String,
        /// What is wrong.
        reason: String,
        /// The error behind it: why a pool of a multi-pool configuration could not start.
        #[source]
        source: Option<Box<Error>>,
    },
}

/// `FILE:LINE: key 'x.y': ` with the parts that are known.
fn config_place(origin: &Option<String>, line: Option<usize>, key: &str) -> String {
    let mut s = match (origin, line) {
        (Some(o), Some(l)) => format!("{o}:{l}: "),
        (Some(o), None) => format!("{o}: "),
        (None, Some(l)) => format!("line {l}: "),
        (None, None) => String::new(),
    };
    if !key.is_empty() {
        s.push_str(&format!("key '{key}': "));
    }
    s
}

/// The reason, then the cause when there is one.
fn config_reason(reason: &str, source: &Option<Box<Error>>) -> String {
    match source {
        Some(e) => format!("{reason}: {e}"),
        None => reason.to_owned(),
    }
}

fn on_worker(w: &Option<WorkerId>) -> String {
    match w {
        Some(w) => format!(" on {w}"),
        None => String::new(),
    }
}

/// `": {source}"`, or nothing: the cause of a variant whose source is optional.
fn cause(source: &Option<impl fmt::Display>) -> String {
    match source {
        Some(s) => format!(": {s}"),
        None => String::new(),
    }
}

/// `[1, 2]`, or words when the worker did not say which versions it speaks.
fn versions_text(v: &[u32]) -> String {
    if v.is_empty() {
        "versions it did not list".into()
    } else {
        format!("{v:?}")
    }
}

fn tail(t: &str) -> String {
    let t = t.trim_end();
    if t.is_empty() {
        String::new()
    } else {
        format!("; stderr tail:\n{t}")
    }
}

impl Error {
    /// A stable snake_case name of the variant, for logs, metrics and JSON replies.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::PoolSaturated { .. } => "pool_saturated",
            Error::QueueTimeout { .. } => "queue_timeout",
            Error::Timeout { .. } => "timeout",
            Error::Cancelled { .. } => "cancelled",
            Error::WorkerCrashed { .. } => "worker_crashed",
            Error::NotStarted { .. } => "not_started",
            Error::Worker { .. } => "worker",
            Error::UnknownCommand { .. } => "unknown_command",
            Error::BadRequest(_) => "bad_request",
            Error::FrameTooLarge { .. } => "frame_too_large",
            Error::Protocol { .. } => "protocol",
            Error::Disconnected { .. } => "disconnected",
            Error::Spawn { .. } => "spawn",
            Error::TransportSetup { .. } => "transport_setup",
            Error::StartupFailed { .. } => "startup_failed",
            Error::HandshakeTimeout { .. } => "handshake_timeout",
            Error::VersionMismatch { .. } => "version_mismatch",
            Error::ShuttingDown => "shutting_down",
            Error::Codec { .. } => "codec",
            Error::Unavailable(_) => "unavailable",
            Error::AgentLost { .. } => "agent_lost",
            Error::Quarantined { .. } => "quarantined",
            Error::Signal { .. } => "signal",
            Error::SessionNotFound { .. } => "session_not_found",
            Error::SessionQuotaExceeded { .. } => "session_quota_exceeded",
            Error::SessionLost { .. } => "session_lost",
            Error::WorkerBusy { .. } => "worker_busy",
            Error::InvalidVariable { .. } => "invalid_variable",
            Error::SessionStore { .. } => "session_store",
            Error::Config { .. } => "config",
        }
    }

    /// The worker this error concerns, if any.
    pub fn worker(&self) -> Option<WorkerId> {
        match self {
            Error::Timeout { worker, .. } => *worker,
            Error::WorkerCrashed { worker, .. }
            | Error::NotStarted { worker, .. }
            | Error::Worker { worker, .. }
            | Error::Protocol { worker, .. }
            | Error::Disconnected { worker }
            | Error::Spawn { worker, .. }
            | Error::TransportSetup { worker, .. }
            | Error::StartupFailed { worker, .. }
            | Error::HandshakeTimeout { worker, .. }
            | Error::VersionMismatch { worker, .. }
            | Error::SessionLost { worker, .. }
            | Error::WorkerBusy { worker, .. } => Some(*worker),
            _ => None,
        }
    }

    /// The error as a JSON object: `{"kind": .., "message": ..}` plus the variant's fields
    /// (`type` and `traceback` for worker errors, `exit` and `stderr_tail` for crashes, ...).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{json, Value};
        let mut v = json!({ "kind": self.kind(), "message": self.to_string() });
        let obj = match v.as_object_mut() {
            Some(o) => o,
            None => return v,
        };
        if let Some(w) = self.worker() {
            obj.insert("worker".into(), Value::String(w.to_string()));
        }
        match self {
            Error::Worker { error, .. } => {
                obj.insert("message".into(), Value::String(error.message.clone()));
                obj.insert("type".into(), Value::String(error.kind.clone()));
                if let Some(tb) = &error.traceback {
                    obj.insert("traceback".into(), Value::String(tb.clone()));
                }
            }
            Error::WorkerCrashed { exit, stderr_tail, .. }
            | Error::StartupFailed { exit, stderr_tail, .. } => {
                obj.insert("exit".into(), serde_json::to_value(exit).unwrap_or(Value::Null));
                obj.insert("stderr_tail".into(), Value::String(stderr_tail.clone()));
            }
            Error::HandshakeTimeout { stderr_tail, .. } => {
                obj.insert("stderr_tail".into(), Value::String(stderr_tail.clone()));
            }
            Error::AgentLost { agent, .. } => {
                obj.insert("agent".into(), Value::String(agent.clone()));
            }
            Error::UnknownCommand { available, .. } => {
                obj.insert("available".into(), json!(available));
            }
            Error::Config { origin, line, key, reason, source } => {
                if let Some(o) = origin {
                    obj.insert("origin".into(), Value::String(o.clone()));
                }
                if let Some(l) = line {
                    obj.insert("line".into(), json!(l));
                }
                obj.insert("key".into(), Value::String(key.clone()));
                obj.insert("reason".into(), Value::String(reason.clone()));
                if let Some(e) = source {
                    obj.insert("cause".into(), e.to_json());
                }
            }
            _ => {}
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_snake_case_and_json_carries_fields() {
        let w = WorkerId { slot: 1, generation: 2 };
        let e = Error::WorkerCrashed {
            worker: w,
            command: Some("crash".into()),
            exit: ExitInfo::Signal(9),
            stderr_tail: "boom\n".into(),
        };
        assert_eq!(e.kind(), "worker_crashed");
        let j = e.to_json();
        assert_eq!(j["exit"], serde_json::json!({"signal": 9}));
        assert_eq!(j["stderr_tail"], "boom\n");
        assert!(e.to_string().contains("worker 1.2"), "{e}");
        let e = Error::Worker {
            worker: w,
            command: "fail".into(),
            error: WorkerError {
                kind: "ValueError".into(),
                message: "bad".into(),
                traceback: Some("tb".into()),
            },
        };
        let j = e.to_json();
        assert_eq!(j["type"], "ValueError");
        assert_eq!(j["message"], "bad");
        assert_eq!(j["traceback"], "tb");
    }

    #[test]
    fn error_is_send_sync_static() {
        fn check<T: Send + Sync + 'static + std::error::Error>() {}
        check::<Error>();
    }

    #[test]
    fn causes_are_kept_as_sources() {
        use std::error::Error as _;
        let w = WorkerId { slot: 0, generation: 3 };
        let e = Error::Spawn {
            worker: w,
            program: "python3".into(),
            reason: "cannot execute it (is the interpreter installed and on PATH?)".into(),
            source: Some(std::io::Error::from(std::io::ErrorKind::NotFound)),
        };
        assert_eq!(e.kind(), "spawn");
        assert!(e.to_string().contains("installed and on PATH?"), "{e}");
        let io = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()).expect("io source");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);

        let e = Error::TransportSetup {
            worker: w,
            transport: "grpc",
            reason: "socket path /x/w.sock is too long".into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "too long"),
        };
        assert_eq!(e.kind(), "transport_setup");
        assert_eq!(e.worker(), Some(w));
        assert_eq!(e.to_json()["kind"], "transport_setup");
        assert!(e.source().is_some());

        let serde = serde_json::from_str::<u32>("x").expect_err("not a number");
        let e = Error::Codec { context: "cannot decode result as the requested type", source: serde };
        assert_eq!(e.kind(), "codec");
        assert!(e.to_string().starts_with("codec error: cannot decode result"), "{e}");
        assert!(e.source().is_some_and(|s| s.is::<serde_json::Error>()));

        let e = Error::Protocol { worker: w, detail: "garbage".into(), source: None };
        assert_eq!(e.to_string(), "protocol error from worker 0.3: garbage");
        assert!(e.source().is_none());
    }

    #[test]
    fn config_errors_show_file_line_key_and_reason() {
        use std::error::Error as _;
        let e = Error::Config {
            origin: Some("pool.toml".into()),
            line: Some(7),
            key: "heartbeat.interval".into(),
            reason: "invalid duration".into(),
            source: None,
        };
        assert_eq!(e.kind(), "config");
        assert_eq!(e.to_string(), "pool.toml:7: key 'heartbeat.interval': invalid duration");
        let j = e.to_json();
        assert_eq!((j["origin"].as_str(), j["line"].as_u64()), (Some("pool.toml"), Some(7)));
        assert_eq!(
            (j["key"].as_str(), j["reason"].as_str()),
            (Some("heartbeat.interval"), Some("invalid duration"))
        );
        let e = Error::Config {
            origin: Some("SNAKEPIT_CFG_SIZE".into()),
            line: None,
            key: "size".into(),
            reason: "must be at least 1".into(),
            source: None,
        };
        assert_eq!(e.to_string(), "SNAKEPIT_CFG_SIZE: key 'size': must be at least 1");
        let e = Error::Config {
            origin: None,
            line: Some(3),
            key: String::new(),
            reason: "x".into(),
            source: None,
        };
        assert_eq!(e.to_string(), "line 3: x");
        let e = Error::Config {
            origin: None,
            line: None,
            key: "pools.gpu".into(),
            reason: "the pool could not start".into(),
            source: Some(Box::new(Error::ShuttingDown)),
        };
        assert_eq!(e.to_string(), "key 'pools.gpu': the pool could not start: the pool is shutting down");
        assert_eq!(e.to_json()["cause"]["kind"], "shutting_down");
        assert!(e.source().is_some());
    }
}
