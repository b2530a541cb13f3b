//! The pool: startup, the bounded FIFO queue, leases, restarts, shutdown.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use snakepit_core::{Adapter, Error, Payload, Request, SessionStore, Transport, WorkerId, DEFAULT_MAX_FRAME};
use snakepit_supervisor::{registry, start_worker, StartOptions, Worker, Zygote};

use crate::lifecycle::{run_slot, Member, SlotState};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

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
}

impl CallOptions {
    /// Options with a timeout.
    pub fn timeout(t: Duration) -> Self {
        CallOptions { timeout: Some(t), deadline: None, key: None, affinity: None }
    }

    /// Options with an absolute deadline.
    pub fn deadline(d: Instant) -> Self {
        CallOptions { timeout: None, deadline: Some(d), key: None, affinity: None }
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

    /// Sets the request's quarantine key (requests with equal keys count as the same request).
    pub fn with_key(mut self, key: u64) -> Self {
        self.key = Some(key);
        self
    }
}

/// A snapshot of the pool's state and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Configured number of workers.
    pub size: usize,
    /// Workers alive and ready (idle or busy).
    pub ready: usize,
    /// Workers idle right now.
    pub idle: usize,
    /// Calls running right now (with a thread profile, several per worker).
    pub busy: usize,
    /// Calls waiting for a worker.
    pub queued: usize,
    /// Worker restarts since the pool started.
    pub restarts: u64,
    /// Calls that returned a result.
    pub calls_ok: u64,
    /// Calls that returned an error.
    pub calls_failed: u64,
    /// Workers replaced by recycling (request count or age).
    pub recycled: u64,
    /// Workers killed for missing heartbeats.
    pub unresponsive: u64,
    /// Some slot crashed too often and stopped restarting for a while.
    pub degraded: bool,
    /// Every slot is failing to start: calls fail fast with `Unavailable`.
    pub circuit_open: bool,
}

#[derive(Clone)]
pub(crate) struct Config {
    size: usize,
    max_queue: usize,
    queue_timeout: Duration,
    default_timeout: Option<Duration>,
    startup_concurrency: usize,
    pub(crate) shutdown_grace: Duration,
    pub(crate) restart_min: Duration,
    pub(crate) restart_max: Duration,
    env: Vec<(OsString, OsString)>,
    max_frame: usize,
    pub(crate) heartbeat: Option<Heartbeat>,
    pub(crate) max_restarts: usize,
    pub(crate) restart_window: Duration,
    pub(crate) max_requests: Option<u64>,
    pub(crate) max_age: Option<Duration>,
    pub(crate) max_memory: Option<u64>,
    pub(crate) memory_check: Duration,
    pub(crate) recycle_jitter: f64,
    pub(crate) drain_timeout: Duration,
    pub(crate) cancel_grace: Duration,
    pub(crate) drop_policy: DropPolicy,
    pub(crate) stream_window: u32,
    pub(crate) max_in_flight: usize,
    start_mode: snakepit_core::StartMode,
    busy_poll: Duration,
    instance: Option<String>,
    run_dir: Option<std::path::PathBuf>,
    registry: bool,
    quarantine: Option<u32>,
    pub(crate) affinity: Affinity,
    session_ttl: Duration,
    max_sessions: usize,
    #[cfg(feature = "chaos")]
    pub(crate) chaos: Option<crate::chaos::Chaos>,
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

/// Heartbeat settings: idle workers are pinged every `interval`; a worker that misses
/// `max_missed` pongs in a row (each within `timeout`) is killed and replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Time between pings of an idle worker.
    pub interval: Duration,
    /// How long one ping may take.
    pub timeout: Duration,
    /// Consecutive missed pings before the worker is replaced.
    pub max_missed: u32,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat { interval: Duration::from_secs(10), timeout: Duration::from_secs(5), max_missed: 3 }
    }
}

/// Builds a [`Pool`]; see [`Pool::builder`].
pub struct PoolBuilder {
    adapter: Option<Arc<dyn Adapter>>,
    transport: Option<Arc<dyn Transport>>,
    store: Option<Arc<dyn SessionStore>>,
    rehydrate: Option<RehydrateHook>,
    cfg: Config,
}

impl std::fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuilder").field("size", &self.cfg.size).finish_non_exhaustive()
    }
}

impl Default for PoolBuilder {
    fn default() -> Self {
        PoolBuilder {
            adapter: None,
            transport: None,
            store: None,
            rehydrate: None,
            cfg: Config {
                size: std::thread::available_parallelism().map_or(2, |n| n.get()),
                max_queue: 1000,
                queue_timeout: Duration::from_secs(5),
                default_timeout: None,
                startup_concurrency: 0,
                shutdown_grace: Duration::from_secs(2),
                restart_min: Duration::from_millis(50),
                restart_max: Duration::from_secs(5),
                env: Vec::new(),
                max_frame: DEFAULT_MAX_FRAME,
                heartbeat: Some(Heartbeat::default()),
                max_restarts: 10,
                restart_window: Duration::from_secs(60),
                max_requests: None,
                max_age: None,
                max_memory: None,
                memory_check: Duration::from_secs(5),
                recycle_jitter: 0.1,
                drain_timeout: Duration::from_secs(60),
                cancel_grace: Duration::from_secs(2),
                drop_policy: DropPolicy::Kill,
                stream_window: 32,
                max_in_flight: 1,
                start_mode: snakepit_core::StartMode::Cold,
                busy_poll: Duration::ZERO,
                instance: None,
                run_dir: None,
                registry: true,
                quarantine: None,
                affinity: Affinity::Hint,
                session_ttl: Duration::from_secs(3600),
                max_sessions: 100_000,
                #[cfg(feature = "chaos")]
                chaos: None,
            },
        }
    }
}

impl PoolBuilder {
    /// What the workers run (required), e.g. `Python::script("worker.py")`.
    pub fn adapter(mut self, adapter: impl Adapter) -> Self {
        self.adapter = Some(Arc::new(adapter));
        self
    }

    /// The transport (default: framed stdio).
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// Number of workers (default: the CPU count).
    pub fn size(mut self, n: usize) -> Self {
        self.cfg.size = n.max(1);
        self
    }

    /// Most calls that may wait for a worker; more fail at once with `PoolSaturated`
    /// (default 1000).
    pub fn max_queue(mut self, n: usize) -> Self {
        self.cfg.max_queue = n;
        self
    }

    /// Longest wait for a free worker before `QueueTimeout` (default 5 s).
    pub fn queue_timeout(mut self, t: Duration) -> Self {
        self.cfg.queue_timeout = t;
        self
    }

    /// Timeout for calls that set none and whose command has no adapter default.
    pub fn default_timeout(mut self, t: Duration) -> Self {
        self.cfg.default_timeout = Some(t);
        self
    }

    /// How many workers start at once (default: all).
    pub fn startup_concurrency(mut self, n: usize) -> Self {
        self.cfg.startup_concurrency = n;
        self
    }

