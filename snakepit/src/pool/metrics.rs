//! The pool's metric handles (see [`crate::metrics`] for the names) and the sampler of its
//! gauges.
//!
//! Handles are taken once — per pool, per command (when the workers announce their tools), per
//! slot — so a call records through handles it already holds: no label lookup, no allocation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use snakepit_core::Error;
use snakepit_supervisor::{RecycleReason, SlotState};

use super::Inner;
use crate::metrics::{
    AUTOSCALE_TOTAL, CALLS_TOTAL, CALL_DURATION_SECONDS, HOST_CALLS_TOTAL, POOL_SIZE, QUEUE_DEPTH,
    QUEUE_WAIT_SECONDS, SESSIONS, STREAM_CHUNKS_TOTAL, WORKERS, WORKER_RECYCLES_TOTAL, WORKER_RESTARTS_TOTAL,
    WORKER_TREE_RSS_BYTES,
};

/// How often the sampler reads the gauges.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Most distinct command labels a pool whose workers list no tools (snakepit-v0) records; the
/// rest count as `_other`.
const MAX_OPEN_COMMANDS: usize = 256;

/// Outcome counters of one label set: `ok` taken up front, each error kind on its first use.
pub(crate) struct Outcomes {
    name: &'static str,
    labels: Vec<(&'static str, String)>,
    ok: Counter,
    errors: Mutex<Vec<(&'static str, Counter)>>,
}

impl Outcomes {
    fn new(name: &'static str, labels: Vec<(&'static str, String)>) -> Self {
        let ok = Self::register(name, &labels, "ok");
        Outcomes { name, labels, ok, errors: Mutex::new(Vec::new()) }
    }

    fn register(name: &'static str, labels: &[(&'static str, String)], outcome: &'static str) -> Counter {
        let mut all: Vec<metrics::Label> =
            labels.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).collect();
        all.push(metrics::Label::new("outcome", outcome));
        counter!(name, all)
    }

    /// Counts one outcome: `None` is `ok`, else the error kind.
    pub(crate) fn count(&self, error: Option<&'static str>) {
        let Some(kind) = error else {
            self.ok.increment(1);
            return;
        };
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        match errors.iter().find(|(k, _)| *k == kind) {
            Some((_, c)) => c.increment(1),
            None => {
                let c = Self::register(self.name, &self.labels, kind);
                c.increment(1);
                errors.push((kind, c));
            }
        }
    }
}

/// One command's handles.
pub(crate) struct CommandMetrics {
    pub(crate) outcomes: Outcomes,
    pub(crate) duration: Histogram,
}

impl CommandMetrics {
    fn new(pool: &str, command: &str) -> Self {
        let labels = vec![("pool", pool.to_owned()), ("command", command.to_owned())];
        let duration =
            histogram!(CALL_DURATION_SECONDS, "pool" => pool.to_owned(), "command" => command.to_owned());
        CommandMetrics { outcomes: Outcomes::new(CALLS_TOTAL, labels), duration }
    }

    /// Records a call that ended after `took` (`None`: refused before it was timed).
    pub(crate) fn record(&self, outcome: Result<(), &Error>, took: Option<Duration>) {
        self.outcomes.count(outcome.err().map(Error::kind));
        if let Some(t) = took {
            self.duration.record(t.as_secs_f64());
        }
    }
}

/// A slot's per-worker gauge.
struct SlotGauges {
    rss: Gauge,
}

impl SlotGauges {
    fn new(pool: &str, slot: usize) -> Self {
        SlotGauges {
            rss: gauge!(WORKER_TREE_RSS_BYTES, "pool" => pool.to_owned(), "worker" => slot.to_string()),
        }
    }
}

