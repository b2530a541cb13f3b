//! The slot: one place in a pool and the task that keeps a live worker in it.
//!
//! [`Slot::run`] supervises one slot for the pool's lifetime: it restarts a worker that died
//! (with [`RestartBackoff`] and an intensity limit), pings it while idle ([`Heartbeat`]), and
//! recycles it by request count, age or memory, always drain-then-replace: the replacement is
//! started and admitted before the old worker retires, which then finishes its calls (bounded by
//! `drain_timeout`) and stops gracefully.
//!
//! The pool stays in charge of routing: the slot talks to it only through the small
//! [`SlotManager`] trait (start a worker, admit it, dismiss it, hold it for a heartbeat, hear
//! about events), so the state machine can be driven in-process by a fake worker in tests.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snakepit_core::{Error, ExitInfo, WorkerId};
use tokio::sync::{oneshot, watch, Notify};

use crate::member::{jittered, Member};
use crate::RestartBackoff;

/// What a pool slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum SlotState {
    /// Its worker is being started (first start).
    Starting = 0,
    /// Its worker is ready (idle or busy).
    Ready = 1,
    /// Its worker died; it waits before restarting.
    Backoff = 2,
    /// Its last start attempt failed; it keeps retrying with backoff.
    Failing = 3,
    /// It crashed more than `max_restarts` times in `restart_window` and pauses for a window.
    Failed = 4,
    /// The pool is shutting down.
    Stopped = 5,
}

impl SlotState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => SlotState::Starting,
            1 => SlotState::Ready,
            2 => SlotState::Backoff,
            3 => SlotState::Failing,
            4 => SlotState::Failed,
            _ => SlotState::Stopped,
        }
    }

    /// Whether the slot has no worker and is not about to get one soon (the circuit opens
    /// when every slot is in such a state).
    pub fn is_failing(self) -> bool {
        matches!(self, SlotState::Failing | SlotState::Failed)
    }
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

/// How a slot treats its workers. Build it with `SlotConfig::default()` and set fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SlotConfig {
    /// Pings of idle workers (`None`: off).
    pub heartbeat: Option<Heartbeat>,
    /// Shortest restart delay.
    pub restart_min: Duration,
    /// Longest restart delay.
    pub restart_max: Duration,
    /// More than this many exits within `restart_window` pause the slot for a window.
    pub max_restarts: usize,
    /// The window of the intensity limit.
    pub restart_window: Duration,
    /// Recycle after about this many answered calls.
    pub max_requests: Option<u64>,
    /// Recycle after about this much uptime.
    pub max_age: Option<Duration>,
    /// Recycle above about this much resident memory ([`snakepit_core::WorkerHandle::memory`]).
    pub max_memory: Option<u64>,
    /// How often memory is checked.
    pub memory_check: Duration,
    /// The fraction (0..=0.5) by which recycling limits are randomly shortened.
    pub recycle_jitter: f64,
    /// How long a retiring worker may take to finish its calls.
    pub drain_timeout: Duration,
    /// Each step of a graceful stop.
    pub shutdown_grace: Duration,
    /// Calls one worker may run at once (the profile's; the worker may announce fewer).
    pub max_in_flight: usize,
    /// Calls one worker that runs them one at a time may hold, queued in its pipeline (offered
    /// in `hello`; the worker may announce fewer, 1 being none).
    pub pipeline_depth: usize,
    /// Heartbeats also go to busy workers that announced `ready.busy_ping` (pinged in place,
    /// their calls going on); others are pinged only when idle.
    pub busy_heartbeat: bool,
}

impl Default for SlotConfig {
    fn default() -> Self {
        SlotConfig {
            heartbeat: Some(Heartbeat::default()),
            restart_min: Duration::from_millis(50),
            restart_max: Duration::from_secs(5),
            max_restarts: 10,
            restart_window: Duration::from_secs(60),
            max_requests: None,
            max_age: None,
            max_memory: None,
            memory_check: Duration::from_secs(5),
            recycle_jitter: 0.1,
            drain_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(2),
            max_in_flight: 1,
            pipeline_depth: 1,
            busy_heartbeat: false,
        }
    }
}

