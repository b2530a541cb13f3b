//! A [`PoolConfig`] becomes a [`PoolBuilder`]: the adapter its `[worker]` names (or the remote
//! agents its `[remote]` names), then every setting.

use std::sync::Arc;

use snakepit_core::{Adapter, Protocol};

use super::validate::{self, Language};
use super::{PoolConfig, ProfileKind, RemoteConfig, TransportKind, WorkerConfig};
use crate::{Error, Generic, Heartbeat, Pool, PoolBuilder, ProcessProfile, ThreadProfile, Zygote};

/// The adapter settings `Python`, `Node` and `Generic` share.
macro_rules! common {
    ($adapter:expr, $w:expr) => {{
        let w: &WorkerConfig = $w;
        let mut a = $adapter;
        for arg in &w.args {
            a = a.arg(arg);
        }
        for (k, v) in &w.env {
            a = a.env(k, v);
        }
        if w.env_clear {
            a = a.env_clear();
        }
        if !w.env_allow.is_empty() {
            a = a.env_allow(w.env_allow.iter());
        }
        if let Some(dir) = &w.cwd {
            a = a.cwd(dir);
        }
        if let Some(c) = &w.config {
            a = a.config(c.clone());
        }
        for (command, t) in &w.timeouts {
            a = a.command_timeout(command, *t);
        }
        a.handshake_timeout(w.handshake_timeout)
    }};
}

impl PoolBuilder {
    /// A builder with every setting of `cfg` (validated first; an invalid one is an
    /// [`Error::Config`] naming the key), to which a program may add what a configuration
    /// cannot hold (a session store, a rehydrate hook) before [`build`](PoolBuilder::build).
    ///
    /// A remote pool (`remote.agents`; feature `remote`) gets `remote_options` (from
    /// `RemoteConfig::options`) instead of an adapter, and its `size` only when the
    /// configuration sets one (otherwise the pool takes the agents' workers); without the
    /// feature it is an [`Error::Config`] at `remote.agents`.
    pub fn from_config(cfg: &PoolConfig) -> Result<PoolBuilder, Error> {
        validate::check(cfg).map_err(validate::Invalid::into_error)?;
        let remote = cfg.remote.is_remote();
        let b = if remote {
            with_remote(Pool::builder(), &cfg.remote)?
        } else {
            with_worker(Pool::builder(), &cfg.worker)?
        };
        let b = with_transport(b, cfg)?;
        let mut b = b
            .max_queue(cfg.max_queue)
            .queue_timeout(cfg.queue_timeout)
            .startup_concurrency(cfg.startup_concurrency)
            .shutdown_grace(cfg.shutdown_grace)
            .drain_timeout(cfg.drain_timeout)
            .cancel_grace(cfg.cancel_grace)
            .drop_policy(cfg.drop_policy)
            .stream_window(cfg.stream_window)
            .busy_poll(cfg.busy_poll)
            .pipeline_depth(cfg.pipeline_depth)
            .shm_threshold(cfg.shm_threshold)
            .shm_max(cfg.shm_max)
            .run_registry(cfg.run_registry)
            .restart_backoff(cfg.restart.backoff_min, cfg.restart.backoff_max)
            .restart_limit(cfg.restart.max_restarts, cfg.restart.window)
            .recycle_jitter(cfg.recycle.jitter)
            .session_ttl(cfg.sessions.ttl)
            .max_sessions(cfg.sessions.max)
            .affinity(cfg.sessions.affinity)
            .create_sessions_on_use(cfg.sessions.create_on_use);
        if let Some(a) = cfg.autoscale.autoscale() {
            b = b.autoscale(a);
        }
        #[cfg(feature = "redis")]
        if let Some(url) = &cfg.sessions.store {
            b = b.session_store_url(url);
        }
        if let Some(n) = cfg.size {
            b = b.size(n);
        }
        if let Some(n) = &cfg.name {
            b = b.name(n);
        }
        if let Some(i) = &cfg.instance {
            b = b.instance(i);
        }
        if let Some(t) = cfg.default_timeout {
            b = b.default_timeout(t);
        }
        if let Some(t) = cfg.max_call_time {
            b = b.max_call_time(t);
        }
        if let Some(n) = cfg.quarantine {
            b = b.quarantine(n);
        }
        if let Some(dir) = &cfg.run_dir {
            b = b.run_dir(dir);
        }
        let hb = &cfg.heartbeat;
        b = b
            .heartbeat(hb.enabled.then_some(Heartbeat {
                interval: hb.interval,
                timeout: hb.timeout,
                max_missed: hb.max_missed,
            }))
            .busy_heartbeat(hb.busy);
        let r = &cfg.recycle;
        if let Some(n) = r.max_requests {
            b = b.max_requests(n);
        }
        if let Some(age) = r.max_age {
            b = b.max_age(age);
        }
        if let Some(bytes) = r.max_memory {
            b = b.max_memory(bytes, r.memory_check);
        }
        if remote {
            // One call at a time on each remote worker; `[worker]` is not theirs.
            return Ok(b);
        }
        let w = &cfg.worker;
        Ok(match (w.profile, w.threads, w.zygote) {
            (ProfileKind::Thread, Some(n), false) => b.profile(ThreadProfile::new(n)),
            (ProfileKind::Thread, Some(n), true) => b.profile(Zygote(ThreadProfile::new(n))),
            (_, _, true) => b.profile(Zygote(ProcessProfile)),
            _ => b.profile(ProcessProfile),
        })
    }
}