/// Every handle of one pool.
pub(crate) struct PoolMetrics {
    pub(crate) pool: Arc<str>,
    /// Commands outside the catalog.
    pub(crate) unknown: Arc<CommandMetrics>,
    /// Commands of a pool without a catalog, by name (bounded).
    open: RwLock<HashMap<Arc<str>, Arc<CommandMetrics>>>,
    pub(crate) queue_wait: Histogram,
    pub(crate) stream_chunks: Counter,
    pub(crate) host_calls: Arc<Outcomes>,
    restarts: Counter,
    recycles: [Counter; 4],
    queue_depth: Gauge,
    sessions: Gauge,
    size: Gauge,
    autoscaled: [Counter; 2],
    workers: [(&'static str, Gauge); 6],
    /// Per slot, registered as slots appear.
    slots: Mutex<Vec<SlotGauges>>,
}

impl PoolMetrics {
    pub(crate) fn new(pool: &str, size: usize) -> Self {
        let p = || pool.to_owned();
        let state = |s: &'static str| (s, gauge!(WORKERS, "pool" => p(), "state" => s));
        let recycle = |t: &'static str| counter!(WORKER_RECYCLES_TOTAL, "pool" => p(), "trigger" => t);
        PoolMetrics {
            pool: Arc::from(pool),
            unknown: Arc::new(CommandMetrics::new(pool, "_unknown")),
            open: RwLock::new(HashMap::new()),
            queue_wait: histogram!(QUEUE_WAIT_SECONDS, "pool" => p()),
            stream_chunks: counter!(STREAM_CHUNKS_TOTAL, "pool" => p()),
            host_calls: Arc::new(Outcomes::new(HOST_CALLS_TOTAL, vec![("pool", p())])),
            restarts: counter!(WORKER_RESTARTS_TOTAL, "pool" => p()),
            recycles: [recycle("requests"), recycle("age"), recycle("memory"), recycle("reload")],
            queue_depth: gauge!(QUEUE_DEPTH, "pool" => p()),
            sessions: gauge!(SESSIONS, "pool" => p()),
            size: gauge!(POOL_SIZE, "pool" => p()),
            autoscaled: [
                counter!(AUTOSCALE_TOTAL, "pool" => p(), "direction" => "up"),
                counter!(AUTOSCALE_TOTAL, "pool" => p(), "direction" => "down"),
            ],
            workers: [
                state("idle"),
                state("busy"),
                state("starting"),
                state("backoff"),
                state("failing"),
                state("failed"),
            ],
            slots: Mutex::new((0..size).map(|i| SlotGauges::new(pool, i)).collect()),
        }
    }

    /// The handles of a command the workers announced.
    pub(crate) fn command(&self, name: &str) -> Arc<CommandMetrics> {
        Arc::new(CommandMetrics::new(&self.pool, name))
    }

    /// The handles of a command of a pool without a catalog (kept, up to a bound).
    pub(crate) fn open_command(&self, name: &str) -> Arc<CommandMetrics> {
        if let Some(m) = self.open.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return m.clone();
        }
        let mut open = self.open.write().unwrap_or_else(|p| p.into_inner());
        if open.len() >= MAX_OPEN_COMMANDS {
            let other = open.entry(Arc::from("_other")).or_insert_with(|| self.command("_other")).clone();
            return open.get(name).cloned().unwrap_or(other);
        }
        open.entry(Arc::from(name)).or_insert_with(|| self.command(name)).clone()
    }

    /// The autoscaler resized the pool (`direction`: `up` or `down`).
    pub(crate) fn autoscaled(&self, direction: &str) {
        self.autoscaled[usize::from(direction != "up")].increment(1);
    }

    pub(crate) fn restarted(&self) {
        self.restarts.increment(1);
    }

    pub(crate) fn recycled(&self, reason: RecycleReason) {
        let i = match reason.label() {
            "requests" => 0,
            "age" => 1,
            "memory" => 2,
            _ => 3,
        };
        self.recycles[i].increment(1);
    }
}

impl Inner {
    /// Reads the sampled gauges once.
    pub(crate) async fn sample_metrics(&self) {
        self.sample_workers();
        if let Ok(s) = self.store.stats().await {
            self.metrics.sessions.set(s.live as f64);
        }
    }

    /// The queue, the workers by state and their memory.
    fn sample_workers(&self) {
        let m = &self.metrics;
        let (idle, queued) = self.queue_lengths();
        m.queue_depth.set(queued as f64);
        let mut by_state = [0usize; 6];
        let slots = self.slots();
        m.size.set(slots.len() as f64);
        let mut gauges = m.slots.lock().unwrap_or_else(|p| p.into_inner());
        while gauges.len() < slots.len() {
            let i = gauges.len();
            gauges.push(SlotGauges::new(&m.pool, i));
        }
        // Slots removed by a resize hold no worker.
        for g in gauges.iter().skip(slots.len()) {
            g.rss.set(0.0);
        }
        for (i, slot) in slots.iter().enumerate() {
            let live = slot.current().filter(|w| w.is_alive());
            let state = match slot.state() {
                SlotState::Ready if live.is_some() => None,
                SlotState::Starting | SlotState::Ready => Some(2),
                SlotState::Backoff => Some(3),
                SlotState::Failing => Some(4),
                SlotState::Failed => Some(5),
                _ => None,
            };
            if let Some(s) = state {
                by_state[s] += 1;
            }
            let rss = live.and_then(|w| w.pid()).and_then(snakepit_supervisor::tree_rss);
            if let Some(g) = gauges.get(i) {
                g.rss.set(rss.unwrap_or(0) as f64);
            }
        }
        drop(gauges);
        let ready = slots.iter().filter(|s| s.current().is_some_and(|w| w.is_alive())).count();
        by_state[0] = idle.min(ready);
        by_state[1] = ready - by_state[0];
        for ((_, g), n) in m.workers.iter().zip(by_state) {
            g.set(n as f64);
        }
    }
}