    /// How long each step of a graceful stop waits (stdin closed, then SIGTERM, then SIGKILL).
    pub fn shutdown_grace(mut self, t: Duration) -> Self {
        self.cfg.shutdown_grace = t;
        self
    }

    /// Restart backoff bounds (default 50 ms to 5 s, exponential with jitter).
    pub fn restart_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.cfg.restart_min = min;
        self.cfg.restart_max = max.max(min);
        self
    }

    /// Heartbeats for idle workers (default: every 10 s, 5 s timeout, 3 misses); `None` turns
    /// them off.
    pub fn heartbeat(mut self, hb: Option<Heartbeat>) -> Self {
        self.cfg.heartbeat = hb;
        self
    }

    /// Restart intensity limit: a slot whose worker dies more than `max_restarts` times within
    /// `window` stops restarting for `window` and the pool reports itself degraded (default:
    /// 10 in 60 s).
    pub fn restart_limit(mut self, max_restarts: usize, window: Duration) -> Self {
        self.cfg.max_restarts = max_restarts;
        self.cfg.restart_window = window;
        self
    }

    /// Recycles a worker after about `n` calls (minus up to `recycle_jitter` of it, so workers
    /// do not recycle together). The replacement is ready before the old worker stops.
    pub fn max_requests(mut self, n: u64) -> Self {
        self.cfg.max_requests = Some(n.max(1));
        self
    }

    /// Recycles a worker after about `age` of uptime (minus up to `recycle_jitter` of it).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.cfg.max_age = Some(age);
        self
    }

    /// Recycles a worker whose process tree (the worker and its descendants, read from `/proc`;
    /// not the host) holds more than about `bytes` of resident memory (minus up to
    /// `recycle_jitter` of it). Checked every `check_every`.
    pub fn max_memory(mut self, bytes: u64, check_every: Duration) -> Self {
        self.cfg.max_memory = Some(bytes);
        self.cfg.memory_check = check_every;
        self
    }

    /// The fraction (0..=0.5) by which recycling limits are randomly shortened (default 0.1).
    pub fn recycle_jitter(mut self, fraction: f64) -> Self {
        self.cfg.recycle_jitter = fraction.clamp(0.0, 0.5);
        self
    }

    /// How long a recycled worker may take to finish its in-flight call before it is stopped
    /// anyway (default 60 s).
    pub fn drain_timeout(mut self, t: Duration) -> Self {
        self.cfg.drain_timeout = t;
        self
    }

    /// After a call's deadline passes (or its future is dropped under [`DropPolicy::Kill`]),
    /// how long the worker has to answer the `cancel` before it is killed and replaced
    /// (default 2 s). A worker that answers in time stays in the pool.
    pub fn cancel_grace(mut self, t: Duration) -> Self {
        self.cfg.cancel_grace = t;
        self
    }

    /// The worker profile: how many calls one worker runs at once. `ProcessProfile` (the
    /// default) runs one; `ThreadProfile::new(n)` lets the bridge run up to `n` calls
    /// concurrently (threads for sync tools, its event loop for `async def` tools), and the pool
    /// sends up to `n` calls to one worker. Wrapping either in [`snakepit_core::Zygote`] forks
    /// the workers from one warm process that imported the worker code once (see
    /// [`snakepit_core::StartMode::Zygote`]).
    pub fn profile(mut self, profile: impl snakepit_core::WorkerProfile) -> Self {
        self.cfg.max_in_flight = profile.max_in_flight().max(1);
        self.cfg.start_mode = profile.start_mode();
        self
    }

    /// Busy-poll window (default: none). After each message, the worker polls its input for up
    /// to `d` before sleeping, and on a current-thread runtime a waiting caller polls for its
    /// reply as long, so a call that follows soon after the last one does not pay the wake-up
    /// latency of an idle CPU (on a 2-core VM, 25-60 µs per sleeping side). It costs CPU time:
    /// up to `d` per worker per idle gap. Worth it for latency-bound, steady traffic with spare
    /// cores and a current-thread runtime (measured: p50 ~70 µs → ~9.5 µs); on a multi-thread
    /// runtime the gain was nil in our benchmark. Off on a process confined to one CPU. The gRPC
    /// transport ignores it.
    pub fn busy_poll(mut self, d: Duration) -> Self {
        self.cfg.busy_poll = d.min(Duration::from_millis(10));
        self
    }

    /// How many stream items a worker may send ahead of the consumer (default 32).
    pub fn stream_window(mut self, n: u32) -> Self {
        self.cfg.stream_window = n.max(1);
        self
    }

    /// What a dropped call future does to its worker (default [`DropPolicy::Kill`]).
    pub fn drop_policy(mut self, p: DropPolicy) -> Self {
        self.cfg.drop_policy = p;
        self
    }

    /// Names this pool instance (default: the adapter's name). On start, the pool reaps what a
    /// previous, SIGKILLed host of the same instance left behind (never another live host's
    /// workers); see `snakepit_supervisor::registry`.
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.cfg.instance = Some(name.into());
        self
    }

    /// Where run files live (default: `snakepit_supervisor::registry::run_dir()`).
    pub fn run_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.cfg.run_dir = Some(dir.into());
        self
    }

    /// Turns the run registry (and the reaping on start) on or off (default on).
    pub fn run_registry(mut self, on: bool) -> Self {
        self.cfg.registry = on;
        self
    }

    /// Poison-request quarantine (off by default): a request (same command and arguments, or
    /// same [`CallOptions::key`]) that has crashed `crashes` workers is refused with
    /// `Quarantined` instead of killing more.
    pub fn quarantine(mut self, crashes: u32) -> Self {
        self.cfg.quarantine = Some(crashes.max(1));
        self
    }

    /// Default session affinity (default [`Affinity::Hint`]).
    pub fn affinity(mut self, a: Affinity) -> Self {
        self.cfg.affinity = a;
        self
    }

    /// Time-to-live of idle sessions in the default store (default 1 h; refreshed on use).
    pub fn session_ttl(mut self, ttl: Duration) -> Self {
        self.cfg.session_ttl = ttl;
        self
    }

    /// Most sessions the default store holds (default 100 000; more fail with
    /// `SessionQuotaExceeded`).
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.cfg.max_sessions = n;
        self
    }

    /// Uses another session store (e.g. a distributed one) instead of the in-memory default.
    pub fn session_store(mut self, store: impl SessionStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Sets the rehydrate hook: when a strict session call finds its worker gone, the hook's
    /// command (if any) runs on the new worker first, instead of failing with `SessionLost`.
    pub fn rehydrate(
        mut self,
        hook: impl Fn(&snakepit_core::SessionRecord) -> Option<(String, Payload)> + Send + Sync + 'static,
    ) -> Self {
        self.rehydrate = Some(Arc::new(hook));
        self
    }

    /// Injects faults (feature `chaos`; for tests).
    #[cfg(feature = "chaos")]
    pub fn chaos(mut self, chaos: crate::chaos::Chaos) -> Self {
        self.cfg.chaos = Some(chaos);
        self
    }

    /// Sets an environment variable for every worker, on top of the adapter's.
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.cfg.env.push((k.into(), v.into()));
        self
    }

    /// Starts the workers concurrently and returns once all are ready, or the first start-up
    /// error (with every started process stopped).
    pub async fn build(self) -> Result<Pool, Error> {
        let adapter = self.adapter.ok_or_else(|| Error::BadRequest("PoolBuilder: no adapter set".into()))?;
        let transport = match self.transport {
            Some(t) => t,
            None => default_transport()?,
        };
        let mut cfg = self.cfg;
        cfg.max_frame = transport.max_frame();
        let run_id = new_run_id();
        let instance = cfg.instance.clone().unwrap_or_else(|| adapter.name());
        let run_file = if cfg.registry {
            let dir = cfg.run_dir.clone().unwrap_or_else(registry::run_dir);
            let reaped = registry::reap(&dir, Some(&instance), false);
            if !reaped.runs.is_empty() {
                tracing::warn!(
                    instance,
                    runs = reaped.runs.len(),
                    killed = ?reaped.pids,
                    "reaped what a previous host of this pool instance left behind"
                );
            }
            match registry::RunFile::create(&dir, &instance, &run_id) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!("run registry unavailable in {}: {e}", dir.display());
                    None
                }
            }
        } else {
            None
        };
        let (shutdown, _) = watch::channel(false);
        let size = cfg.size;
        let (store, sweeper) = match self.store {
            Some(s) => (s, None),
            None => {
                let m = snakepit_session::MemoryStore::new(cfg.session_ttl, cfg.max_sessions);
                let every = (cfg.session_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
                let sweeper = m.spawn_sweeper(every);
                (Arc::new(m) as Arc<dyn SessionStore>, Some(sweeper))
            }
        };
        let inner = Arc::new(Inner {
            host: Arc::new(crate::host::PoolHost::new(store.clone())),
            store,
            rehydrate: self.rehydrate,
            slots: (0..cfg.size).map(|_| Slot::default()).collect(),
            cfg,
            adapter,
            transport,
            run_id,
            state: Mutex::new(State {
                pinned: (0..size).map(|_| VecDeque::new()).collect(),
                ..State::default()
            }),
            tools: RwLock::new(None),
            shutdown,
            restarts: AtomicU64::new(0),
            recycled: AtomicU64::new(0),
            unresponsive: AtomicU64::new(0),
            last_error: Mutex::new(None),
            calls_ok: AtomicU64::new(0),
            calls_failed: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            run_file,
            poison: Mutex::new(std::collections::HashMap::new()),
            all_idle: tokio::sync::Notify::new(),
            changes: watch::channel(0).0,
            zygote: tokio::sync::Mutex::new(None),
        });
        let workers = match inner.start_all().await {
            Ok(w) => w,
            Err(e) => {
                if let Some(s) = &sweeper {
                    s.abort();
                }
                return Err(e);
            }
        };
        let mut tasks = Vec::with_capacity(workers.len());
        for w in workers {
            let slot = w.id().slot;
            // Published before `build` returns, so the pool is fully usable at once.
            inner.slots[slot].publish(&w);
            inner.register(&w);
            inner.slots[slot].state.store(SlotState::Ready as u8, Ordering::Release);
            inner.checkin(w.clone());
            tasks.push(tokio::spawn(run_slot(inner.clone(), slot, w)));
        }
        tracing::info!(size = inner.cfg.size, adapter = %inner.adapter.name(), run_id = %inner.run_id, "pool ready");
        Ok(Pool { inner, tasks: Mutex::new(tasks), sweeper })
    }
}

