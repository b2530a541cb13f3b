//! [`PoolBuilder`]: the pool's settings, and `build`, which starts the workers.

use std::ffi::OsString;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use snakepit_core::{
    Adapter, Error, Launcher, Payload, SessionStore, StartMode, StartOptions, Transport, WorkerId,
    DEFAULT_MAX_FRAME,
};
use snakepit_supervisor::{registry, Heartbeat, Member, ProcessLauncher, Slot, SlotConfig};
use tokio::sync::watch;

/// The deepest pipeline [`PoolBuilder::pipeline_depth`] accepts.
pub const MAX_PIPELINE_DEPTH: usize = 16;

/// The supervisor's defaults, with the pool's default pipeline depth.
fn default_slot() -> SlotConfig {
    let mut slot = SlotConfig::default();
    slot.pipeline_depth = DEFAULT_PIPELINE_DEPTH;
    slot
}

/// The default pipeline depth: 1, none. Pipelining is opt-in because it changes what a crash
/// costs: the calls queued behind the running one fail with `NotStarted` instead of waiting in
/// the pool for another worker. Measured unpinned on 2 cores, 4 workers × 32 callers of 64 B
/// calls did 57k calls/s at depth 1, 87k at 2, 120k at 4 and 135k at 8 (`snakepit bench
/// --only "4 workers"`).
pub const DEFAULT_PIPELINE_DEPTH: usize = 1;

use super::queue::Queue;
use super::stats::Counters;
use super::{Affinity, DropPolicy, Inner, Pool, RehydrateHook};

/// The pool's settings; `slot` is what each slot's supervisor uses.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) size: usize,
    pub(crate) max_queue: usize,
    pub(crate) queue_timeout: Duration,
    pub(crate) default_timeout: Option<Duration>,
    pub(crate) max_call_time: Option<Duration>,
    startup_concurrency: usize,
    env: Vec<(OsString, OsString)>,
    pub(crate) cancel_grace: Duration,
    pub(crate) drop_policy: DropPolicy,
    pub(crate) stream_window: u32,
    start_mode: StartMode,
    busy_poll: Duration,
    offer_versions: Option<Vec<u32>>,
    shm: snakepit_core::ShmOptions,
    instance: Option<String>,
    /// The pool's name in metrics and spans (the `pool` label).
    name: Option<String>,
    run_dir: Option<std::path::PathBuf>,
    registry: bool,
    pub(crate) quarantine: Option<u32>,
    pub(crate) affinity: Affinity,
    session_ttl: Duration,
    max_sessions: usize,
    /// A call in an unknown session creates it (the original Snakepit's behaviour).
    pub(crate) create_sessions_on_use: bool,
    pub(crate) autoscale: Option<super::Autoscale>,
    /// Retry every call once that failed with `NotStarted` (a remote pool: an agent that
    /// drains refuses calls it never ran).
    pub(crate) retry_not_started: bool,
    /// Whether `size` was set (a remote pool otherwise takes its agents' workers).
    pub(crate) size_set: bool,
    /// A shared session store to connect to at build (`redis://...`).
    store_url: Option<String>,
    pub(crate) slot: SlotConfig,
    #[cfg(feature = "chaos")]
    pub(crate) chaos: Option<crate::chaos::Chaos>,
}

