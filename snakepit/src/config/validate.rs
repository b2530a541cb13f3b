//! What a [`PoolConfig`] must satisfy beyond its types: ranges, one worker source (or remote
//! agents instead), what the chosen worker, protocol and transport allow, and which adapters
//! this build has.

use std::time::Duration;

use snakepit_core::Protocol;

use super::{PoolConfig, ProfileKind, RemoteConfig, TransportKind, WorkerConfig};
use crate::Error;

/// A key and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    /// The dotted key, relative to the pool.
    pub(crate) key: String,
    /// What is wrong.
    pub(crate) reason: String,
}

impl Invalid {
    pub(crate) fn new(key: &str, reason: impl Into<String>) -> Self {
        Invalid { key: key.into(), reason: reason.into() }
    }

    /// As an error with no origin (a configuration built in code).
    pub(crate) fn into_error(self) -> Error {
        Error::Config { origin: None, line: None, key: self.key, reason: self.reason, source: None }
    }
}

/// Which adapter a worker configuration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Language {
    Python,
    Node,
    Command,
}

/// Whether `path` names a Node script (`.js`, `.mjs`, `.cjs`): a `[worker] script` (or `serve
/// --script`) that does runs on Node, any other on Python.
pub fn is_node_script(path: &std::path::Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("js" | "mjs" | "cjs"))
}

impl WorkerConfig {
    /// The one worker source, as its language; an error naming the key `worker` when there is
    /// none or more than one.
    pub(crate) fn language(&self) -> Result<Language, Invalid> {
        let set: Vec<&str> = [
            ("script", self.script.is_some()),
            ("module", self.module.is_some()),
            ("command", self.command.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, on)| on.then_some(k))
        .collect();
        match set.as_slice() {
            [] => Err(Invalid::new("worker", "no worker: set one of `script`, `module` or `command`")),
            ["script"] => Ok(match &self.script {
                Some(s) if is_node_script(s) => Language::Node,
                _ => Language::Python,
            }),
            ["module"] => Ok(Language::Python),
            ["command"] => Ok(Language::Command),
            many => Err(Invalid::new(
                "worker",
                format!(
                    "{} each name the worker: set exactly one of `script`, `module` or `command`",
                    many.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(" and ")
                ),
            )),
        }
    }
}

fn at_least_one(key: &str, n: u64) -> Result<(), Invalid> {
    if n == 0 {
        return Err(Invalid::new(key, "must be at least 1"));
    }
    Ok(())
}

fn positive(key: &str, d: Duration) -> Result<(), Invalid> {
    if d.is_zero() {
        return Err(Invalid::new(key, "must be longer than 0"));
    }
    Ok(())
}

/// Why a pool cannot name both remote agents and a local worker.
pub(crate) const REMOTE_OR_LOCAL: &str =
    "a pool's workers are either remote (remote.agents) or local ([worker])";

/// Why a build without the `remote` feature refuses agents.
pub(crate) const NO_REMOTE: &str = "this build has no remote workers (the `remote` feature)";

/// Checks everything [`PoolConfig`]'s types cannot say; the first problem found. A remote pool
/// (`remote.agents`) has no worker source, and its `[worker]` is not checked.
pub(crate) fn check(c: &PoolConfig) -> Result<(), Invalid> {
    check_pool(c)?;
    check_remote(&c.remote, &c.worker)?;
    if c.remote.is_remote() {
        return Ok(());
    }
    check_worker(c)
}