#[cfg(feature = "stdio")]
fn default_transport() -> Result<Arc<dyn Transport>, Error> {
    Ok(Arc::new(snakepit_transport_stdio::StdioTransport::default()))
}

#[cfg(not(feature = "stdio"))]
fn default_transport() -> Result<Arc<dyn Transport>, Error> {
    Err(Error::BadRequest("no transport set and the `stdio` feature is off".into()))
}

/// The default quarantine key: a hash of the command and the encoded arguments.
fn request_key(command: &str, args: &Payload) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    command.hash(&mut h);
    args.bytes().hash(&mut h);
    h.finish()
}

fn new_run_id() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!("{:x}-{:x}-{}", std::process::id(), nanos & 0xffff_ffff_ffff, SEQ.fetch_add(1, Ordering::Relaxed))
}

#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) current: Mutex<Option<Arc<Member>>>,
    pub(crate) state: std::sync::atomic::AtomicU8,
    pub(crate) recycle: tokio::sync::Notify,
}

impl Slot {
    pub(crate) fn state(&self) -> SlotState {
        SlotState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(crate) fn publish(&self, m: &Arc<Member>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(m.clone());
    }
}

#[derive(Default)]
struct State {
    idle: Vec<Arc<Member>>,
    waiters: VecDeque<oneshot::Sender<Lease>>,
    /// Per slot: strict session calls waiting for that slot's worker (the one named).
    pinned: Vec<VecDeque<(WorkerId, oneshot::Sender<Lease>)>>,
    closed: bool,
}

struct ToolSet {
    /// Shared names: a call's [`Request`] takes a clone of its tool's name, not a copy.
    names: HashSet<Arc<str>>,
    sorted: Vec<String>,
    streams: HashSet<String>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) host: Arc<crate::host::PoolHost>,
    rehydrate: Option<RehydrateHook>,
    pub(crate) cfg: Config,
    adapter: Arc<dyn Adapter>,
    transport: Arc<dyn Transport>,
    run_id: String,
    pub(crate) slots: Vec<Slot>,
    state: Mutex<State>,
    tools: RwLock<Option<Arc<ToolSet>>>,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) restarts: AtomicU64,
    pub(crate) recycled: AtomicU64,
    pub(crate) unresponsive: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
    pub(crate) calls_ok: AtomicU64,
    pub(crate) calls_failed: AtomicU64,
    busy: AtomicUsize,
    pub(crate) run_file: Option<registry::RunFile>,
    /// Crash counts per request key (only with quarantine on).
    poison: Mutex<std::collections::HashMap<u64, u32>>,
    all_idle: tokio::sync::Notify,
    /// Bumped on every change observers may wait for (see [`Pool::wait_stats`]).
    changes: watch::Sender<u64>,
    /// The warm process workers are forked from (zygote start mode only).
    zygote: tokio::sync::Mutex<Option<Arc<Zygote>>>,
}

