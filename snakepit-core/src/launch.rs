//! The seam between *what* a worker is and *how* it comes to life: [`Launcher`] starts workers
//! and hands out [`WorkerHandle`]s.
//!
//! The supervisor's process launcher (`snakepit_supervisor::ProcessLauncher`) is the usual
//! implementation: it spawns the adapter's program under a shepherd (or forks it from a zygote)
//! and runs the handshake through the pool's [`Transport`](crate::Transport). An adapter can
//! instead supply its own launcher through [`Adapter::launcher`](crate::Adapter::launcher): an
//! in-process worker (a test double such as `snakepit_testing::FakeWorker`, or a worker on
//! another host) that the pool supervises exactly like a process: crash, restart with backoff,
//! heartbeats, recycling and shutdown all go through this one trait pair.

use std::ffi::OsString;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::{Connection, Error, ExitInfo, HostHandler, Ready, RequestId, WorkerId};

/// What a [`Launcher`] needs to start one worker, besides what its adapter says.
#[derive(Clone)]
#[non_exhaustive]
pub struct StartOptions {
    /// The worker to start.
    pub worker: WorkerId,
    /// The pool's run id (exported to processes as `SNAKEPIT_RUN_ID`).
    pub run_id: String,
    /// Extra environment set on top of the adapter's.
    pub env: Vec<(OsString, OsString)>,
    /// Largest frame body (sent in `hello`).
    pub max_frame: usize,
    /// Fault injection: wait this long before the handshake (inside the handshake timeout).
    pub handshake_delay: Option<Duration>,
    /// Answers the worker's calls to the host.
    pub host: Option<Arc<dyn HostHandler>>,
    /// How many calls the host may send at once (told to the worker in `hello`).
    pub max_in_flight: usize,
    /// Pipelining offered to a worker that runs calls one at a time (see
    /// [`crate::Hello::pipeline_depth`]); 1: none.
    pub pipeline_depth: usize,
    /// The busy-poll window (told to the worker in `hello`, used by the host's transport).
    pub busy_poll: Duration,
    /// Heartbeats of busy workers offered (see [`crate::Hello::busy_ping`]).
    pub busy_ping: bool,
    /// The shared-memory arena to offer the worker, if its transport uses one.
    pub shm: ShmOptions,
    /// The protocol versions offered in `hello` instead of the host's own
    /// ([`crate::PROTOCOL_VERSIONS`]): for conformance checks of a worker's `refuse` only.
    pub offer_versions: Option<Vec<u32>>,
}

/// Size and threshold of the per-worker shared-memory arena (docs/protocol.md, "Shared
/// memory"). Segments of `threshold` bytes or more travel through it instead of the pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShmOptions {
    /// The arena's size per worker (half for each direction); 0: no arena.
    pub size: usize,
    /// The smallest segment that goes through the arena.
    pub threshold: usize,
}

impl ShmOptions {
    /// The default arena: 64 MiB per worker (32 MiB each way; only what is written is ever
    /// backed by memory), for segments of 64 KiB or more (a pipe's default capacity; measured
    /// on 2 cores, pinned: the arena wins from 64 KiB on, ties at 32 KiB and loses below).
    pub const DEFAULT: ShmOptions = ShmOptions { size: 64 << 20, threshold: 64 << 10 };

    /// No arena: every segment goes over the pipe.
    pub const OFF: ShmOptions = ShmOptions { size: 0, threshold: usize::MAX };

    /// An arena of `size` bytes for segments of `threshold` bytes or more.
    pub fn new(size: usize, threshold: usize) -> Self {
        ShmOptions { size, threshold: threshold.max(1) }
    }

    /// Whether an arena is to be made.
    pub fn enabled(&self) -> bool {
        self.size > 0
    }
}

impl Default for ShmOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Debug for StartOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StartOptions")
            .field("worker", &self.worker)
            .field("run_id", &self.run_id)
            .field("max_frame", &self.max_frame)
            .field("host", &self.host.is_some())
            .finish_non_exhaustive()
    }
}

impl StartOptions {
    /// Options for `worker` in run `run_id`.
    pub fn new(worker: WorkerId, run_id: impl Into<String>, max_frame: usize) -> Self {
        StartOptions {
            worker,
            run_id: run_id.into(),
            env: Vec::new(),
            max_frame,
            handshake_delay: None,
            host: None,
            max_in_flight: 1,
            pipeline_depth: 1,
            busy_poll: Duration::ZERO,
            busy_ping: false,
            shm: ShmOptions::OFF,
            offer_versions: None,
        }
    }

    /// Offers these protocol versions instead of the host's own (see
    /// [`offer_versions`](Self::offer_versions)).
    pub fn with_offer_versions(mut self, versions: Option<Vec<u32>>) -> Self {
        self.offer_versions = versions;
        self
    }