/// Builds a [`Pool`]; see [`Pool::builder`].
pub struct PoolBuilder {
    pub(crate) adapter: Option<Arc<dyn Adapter>>,
    /// Workers on remote agents instead of the adapter (feature `remote`).
    #[cfg(feature = "remote")]
    pub(crate) remote: Option<snakepit_remote::RemoteOptions>,
    transport: Option<Arc<dyn Transport>>,
    store: Option<Arc<dyn SessionStore>>,
    rehydrate: Option<RehydrateHook>,
    pub(crate) cfg: Config,
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
            #[cfg(feature = "remote")]
            remote: None,
            transport: None,
            store: None,
            rehydrate: None,
            cfg: Config {
                size: std::thread::available_parallelism().map_or(2, |n| n.get()),
                max_queue: 1000,
                queue_timeout: Duration::from_secs(5),
                default_timeout: None,
                max_call_time: None,
                startup_concurrency: 0,
                env: Vec::new(),
                cancel_grace: Duration::from_secs(2),
                drop_policy: DropPolicy::Kill,
                stream_window: 32,
                start_mode: StartMode::Cold,
                busy_poll: Duration::ZERO,
                offer_versions: None,
                shm: snakepit_core::ShmOptions::DEFAULT,
                instance: None,
                name: None,
                run_dir: None,
                registry: true,
                quarantine: None,
                affinity: Affinity::Hint,
                session_ttl: Duration::from_secs(3600),
                max_sessions: 100_000,
                create_sessions_on_use: false,
                autoscale: None,
                retry_not_started: false,
                size_set: false,
                store_url: None,
                slot: default_slot(),
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

    /// What the workers run, already shared (e.g. `PoolConfig::adapter`'s).
    pub fn adapter_shared(mut self, adapter: Arc<dyn Adapter>) -> Self {
        self.adapter = Some(adapter);
        self
    }

    /// The transport (default: framed stdio). Unused when the adapter supplies its own
    /// launcher ([`Adapter::launcher`]), except for its frame limit.
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// Number of workers (default: the CPU count).
    pub fn size(mut self, n: usize) -> Self {
        self.cfg.size = n.max(1);
        self.cfg.size_set = true;
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

    /// Timeout for calls that set none and whose command has no adapter default (default:
    /// none, so such a call may wait for its worker for ever; see also
    /// [`PoolBuilder::max_call_time`]).
    pub fn default_timeout(mut self, t: Duration) -> Self {
        self.cfg.default_timeout = Some(t);
        self
    }

    /// The longest a call (or stream) may run on a worker, whatever its own deadline (default:
    /// none). A call running longer fails with `Timeout`; its worker is sent `cancel` and is
    /// replaced unless it answers within [`cancel_grace`](PoolBuilder::cancel_grace), as after
    /// any timeout. Time spent queued for a worker does not count.
    pub fn max_call_time(mut self, d: Duration) -> Self {
        self.cfg.max_call_time = Some(d);
        self
    }

    /// How many workers start at once (default: all).
    pub fn startup_concurrency(mut self, n: usize) -> Self {
        self.cfg.startup_concurrency = n;
        self
    }

    /// How long each step of a graceful stop waits (stdin closed, then SIGTERM, then SIGKILL).
    pub fn shutdown_grace(mut self, t: Duration) -> Self {
        self.cfg.slot.shutdown_grace = t;
        self
    }

    /// Restart backoff bounds (default 50 ms to 5 s, exponential with jitter).
    pub fn restart_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.cfg.slot.restart_min = min;
        self.cfg.slot.restart_max = max.max(min);
        self
    }

    /// Heartbeats for idle workers (default: every 10 s, 5 s timeout, 3 misses); `None` turns
    /// them off.
    pub fn heartbeat(mut self, hb: Option<Heartbeat>) -> Self {
        self.cfg.slot.heartbeat = hb;
        self
    }

    /// Restart intensity limit: a slot whose worker dies more than `max_restarts` times within
    /// `window` stops restarting for `window` and the pool reports itself degraded (default:
    /// 10 in 60 s).
    pub fn restart_limit(mut self, max_restarts: usize, window: Duration) -> Self {
        self.cfg.slot.max_restarts = max_restarts;
        self.cfg.slot.restart_window = window;
        self
    }

    /// Recycles a worker after about `n` calls (minus up to `recycle_jitter` of it, so workers
    /// do not recycle together). The replacement is ready before the old worker stops.
    pub fn max_requests(mut self, n: u64) -> Self {
        self.cfg.slot.max_requests = Some(n.max(1));
        self
    }

    /// Recycles a worker after about `age` of uptime (minus up to `recycle_jitter` of it).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.cfg.slot.max_age = Some(age);
        self
    }

    /// Recycles a worker whose process tree (the worker and its descendants, read from `/proc`;
    /// not the host) holds more than about `bytes` of resident memory (minus up to
    /// `recycle_jitter` of it). Checked every `check_every`.
    pub fn max_memory(mut self, bytes: u64, check_every: Duration) -> Self {
        self.cfg.slot.max_memory = Some(bytes);
        self.cfg.slot.memory_check = check_every;
        self
    }

    /// The fraction (0..=0.5) by which recycling limits are randomly shortened (default 0.1).
    pub fn recycle_jitter(mut self, fraction: f64) -> Self {
        self.cfg.slot.recycle_jitter = fraction.clamp(0.0, 0.5);
        self
    }