pub(crate) fn alive(m: &Member) -> bool {
    !m.is_retiring() && m.exit_info().is_none() && !m.connection().is_closed()
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn start_options(&self, worker: WorkerId) -> StartOptions {
        let host: Arc<dyn snakepit_core::HostHandler> = self.host.clone();
        let opts = StartOptions::new(worker, self.run_id.clone(), self.cfg.max_frame)
            .with_env(self.cfg.env.clone())
            .with_host(Some(host))
            .with_max_in_flight(self.cfg.max_in_flight)
            .with_busy_poll(self.cfg.busy_poll);
        #[cfg(feature = "chaos")]
        let opts = opts.with_handshake_delay(self.cfg.chaos.as_ref().and_then(|c| c.handshake_delay()));
        opts
    }

    async fn start_raw(&self, worker: WorkerId) -> Result<Worker, Error> {
        let opts = self.start_options(worker);
        let w = match self.cfg.start_mode {
            snakepit_core::StartMode::Zygote => {
                let zygote = self.zygote(&opts).await?;
                zygote.start_worker(&*self.adapter, &*self.transport, opts).await?
            }
            _ => start_worker(&*self.adapter, &*self.transport, opts).await?,
        };
        self.learn_tools(&w);
        Ok(w)
    }

    /// The live zygote, started (again) if there is none: concurrent starts share one.
    async fn zygote(&self, opts: &StartOptions) -> Result<Arc<Zygote>, Error> {
        let mut z = self.zygote.lock().await;
        if let Some(live) = z.as_ref().filter(|z| !z.is_closed()) {
            return Ok(live.clone());
        }
        if z.take().is_some() {
            tracing::warn!("the zygote is gone; starting a new one");
        }
        let fresh = Arc::new(Zygote::start(&*self.adapter, opts).await?);
        *z = Some(fresh.clone());
        Ok(fresh)
    }

    /// Starts a worker for a slot, wrapped with its recycling limits.
    pub(crate) async fn start(&self, worker: WorkerId) -> Result<Arc<Member>, Error> {
        let w = self.start_raw(worker).await?;
        Ok(Arc::new(Member::new(w, &self.cfg)))
    }

    fn learn_tools(&self, w: &Worker) {
        let mut tools = self.tools.write().unwrap_or_else(|p| p.into_inner());
        if tools.is_none() {
            let mut sorted: Vec<String> = w.ready().tools.iter().map(|t| t.name.clone()).collect();
            sorted.sort();
            let streams = w.ready().tools.iter().filter(|t| t.stream).map(|t| t.name.clone()).collect();
            *tools = Some(Arc::new(ToolSet {
                names: sorted.iter().map(|n| Arc::from(n.as_str())).collect(),
                sorted,
                streams,
            }));
        }
    }

    async fn start_all(&self) -> Result<Vec<Arc<Member>>, Error> {
        let limit = match self.cfg.startup_concurrency {
            0 => self.cfg.size,
            n => n,
        };
        let mut pending = (0..self.cfg.size).map(|slot| WorkerId { slot, generation: 0 });
        let mut running = FuturesUnordered::new();
        let mut ready = Vec::with_capacity(self.cfg.size);
        let mut first_err = None;
        for id in pending.by_ref().take(limit) {
            running.push(self.start(id));
        }
        while let Some(r) = running.next().await {
            match r {
                Ok(w) => ready.push(w),
                Err(e) => {
                    // Fail fast: stop the others still starting (dropping their futures kills
                    // their processes) and report the first error.
                    first_err = Some(e);
                    break;
                }
            }
            if let Some(id) = pending.next() {
                running.push(self.start(id));
            }
        }
        drop(running);
        if let Some(e) = first_err {
            for w in &ready {
                w.kill();
            }
            for w in &ready {
                w.exited().await;
            }
            return Err(e);
        }
        Ok(ready)
    }

    pub(crate) fn call_done(&self) {
        if self.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_idle.notify_waiters();
        }
        self.bump();
    }

    /// Wakes stats observers; free when nobody observes.
    pub(crate) fn bump(&self) {
        if self.changes.receiver_count() > 0 {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Returns a worker to the pool: to the oldest live waiter, else to the idle stack.
    pub(crate) fn checkin(self: &Arc<Self>, worker: Arc<Member>) {
        let mut st = self.state();
        let pos = st.idle.iter().position(|w| Arc::ptr_eq(w, &worker));
        if !alive(&worker) {
            if let Some(i) = pos {
                st.idle.remove(i);
            }
            return;
        }
        if st.closed {
            if pos.is_none() {
                st.idle.push(worker);
            }
            return;
        }
        let slot = worker.id().slot;
        // Hand free call slots to waiters: this worker's strict session calls first, then the
        // generic queue (oldest first).
        while worker.has_room() {
            let next = match st.pinned.get_mut(slot).and_then(|q| q.pop_front()) {
                Some((want, tx)) if want == worker.id() => tx,
                // Waiting for an earlier worker of this slot: it is gone (dropping `tx` tells
                // the caller its session lost its worker).
                Some(_) => continue,
                None => match st.waiters.pop_front() {
                    Some(tx) => tx,
                    None => break,
                },
            };
            if let Err(mut lease) = next.send(Lease::new(worker.clone(), self)) {
                // That caller gave up: undo the lease without running its drop.
                if let Some(w) = lease.worker.take() {
                    w.release();
                }
            }
        }
        match (worker.has_room(), pos) {
            (true, None) => st.idle.push(worker),
            (false, Some(i)) => {
                st.idle.remove(i);
            }
            _ => {}
        }
        drop(st);
        self.bump();
    }

    /// Fails the strict session calls waiting for `slot`'s worker (it is gone).
    pub(crate) fn fail_pinned(&self, slot: usize) {
        let waiters = self.state().pinned.get_mut(slot).map(std::mem::take);
        drop(waiters);
    }

    /// Whether `id` is the live current worker of its slot.
    fn is_current(&self, id: WorkerId) -> bool {
        self.slots.get(id.slot).is_some_and(|s| {
            s.current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|m| m.id() == id && alive(m))
        })
    }

    /// Records a started worker in the run registry.
    pub(crate) fn register(&self, m: &Member) {
        if let Some(f) = &self.run_file {
            f.add_worker(m.pid());
        }
    }

    /// Forgets an exited worker in the run registry.
    pub(crate) fn unregister(&self, m: &Member) {
        if let Some(f) = &self.run_file {
            f.remove_worker(m.pid());
        }
    }

    pub(crate) fn remove_idle(&self, id: WorkerId) {
        self.state().idle.retain(|w| w.id() != id);
    }

    /// Takes the worker out of the idle stack if it is there (for a heartbeat).
    pub(crate) fn take_idle(&self, id: WorkerId) -> Option<Arc<Member>> {
        let mut st = self.state();
        let i = st.idle.iter().position(|w| w.id() == id && w.leases() == 0)?;
        Some(st.idle.remove(i))
    }

    /// True when every slot is failing to start or has given up: calls fail fast.
    pub(crate) fn circuit_open(&self) -> bool {
        self.slots.iter().all(|s| matches!(s.state(), SlotState::Failing | SlotState::Failed))
    }

    /// Called when a slot enters a failing state: if the circuit is now open, fail the queue.
    pub(crate) fn check_circuit(&self) {
        if self.circuit_open() {
            let waiters = std::mem::take(&mut self.state().waiters);
            if !waiters.is_empty() {
                tracing::error!(
                    queued = waiters.len(),
                    "every worker is failing to start; failing queued calls"
                );
            }
            drop(waiters);
        }
        self.bump();
    }

    fn unavailable(&self) -> Error {
        let last = self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Error::Unavailable(format!(
            "all {} workers are failing to start (circuit open){}",
            self.cfg.size,
            last.map(|e| format!("; last error: {e}")).unwrap_or_default()
        ))
    }

    /// Checks `command` against the workers' tool catalog (once known) and returns its name
    /// as the catalog's shared copy (a new one when there is no catalog yet).
    fn known_tool(&self, command: &str) -> Result<Arc<str>, Error> {
        let tools = self.tools.read().unwrap_or_else(|p| p.into_inner());
        match tools.as_ref() {
            Some(t) => match t.names.get(command) {
                Some(name) => Ok(name.clone()),
                None => Err(Error::UnknownCommand { command: command.into(), available: t.sorted.clone() }),
            },
            None => Ok(Arc::from(command)),
        }
    }

    async fn checkout(
        self: &Arc<Self>,
        command: &str,
        deadline: Option<Instant>,
        pin: Option<Pin<'_>>,
    ) -> Result<Lease, Error> {
        let strict = pin.as_ref().is_some_and(|p| p.mode != Affinity::Hint);
        let rx = {
            let mut st = self.state();
            if st.closed {
                return Err(Error::ShuttingDown);
            }
            if let Some(p) = &pin {
                if let Some(i) = st.idle.iter().position(|w| w.id() == p.worker && alive(w)) {
                    let w = st.idle[i].clone();
                    let lease = Lease::new(w.clone(), self);
                    if !w.has_room() {
                        st.idle.remove(i);
                    }
                    return Ok(lease);
                }
                if strict {
                    drop(st);
                    if !self.is_current(p.worker) {
                        return Err(Error::SessionLost { session: p.session.to_owned(), worker: p.worker });
                    }
                    if p.mode == Affinity::StrictFailFast {
                        return Err(Error::WorkerBusy { session: p.session.to_owned(), worker: p.worker });
                    }
                    st = self.state();
                }
            }
            if !strict {
                while let Some(w) = st.idle.last().cloned() {
                    if !alive(&w) {
                        st.idle.pop();
                        continue;
                    }
                    let lease = Lease::new(w.clone(), self);
                    if !w.has_room() {
                        st.idle.pop();
                    }
                    return Ok(lease);
                }
            }
            if self.circuit_open() {
                drop(st);
                return Err(self.unavailable());
            }
            let queued = st.waiters.len() + st.pinned.iter().map(VecDeque::len).sum::<usize>();
            if queued >= self.cfg.max_queue {
                st.waiters.retain(|tx| !tx.is_closed());
                for q in st.pinned.iter_mut() {
                    q.retain(|(_, tx)| !tx.is_closed());
                }
                let queued = st.waiters.len() + st.pinned.iter().map(VecDeque::len).sum::<usize>();
                if queued >= self.cfg.max_queue {
                    return Err(Error::PoolSaturated { max_queue: self.cfg.max_queue });
                }
            }
            let (tx, rx) = oneshot::channel();
            match &pin {
                Some(p) if strict => match st.pinned.get_mut(p.worker.slot) {
                    Some(q) => q.push_back((p.worker, tx)),
                    None => {
                        return Err(Error::SessionLost { session: p.session.to_owned(), worker: p.worker })
                    }
                },
                _ => st.waiters.push_back(tx),
            }
            rx
        };
        self.bump();
        let start = Instant::now();
        let queue_deadline = start + self.cfg.queue_timeout;
        let (limit, is_call_deadline) = match deadline {
            Some(d) if d < queue_deadline => (d, true),
            _ => (queue_deadline, false),
        };
        match tokio::time::timeout_at(limit.into(), rx).await {
            Ok(Ok(lease)) => Ok(lease),
            Ok(Err(_)) if self.state().closed => Err(Error::ShuttingDown),
            Ok(Err(_)) => match pin {
                Some(p) if strict => {
                    Err(Error::SessionLost { session: p.session.to_owned(), worker: p.worker })
                }
                _ => Err(self.unavailable()),
            },
            // Dropping `rx` withdraws the call: a worker sent meanwhile comes back via the
            // lease's drop, and the call is never run.
            Err(_) if is_call_deadline => {
                Err(Error::Timeout { command: command.into(), worker: None, after: start.elapsed() })
            }
            Err(_) => Err(Error::QueueTimeout { command: command.into(), waited: start.elapsed() }),
        }
    }
}

