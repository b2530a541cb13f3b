//! The pool: the public API over a bounded FIFO queue of supervised workers.
//!
//! One idea per file: [`builder`] (settings, start-up), [`options`] (per-call options),
//! [`queue`] (idle workers and waiting calls), [`lease`] (a checked-out worker and the cancel
//! ladder), [`call`] (admission, routing and the plain call, shared with streams), [`stream`]
//! (streamed calls), [`stats`] (counters), [`manager`] (what the supervisor's slots see of the
//! pool). Supervision itself — restarts, heartbeats, recycling — is `snakepit_supervisor::Slot`.

mod autoscale;
mod builder;
mod call;
mod elastic;
mod lease;
mod manager;
mod metrics;
mod options;
mod queue;
#[cfg(feature = "remote")]
mod remote;
mod stats;
mod stream;

use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use snakepit_core::{Adapter, Error, Launcher, Payload, Ready, SessionStore, StartOptions};
use snakepit_supervisor::{Member, Slot};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use autoscale::Autoscale;
pub(crate) use builder::Config;
pub use builder::{PoolBuilder, DEFAULT_PIPELINE_DEPTH, MAX_PIPELINE_DEPTH};
pub(crate) use metrics::Outcomes as HostCallMetrics;
pub use options::{Affinity, CallOptions, DropPolicy, RehydrateHook};
pub use stats::PoolStats;
pub use stream::CallStream;

/// A time far enough ahead to mean "never" (a year), for waits given an absurd bound.
pub(crate) fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 86_400)
}

/// The commands the workers announced.
struct ToolSet {
    /// Shared names (a call's request takes a clone of its tool's name, not a copy) and each
    /// command's metric handles.
    names: HashMap<Arc<str>, Arc<metrics::CommandMetrics>>,
    sorted: Vec<String>,
    streams: HashSet<String>,
}

/// What the workers run: the adapter and the launcher that starts its workers.
pub(crate) struct WorkerSource {
    pub(crate) adapter: Arc<dyn Adapter>,
    pub(crate) launcher: Arc<dyn Launcher>,
}

/// The pool's shared state (the slot tasks, leases and the handle all hold it).
pub(crate) struct Inner {
    pub(crate) cfg: Config,
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) host: Arc<crate::host::PoolHost>,
    rehydrate: Option<RehydrateHook>,
    /// What the workers run and how they start (swapped by [`Pool::reload`]).
    source: RwLock<Arc<WorkerSource>>,
    /// Launchers replaced by a reload (stopped with the pool: a zygote may still serve).
    retired_launchers: Mutex<Vec<Arc<dyn Launcher>>>,
    /// The process launcher the pool was built with, to launch another adapter's workers the
    /// same way on reload (`None` when the adapter supplies its own launcher).
    template: Option<Arc<snakepit_supervisor::ProcessLauncher>>,
    /// What every worker start shares (the worker id is filled in per start).
    start_opts: StartOptions,
    run_id: String,
    /// The slots, by index (grown and shrunk by [`Pool::resize`]; readers take a snapshot).
    slots: RwLock<Arc<Vec<Arc<Slot>>>>,
    /// Each slot's task and its stop signal, by index.
    slot_tasks: Mutex<Vec<(watch::Sender<bool>, JoinHandle<()>)>>,
    /// The number of slots now.
    size: AtomicUsize,
    /// Serialises resizes and reloads.
    admin: tokio::sync::Mutex<()>,
    /// The next generation of each slot index a shrink removed (a slot that comes back goes
    /// on from there, so no worker id is ever reused).
    retired_generations: Mutex<HashMap<usize, u64>>,
    queue: queue::Queue,
    tools: RwLock<Option<Arc<ToolSet>>>,
    shutdown: watch::Sender<bool>,
    pub(crate) counters: stats::Counters,
    pub(crate) metrics: metrics::PoolMetrics,
    /// Whether the circuit was open when last checked (its changes are logged).
    circuit_was_open: std::sync::atomic::AtomicBool,
    /// The last start-up error (reported while the circuit is open).
    last_error: Mutex<Option<String>>,
    /// Crash counts per request key (only with quarantine on).
    poison: Mutex<HashMap<u64, u32>>,
}