/// `[remote]`: positive timings, all three TLS files or none; with agents, no worker source,
/// URLs that are `https://` (with TLS) or `http://` (with `insecure_plaintext`), and a build
/// that has remote workers.
fn check_remote(r: &RemoteConfig, w: &WorkerConfig) -> Result<(), Invalid> {
    positive("remote.keepalive_interval", r.keepalive_interval)?;
    positive("remote.keepalive_timeout", r.keepalive_timeout)?;
    positive("remote.connect_timeout", r.connect_timeout)?;
    positive("remote.resolve_every", r.resolve_every)?;
    let tls =
        [("remote.tls_ca", &r.tls_ca), ("remote.tls_cert", &r.tls_cert), ("remote.tls_key", &r.tls_key)];
    let missing = tls.iter().find(|(_, p)| p.is_none()).map(|(k, _)| *k);
    let some_set = tls.iter().any(|(_, p)| p.is_some());
    if let (true, Some(key)) = (some_set, missing) {
        return Err(Invalid::new(key, "mutual TLS needs all of `tls_ca`, `tls_cert` and `tls_key`"));
    }
    if !r.is_remote() {
        return Ok(());
    }
    if w.script.is_some() || w.module.is_some() || w.command.is_some() {
        return Err(Invalid::new("remote.agents", REMOTE_OR_LOCAL));
    }
    for url in &r.agents {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("http://") {
            if !r.insecure_plaintext {
                return Err(Invalid::new(
                    "remote.agents",
                    format!("{url:?}: http:// is plaintext: it needs `insecure_plaintext = true` (loopback only); use https://"),
                ));
            }
        } else if lower.starts_with("https://") {
            if let Some(key) = missing {
                return Err(Invalid::new(
                    key,
                    format!(
                        "https:// agents ({url:?}) need mutual TLS: set `tls_ca`, `tls_cert` and `tls_key`"
                    ),
                ));
            }
        } else {
            return Err(Invalid::new(
                "remote.agents",
                format!(
                    "{url:?}: expected https://HOST[:PORT] (or http:// with `insecure_plaintext = true`)"
                ),
            ));
        }
        #[cfg(feature = "remote")]
        {
            let u = snakepit_remote::AgentUrl::parse(url)
                .map_err(|e| Invalid::new("remote.agents", e.to_string()))?;
            if u.plaintext && !u.is_loopback() {
                return Err(Invalid::new(
                    "remote.agents",
                    format!("{url:?}: plaintext (http://) is for loopback addresses only; use https://"),
                ));
            }
        }
    }
    if !cfg!(feature = "remote") {
        return Err(Invalid::new("remote.agents", NO_REMOTE));
    }
    Ok(())
}

fn check_pool(c: &PoolConfig) -> Result<(), Invalid> {
    if let Some(n) = c.size {
        at_least_one("size", n as u64)?;
    }
    if !(1..=crate::MAX_PIPELINE_DEPTH).contains(&c.pipeline_depth) {
        return Err(Invalid::new(
            "pipeline_depth",
            format!("must be 1 to {} (got {})", crate::MAX_PIPELINE_DEPTH, c.pipeline_depth),
        ));
    }
    at_least_one("stream_window", u64::from(c.stream_window))?;
    at_least_one("shm_threshold", c.shm_threshold as u64)?;
    if let Some(n) = c.quarantine {
        at_least_one("quarantine", u64::from(n))?;
    }
    if c.busy_poll > Duration::from_millis(10) {
        return Err(Invalid::new("busy_poll", format!("must be at most 10ms (got {:?})", c.busy_poll)));
    }
    match c.transport {
        TransportKind::Stdio if !cfg!(feature = "stdio") => {
            return Err(Invalid::new("transport", "\"stdio\" needs snakepit's `stdio` feature"));
        }
        TransportKind::Grpc if !cfg!(feature = "grpc") => {
            return Err(Invalid::new("transport", "\"grpc\" needs snakepit's `grpc` feature"));
        }
        _ => {}
    }
    let hb = &c.heartbeat;
    if hb.enabled {
        positive("heartbeat.interval", hb.interval)?;
        positive("heartbeat.timeout", hb.timeout)?;
        at_least_one("heartbeat.max_missed", u64::from(hb.max_missed))?;
    } else if hb.busy {
        return Err(Invalid::new("heartbeat.busy", "needs the heartbeat on (`enabled = true`)"));
    }
    let r = &c.recycle;
    if let Some(n) = r.max_requests {
        at_least_one("recycle.max_requests", n)?;
    }
    if !(0.0..=0.5).contains(&r.jitter) {
        return Err(Invalid::new("recycle.jitter", format!("must be between 0 and 0.5 (got {})", r.jitter)));
    }
    if let Some(bytes) = r.max_memory {
        // 0 would recycle every worker as soon as it starts, for ever.
        at_least_one("recycle.max_memory", bytes)?;
        positive("recycle.memory_check", r.memory_check)?;
    }
    if let Some(age) = r.max_age {
        positive("recycle.max_age", age)?;
    }
    positive("restart.window", c.restart.window)?;
    positive("worker.handshake_timeout", c.worker.handshake_timeout)?;
    if let Some(a) = c.autoscale.autoscale() {
        if a.min == 0 {
            return Err(Invalid::new("autoscale.min", "must be at least 1"));
        }
        if a.max < a.min {
            return Err(Invalid::new("autoscale.max", format!("is below min ({} < {})", a.max, a.min)));
        }
        positive("autoscale.interval", a.interval)?;
        at_least_one("autoscale.up_after", u64::from(a.up_after))?;
        at_least_one("autoscale.down_after", u64::from(a.down_after))?;
        at_least_one("autoscale.step", a.step as u64)?;
        if !(0.0..=1.0).contains(&a.idle_below) {
            return Err(Invalid::new(
                "autoscale.idle_below",
                format!("must be between 0 and 1 (got {})", a.idle_below),
            ));
        }
    }
    if let Some(url) = &c.sessions.store {
        if !(url.starts_with("redis://") || url.starts_with("redis+unix://")) {
            return Err(Invalid::new(
                "sessions.store",
                format!("{url:?}: expected redis://HOST:PORT/DB or redis+unix:///path/redis.sock"),
            ));
        }
        if !cfg!(feature = "redis") {
            return Err(Invalid::new("sessions.store", "a Redis store needs snakepit's `redis` feature"));
        }
    }
    if c.restart.backoff_max < c.restart.backoff_min {
        return Err(Invalid::new(
            "restart.backoff_max",
            format!(
                "is shorter than backoff_min ({:?} < {:?})",
                c.restart.backoff_max, c.restart.backoff_min
            ),
        ));
    }
    Ok(())
}