/// The items of a streamed call, in order, then `None`. An error item (the tool raised
/// midway, the worker crashed, the deadline passed) ends the stream.
///
/// Dropping it before the end cancels the call: the worker is sent `cancel` (the Python bridge
/// closes the generator, so its `finally` runs) and returns to the pool once it has answered.
pub struct CallStream {
    stream: futures::stream::BoxStream<'static, Result<Payload, Error>>,
    lease: Lease,
    worker: Arc<Member>,
    inner: Arc<Inner>,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    command: String,
    done: bool,
    _session_call: Option<crate::lifecycle::SessionCall>,
    _scope: Option<crate::host::SessionScope>,
}

impl std::fmt::Debug for CallStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream")
            .field("command", &self.command)
            .field("worker", &self.worker.id())
            .finish()
    }
}

impl CallStream {
    /// The next item decoded as JSON, or `None` at the end.
    pub async fn next_json(&mut self) -> Option<Result<serde_json::Value, Error>> {
        use futures::StreamExt;
        self.next().await.map(|r| r.and_then(|p| p.to_value()))
    }

    fn finish(&mut self, ok: bool) {
        self.done = true;
        let counter = if ok { &self.inner.calls_ok } else { &self.inner.calls_failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl futures::Stream for CallStream {
    type Item = Result<Payload, Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(d) = this.deadline.as_mut() {
            if std::future::Future::poll(d.as_mut(), cx).is_ready() {
                this.lease.timed_out = true;
                this.finish(false);
                return Poll::Ready(Some(Err(Error::Timeout {
                    command: this.command.clone(),
                    worker: Some(this.worker.id()),
                    after: Duration::ZERO,
                })));
            }
        }
        match this.stream.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(p))) => Poll::Ready(Some(Ok(p))),
            Poll::Ready(None) => {
                this.lease.completed(&this.inner);
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e @ Error::Worker { .. }))) => {
                this.lease.completed(&this.inner);
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Err(Error::Disconnected { worker }))) => {
                this.inner.call_done();
                this.lease.in_call = false;
                this.finish(false);
                Poll::Ready(Some(Err(Error::WorkerCrashed {
                    worker,
                    command: Some(this.command.clone()),
                    exit: this.worker.exit_info().unwrap_or(snakepit_core::ExitInfo::Unknown),
                    stderr_tail: this.worker.stderr_tail(),
                })))
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner.call_done();
                this.lease.in_call = false;
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

/// A checked-out call: its lease (the worker, marked busy), deadline and start time.
struct Acquired {
    lease: Lease,
    worker: Arc<Member>,
    deadline: Option<Instant>,
    now: Instant,
    _session_call: Option<crate::lifecycle::SessionCall>,
}

/// A session call's wish to run on a given worker.
#[derive(Clone, Copy)]
struct Pin<'a> {
    session: &'a str,
    worker: WorkerId,
    mode: Affinity,
}