impl Inner {
    /// A snapshot of the slots.
    pub(crate) fn slots(&self) -> Arc<Vec<Arc<Slot>>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The workers' adapter and launcher now.
    pub(crate) fn source(&self) -> Arc<WorkerSource> {
        self.source.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The number of slots now.
    pub(crate) fn size(&self) -> usize {
        self.size.load(Ordering::Acquire)
    }

    /// Learns the tool catalog from the first worker that reports it.
    fn learn_tools(&self, ready: &Ready) {
        // A worker that lists no commands (snakepit-v0) leaves the catalog unknown: every
        // command is sent.
        if ready.open_tools {
            return;
        }
        let mut tools = self.tools.write().unwrap_or_else(|p| p.into_inner());
        if tools.is_none() {
            let mut sorted: Vec<String> = ready.tools.iter().map(|t| t.name.clone()).collect();
            sorted.sort();
            let streams = ready.tools.iter().filter(|t| t.stream).map(|t| t.name.clone()).collect();
            let names = sorted.iter().map(|n| (Arc::from(n.as_str()), self.metrics.command(n))).collect();
            *tools = Some(Arc::new(ToolSet { names, sorted, streams }));
        }
    }

    /// Replaces the tool catalog with a new worker's (a reload).
    pub(crate) fn relearn_tools(&self, ready: &Ready) {
        // A worker without a catalog leaves it open: every command is sent.
        *self.tools.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.learn_tools(ready);
    }

    /// Checks `command` against the workers' tool catalog (once known) and returns its name
    /// as the catalog's shared copy (a new one when there is no catalog) with its metric
    /// handles.
    fn known_tool(&self, command: &str) -> Result<(Arc<str>, Arc<metrics::CommandMetrics>), Error> {
        let tools = self.tools.read().unwrap_or_else(|p| p.into_inner());
        match tools.as_ref() {
            Some(t) => match t.names.get_key_value(command) {
                Some((name, m)) => Ok((name.clone(), m.clone())),
                None => Err(Error::UnknownCommand { command: command.into(), available: t.sorted.clone() }),
            },
            None => Ok((Arc::from(command), self.metrics.open_command(command))),
        }
    }
}

/// A supervised pool of workers. See the [crate docs](crate).
///
/// A `Pool` is a handle: cloning it is cheap (two reference counts) and every clone is the same
/// pool, so it can live in an axum or tonic state as it is. The workers stop when the last
/// clone is dropped (killed at once) or when any clone calls [`Pool::shutdown`] (gracefully);
/// calls on the other clones then fail with `ShuttingDown`.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
    life: Arc<Life>,
}

impl Pool {
    /// Marks the pool as an agent's backend: host calls not forwarded to a front end are refused.
    #[cfg(feature = "remote")]
    pub(crate) fn serve_as_agent(&self) {
        self.inner.host.serve_as_agent();
    }
}

/// What the last clone of a [`Pool`] stops on drop.
struct Life {
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
    ///
    /// There is no call timeout by default: the call waits for its worker as long as the tool
    /// runs (only the wait for a free worker is bounded, by the queue timeout). Set one per
    /// call ([`Pool::execute_timeout`], [`CallOptions`]), for the whole pool
    /// ([`PoolBuilder::default_timeout`]), or cap every call whatever its deadline
    /// ([`PoolBuilder::max_call_time`]).
    pub async fn execute(&self, command: &str, args: serde_json::Value) -> Result<serde_json::Value, Error> {
        self.execute_with(command, Payload::from(args), CallOptions::default()).await?.to_value()
    }

    /// Runs `command` with raw bytes and returns raw bytes: no JSON, no base64. The bytes
    /// travel as a binary segment (a Python tool receives a `memoryview` and returns `bytes`,
    /// a `memoryview`, a numpy array or any buffer); see [`Payload`] for mixing bytes and
    /// JSON. Fails with [`Error::BadRequest`] if the worker does not accept binary segments,
    /// and [`Error::Codec`] if the tool returned something other than bytes.
    ///
    /// ```no_run
    /// # async fn f(pool: &snakepit::Pool) -> Result<(), snakepit::Error> {
    /// let png = snakepit::Bytes::from(std::fs::read("in.png").unwrap_or_default());
    /// let thumbnail = pool.execute_bytes("thumbnail", png).await?;
    /// # Ok(()) }
    /// ```
    pub async fn execute_bytes(&self, command: &str, bytes: Bytes) -> Result<Bytes, Error> {
        self.execute_with(command, Payload::from_bytes(bytes), CallOptions::default()).await?.into_segment()
    }

    /// Runs `command` with typed arguments and decodes a typed result. Fields serialised as
    /// bytes (`#[serde(with = "serde_bytes")]`, `bytes::Bytes`) travel as binary segments both
    /// ways, never as JSON arrays (see [`Payload::json`], [`Payload::decode`]).
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

    /// Runs a generator tool and returns its items as a stream (see [`CallStream`]).
    pub async fn execute_stream(&self, command: &str, args: serde_json::Value) -> Result<CallStream, Error> {
        self.execute_stream_with(None, command, Payload::from(args), CallOptions::default()).await
    }