    /// Sets the shared-memory arena to offer (see [`ShmOptions`]).
    pub fn with_shm(mut self, shm: ShmOptions) -> Self {
        self.shm = shm;
        self
    }

    /// The same options for another worker.
    pub fn for_worker(&self, worker: WorkerId) -> Self {
        StartOptions { worker, ..self.clone() }
    }

    /// Sets the busy-poll window (see [`crate::Hello::busy_poll`]).
    pub fn with_busy_poll(mut self, d: Duration) -> Self {
        self.busy_poll = d;
        self
    }

    /// Fault injection: delays the handshake by `d` (it still counts against the timeout).
    pub fn with_handshake_delay(mut self, d: Option<Duration>) -> Self {
        self.handshake_delay = d;
        self
    }

    /// Sets how many calls the host may send at once.
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Offers heartbeats while busy (see [`crate::Hello::busy_ping`]).
    pub fn with_busy_ping(mut self, on: bool) -> Self {
        self.busy_ping = on;
        self
    }

    /// Offers pipelining up to `depth` calls (see [`crate::Hello::pipeline_depth`]).
    pub fn with_pipeline_depth(mut self, depth: usize) -> Self {
        self.pipeline_depth = depth.max(1);
        self
    }

    /// Sets the handler of the worker's calls to the host.
    pub fn with_host(mut self, host: Option<Arc<dyn HostHandler>>) -> Self {
        self.host = host;
        self
    }

    /// Sets the extra environment variables.
    pub fn with_env(mut self, env: Vec<(OsString, OsString)>) -> Self {
        self.env = env;
        self
    }
}

/// A started, handshaken worker as the pool sees it: its connection, and how to watch and stop
/// it. Dropping the handle must stop the worker (a process launcher kills its process tree).
#[async_trait]
pub trait WorkerHandle: Send + Sync + fmt::Debug + 'static {
    /// The worker's id.
    fn id(&self) -> WorkerId;

    /// The live connection.
    fn connection(&self) -> &Arc<dyn Connection>;

    /// What the worker announced in its handshake.
    fn ready(&self) -> &Ready;

    /// When the worker became ready.
    fn started(&self) -> Instant;

    /// How the worker ended, if it has.
    fn exit_info(&self) -> Option<ExitInfo>;

    /// Waits until the worker has ended (a process: exited and reaped).
    async fn exited(&self) -> ExitInfo;

    /// Kills the worker (and, for a process, its whole subtree) at once.
    fn kill(&self);

    /// Stops the worker gracefully within about `grace` per step, killing it at the end.
    async fn shutdown(&self, grace: Duration) -> ExitInfo;

    /// Resolves when the worker asks to leave the pool gracefully (a remote worker whose agent
    /// is draining): the slot takes it out of routing, lets its calls finish (within the
    /// drain timeout), stops it, and starts a replacement. Unlike an exit, this is not a crash.
    /// The default never resolves.
    fn leaving(&self) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(futures::future::pending())
    }

    /// Cancels call `id`: by default, the protocol's `cancel`.
    fn cancel(&self, id: RequestId) {
        self.connection().cancel(id);
    }

    /// Interrupts call `id` if the worker runs it now ([`Connection::running`]) by the means it
    /// announced (a process: its cancel signal), after a [`cancel`](Self::cancel) that found
    /// the call still queued in the worker's pipeline. The default does nothing.
    fn interrupt(&self, _id: RequestId) {}

    /// The last lines the worker wrote to its error output (empty if it has none).
    fn stderr_tail(&self) -> String {
        String::new()
    }

    /// The id of the worker's process, where the host verified it (none for an in-process
    /// worker).
    fn pid(&self) -> Option<u32> {
        None
    }

    /// Resident memory of the worker (a process: its whole tree), for recycling by memory;
    /// `None` when unknown.
    fn memory(&self) -> Option<u64> {
        None
    }
}

/// Starts workers: the one seam between the pool and how its workers come to life.
#[async_trait]
pub trait Launcher: Send + Sync + 'static {
    /// Starts the worker `opts.worker` and returns it ready for calls, or a typed start-up
    /// error (`Spawn`, `StartupFailed`, `HandshakeTimeout`, `VersionMismatch`, ...), leaving
    /// nothing running behind.
    async fn launch(&self, opts: StartOptions) -> Result<Box<dyn WorkerHandle>, Error>;

    /// Stops, within `grace`, whatever the launcher keeps besides its workers (a zygote). The
    /// pool calls it at shutdown, after its workers have stopped.
    async fn shutdown(&self, _grace: Duration) {}

    /// Kills at once whatever the launcher keeps besides its workers (the pool was dropped).
    fn abort(&self) {}
}