    /// How long a recycled worker may take to finish its in-flight call before it is stopped
    /// anyway (default 60 s).
    pub fn drain_timeout(mut self, t: Duration) -> Self {
        self.cfg.slot.drain_timeout = t;
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
        self.cfg.slot.max_in_flight = profile.max_in_flight().max(1);
        self.cfg.start_mode = profile.start_mode();
        self
    }

    /// Heartbeats of busy workers (default off). Heartbeats normally go to idle workers only;
    /// with this on, a worker that announces it can answer a `ping` while it runs a call (the
    /// Python bridge does, from a reader thread in the process profile and from its main loop
    /// in the thread profile) is pinged busy too, and killed and replaced after
    /// `max_missed` missed pings like an idle one. That catches a worker that stopped (SIGSTOP,
    /// a frozen VM) or hangs holding the GIL while a call with no deadline runs. It also kills
    /// a tool that holds the GIL in C code for longer than `max_missed` pings (a long
    /// `sorted()`, a regex that backtracks, some C extensions): opt in when your tools release
    /// the GIL or have deadlines shorter than that. A tool blocked in C *with* the GIL
    /// released (a socket read) still answers pings; deadlines catch that one. Needs
    /// [`heartbeat`](Self::heartbeat) on.
    pub fn busy_heartbeat(mut self, on: bool) -> Self {
        self.cfg.slot.busy_heartbeat = on;
        self
    }

    /// Pipelining (process profile): how many calls one worker may hold — the one it runs and
    /// the next ones, already written to its input, that it runs in order right after (default
    /// [`DEFAULT_PIPELINE_DEPTH`]: 1, none; 4 doubles the throughput of a busy pool here). The worker never waits for the host between calls, and one read
    /// of its input takes several calls. A call queued in a worker waits for the calls ahead of
    /// it even if another worker frees up first, so calls of very uneven lengths are better
    /// served by depth 1. Semantics stay exact: a queued call whose deadline passes or whose
    /// caller goes away is answered `Cancelled` without running; a crash fails the running call
    /// with `WorkerCrashed` and the queued ones with [`Error::NotStarted`]
    /// (see [`CallOptions::retry_not_started`](crate::CallOptions::retry_not_started)).
    /// Negotiated: a worker that does not announce pipelining gets one call at a time.
    /// At most 16; ignored by the thread profile and the gRPC transport.
    pub fn pipeline_depth(mut self, depth: usize) -> Self {
        self.cfg.slot.pipeline_depth = depth.clamp(1, MAX_PIPELINE_DEPTH);
        self
    }

    /// Busy-poll window (default: none). After each message, the worker polls its input for up
    /// to `d` before sleeping, and on a current-thread runtime a waiting caller polls for its
    /// reply as long, so a call that follows soon after the last one does not pay the wake-up
    /// latency of an idle CPU (on a 2-core VM, 25-60 µs per sleeping side). It costs CPU time:
    /// up to `d` per worker per idle gap. Worth it for latency-bound, steady traffic with spare
    /// cores. Measured unpinned on 2 cores with 50 µs: on a current-thread runtime a sequential
    /// call's p50 goes from ~70 to ~9.5 µs (both sides poll); on a multi-thread runtime, where
    /// only the worker polls, from 78.5 to 26.7 µs, and 16 callers on one worker go from 12.6k to
    /// 35.5k calls/s (`cargo xtask bench`). Off on a process confined to one CPU. The gRPC
    /// transport ignores it.
    pub fn busy_poll(mut self, d: Duration) -> Self {
        self.cfg.busy_poll = d.min(Duration::from_millis(10));
        self
    }

    /// Offers these protocol versions in `hello` instead of the host's own: for a conformance
    /// check that a worker refuses versions it does not speak (`snakepit conform`). Not for
    /// serving: a `ready` naming a version this host does not speak still fails the start with
    /// `version_mismatch`.
    #[doc(hidden)]
    pub fn offer_versions(mut self, versions: Vec<u32>) -> Self {
        self.cfg.offer_versions = Some(versions);
        self
    }

    /// The smallest binary segment that travels through the worker's shared-memory arena
    /// instead of its pipe (default 64 KiB; stdio transport only). Smaller segments are
    /// cheaper in the frame (no bookkeeping, no `release` message); larger ones cost one
    /// `memcpy` each way instead of the pipe's two and its wake-ups (pinned, 1 MiB: 278 µs
    /// against 655 µs). See docs/protocol.md, "Shared memory".
    pub fn shm_threshold(mut self, bytes: usize) -> Self {
        self.cfg.shm.threshold = bytes.max(1);
        self
    }