/// A worker checked out for one call. Dropping it returns the worker to the pool, or kills it
/// when a call was interrupted on it (so a stuck or half-answered worker never serves again).
struct Lease {
    worker: Option<Arc<Member>>,
    inner: Option<Arc<Inner>>,
    in_call: bool,
    /// The running call's id and deadline (for cancel / detach).
    request: Option<(snakepit_core::RequestId, Option<Instant>)>,
    timed_out: bool,
}

impl Lease {
    fn new(w: Arc<Member>, inner: &Arc<Inner>) -> Self {
        w.acquire();
        Lease { worker: Some(w), inner: Some(inner.clone()), in_call: false, request: None, timed_out: false }
    }

    /// Marks the call as completed (the worker answered), counting it for recycling.
    fn completed(&mut self, inner: &Inner) {
        inner.call_done();
        self.in_call = false;
        if let Some(w) = &self.worker {
            w.count_request(&inner.slots[w.id().slot]);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(w) = self.worker.take() else { return };
        let Some(inner) = self.inner.take() else {
            w.release();
            return;
        };
        if !self.in_call {
            w.release();
            inner.checkin(w);
            return;
        }
        // The call was interrupted (deadline or dropped future) while the worker works on it.
        let detach = !self.timed_out && inner.cfg.drop_policy == DropPolicy::Detach;
        let conn = w.connection().clone();
        let id = self.request.map(|(id, _)| id);
        if !detach {
            if let Some(id) = id {
                w.cancel(id);
            }
        }
        let limit = if detach {
            self.request
                .and_then(|(_, d)| d)
                .map_or(inner.cfg.drain_timeout, |d| d.saturating_duration_since(Instant::now()))
        } else {
            inner.cfg.cancel_grace
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait on: the safe choice is to kill.
            inner.call_done();
            w.release();
            w.kill();
            return;
        };
        rt.spawn(async move {
            let wait = match id {
                Some(id) => conn.answered(id),
                None => conn.idle(),
            };
            let answered = tokio::time::timeout(limit, wait).await.is_ok() && alive(&w);
            inner.call_done();
            w.release();
            if answered {
                tracing::debug!(worker = %w.id(), detach, "interrupted call answered; worker kept");
                inner.checkin(w);
            } else {
                tracing::warn!(worker = %w.id(), ?limit, "interrupted call not answered in time; replacing the worker");
                w.kill();
            }
        });
    }
}

/// A supervised pool of worker processes. See the [crate docs](crate).
///
/// Dropping the pool kills every worker's process group at once; [`Pool::shutdown`] stops them
/// gracefully instead.
pub struct Pool {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The default session store's sweeper (stopped with the pool).
    sweeper: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("run_id", &self.inner.run_id).field("stats", &self.stats()).finish()
    }
}

impl Pool {
    /// A builder with the defaults (CPU-count workers, stdio transport, queue of 1000, 5 s
    /// queue timeout, no call timeout).
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// Runs `command` with JSON `args` and returns its JSON result.
    pub async fn execute(&self, command: &str, args: serde_json::Value) -> Result<serde_json::Value, Error> {
        self.execute_with(command, Payload::from(args), CallOptions::default()).await?.to_value()
    }