/// Why a worker is recycled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecycleReason {
    /// It answered its `max_requests`.
    Requests,
    /// It reached its `max_age`.
    Age,
    /// Its memory passed `max_memory`.
    Memory,
    /// The pool handed the slot a new worker ([`Slot::replace`]): a rolling reload.
    Reload,
    /// The worker asked to leave ([`WorkerHandle::leaving`](snakepit_core::WorkerHandle::leaving)):
    /// a remote agent draining.
    Leaving,
}

impl RecycleReason {
    /// The trigger as a metric label: `requests`, `age`, `memory`, `reload` or `leaving`.
    pub fn label(self) -> &'static str {
        match self {
            RecycleReason::Requests => "requests",
            RecycleReason::Age => "age",
            RecycleReason::Memory => "memory",
            RecycleReason::Reload => "reload",
            RecycleReason::Leaving => "leaving",
        }
    }
}

impl std::fmt::Display for RecycleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecycleReason::Requests => "request count",
            RecycleReason::Age => "age",
            RecycleReason::Memory => "memory",
            RecycleReason::Reload => "reload",
            RecycleReason::Leaving => "the worker leaving (its host drains)",
        })
    }
}

/// What a slot reports to its [`SlotManager`].
#[derive(Debug)]
#[non_exhaustive]
pub enum SlotEvent<'a> {
    /// The slot entered a state.
    State(SlotState),
    /// A worker was started for the slot and admitted; `restart` unless it replaced a
    /// recycled worker.
    Started {
        /// The new worker.
        worker: WorkerId,
        /// Whether it replaced a worker that died.
        restart: bool,
    },
    /// The slot's worker ended on its own (crashed, was killed, or exited).
    Exited {
        /// The worker.
        worker: WorkerId,
        /// How it ended.
        exit: ExitInfo,
    },
    /// A start attempt failed; the slot retries with backoff.
    StartFailed {
        /// The worker that failed to start.
        worker: WorkerId,
        /// Why.
        error: &'a Error,
    },
    /// The worker is being recycled; its replacement is ready.
    Recycled {
        /// The retiring worker.
        worker: WorkerId,
        /// Why.
        reason: RecycleReason,
    },
    /// An idle worker missed a heartbeat.
    MissedHeartbeat {
        /// The worker.
        worker: WorkerId,
        /// Consecutive misses so far.
        missed: u32,
    },
    /// A worker answered a heartbeat ping.
    HeartbeatAnswered {
        /// The worker.
        worker: WorkerId,
    },
    /// A worker missed `max_missed` heartbeats and was killed.
    Unresponsive {
        /// The worker.
        worker: WorkerId,
    },
}

/// The pool, as a slot sees it: the handful of things a slot asks of it.
pub trait SlotManager: Send + Sync + 'static {
    /// Starts a worker with id `id` (the pool: through its launcher) and wraps it as a member.
    fn start(&self, id: WorkerId) -> impl Future<Output = Result<Arc<Member>, Error>> + Send;

    /// A ready worker joined its slot (it is already the slot's current worker): offer it to
    /// callers.
    fn admit(&self, member: &Arc<Member>);

    /// `member` leaves the pool (it died, or it retires and its replacement is admitted):
    /// lend it no more.
    fn dismiss(&self, member: &Arc<Member>);

    /// Takes an idle `member` out of circulation for a heartbeat; `false` if it is busy (then it
    /// is not pinged). The slot gives it back with [`admit`](SlotManager::admit).
    fn hold(&self, member: &Arc<Member>) -> bool;

    /// Something happened to the slot (for counters and logs).
    fn event(&self, slot: usize, event: SlotEvent<'_>);

    /// Pings `member` for a heartbeat (the default: a protocol `ping`).
    fn ping<'a>(&'a self, member: &'a Member) -> impl Future<Output = Result<Duration, Error>> + Send + 'a {
        member.connection().ping()
    }
}

/// One place in a pool: its current worker and its state.
#[derive(Debug)]
pub struct Slot {
    index: usize,
    current: Mutex<Option<Arc<Member>>>,
    state: AtomicU8,
    /// Recycled workers still draining (they belong to the pool until they have stopped).
    retiring: Mutex<Vec<Arc<Member>>>,
    /// The next worker generation of this slot.
    generation: AtomicU64,
    /// A worker handed over by the pool ([`Slot::replace`]) and who waits for its install;
    /// `closed` once the slot's task has ended (no handover is taken any more).
    handover: Mutex<Handover>,
    handover_ready: Notify,
}