    /// The size of each worker's shared-memory arena (default 64 MiB: half for arguments, half
    /// for results; 0 turns it off). Only the pages a payload touched are backed by memory,
    /// and they stay with the worker until it exits: a pool may hold up to `size` per worker
    /// after large payloads. A segment that does not fit takes the pipe (counted in
    /// `snakepit::shm::counters().arena_full`).
    pub fn shm_max(mut self, bytes: usize) -> Self {
        self.cfg.shm.size = bytes;
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

    /// Names the pool in its metrics (the `pool` label) and its tracing spans (default: the
    /// [instance](PoolBuilder::instance) name, else the adapter's name, e.g. `python:worker.py`).
    /// Give each pool of a process its own name: pools of one name add to the same series.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.cfg.name = Some(name.into());
        self
    }

    /// Where run files live (default: `snakepit_supervisor::registry::run_dir()`). The run
    /// registry, the instance name and the start mode apply to process workers only (not to an
    /// adapter that supplies its own launcher).
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
    /// same [`CallOptions::key`](crate::CallOptions::key)) that has crashed `crashes` workers is refused with
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

    /// A call in a session that does not exist creates it (with `null` metadata) instead of
    /// failing with `SessionNotFound`: the original Snakepit's `execute_in_session`. Off by
    /// default; the store's quota still applies (`SessionQuotaExceeded`).
    pub fn create_sessions_on_use(mut self, on: bool) -> Self {
        self.cfg.create_sessions_on_use = on;
        self
    }

    /// Autoscaling between `min` and `max` workers (off by default; see [`Autoscale`]). The
    /// pool starts with [`size`](PoolBuilder::size) workers brought within those bounds.
    ///
    /// [`Autoscale`]: super::Autoscale
    pub fn autoscale(mut self, a: super::Autoscale) -> Self {
        self.cfg.autoscale = Some(a);
        self
    }