    /// Streams `command`, optionally in a session, with options. The same admission as a plain
    /// call applies (unknown command, validation, quarantine, session routing). The timeout
    /// covers the whole stream. At most `stream_window` items are buffered ahead of the
    /// consumer: a fast producer is held back, so memory stays bounded. Dropping the stream
    /// cancels the generator in the worker (its `finally` blocks run) and frees the worker.
    pub async fn execute_stream_with(
        &self,
        session: Option<&str>,
        command: &str,
        args: Payload,
        opts: CallOptions,
    ) -> Result<CallStream, Error> {
        self.stream_call(session, command, args, opts).await
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

    /// Registers a host tool that takes and returns [`Payload`]s: JSON with binary segments
    /// (a Python worker's `ctx.call_host(name, {"data": some_bytes})` arrives with the bytes as
    /// a segment, and [`Payload::from_bytes`] answers with bytes).
    ///
    /// ```no_run
    /// # async fn t(pool: &snakepit::Pool) {
    /// use snakepit::Payload;
    /// pool.register_host_tool_payload("checksum", |args: Payload| async move {
    ///     let sum: u64 = args.segments().iter().flat_map(|s| s.iter()).map(|&b| u64::from(b)).sum();
    ///     Ok(Payload::from(serde_json::json!(sum)))
    /// });
    /// # }
    /// ```
    pub fn register_host_tool_payload<F, Fut>(&self, name: &str, f: F)
    where
        F: Fn(Payload) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Payload, Error>> + Send + 'static,
    {
        self.inner.host.register_payload(name, f);
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

    /// The process ids of the live workers, by slot (`None` for a slot without a live worker,
    /// or whose worker is not a process).
    pub fn worker_pids(&self) -> Vec<Option<u32>> {
        let live = |s: &Arc<Slot>| s.current().filter(|w| w.is_alive()).and_then(|w| w.pid());
        self.inner.slots().iter().map(live).collect()
    }

    /// What each live worker announced in its handshake (its bridge, tools, whether it takes
    /// binary segments and mapped a shared-memory arena...), by slot (`None` for a slot without
    /// a live worker).
    pub fn worker_handshakes(&self) -> Vec<Option<Ready>> {
        let live = |s: &Arc<Slot>| s.current().filter(|w| w.is_alive()).map(|w| w.ready().clone());
        self.inner.slots().iter().map(live).collect()
    }

    /// Stops the pool gracefully: new calls fail with `ShuttingDown`, queued calls are failed,
    /// running calls get up to the shutdown grace to finish, then every worker is stopped
    /// (a process: stdin closed, then SIGTERM, then SIGKILL to its group) and reaped.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.close_queue();
        let grace = inner.cfg.slot.shutdown_grace;
        // Let running calls finish, within the grace period.
        let until = tokio::time::Instant::now().checked_add(grace).unwrap_or_else(far_future);
        loop {
            let idle = inner.counters.all_idle.notified();
            if inner.counters.busy.load(std::sync::atomic::Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(until, idle).await.is_err() {
                tracing::warn!("calls still running after the shutdown grace; stopping their workers");
                break;
            }
        }
        inner.shutdown.send_replace(true);
        if let Some(s) = &self.life.sweeper {
            s.abort();
        }
        let tasks = std::mem::take(&mut *self.life.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let slot_tasks = inner.stop_slot_tasks();
        for t in tasks.into_iter().chain(slot_tasks) {
            let _ = t.await;
        }
        // The current workers, and recycled ones still draining: none outlives the pool.
        let workers: Vec<Arc<Member>> = inner
            .slots()
            .iter()
            .flat_map(|s| s.take_current().into_iter().chain(s.take_retiring()))
            .collect();
        inner.drain_idle();
        futures::future::join_all(workers.iter().map(|w| w.shutdown(grace))).await;
        for l in inner.launchers() {
            l.shutdown(grace).await;
        }
        tracing::info!(run_id = %inner.run_id, "pool stopped");
    }
}

impl Inner {
    /// Tells every slot task to stop; returns their handles.
    fn stop_slot_tasks(&self) -> Vec<JoinHandle<()>> {
        let tasks = std::mem::take(&mut *self.slot_tasks.lock().unwrap_or_else(|p| p.into_inner()));
        tasks
            .into_iter()
            .map(|(stop, task)| {
                stop.send_replace(true);
                task
            })
            .collect()
    }

    /// The launcher now and those a reload replaced.
    fn launchers(&self) -> Vec<Arc<dyn Launcher>> {
        let mut all = vec![self.source().launcher.clone()];
        all.extend(self.retired_launchers.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        all
    }
}

impl Drop for Life {
    fn drop(&mut self) {
        let inner = &self.inner;
        inner.close_queue();
        inner.shutdown.send_replace(true);
        if let Some(s) = &self.sweeper {
            s.abort();
        }
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
        for t in inner.stop_slot_tasks() {
            t.abort();
        }
        for s in inner.slots().iter() {
            for w in s.take_current().into_iter().chain(s.take_retiring()) {
                w.kill();
            }
        }
        for w in inner.drain_idle() {
            w.kill();
        }
        for l in inner.launchers() {
            l.abort();
        }
    }
}