/// Resolves once the pool is shutting down.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The handover box of a slot.
#[derive(Debug, Default)]
struct Handover {
    next: Option<(Arc<Member>, oneshot::Sender<()>)>,
    closed: bool,
}

enum Next {
    Exited(ExitInfo),
    Recycle(RecycleReason),
    /// The pool handed over a replacement (already started).
    Replace,
    /// The worker asked to leave gracefully (its agent drains).
    Leave,
    Shutdown,
}

impl Slot {
    /// Slot number `index`, with no worker yet.
    pub fn new(index: usize) -> Self {
        Self::starting_at(index, 0)
    }

    /// Slot number `index` whose workers' generations start at `generation` (a slot that comes
    /// back after the pool shrank: its new workers never take an id a session may still hold).
    pub fn starting_at(index: usize, generation: u64) -> Self {
        Slot {
            index,
            current: Mutex::new(None),
            state: AtomicU8::new(SlotState::Starting as u8),
            retiring: Mutex::new(Vec::new()),
            generation: AtomicU64::new(generation),
            handover: Mutex::new(Handover::default()),
            handover_ready: Notify::new(),
        }
    }

    /// The generation the slot's next worker will get.
    pub fn next_generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// A new worker id for this slot (generations count up from 0 and are never reused, so a
    /// session pinned to a replaced worker never matches its successor).
    pub fn next_id(&self) -> WorkerId {
        WorkerId { slot: self.index, generation: self.generation.fetch_add(1, Ordering::Relaxed) }
    }

    /// Hands the slot `next` (started with an id from [`next_id`](Slot::next_id)) to replace its
    /// current worker the way recycling does: `next` is admitted, then the old worker serves
    /// no new call, finishes its calls (within the drain timeout) and stops. Resolves once
    /// `next` is installed: `true`. `false` if the slot's task has ended or ends first (the
    /// pool is shutting down, or the slot was removed): `next` has been killed.
    pub async fn replace(&self, next: Arc<Member>) -> bool {
        let (tx, rx) = oneshot::channel();
        {
            let mut h = self.handover.lock().unwrap_or_else(|p| p.into_inner());
            if h.closed {
                drop(h);
                next.kill();
                return false;
            }
            if let Some((earlier, _)) = h.next.replace((next, tx)) {
                earlier.kill();
            }
        }
        self.handover_ready.notify_one();
        rx.await.is_ok()
    }

    /// Ends handovers: the slot's task has ended; a worker handed over meanwhile is killed
    /// (its `replace` returns `false`).
    fn close_handover(&self) {
        let pending = {
            let mut h = self.handover.lock().unwrap_or_else(|p| p.into_inner());
            h.closed = true;
            h.next.take()
        };
        if let Some((next, _)) = pending {
            next.kill();
        }
    }

    /// Takes the slot's workers out of the pool for good, once its task has stopped (the pool
    /// shrinks): the current one serves no new call and is dismissed (strict session calls
    /// waiting for it fail with `SessionLost`), finishes its calls within `drain`, then stops
    /// gracefully (`grace` per step), as do recycled ones still draining.
    pub async fn remove(&self, mgr: &impl SlotManager, drain: Duration, grace: Duration) {
        self.close_handover();
        let mut leaving: Vec<Arc<Member>> = self.take_retiring();
        if let Some(m) = self.take_current() {
            m.set_retiring();
            mgr.dismiss(&m);
            leaving.push(m);
        }
        // Every worker of the slot, the current one and recycled ones still finishing a call,
        // finishes its calls (within `drain`) before it stops.
        futures::future::join_all(leaving.iter().map(|m| async move {
            if !m.drained(drain).await {
                tracing::warn!(worker = %m.id(), "still busy after the drain timeout; stopping it anyway");
            }
            m.shutdown(grace).await;
        }))
        .await;
        self.state.store(SlotState::Stopped as u8, Ordering::Release);
    }

    /// The slot's number.
    pub fn index(&self) -> usize {
        self.index
    }