fn check_worker(c: &PoolConfig) -> Result<(), Invalid> {
    let w = &c.worker;
    let lang = w.language()?;
    match lang {
        Language::Python if !cfg!(feature = "python") => {
            let key = if w.script.is_some() { "worker.script" } else { "worker.module" };
            return Err(Invalid::new(key, "a Python worker needs snakepit's `python` feature"));
        }
        Language::Node if !cfg!(feature = "node") => {
            return Err(Invalid::new(
                "worker.script",
                "a Node script (.js, .mjs, .cjs) needs snakepit's `node` feature",
            ));
        }
        _ => {}
    }
    if let Some(words) = &w.command {
        if words.first().map_or(true, |p| p.is_empty()) {
            return Err(Invalid::new("worker.command", "is empty"));
        }
    }
    if lang == Language::Command && w.interpreter.is_some() {
        return Err(Invalid::new(
            "worker.interpreter",
            "is for `script` and `module` workers (a `command` names its program)",
        ));
    }
    if lang != Language::Python && w.adapter_class.is_some() {
        return Err(Invalid::new("worker.adapter_class", "is for Python workers"));
    }
    if lang != Language::Node && !w.node_path.is_empty() {
        return Err(Invalid::new("worker.node_path", "is for Node workers"));
    }
    if lang != Language::Python && w.zygote {
        return Err(Invalid::new("worker.zygote", "the zygote start mode is for Python workers"));
    }
    for name in w.env.keys() {
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(Invalid::new(&format!("worker.env.{name}"), "is not a valid variable name"));
        }
    }
    match (w.profile, w.threads) {
        (ProfileKind::Thread, None) => {
            return Err(Invalid::new("worker.threads", "profile = \"thread\" needs `threads = N`"));
        }
        (ProfileKind::Thread, Some(n)) => at_least_one("worker.threads", n as u64)?,
        (ProfileKind::Process, Some(_)) => {
            return Err(Invalid::new("worker.threads", "is for profile = \"thread\""));
        }
        (ProfileKind::Process, None) => {}
    }
    if w.protocol == Protocol::SnakepitV0 {
        if lang != Language::Command {
            return Err(Invalid::new(
                "worker.protocol",
                "snakepit-v0 workers are bridge scripts given with `command`",
            ));
        }
        if c.transport != TransportKind::Stdio {
            return Err(Invalid::new("transport", "snakepit-v0 workers run on \"stdio\" only"));
        }
        if w.profile != ProfileKind::Process {
            return Err(Invalid::new("worker.profile", "snakepit-v0 workers run one call at a time"));
        }
        if c.pipeline_depth > 1 {
            return Err(Invalid::new("pipeline_depth", "snakepit-v0 workers run one call at a time"));
        }
    } else if !w.tools.is_empty() {
        return Err(Invalid::new(
            "worker.tools",
            "is for protocol = \"snakepit-v0\" (v1 workers list their tools)",
        ));
    }
    Ok(())
}
