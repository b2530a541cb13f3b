//! The worker's stdio pipe as the *control channel* of another transport.
//!
//! A transport whose calls travel elsewhere (the gRPC transport: HTTP/2 on a Unix socket) can
//! still use the pipe every worker has for what a pipe does best: the `hello`/`ready`
//! handshake, heartbeats (`ping`), `shutdown`, and crash detection — the pipe closes the moment
//! the worker dies, so a dead worker is seen at once, not at its next call.
//!
//! ```no_run
//! # async fn demo(io: snakepit_core::WorkerIo, hello: snakepit_core::Hello) -> Result<(), snakepit_core::Error> {
//! use snakepit_transport_stdio::{control, DEFAULT_FRAME_TIMEOUT};
//!
//! // Tell the worker where to serve in `hello.transport`, then:
//! let (control, ready) = control::connect(io, hello, DEFAULT_FRAME_TIMEOUT).await?;
//! // ... connect to `ready.address`, serve calls there ...
//! control.ping().await?;
//! if control.is_closed() { /* the worker is gone */ }
//! control.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The worker's calls to the host (`host_call`) that arrive on the pipe are still answered by
//! `hello.host`. Calls and streams are not offered here: a worker that serves its calls on
//! another transport need not serve them on the pipe.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use snakepit_core::{CloseReason, Connection, Error, Hello, Ready, WorkerId, WorkerIo};

use crate::{Shared, StdioConnection};

/// Performs the framed-stdio handshake on `io` (exactly as [`StdioConnection::connect`] does:
/// the same `hello`, the same checks of `ready`, the same errors) and returns the pipe as a
/// [`ControlChannel`], with the worker's `ready`.
pub async fn connect(
    io: WorkerIo,
    hello: Hello,
    frame_timeout: Duration,
) -> Result<(ControlChannel, Ready), Error> {
    let (conn, ready) = StdioConnection::connect(io, hello, frame_timeout).await?;
    Ok((ControlChannel { conn }, ready))
}

/// A worker's stdio pipe after the handshake, used for its lifecycle only: heartbeats,
/// shutdown and crash detection. Dropping it closes the worker's stdin.
#[derive(Debug)]
pub struct ControlChannel {
    conn: StdioConnection,
}

impl ControlChannel {
    /// The worker at the other end.
    pub fn worker(&self) -> WorkerId {
        self.conn.shared.worker
    }

    /// Round-trips a `ping` on the pipe; returns the time it took.
    pub async fn ping(&self) -> Result<Duration, Error> {
        self.conn.ping().await
    }

    /// Sends `shutdown` and closes the worker's stdin once it is written.
    pub async fn shutdown(&self) {
        self.conn.shutdown().await;
    }

    /// Resolves when the pipe is gone (the worker exited, broke the protocol, or the host
    /// closed it), with the reason.
    pub fn closed(&self) -> BoxFuture<'static, CloseReason> {
        self.conn.closed()
    }

    /// Whether the pipe is gone.
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// The reason the pipe is gone, once it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.conn.shared.close_reason()
    }

    /// A handle that reports protocol violations seen elsewhere (see [`Breaker`]).
    pub fn breaker(&self) -> Breaker {
        Breaker { shared: self.conn.shared.clone() }
    }
}

/// Breaks a [`ControlChannel`] when the worker violated the protocol on another transport:
/// the channel closes with [`CloseReason::Protocol`] (so the supervisor kills and replaces
/// the worker) and its waiters fail with [`Error::Protocol`]. Cheap to clone.
#[derive(Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker").field("worker", &self.shared.worker).finish()
    }
}

impl Breaker {
    /// Closes the channel as a protocol violation described by `detail` (the first reason
    /// given wins).
    pub fn protocol_error(&self, detail: impl Into<String>) {
        self.shared.close(CloseReason::Protocol(detail.into()));
    }
}
