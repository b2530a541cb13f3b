//! Per-call options and the pool-wide policies they override.

use std::sync::Arc;
use std::time::{Duration, Instant};

use snakepit_core::Payload;

/// Per-call options.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CallOptions {
    /// The call's time budget from now (queue wait included).
    pub timeout: Option<Duration>,
    /// An absolute deadline (the earlier of this and `timeout` wins).
    pub deadline: Option<Instant>,
    /// The request's identity for quarantine (default: a hash of command and arguments).
    pub key: Option<u64>,
    /// Session affinity for this call (default: the pool's).
    pub affinity: Option<Affinity>,
    /// Retry the call once on another worker if it fails with [`Error::NotStarted`](snakepit_core::Error::NotStarted)
    /// (it was queued in a pipelined worker that died before it started, so it never ran).
    /// Off by default: the caller decides whether a call may run twice. Plain calls only (a
    /// stream that did not start is reported, not retried).
    pub retry_not_started: bool,
    /// Where this call's host calls go instead of the pool's own handler (an agent forwards
    /// them to the front end that made the call).
    pub(crate) host: Option<crate::host::Forward>,
}

impl CallOptions {
    /// Options with a timeout.
    pub fn timeout(t: Duration) -> Self {
        CallOptions { timeout: Some(t), ..CallOptions::default() }
    }

    /// Options with an absolute deadline.
    pub fn deadline(d: Instant) -> Self {
        CallOptions { deadline: Some(d), ..CallOptions::default() }
    }

    /// Sets or clears the timeout.
    pub fn with_timeout(mut self, t: Option<Duration>) -> Self {
        self.timeout = t;
        self
    }

    /// Sets or clears the deadline.
    pub fn with_deadline(mut self, d: Option<Instant>) -> Self {
        self.deadline = d;
        self
    }

    /// Sets the session affinity of this call.
    pub fn with_affinity(mut self, a: Affinity) -> Self {
        self.affinity = Some(a);
        self
    }

    /// Retries the call once on another worker when it did not start (see
    /// [`CallOptions::retry_not_started`]).
    pub fn retry_not_started(mut self, on: bool) -> Self {
        self.retry_not_started = on;
        self
    }

    /// Sets the request's quarantine key (requests with equal keys count as the same request).
    pub fn with_key(mut self, key: u64) -> Self {
        self.key = Some(key);
        self
    }
}

/// How a session's calls are routed to the worker its last call ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Affinity {
    /// Prefer the session's worker; if it is busy or gone, any free worker will do.
    #[default]
    Hint,
    /// Wait for the session's worker (the queue timeout applies); if it is gone, fail with
    /// `SessionLost` (or rehydrate, when a hook is set).
    Strict,
    /// Like `Strict`, but fail at once with `WorkerBusy` instead of waiting.
    StrictFailFast,
}

/// Builds the command that restores a session's worker-side state on a new worker, when the
/// session's pinned worker was lost: `Some((command, args))` is run on the new worker first.
pub type RehydrateHook =
    Arc<dyn Fn(&snakepit_core::SessionRecord) -> Option<(String, Payload)> + Send + Sync>;

/// What happens to a running call whose caller drops its future.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DropPolicy {
    /// Send `cancel`; if the worker has not answered within `cancel_grace`, kill and replace it.
    #[default]
    Kill,
    /// Let the tool finish and discard its reply; the worker returns to the pool when it
    /// answers (bounded by the call's deadline, else by `drain_timeout`). A client disconnect
    /// then never costs a cold restart of a worker holding a loaded model.
    Detach,
}
