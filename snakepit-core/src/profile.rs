//! Worker profiles: how many requests one worker serves at once and how it is started.

/// How worker processes are created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartMode {
    /// Every worker is a fresh process (the default).
    #[default]
    Cold,
    /// Workers are forked from a warm *zygote*: one process that imported the worker's code
    /// once (see [`Zygote`]). The adapter must support it ([`crate::Adapter::zygote_spec`]).
    Zygote,
}

/// How a worker is loaded: its concurrency and its start mode.
pub trait WorkerProfile: Send + Sync + 'static {
    /// How many requests one worker process runs at once (1 = process profile).
    fn max_in_flight(&self) -> usize;
    /// How workers are created.
    fn start_mode(&self) -> StartMode {
        StartMode::Cold
    }
}

/// The process profile: one request at a time per worker process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessProfile;

impl WorkerProfile for ProcessProfile {
    fn max_in_flight(&self) -> usize {
        1
    }
}

/// The thread profile: a worker runs up to `n` calls at once (the Python bridge uses a thread
/// pool for sync tools and its event loop for `async def` tools).
#[derive(Debug, Clone, Copy)]
pub struct ThreadProfile {
    max_in_flight: usize,
}

impl ThreadProfile {
    /// Up to `n` concurrent calls per worker.
    pub fn new(n: usize) -> Self {
        ThreadProfile { max_in_flight: n.max(1) }
    }
}

impl WorkerProfile for ThreadProfile {
    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }
}

/// Wraps a profile so that its workers are forked from a warm zygote instead of started cold.
///
/// One zygote process per pool imports the worker's code once; each worker is then a `fork()`
/// of it, ready in about a millisecond plus its handshake, whatever its imports cost. Crash,
/// recycling and shutdown behave as with cold workers; a dead zygote is started again on the next
/// worker start.
///
/// Fork safety is the worker code's part: nothing imported at module level may start threads
/// (BLAS thread pools, gRPC channels, event loops) or hold sockets, since a fork copies only the
/// forking thread. Per-worker resources belong in `setup()`, which still runs in every worker.
///
/// ```
/// use snakepit_core::{ProcessProfile, StartMode, WorkerProfile, Zygote};
/// let p = Zygote(ProcessProfile);
/// assert_eq!(p.start_mode(), StartMode::Zygote);
/// assert_eq!(p.max_in_flight(), 1);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Zygote<P = ProcessProfile>(pub P);

impl<P: WorkerProfile> WorkerProfile for Zygote<P> {
    fn max_in_flight(&self) -> usize {
        self.0.max_in_flight()
    }

    fn start_mode(&self) -> StartMode {
        StartMode::Zygote
    }
}