    /// Most sessions the default store holds (default 100 000; more fail with
    /// `SessionQuotaExceeded`).
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.cfg.max_sessions = n;
        self
    }

    /// Keeps sessions in Redis (`redis://HOST:PORT/DB` or `redis+unix:///path/redis.sock`),
    /// connected at [`build`](PoolBuilder::build) with this pool's session TTL and quota and its
    /// run id as its front-end name: pools of several processes on one Redis share sessions,
    /// variables and globals (see [`RedisStore`](crate::RedisStore)). `build` fails with
    /// `SessionStore` if Redis does not answer.
    #[cfg(feature = "redis")]
    pub fn session_store_url(mut self, url: impl Into<String>) -> Self {
        self.cfg.store_url = Some(url.into());
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
    /// error (with every started worker stopped).
    #[cfg_attr(not(feature = "remote"), allow(unused_mut))]
    pub async fn build(mut self) -> Result<Pool, Error> {
        #[cfg(feature = "remote")]
        let remote = match self.remote.take() {
            Some(opts) => Some(super::remote::prepare(opts, &mut self).await?),
            None => None,
        };
        let adapter = self.adapter.ok_or_else(|| Error::BadRequest("PoolBuilder: no adapter set".into()))?;
        let mut cfg = self.cfg;
        if let Some(a) = &cfg.autoscale {
            a.check().map_err(Error::BadRequest)?;
            cfg.size = cfg.size.clamp(a.min, a.max);
        }
        let run_id = new_run_id();
        // An adapter that supplies its own launcher needs no transport and keeps no run file.
        let (launcher, template, max_frame): (Arc<dyn Launcher>, _, usize) = match adapter.launcher() {
            Some(l) => (l, None, self.transport.map_or(DEFAULT_MAX_FRAME, |t| t.max_frame())),
            None => {
                let transport = match self.transport {
                    Some(t) => t,
                    None => default_transport_for(adapter.protocol())?,
                };
                check_protocol(adapter.protocol(), transport.protocol(), &cfg)?;
                let instance = cfg.instance.clone().unwrap_or_else(|| adapter.name());
                let run_file = cfg.registry.then(|| run_file(&cfg, &instance, &run_id)).flatten();
                let max_frame = transport.max_frame();
                let launcher = ProcessLauncher::new(adapter.clone(), transport, cfg.start_mode);
                let launcher = Arc::new(launcher.with_run_file(run_file));
                (launcher.clone(), Some(launcher), max_frame)
            }
        };
        let (store, sweeper) = match (self.store, &cfg.store_url) {
            (Some(s), _) => (s, None),
            #[cfg(feature = "redis")]
            (None, Some(url)) => {
                let redis = snakepit_session::RedisStore::connect(url)
                    .await?
                    .ttl(cfg.session_ttl)
                    .max_sessions(cfg.max_sessions)
                    .front_end_name(run_id.clone());
                (Arc::new(redis) as Arc<dyn SessionStore>, None)
            }
            (None, _) => {
                let m = snakepit_session::MemoryStore::new(cfg.session_ttl, cfg.max_sessions);
                let every = (cfg.session_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
                let sweeper = m.spawn_sweeper(every);
                (Arc::new(m) as Arc<dyn SessionStore>, Some(sweeper))
            }
        };
        let name = cfg.name.clone().or_else(|| cfg.instance.clone()).unwrap_or_else(|| adapter.name());
        let metrics = super::metrics::PoolMetrics::new(&name, cfg.size);
        let host = Arc::new(crate::host::PoolHost::new(store.clone(), metrics.host_calls.clone()));
        let host_handler: Arc<dyn snakepit_core::HostHandler> = host.clone();
        let start_opts = StartOptions::new(WorkerId { slot: 0, generation: 0 }, run_id.clone(), max_frame)
            .with_env(cfg.env.clone())
            .with_host(Some(host_handler))
            .with_max_in_flight(cfg.slot.max_in_flight)
            .with_pipeline_depth(if cfg.slot.max_in_flight == 1 { cfg.slot.pipeline_depth } else { 1 })
            .with_busy_ping(cfg.slot.busy_heartbeat && cfg.slot.heartbeat.is_some())
            .with_busy_poll(cfg.busy_poll)
            .with_shm(cfg.shm)
            .with_offer_versions(cfg.offer_versions.clone());
        #[cfg(feature = "chaos")]
        let start_opts =
            start_opts.with_handshake_delay(cfg.chaos.as_ref().and_then(|c| c.handshake_delay()));
        let inner = Arc::new(Inner {
            host,
            store,
            rehydrate: self.rehydrate,
            slots: RwLock::new(Arc::new((0..cfg.size).map(|i| Arc::new(Slot::new(i))).collect())),
            slot_tasks: Mutex::new(Vec::new()),
            size: std::sync::atomic::AtomicUsize::new(cfg.size),
            admin: tokio::sync::Mutex::new(()),
            retired_generations: Mutex::new(std::collections::HashMap::new()),
            queue: Queue::new(cfg.size),
            source: RwLock::new(Arc::new(super::WorkerSource { adapter, launcher })),
            retired_launchers: Mutex::new(Vec::new()),
            template,
            start_opts,
            run_id,
            tools: RwLock::new(None),
            shutdown: watch::channel(false).0,
            counters: Counters::default(),
            metrics,
            circuit_was_open: std::sync::atomic::AtomicBool::new(false),
            last_error: Mutex::new(None),
            poison: Mutex::new(std::collections::HashMap::new()),
            cfg,
        });
        let workers = match start_all(&inner).await {
            Ok(w) => w,
            Err(e) => {
                if let Some(s) = &sweeper {
                    s.abort();
                }
                inner.source().launcher.abort();
                return Err(e);
            }
        };
        // Installed before `build` returns, so the pool is fully usable at once.
        inner.run_slots(workers);
        let mut tasks = vec![tokio::spawn(sample_metrics(Arc::downgrade(&inner)))];
        tasks.extend(inner.spawn_autoscaler());
        #[cfg(feature = "remote")]
        if let Some(remote) = remote {
            let follow = super::remote::follow(Arc::downgrade(&inner), remote, inner.shutdown.subscribe());
            tasks.push(tokio::spawn(follow));
        }
        tracing::info!(pool = &*inner.metrics.pool, size = inner.cfg.size, adapter = %inner.source().adapter.name(), run_id = %inner.run_id, "pool ready");
        let life = Arc::new(super::Life { inner: inner.clone(), tasks: Mutex::new(tasks), sweeper });
        Ok(Pool { inner, life })
    }
}

/// Samples the pool's gauges every second, until the pool is gone.
async fn sample_metrics(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(super::metrics::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if *inner.shutdown.borrow() {
            return;
        }
        inner.sample_metrics().await;
    }
}

/// Reaps what a SIGKILLed previous host of `instance` left behind, then opens this run's file.
fn run_file(cfg: &Config, instance: &str, run_id: &str) -> Option<registry::RunFile> {
    let dir = cfg.run_dir.clone().unwrap_or_else(registry::run_dir);
    let reaped = match registry::reap(&dir, Some(instance), false) {
        Ok(r) => r,
        Err(e) => {
            // The directory failed its ownership check: nothing in it is trusted, and this
            // pool keeps no run file.
            tracing::warn!("run registry disabled for this pool: {e}");
            return None;
        }
    };
    if !reaped.runs.is_empty() {
        tracing::warn!(
            instance,
            runs = reaped.runs.len(),
            killed = ?reaped.pids,
            removed = ?reaped.dirs,
            "reaped what a previous host of this pool instance left behind"
        );
    }
    match registry::RunFile::create(&dir, instance, run_id) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("run registry disabled for this pool: cannot use {}: {e}", dir.display());
            None
        }
    }
}