    /// What the slot is doing.
    pub fn state(&self) -> SlotState {
        SlotState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The slot's current worker (it may have died a moment ago: see [`Member::is_alive`]).
    pub fn current(&self) -> Option<Arc<Member>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes the current worker out of the slot (at shutdown).
    pub fn take_current(&self) -> Option<Arc<Member>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Takes the recycled workers that are still draining (at shutdown: the pool stops them
    /// with the others, so none outlives it).
    pub fn take_retiring(&self) -> Vec<Arc<Member>> {
        std::mem::take(&mut *self.retiring.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn set_state(&self, mgr: &impl SlotManager, s: SlotState) {
        self.state.store(s as u8, Ordering::Release);
        mgr.event(self.index, SlotEvent::State(s));
    }

    /// Makes `member` the slot's worker, marks the slot ready and admits the worker.
    pub fn install(&self, mgr: &impl SlotManager, member: &Arc<Member>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(member.clone());
        self.set_state(mgr, SlotState::Ready);
        mgr.admit(member);
    }

    /// Supervises the slot until `shutdown` turns true, starting from `first` (already
    /// [installed](Slot::install)); the slot is then `Stopped`.
    pub async fn run<M: SlotManager>(
        self: Arc<Self>,
        mgr: Arc<M>,
        cfg: Arc<SlotConfig>,
        first: Arc<Member>,
        shutdown: watch::Receiver<bool>,
    ) {
        self.supervise(&*mgr, &cfg, first, shutdown).await;
        self.close_handover();
        self.set_state(&*mgr, SlotState::Stopped);
    }

    async fn supervise(
        self: &Arc<Self>,
        mgr: &impl SlotManager,
        cfg: &SlotConfig,
        first: Arc<Member>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = RestartBackoff::new(cfg.restart_min, cfg.restart_max, Duration::from_secs(30));
        // Tokio's clock, so that tests with a paused clock see the window pass.
        let mut crashes: VecDeque<tokio::time::Instant> = VecDeque::new();
        // Generations go on after the first worker's, whoever numbered it.
        self.generation.fetch_max(first.id().generation + 1, Ordering::Relaxed);
        let mut member = first;
        loop {
            match self.serve(mgr, cfg, &member, &mut shutdown).await {
                Next::Shutdown => return,
                Next::Replace => {
                    let taken = self.handover.lock().unwrap_or_else(|p| p.into_inner()).next.take();
                    let Some((next, installed)) = taken else { continue };
                    tracing::info!(
                        target: "snakepit::worker",
                        event = "recycled",
                        worker = %member.id(),
                        trigger = RecycleReason::Reload.label(),
                        "replaced by {} (reload)",
                        next.id()
                    );
                    member.set_retiring();
                    mgr.dismiss(&member);
                    mgr.event(
                        self.index,
                        SlotEvent::Recycled { worker: member.id(), reason: RecycleReason::Reload },
                    );
                    self.install(mgr, &next);
                    mgr.event(self.index, SlotEvent::Started { worker: next.id(), restart: false });
                    let old = std::mem::replace(&mut member, next);
                    self.retiring.lock().unwrap_or_else(|p| p.into_inner()).push(old.clone());
                    tokio::spawn(retire(self.clone(), old, cfg.drain_timeout, cfg.shutdown_grace));
                    let _ = installed.send(());
                }
                Next::Recycle(reason) => {
                    // A worker serving a session call keeps it to the end before it is recycled
                    // (bounded by the drain timeout): its pinned sessions lose it only afterwards.
                    tokio::select! {
                        _ = member.sessions_quiet(cfg.drain_timeout) => {}
                        _ = stopped(&mut shutdown) => return,
                    }
                    tracing::info!(
                        target: "snakepit::worker",
                        event = "recycled",
                        worker = %member.id(),
                        trigger = reason.label(),
                        "recycling ({reason}); starting its replacement first"
                    );
                    // While the replacement starts, the old worker serves: the slot stays Ready
                    // (a failed start is reported, but it does not open the circuit).
                    let attempt = self.start(mgr, &mut backoff, None, &mut shutdown, Start::Recycle);
                    let Some(next) = attempt.await else { return };
                    // The replacement is ready: only now does the old worker leave the pool.
                    member.set_retiring();
                    mgr.dismiss(&member);
                    mgr.event(self.index, SlotEvent::Recycled { worker: member.id(), reason });
                    self.install(mgr, &next);
                    mgr.event(self.index, SlotEvent::Started { worker: next.id(), restart: false });
                    let old = std::mem::replace(&mut member, next);
                    self.retiring.lock().unwrap_or_else(|p| p.into_inner()).push(old.clone());
                    tokio::spawn(retire(self.clone(), old, cfg.drain_timeout, cfg.shutdown_grace));
                }
                Next::Leave => {
                    // Out of routing now; its calls finish (within the drain timeout) while a
                    // replacement starts wherever there is room (not a crash: no restart counted).
                    tracing::info!(
                        target: "snakepit::worker",
                        event = "recycled",
                        worker = %member.id(),
                        trigger = RecycleReason::Leaving.label(),
                        "leaving (its host drains); starting a replacement"
                    );
                    member.set_retiring();
                    mgr.dismiss(&member);
                    mgr.event(
                        self.index,
                        SlotEvent::Recycled { worker: member.id(), reason: RecycleReason::Leaving },
                    );
                    self.retiring.lock().unwrap_or_else(|p| p.into_inner()).push(member.clone());
                    tokio::spawn(retire(self.clone(), member.clone(), cfg.drain_timeout, cfg.shutdown_grace));
                    self.set_state(mgr, SlotState::Backoff);
                    let attempt = self.start(mgr, &mut backoff, None, &mut shutdown, Start::Replace);
                    let Some(next) = attempt.await else { return };
                    member = next;
                    self.install(mgr, &member);
                    mgr.event(self.index, SlotEvent::Started { worker: member.id(), restart: false });
                }
                Next::Exited(exit) => {
                    mgr.dismiss(&member);
                    if *shutdown.borrow() {
                        return;
                    }
                    mgr.event(self.index, SlotEvent::Exited { worker: member.id(), exit });
                    tracing::warn!(
                        target: "snakepit::worker",
                        event = "crashed",
                        worker = %member.id(),
                        exit = %exit,
                        uptime_ms = member.started().elapsed().as_millis() as u64,
                        "worker exited ({exit})"
                    );
                    let now = tokio::time::Instant::now();
                    crashes.push_back(now);
                    while crashes.front().is_some_and(|t| now.duration_since(*t) > cfg.restart_window) {
                        crashes.pop_front();
                    }
                    if crashes.len() > cfg.max_restarts {
                        tracing::error!(
                            target: "snakepit::worker",
                            event = "degraded",
                            slot = self.index,
                            crashes = crashes.len(),
                            window = ?cfg.restart_window,
                            "worker keeps crashing; slot paused for one restart window (pool degraded)"
                        );
                        self.set_state(mgr, SlotState::Failed);
                        tokio::select! {
                            _ = tokio::time::sleep(cfg.restart_window) => {}
                            _ = stopped(&mut shutdown) => return,
                        }
                        crashes.clear();
                    } else {
                        self.set_state(mgr, SlotState::Backoff);
                    }
                    let started = Some(member.started());
                    let attempt = self.start(mgr, &mut backoff, started, &mut shutdown, Start::Restart);
                    let Some(next) = attempt.await else { return };
                    member = next;
                    self.install(mgr, &member);
                    mgr.event(self.index, SlotEvent::Started { worker: member.id(), restart: true });
                }
            }
        }
    }

    /// Serves with `member` until it dies, is due for recycling, or the pool shuts down; pings
    /// it while idle.
    async fn serve(
        &self,
        mgr: &impl SlotManager,
        cfg: &SlotConfig,
        member: &Arc<Member>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Next {
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        let age_due = cfg.max_age.map_or(far, |age| {
            let age = Duration::try_from_secs_f64(jittered(age.as_secs_f64(), cfg.recycle_jitter))
                .unwrap_or(Duration::MAX);
            let lived = member.started().elapsed();
            tokio::time::Instant::now().checked_add(age.saturating_sub(lived)).unwrap_or(far)
        });
        let hb = cfg.heartbeat;
        // A zero period would make `interval` panic: at least a millisecond.
        let min = Duration::from_millis(1);
        let mut ticker = tokio::time::interval(hb.map_or(Duration::from_secs(3600), |h| h.interval).max(min));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate
        let mut missed = 0u32;
        // Whether the worker is out of circulation for a heartbeat (an idle one is; a busy one
        // that answers pings while busy is pinged in place).
        let mut held = false;
        let busy_ping = cfg.busy_heartbeat && member.ready().busy_ping;
        let mut hb_on = hb.is_some();
        let mem_limit = cfg.max_memory.map(|b| jittered(b as f64, cfg.recycle_jitter) as u64);
        let mut mem_ticker = tokio::time::interval(cfg.memory_check.max(min));
        mem_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        mem_ticker.tick().await;
        loop {
            tokio::select! {
                e = member.exited() => return Next::Exited(e),
                _ = member.leaving() => return Next::Leave,
                _ = stopped(shutdown) => return Next::Shutdown,
                _ = tokio::time::sleep_until(age_due) => return Next::Recycle(RecycleReason::Age),
                _ = member.recycle_due.notified() => return Next::Recycle(RecycleReason::Requests),
                _ = self.handover_ready.notified() => return Next::Replace,
                _ = mem_ticker.tick(), if mem_limit.is_some() => {
                    let limit = mem_limit.unwrap_or(u64::MAX);
                    if let Some(rss) = member.memory().filter(|rss| *rss > limit) {
                        tracing::info!(target: "snakepit::worker", worker = %member.id(), rss, limit, "over its memory limit");
                        return Next::Recycle(RecycleReason::Memory);
                    }
                }
                _ = ticker.tick(), if hb_on => {
                    let Some(hb) = hb else { continue };
                    // An idle worker is taken out of circulation for its ping, and one that
                    // missed a ping stays out until it answers again; a busy one is pinged in
                    // place if it answers while busy, else not at all.
                    if !held {
                        if mgr.hold(member) {
                            held = true;
                        } else if !busy_ping {
                            continue;
                        }
                    }
                    match tokio::time::timeout(hb.timeout, mgr.ping(member)).await {
                        Ok(Ok(_)) => {
                            missed = 0;
                            mgr.event(self.index, SlotEvent::HeartbeatAnswered { worker: member.id() });
                            if std::mem::take(&mut held) {
                                mgr.admit(member);
                            }
                        }
                        _ => {
                            missed += 1;
                            mgr.event(self.index, SlotEvent::MissedHeartbeat { worker: member.id(), missed });
                            tracing::warn!(target: "snakepit::worker", event = "missed_heartbeat", worker = %member.id(), missed, "missed a heartbeat");
                            if missed >= hb.max_missed {
                                tracing::error!(target: "snakepit::worker", event = "unresponsive", worker = %member.id(), "unresponsive; killing and replacing it");
                                mgr.event(self.index, SlotEvent::Unresponsive { worker: member.id() });
                                hb_on = false;
                                member.kill();
                            }
                        }
                    }
                }
            }
        }
    }

    /// Starts a worker for the slot, retrying with backoff until it is ready or the pool stops.
    async fn start(
        &self,
        mgr: &impl SlotManager,
        backoff: &mut RestartBackoff,
        mut last_started: Option<Instant>,
        shutdown: &mut watch::Receiver<bool>,
        why: Start,
    ) -> Option<Arc<Member>> {
        // A restart waits before its first attempt; a recycle or a replacement starts at once.
        let mut first_delay = why == Start::Restart;
        loop {
            if first_delay {
                let delay = backoff.next_delay(last_started.take());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(shutdown) => return None,
                }
            }
            first_delay = true;
            let id = self.next_id();
            let attempt = tokio::select! {
                r = mgr.start(id) => r,
                _ = stopped(shutdown) => return None,
            };
            match attempt {
                Ok(m) => return Some(m),
                Err(e) => {
                    tracing::error!(target: "snakepit::worker", event = "start_failed", worker = %id, kind = e.kind(), "start failed: {e}");
                    mgr.event(self.index, SlotEvent::StartFailed { worker: id, error: &e });
                    if why != Start::Recycle {
                        self.set_state(mgr, SlotState::Failing);
                    }
                }
            }
        }
    }
}

/// Why a slot starts a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// The last one ended: back off first; failures make the slot `Failing`.
    Restart,
    /// The current one is due for recycling and still serves: start at once, stay `Ready`.
    Recycle,
    /// The last one left gracefully: start at once; failures make the slot `Failing`.
    Replace,
}

/// Lets `old` finish its calls, then stops it gracefully and forgets it.
async fn retire(slot: Arc<Slot>, old: Arc<Member>, drain: Duration, grace: Duration) {
    if !old.drained(drain).await {
        tracing::warn!(worker = %old.id(), "still busy after the drain timeout; stopping it anyway");
    }
    old.shutdown(grace).await;
    slot.retiring.lock().unwrap_or_else(|p| p.into_inner()).retain(|m| !Arc::ptr_eq(m, &old));
}