impl Pool {
    /// Starts the pool `cfg` describes (see [`PoolBuilder::from_config`]).
    pub async fn from_config(cfg: &PoolConfig) -> Result<Pool, Error> {
        PoolBuilder::from_config(cfg)?.build().await
    }
}

/// The builder with the adapter `[worker]` names.
fn with_worker(b: PoolBuilder, w: &WorkerConfig) -> Result<PoolBuilder, Error> {
    adapter_of(w).map(|a| b.adapter_shared(a))
}

/// The builder with the remote agents `[remote]` names (`size` is left to the caller: unset,
/// the pool takes the agents' workers).
#[cfg(feature = "remote")]
fn with_remote(b: PoolBuilder, r: &RemoteConfig) -> Result<PoolBuilder, Error> {
    Ok(b.remote_options(r.options()))
}

/// Without the `remote` feature, agents are an error (validation says so first).
#[cfg(not(feature = "remote"))]
fn with_remote(_b: PoolBuilder, _r: &RemoteConfig) -> Result<PoolBuilder, Error> {
    Err(validate::Invalid::new("remote.agents", validate::NO_REMOTE).into_error())
}

impl PoolConfig {
    /// The adapter `[worker]` names, with its settings (the configuration validated first):
    /// for [`Pool::reload_shared`](crate::Pool::reload_shared) when a configuration changes.
    ///
    /// A remote pool (`remote.agents`) has no local adapter: its workers are its agents'. For
    /// one this is an [`Error::Config`] at `remote.agents`; check
    /// [`RemoteConfig::is_remote`] first.
    pub fn adapter(&self) -> Result<Arc<dyn Adapter>, Error> {
        validate::check(self).map_err(validate::Invalid::into_error)?;
        if self.remote.is_remote() {
            return Err(validate::Invalid::new(
                "remote.agents",
                "a remote pool's workers are its agents': it has no local adapter to reload",
            )
            .into_error());
        }
        adapter_of(&self.worker)
    }
}

/// The adapter `[worker]` names (checked: exactly one source, an adapter this build has).
fn adapter_of(w: &WorkerConfig) -> Result<Arc<dyn Adapter>, Error> {
    let lang = w.language().map_err(validate::Invalid::into_error)?;
    let unavailable = |key: &str, feature: &str| Error::Config {
        origin: None,
        line: None,
        key: key.into(),
        reason: format!("this worker needs snakepit's `{feature}` feature"),
        source: None,
    };
    match lang {
        Language::Command => {
            let mut words = w.command.iter().flatten();
            let program = words
                .next()
                .ok_or_else(|| validate::Invalid::new("worker.command", "is empty").into_error())?;
            // The command line's own words, then `args`.
            let g = words.fold(Generic::new(program), Generic::arg);
            let g = common!(g, w);
            let g = if w.protocol == Protocol::SnakepitV0 { g.protocol(Protocol::SnakepitV0) } else { g };
            Ok(Arc::new(g))
        }
        #[cfg(feature = "python")]
        Language::Python => {
            let p = match (&w.script, &w.module) {
                (Some(s), _) => crate::Python::script(s),
                (None, Some(m)) => crate::Python::module(m),
                (None, None) => return Err(unavailable("worker", "python")),
            };
            let mut p = common!(p, w);
            if let Some(i) = &w.interpreter {
                p = p.interpreter(i);
            }
            if let Some(c) = &w.adapter_class {
                p = p.adapter_class(c);
            }
            Ok(Arc::new(p))
        }
        #[cfg(feature = "node")]
        Language::Node => {
            let Some(script) = &w.script else { return Err(unavailable("worker.script", "node")) };
            let mut n = common!(crate::Node::script(script), w);
            if let Some(i) = &w.interpreter {
                n = n.interpreter(i);
            }
            for dir in &w.node_path {
                n = n.node_path(dir);
            }
            Ok(Arc::new(n))
        }
        #[cfg(not(feature = "python"))]
        Language::Python => {
            Err(unavailable(if w.script.is_some() { "worker.script" } else { "worker.module" }, "python"))
        }
        #[cfg(not(feature = "node"))]
        Language::Node => Err(unavailable("worker.script", "node")),
    }
}

/// The transport `transport` and `[worker] protocol` name (the builder's default, stdio or
/// its snakepit-v0 variant, unless told otherwise).
fn with_transport(b: PoolBuilder, cfg: &PoolConfig) -> Result<PoolBuilder, Error> {
    match cfg.transport {
        #[cfg(feature = "stdio")]
        TransportKind::Stdio if !cfg.worker.tools.is_empty() => {
            Ok(b.transport(crate::SnakepitV0::new().tools(cfg.worker.tools.iter().cloned())))
        }
        TransportKind::Stdio => Ok(b),
        #[cfg(feature = "grpc")]
        TransportKind::Grpc => Ok(b.transport(crate::Grpc::default())),
        #[cfg(not(feature = "grpc"))]
        TransportKind::Grpc => Err(Error::Config {
            origin: None,
            line: None,
            key: "transport".into(),
            reason: "\"grpc\" needs snakepit's `grpc` feature".into(),
            source: None,
        }),
    }
}