/// Starts every slot's first worker, `startup_concurrency` at a time; on the first error, stops
/// the others and reports it.
async fn start_all(inner: &Inner) -> Result<Vec<Arc<Member>>, Error> {
    let slots = inner.slots();
    let size = slots.len();
    let limit = match inner.cfg.startup_concurrency {
        0 => size,
        n => n,
    };
    let mut pending = slots.iter().map(|s| s.next_id());
    let mut running = FuturesUnordered::new();
    let mut ready = Vec::with_capacity(size);
    let mut first_err = None;
    for id in pending.by_ref().take(limit) {
        running.push(inner.start_member(id));
    }
    while let Some(r) = running.next().await {
        match r {
            Ok(w) => ready.push(w),
            Err(e) => {
                // Fail fast: dropping the other starts kills their workers.
                first_err = Some(e);
                break;
            }
        }
        if let Some(id) = pending.next() {
            running.push(inner.start_member(id));
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

#[cfg(feature = "stdio")]
fn default_transport_for(protocol: snakepit_core::Protocol) -> Result<Arc<dyn Transport>, Error> {
    Ok(match protocol {
        snakepit_core::Protocol::SnakepitV0 => Arc::new(snakepit_transport_stdio::SnakepitV0::default()),
        _ => Arc::new(snakepit_transport_stdio::StdioTransport::default()),
    })
}

#[cfg(not(feature = "stdio"))]
fn default_transport_for(_protocol: snakepit_core::Protocol) -> Result<Arc<dyn Transport>, Error> {
    Err(Error::BadRequest("no transport set and the `stdio` feature is off".into()))
}

/// A worker's protocol against its transport's and what the pool asks of it: a snakepit-v0
/// worker runs only on the `SnakepitV0` transport, and that transport only one call at a time
/// per worker, on cold workers.
pub(super) fn check_protocol(
    adapter: snakepit_core::Protocol,
    transport: snakepit_core::Protocol,
    cfg: &Config,
) -> Result<(), Error> {
    use snakepit_core::Protocol;
    // Any adapter may run on the v0 transport (a `Generic` names the program); an adapter
    // that says its workers speak v0 needs that transport.
    if adapter == Protocol::SnakepitV0 && transport != Protocol::SnakepitV0 {
        return Err(Error::BadRequest(format!(
            "the adapter's workers speak {adapter:?} and the transport speaks {transport:?}"
        )));
    }
    if transport == Protocol::SnakepitV0 {
        if matches!(cfg.start_mode, StartMode::Zygote) {
            return Err(Error::BadRequest(
                "zygote start mode is not supported for snakepit-v0 workers".into(),
            ));
        }
        if cfg.slot.pipeline_depth > 1 || cfg.slot.max_in_flight > 1 {
            return Err(Error::BadRequest("snakepit-v0 workers run one call at a time".into()));
        }
    }
    Ok(())
}

fn new_run_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!("{:x}-{:x}-{}", std::process::id(), nanos & 0xffff_ffff_ffff, SEQ.fetch_add(1, Ordering::Relaxed))
}
