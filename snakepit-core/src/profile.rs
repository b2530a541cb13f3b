//! Worker profiles: how many requests one worker serves at once and how it is started.

/// How worker processes are created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartMode {
    /// Every worker is a fresh process (the default).
    #[default]
    Cold,
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