    /// Runs `command` with typed arguments and decodes a typed result.
    pub async fn execute_as<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        command: &str,
        args: &A,
    ) -> Result<R, Error> {
        self.execute_with(command, Payload::json(args)?, CallOptions::default()).await?.decode()
    }

    /// Runs `command` with a timeout.
    pub async fn execute_timeout(
        &self,
        command: &str,
        args: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, Error> {
        self.execute_with(command, Payload::from(args), CallOptions::timeout(timeout)).await?.to_value()
    }

    /// Runs `command` with an encoded payload and options; the most general form.
    ///
    /// Errors: `UnknownCommand` (no round trip), `PoolSaturated` (at once), `QueueTimeout`,
    /// `Timeout` (at once; the worker is sent `cancel` and is kept if it answers within
    /// `cancel_grace`, else replaced; its late reply is never delivered), `Worker` (the tool
    /// raised), `WorkerCrashed`, `Protocol`, `Unavailable`, `Quarantined`, `ShuttingDown`.
    /// Dropping the future withdraws a queued call; a running one is handled by the pool's
    /// [`DropPolicy`].
    pub async fn execute_with(
        &self,
        command: &str,
        args: Payload,
        opts: CallOptions,
    ) -> Result<Payload, Error> {
        self.call(None, command, args, opts).await
    }

    /// Runs `command` in `session`: routed to the worker the session's last call ran on,
    /// according to the pool's [`Affinity`] (see [`Pool::execute_in_session_with`]).
    pub async fn execute_in_session(
        &self,
        session: &str,
        command: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, Error> {
        self.call(Some(session), command, Payload::from(args), CallOptions::default()).await?.to_value()
    }

    /// Runs `command` in `session` with options (affinity, timeout...). Errors, besides those
    /// of [`Pool::execute_with`]: `SessionNotFound`; `SessionLost` when a strict call's worker
    /// is gone (unless a rehydrate hook is set); `WorkerBusy` for `StrictFailFast`.
    pub async fn execute_in_session_with(
        &self,
        session: &str,
        command: &str,
        args: Payload,
        opts: CallOptions,
    ) -> Result<Payload, Error> {
        self.call(Some(session), command, args, opts).await
    }

    async fn call(
        &self,
        session: Option<&str>,
        command: &str,
        args: Payload,
        opts: CallOptions,
    ) -> Result<Payload, Error> {
        let r = self.run(session, command, args, opts).await;
        let counter = if r.is_ok() { &self.inner.calls_ok } else { &self.inner.calls_failed };
        counter.fetch_add(1, Ordering::Relaxed);
        r
    }

    async fn run(
        &self,
        session: Option<&str>,
        command: &str,
        args: Payload,
        opts: CallOptions,
    ) -> Result<Payload, Error> {
        let inner = &self.inner;
        let name = inner.known_tool(command)?;
        inner.adapter.validate(command, &args)?;
        let poison_key = inner.cfg.quarantine.map(|limit| {
            let key = opts.key.unwrap_or_else(|| request_key(command, &args));
            (key, limit)
        });
        if let Some((key, limit)) = poison_key {
            let crashes =
                inner.poison.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied().unwrap_or(0);
            if crashes >= limit {
                return Err(Error::Quarantined { command: command.into(), crashes });
            }
        }
        let r = self.run_checked(session, name, args, opts).await;
        if let (Some((key, _)), Err(Error::WorkerCrashed { .. } | Error::Protocol { .. })) = (poison_key, &r)
        {
            let mut poison = inner.poison.lock().unwrap_or_else(|p| p.into_inner());
            if poison.len() >= 10_000 {
                poison.clear(); // bounded memory; a real poison request is caught again quickly
            }
            *poison.entry(key).or_default() += 1;
        }
        r
    }

    /// Checks a call out: deadline, session pin (and rehydration), a leased worker marked busy.
    async fn acquire(
        &self,
        session: Option<&str>,
        command: &str,
        opts: &CallOptions,
    ) -> Result<Acquired, Error> {
        let inner = &self.inner;
        let now = Instant::now();
        let timeout =
            opts.timeout.or_else(|| inner.adapter.timeout_for(command)).or(inner.cfg.default_timeout);
        let deadline = match (timeout.map(|t| now + t), opts.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let record = match session {
            Some(sid) => {
                Some(inner.store.get(sid).await?.ok_or_else(|| Error::SessionNotFound { id: sid.into() })?)
            }
            None => None,
        };
        let pin = match (session, &record) {
            (Some(sid), Some(rec)) => rec.worker.map(|worker| Pin {
                session: sid,
                worker,
                mode: opts.affinity.unwrap_or(inner.cfg.affinity),
            }),
            _ => None,
        };
        let mut rehydrate = None;
        let mut lease = match inner.checkout(command, deadline, pin).await {
            Err(Error::SessionLost { session: sid, worker: lost }) => match (&inner.rehydrate, &record) {
                (Some(hook), Some(rec)) => {
                    tracing::info!(session = sid, %lost, "session lost its worker; rehydrating on another");
                    rehydrate = hook(rec);
                    inner.checkout(command, deadline, None).await?
                }
                _ => return Err(Error::SessionLost { session: sid, worker: lost }),
            },
            r => r?,
        };
        let worker = match &lease.worker {
            Some(w) => w.clone(),
            None => return Err(Error::Unavailable("internal: empty lease".into())),
        };
        lease.in_call = true;
        inner.busy.fetch_add(1, Ordering::Relaxed);
        inner.bump();
        let session_call = session.map(|_| worker.session_call());
        if let Some((cmd, rargs)) = rehydrate {
            let id = worker.connection().new_request_id();
            lease.request = Some((id, deadline));
            let req = Request::new(cmd.clone(), rargs).with_deadline(deadline).with_id(id);
            let r = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), worker.connection().call(req))
                    .await
                    .unwrap_or_else(|_| {
                        lease.timed_out = true;
                        Err(Error::Timeout {
                            command: cmd.clone(),
                            worker: Some(worker.id()),
                            after: d.saturating_duration_since(now),
                        })
                    }),
                None => worker.connection().call(req).await,
            };
            match r {
                Ok(_) => {}
                Err(e @ Error::Worker { .. }) => {
                    lease.completed(inner);
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Acquired { lease, worker, deadline, now, _session_call: session_call })
    }

    async fn run_checked(
        &self,
        session: Option<&str>,
        name: Arc<str>,
        args: Payload,
        opts: CallOptions,
    ) -> Result<Payload, Error> {
        let inner = &self.inner;
        let command = &*name;
        let Acquired { mut lease, worker, deadline, now, _session_call } =
            self.acquire(session, command, &opts).await?;
        let id = worker.connection().new_request_id();
        lease.request = Some((id, deadline));
        let req = Request::new(name.clone(), args)
            .with_deadline(deadline)
            .with_id(id)
            .with_session(session.map(str::to_owned));
        let _scope = session.map(|sid| inner.host.enter(worker.id(), id, sid));
        #[cfg(feature = "chaos")]
        let chaos_n = match &inner.cfg.chaos {
            Some(c) => {
                let (n, kill) = c.before_call();
                if kill {
                    worker.kill();
                    // Let the kill land before the call is sent.
                    let _ = worker.connection().closed().await;
                }
                Some(n)
            }
            None => None,
        };
        let call = worker.connection().start(req);
        let result = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), call).await {
                Ok(r) => r,
                Err(_) => {
                    // The lease stays `in_call`: dropping it cancels the call and gives the
                    // worker `cancel_grace` to answer before it is replaced.
                    lease.timed_out = true;
                    tracing::warn!(worker = %worker.id(), command, "call timed out; cancelling it");
                    return Err(Error::Timeout {
                        command: command.into(),
                        worker: Some(worker.id()),
                        after: d.saturating_duration_since(now),
                    });
                }
            },
            None => call.await,
        };
        #[cfg(feature = "chaos")]
        if let (Some(c), Some(n), Ok(_)) = (&inner.cfg.chaos, chaos_n, &result) {
            if c.after_reply(n) {
                worker.kill();
            }
        }
        if let (Some(sid), Ok(_) | Err(Error::Worker { .. })) = (session, &result) {
            // The session's worker-side state now lives on this worker.
            if let Err(e) = inner.store.set_worker(sid, Some(worker.id())).await {
                tracing::debug!(session = sid, "cannot record the session's worker: {e}");
            }
        }
        match result {
            Ok(p) => {
                lease.completed(inner);
                Ok(p)
            }
            Err(Error::Disconnected { worker: id }) => {
                inner.call_done();
                lease.in_call = false;
                let exit = match tokio::time::timeout(Duration::from_secs(3), worker.exited()).await {
                    Ok(e) => e,
                    Err(_) => snakepit_core::ExitInfo::Unknown,
                };
                Err(Error::WorkerCrashed {
                    worker: id,
                    command: Some(command.into()),
                    exit,
                    stderr_tail: worker.stderr_tail(),
                })
            }
            Err(e @ Error::Worker { .. }) => {
                lease.completed(inner);
                Err(e)
            }
            Err(e) => {
                inner.call_done();
                lease.in_call = false;
                Err(e)
            }
        }
    }

    /// Runs a generator tool and returns its items as a stream (see [`CallStream`]).
    pub async fn execute_stream(&self, command: &str, args: serde_json::Value) -> Result<CallStream, Error> {
        self.execute_stream_with(None, command, Payload::from(args), CallOptions::default()).await
    }

    /// Streams `command`, optionally in a session, with options. The timeout covers the whole
    /// stream. At most `stream_window` items are buffered ahead of the consumer: a fast
    /// producer is held back, so memory stays bounded. Dropping the stream cancels the
    /// generator in the worker (its `finally` blocks run) and frees the worker.
    pub async fn execute_stream_with(
        &self,
        session: Option<&str>,
        command: &str,
        args: Payload,
        opts: CallOptions,
    ) -> Result<CallStream, Error> {
        let inner = &self.inner;
        let name = inner.known_tool(command)?;
        inner.adapter.validate(command, &args)?;
        let Acquired { mut lease, worker, deadline, now: _, _session_call } =
            self.acquire(session, command, &opts).await?;
        let id = worker.connection().new_request_id();
        lease.request = Some((id, deadline));
        let req = Request::new(name, args)
            .with_deadline(deadline)
            .with_id(id)
            .with_session(session.map(str::to_owned));
        let scope = session.map(|sid| inner.host.enter(worker.id(), id, sid));
        let stream = match worker.connection().stream(req, inner.cfg.stream_window).await {
            Ok(s) => s,
            Err(e) => {
                inner.calls_failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        if let Some(sid) = session {
            let _ = inner.store.set_worker(sid, Some(worker.id())).await;
        }
        Ok(CallStream {
            stream,
            lease,
            worker,
            inner: inner.clone(),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
            command: command.to_owned(),
            done: false,
            _session_call,
            _scope: scope,
        })
    }

    /// The pool's session store.
    pub fn session_store(&self) -> &Arc<dyn SessionStore> {
        &self.inner.store
    }

    /// Registers a host tool that workers can call while they run a request (Python:
    /// `ctx.call_host(name, args)`). Its error is raised in the worker as `HostCallError`.
    ///
    /// ```no_run
    /// # async fn t(pool: &snakepit::Pool) {
    /// pool.register_host_tool("lookup", |args| async move {
    ///     Ok(serde_json::json!({"user": args["id"], "plan": "pro"}))
    /// });
    /// # }
    /// ```
    pub fn register_host_tool<F, Fut>(&self, name: &str, f: F)
    where
        F: Fn(serde_json::Value) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<serde_json::Value, Error>> + Send + 'static,
    {
        self.inner.host.register(name, f);
    }

    /// Whether the workers announced `command` as a streaming tool (a generator).
    pub fn is_stream_tool(&self, command: &str) -> bool {
        let tools = self.inner.tools.read().unwrap_or_else(|p| p.into_inner());
        tools.as_ref().is_some_and(|t| t.streams.contains(command))
    }

    /// The commands the workers announced (sorted).
    pub fn tools(&self) -> Vec<String> {
        let tools = self.inner.tools.read().unwrap_or_else(|p| p.into_inner());
        tools.as_ref().map(|t| t.sorted.clone()).unwrap_or_default()
    }

    /// The pool's run id (exported to workers as `SNAKEPIT_RUN_ID`).
    pub fn run_id(&self) -> &str {
        &self.inner.run_id
    }

    /// The process ids of the live workers, by slot.
    pub fn worker_pids(&self) -> Vec<Option<u32>> {
        self.inner
            .slots
            .iter()
            .map(|s| {
                let cur = s.current.lock().unwrap_or_else(|p| p.into_inner());
                cur.as_ref().filter(|w| alive(w)).map(|w| w.pid())
            })
            .collect()
    }

    /// A snapshot of the pool's counters.
    pub fn stats(&self) -> PoolStats {
        let inner = &self.inner;
        let ready = inner
            .slots
            .iter()
            .filter(|s| {
                s.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|w| alive(w))
            })
            .count();
        let (idle, queued) = {
            let st = inner.state();
            (
                st.idle.iter().filter(|w| alive(w)).count(),
                st.waiters.iter().filter(|w| !w.is_closed()).count()
                    + st.pinned.iter().flatten().filter(|(_, w)| !w.is_closed()).count(),
            )
        };
        PoolStats {
            size: inner.cfg.size,
            ready,
            idle,
            busy: inner.busy.load(Ordering::Relaxed),
            queued,
            restarts: inner.restarts.load(Ordering::Relaxed),
            recycled: inner.recycled.load(Ordering::Relaxed),
            unresponsive: inner.unresponsive.load(Ordering::Relaxed),
            degraded: inner.slots.iter().any(|s| s.state() == SlotState::Failed),
            circuit_open: inner.circuit_open(),
            calls_ok: inner.calls_ok.load(Ordering::Relaxed),
            calls_failed: inner.calls_failed.load(Ordering::Relaxed),
        }
    }

    /// Waits until the pool's stats satisfy `cond`, re-checking on every change (checkout,
    /// check-in, queueing, call completion, restart), for at most `timeout`. Returns the stats
    /// that satisfied it, or the last ones seen when the time ran out.
    pub async fn wait_stats(
        &self,
        mut cond: impl FnMut(&PoolStats) -> bool,
        timeout: Duration,
    ) -> Result<PoolStats, PoolStats> {
        let mut rx = self.inner.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            let stats = self.stats();
            if cond(&stats) {
                return Ok(stats);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(self.stats()),
            }
        }
    }

    /// Stops the pool gracefully: new calls fail with `ShuttingDown`, queued calls are failed,
    /// running calls get up to the shutdown grace to finish, then every worker is stopped
    /// (stdin closed, then SIGTERM, then SIGKILL to its group) and reaped.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        let waiters = {
            let mut st = inner.state();
            st.closed = true;
            std::mem::take(&mut st.waiters)
        };
        drop(waiters);
        // Let running calls finish, within the grace period.
        let until = tokio::time::Instant::now() + inner.cfg.shutdown_grace;
        loop {
            let idle = inner.all_idle.notified();
            if inner.busy.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(until, idle).await.is_err() {
                tracing::warn!("calls still running after the shutdown grace; stopping their workers");
                break;
            }
        }
        inner.shutdown.send_replace(true);
        if let Some(s) = &self.sweeper {
            s.abort();
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        let workers: Vec<Arc<Member>> = inner
            .slots
            .iter()
            .filter_map(|s| s.current.lock().unwrap_or_else(|p| p.into_inner()).take())
            .collect();
        inner.state().idle.clear();
        let grace = inner.cfg.shutdown_grace;
        futures::future::join_all(workers.iter().map(|w| w.shutdown(grace))).await;
        if let Some(z) = inner.zygote.lock().await.take() {
            z.shutdown(grace).await;
        }
        tracing::info!(run_id = %inner.run_id, "pool stopped");
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let inner = &self.inner;
        inner.state().closed = true;
        inner.shutdown.send_replace(true);
        if let Some(s) = &self.sweeper {
            s.abort();
        }
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
        for s in &inner.slots {
            if let Some(w) = s.current.lock().unwrap_or_else(|p| p.into_inner()).take() {
                w.kill();
            }
        }
        let mut st = inner.state();
        for w in st.idle.drain(..) {
            w.kill();
        }
        st.waiters.clear();
        drop(st);
        // Dropping the zygote kills it and anything it forked. If a start holds the lock right
        // now, that start's future dies with the aborted slot task and the zygote with `Inner`.
        if let Ok(mut z) = inner.zygote.try_lock() {
            z.take();
        }
    }
}
