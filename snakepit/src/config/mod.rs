//! Pools described by a configuration file (feature `config`).
//!
//! A [`PoolConfig`] holds every setting of [`PoolBuilder`](crate::PoolBuilder) as data: read
//! from a TOML file, with `SNAKEPIT_CFG_<KEY>` environment variables over it (`__` between the
//! parts of a nested key: `SNAKEPIT_CFG_HEARTBEAT__INTERVAL=2s`), or built in code from
//! [`PoolConfig::default`]. Durations are written the human way (`"250ms"`, `"5s"`,
//! `"1h 30m"`), sizes as bytes or `"512MiB"`. `snakepit.example.toml` at the repository's root
//! documents every key and its default.
//!
//! ```no_run
//! use snakepit::{config::PoolConfig, Pool};
//! # async fn demo() -> Result<(), snakepit::Error> {
//! let cfg = PoolConfig::load("snakepit.toml")?; // the file, then SNAKEPIT_CFG_* over it
//! let pool = Pool::from_config(&cfg).await?;
//! # pool.shutdown().await; Ok(()) }
//! ```
//!
//! Precedence, lowest first: the defaults, the file, the environment, then whatever the
//! program sets on the loaded value (`snakepit serve` applies its command-line flags there).
//! Nothing but the file and the `SNAKEPIT_CFG_*` variables is read as configuration; another
//! `SNAKEPIT_*` variable is never an error, and a `SNAKEPIT_CFG_*` variable naming no key is
//! logged (one warning) and ignored.
//!
//! Every error, from the file, a variable or validation, is one [`Error::Config`](crate::Error::Config) displayed as
//! `FILE:LINE: key 'x.y': reason` (a variable: `SNAKEPIT_CFG_SIZE: key 'size': reason`).
//! Keys the loader does not know are errors in a file.
//!
//! A file with `[pools.NAME]` tables describes several pools ([`PoolsConfig`], started as
//! [`Pools`]): its top-level keys are defaults that every pool inherits, and each pool's table
//! overrides them.
//!
//! A `[remote]` section whose `agents` names some makes the pool's workers remote (agents
//! reached over gRPC with mutual TLS, feature `remote`; see [`RemoteConfig`]) instead of the
//! local processes `[worker]` describes.

mod build;
mod de;
mod keys;
mod load;
mod pools;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use snakepit_core::Protocol;

use crate::{Affinity, DropPolicy};

pub use de::split_command;
pub use load::ConfigFile;
pub use pools::{Pools, PoolsConfig};
pub use validate::is_node_script;

/// One pool's settings: every data-valued [`PoolBuilder`](crate::PoolBuilder) setting, and
/// the worker it runs ([`WorkerConfig`]).
///
/// Load one with [`PoolConfig::load`], or build one in code from [`PoolConfig::default`] and
/// field assignments; start it with [`Pool::from_config`](crate::Pool::from_config), or turn it
/// into a builder with [`PoolBuilder::from_config`](crate::PoolBuilder::from_config) to add
/// what a file cannot hold (a session store, a rehydrate hook) before `build()`.
///
/// The defaults are the builder's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PoolConfig {
    /// The pool's name in metrics and spans ([`PoolBuilder::name`](crate::PoolBuilder::name));
    /// in a multi-pool file, the pool's table name unless its table sets one.
    pub name: Option<String>,
    /// The pool instance name for the run registry
    /// ([`PoolBuilder::instance`](crate::PoolBuilder::instance); default: the adapter's name).
    pub instance: Option<String>,
    /// Number of workers (default: the CPU count).
    pub size: Option<usize>,
    /// Most calls that may wait for a worker (default 1000).
    pub max_queue: usize,
    /// Longest wait for a free worker (default 5 s).
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Timeout of calls that set none (default: none).
    #[serde(with = "humantime_serde")]
    pub default_timeout: Option<Duration>,
    /// Longest a call may run on its worker, whatever its deadline (default: none).
    #[serde(with = "humantime_serde")]
    pub max_call_time: Option<Duration>,
    /// How many workers start at once (default 0: all).
    pub startup_concurrency: usize,
    /// Each step of a graceful stop (default 2 s).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a recycled (or detached) worker may take to finish its call (default 60 s).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long a worker has to answer a `cancel` before it is replaced (default 2 s).
    #[serde(with = "humantime_serde")]
    pub cancel_grace: Duration,
    /// What a dropped call future does to its worker: `"kill"` (default) or `"detach"`.
    #[serde(deserialize_with = "de::drop_policy")]
    pub drop_policy: DropPolicy,
    /// Stream items a worker may send ahead of the consumer (default 32).
    pub stream_window: u32,
    /// Busy-poll window (default 0: off; at most 10 ms).
    #[serde(with = "humantime_serde")]
    pub busy_poll: Duration,
    /// Calls one worker may hold, run in order (default 1: no pipelining; at most 16).
    pub pipeline_depth: usize,
    /// The smallest binary segment sent through shared memory (default 64 KiB).
    #[serde(deserialize_with = "de::bytes_usize")]
    pub shm_threshold: usize,
    /// Each worker's shared-memory arena (default 64 MiB; 0: off).
    #[serde(deserialize_with = "de::bytes_usize")]
    pub shm_max: usize,
    /// Refuse a request that crashed this many workers (default: off).
    pub quarantine: Option<u32>,
    /// Where run files live (default: the registry's own choice).
    pub run_dir: Option<PathBuf>,
    /// The run registry and the reaping on start (default on).
    pub run_registry: bool,
    /// The transport: `"stdio"` (default) or `"grpc"` (feature `grpc`).
    pub transport: TransportKind,
    /// `[worker]`: what the workers run.
    pub worker: WorkerConfig,
    /// `[heartbeat]`: pings of idle (and optionally busy) workers.
    pub heartbeat: HeartbeatConfig,
    /// `[recycle]`: when workers are replaced while healthy.
    pub recycle: RecycleConfig,
    /// `[restart]`: backoff and intensity limit of restarts after crashes.
    pub restart: RestartConfig,
    /// `[sessions]`: the default session store and routing.
    pub sessions: SessionsConfig,
    /// `[autoscale]`: growing and shrinking with the load (off by default).
    pub autoscale: AutoscaleConfig,
    /// `[remote]`: workers on remote agents instead of local processes (off unless `agents`
    /// names some).
    pub remote: RemoteConfig,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            name: None,
            instance: None,
            size: None,
            max_queue: 1000,
            queue_timeout: Duration::from_secs(5),
            default_timeout: None,
            max_call_time: None,
            startup_concurrency: 0,
            shutdown_grace: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(60),
            cancel_grace: Duration::from_secs(2),
            drop_policy: DropPolicy::Kill,
            stream_window: 32,
            busy_poll: Duration::ZERO,
            pipeline_depth: crate::DEFAULT_PIPELINE_DEPTH,
            shm_threshold: snakepit_core::ShmOptions::DEFAULT.threshold,
            shm_max: snakepit_core::ShmOptions::DEFAULT.size,
            quarantine: None,
            run_dir: None,
            run_registry: true,
            transport: TransportKind::Stdio,
            worker: WorkerConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            recycle: RecycleConfig::default(),
            restart: RestartConfig::default(),
            sessions: SessionsConfig::default(),
            autoscale: AutoscaleConfig::default(),
            remote: RemoteConfig::default(),
        }
    }
}

/// Which transport the workers speak (`transport = "stdio" | "grpc"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum TransportKind {
    /// Framed stdio (feature `stdio`, the default).
    #[default]
    Stdio,
    /// gRPC over a Unix socket (feature `grpc`).
    Grpc,
}

/// How many calls a worker runs at once (`[worker] profile = "process" | "thread"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ProfileKind {
    /// One call at a time ([`ProcessProfile`](crate::ProcessProfile), the default).
    #[default]
    Process,
    /// Up to `threads` calls at once ([`ThreadProfile`](crate::ThreadProfile)).
    Thread,
}

/// `[worker]`: what the workers run. Exactly one of `script`, `module` and `command` names it
/// (none in a remote pool: see [`RemoteConfig`]).
///
/// A `script` ending in `.js`, `.mjs` or `.cjs` runs on Node ([`Node::script`], feature
/// `node`), any other on Python ([`Python::script`], feature `python`); a `module` is a Python
/// module ([`Python::module`]); a `command` is any program that speaks the protocol itself
/// ([`Generic`](crate::Generic)).
///
/// [`Node::script`]: crate::adapters::Node::script
/// [`Python::script`]: crate::adapters::Python::script
/// [`Python::module`]: crate::adapters::Python::module
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// A worker script (Python, or Node by its extension).
    pub script: Option<PathBuf>,
    /// An importable Python module.
    pub module: Option<String>,
    /// A program and its arguments: in a file, a string split with shell word rules
    /// (`"perl worker.pl"`; quotes and backslashes, no variables or globbing) or an array.
    #[serde(deserialize_with = "de::command")]
    pub command: Option<Vec<String>>,
    /// More arguments for the worker's script or program.
    pub args: Vec<String>,
    /// The Python or Node interpreter (default: `$SNAKEPIT_PYTHON` or `python3`,
    /// `$SNAKEPIT_NODE` or `node`); not for a `command`.
    pub interpreter: Option<PathBuf>,
    /// The protocol: `"v1"` (default) or `"snakepit-v0"` (a `command` worker on stdio, one
    /// call at a time; see [`SnakepitV0`](crate::core::Protocol::SnakepitV0)).
    #[serde(deserialize_with = "de::protocol")]
    pub protocol: Protocol,
    /// With `snakepit-v0`: the worker's commands; others are refused host-side (default:
    /// every command is sent).
    pub tools: Vec<String>,
    /// Environment variables set for every worker.
    pub env: BTreeMap<String, String>,
    /// Start the workers from an empty environment (only `PATH`, `env_allow` and `env`).
    pub env_clear: bool,
    /// With `env_clear`: the host's variables the workers still get.
    pub env_allow: Vec<String>,
    /// The workers' working directory.
    pub cwd: Option<PathBuf>,
    /// The configuration sent in `hello.config` (any value; default none).
    pub config: Option<serde_json::Value>,
    /// `"process"` (default) or `"thread"`.
    pub profile: ProfileKind,
    /// With `profile = "thread"`: calls one worker runs at once (required there).
    pub threads: Option<usize>,
    /// Fork the workers from a warm zygote (Python only; default false).
    pub zygote: bool,
    /// How long start-up may take until `ready` (default 30 s).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Default timeouts per command (`{ predict = "30s" }`).
    #[serde(deserialize_with = "de::duration_map")]
    pub timeouts: BTreeMap<String, Duration>,
    /// The `BaseAdapter` subclass a Python script serves when it defines several.
    pub adapter_class: Option<String>,
    /// More `NODE_PATH` entries for a Node worker.
    pub node_path: Vec<PathBuf>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            script: None,
            module: None,
            command: None,
            args: Vec::new(),
            interpreter: None,
            protocol: Protocol::V1,
            tools: Vec::new(),
            env: BTreeMap::new(),
            env_clear: false,
            env_allow: Vec::new(),
            cwd: None,
            config: None,
            profile: ProfileKind::Process,
            threads: None,
            zygote: false,
            handshake_timeout: Duration::from_secs(30),
            timeouts: BTreeMap::new(),
            adapter_class: None,
            node_path: Vec::new(),
        }
    }
}

impl WorkerConfig {
    /// The keys tied to the worker source: the source itself and what only makes sense for it
    /// (its arguments, interpreter, Python adapter class, `NODE_PATH`, zygote, protocol and
    /// declared tools). A source named at a higher level (a `[pools.NAME]` table over the top
    /// level, a command-line flag over the file) replaces all of them; `env`, `cwd`, `config`,
    /// the profile and the timeouts carry over.
    pub const SOURCE_KEYS: &'static [&'static str] = &[
        "script",
        "module",
        "command",
        "args",
        "interpreter",
        "adapter_class",
        "node_path",
        "zygote",
        "protocol",
        "tools",
    ];

    /// Forgets the worker source and the keys tied to it ([`SOURCE_KEYS`](Self::SOURCE_KEYS)),
    /// before another source is set.
    pub fn clear_source(&mut self) {
        let d = WorkerConfig::default();
        self.script = d.script;
        self.module = d.module;
        self.command = d.command;
        self.args = d.args;
        self.interpreter = d.interpreter;
        self.adapter_class = d.adapter_class;
        self.node_path = d.node_path;
        self.zygote = d.zygote;
        self.protocol = d.protocol;
        self.tools = d.tools;
    }
}

/// `[heartbeat]`: idle workers are pinged every `interval`; one that misses `max_missed`
/// pongs in a row (each within `timeout`) is replaced.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct HeartbeatConfig {
    /// Heartbeats on (default true).
    pub enabled: bool,
    /// Time between pings (default 10 s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long one ping may take (default 5 s).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Missed pings before the worker is replaced (default 3).
    pub max_missed: u32,
    /// Ping busy workers too, when they can answer
    /// ([`PoolBuilder::busy_heartbeat`](crate::PoolBuilder::busy_heartbeat); default false).
    pub busy: bool,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        let hb = crate::Heartbeat::default();
        HeartbeatConfig {
            enabled: true,
            interval: hb.interval,
            timeout: hb.timeout,
            max_missed: hb.max_missed,
            busy: false,
        }
    }
}

/// `[recycle]`: workers replaced while healthy (the replacement starts first).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RecycleConfig {
    /// After about this many calls (default: never).
    pub max_requests: Option<u64>,
    /// After about this much uptime (default: never).
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Above about this much resident memory of the worker's process tree (default: never).
    #[serde(deserialize_with = "de::opt_bytes")]
    pub max_memory: Option<u64>,
    /// How often memory is checked, with `max_memory` (default 5 s).
    #[serde(with = "humantime_serde")]
    pub memory_check: Duration,
    /// The fraction (0 to 0.5) by which the limits are randomly shortened (default 0.1).
    pub jitter: f64,
}

impl Default for RecycleConfig {
    fn default() -> Self {
        RecycleConfig {
            max_requests: None,
            max_age: None,
            max_memory: None,
            memory_check: Duration::from_secs(5),
            jitter: 0.1,
        }
    }
}

/// `[restart]`: how crashed workers are restarted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RestartConfig {
    /// Shortest restart delay (default 50 ms).
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Longest restart delay (default 5 s).
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// More than this many exits within `window` pause the slot for a window (default 10).
    pub max_restarts: usize,
    /// The window of that limit (default 60 s).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            max_restarts: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// `[autoscale]`: the pool grows when calls wait for a worker and shrinks when most workers
/// idle, between `min` and `max` (see [`Autoscale`](crate::Autoscale)).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AutoscaleConfig {
    /// On or off (default off).
    pub enabled: bool,
    /// Fewest workers (default 1).
    pub min: usize,
    /// Most workers (default: the CPU count).
    pub max: usize,
    /// How often the load is looked at (default 1 s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Looks in a row with calls waiting before growing (default 2).
    pub up_after: u32,
    /// Looks in a row mostly idle before shrinking (default 30).
    pub down_after: u32,
    /// The busy fraction below which a look is idle (default 0.5).
    pub idle_below: f64,
    /// Workers added or removed at once (default 1).
    pub step: usize,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        let a = crate::Autoscale::new(1, std::thread::available_parallelism().map_or(2, |n| n.get()));
        AutoscaleConfig {
            enabled: false,
            min: a.min,
            max: a.max,
            interval: a.interval,
            up_after: a.up_after,
            down_after: a.down_after,
            idle_below: a.idle_below,
            step: a.step,
        }
    }
}

impl AutoscaleConfig {
    /// The autoscaler these settings describe, when enabled.
    pub fn autoscale(&self) -> Option<crate::Autoscale> {
        self.enabled.then(|| {
            let mut a = crate::Autoscale::new(self.min, self.max).interval(self.interval);
            a = a.after(self.up_after, self.down_after);
            a.idle_below = self.idle_below;
            a.step = self.step;
            a
        })
    }
}

/// `[sessions]`: the default (in-memory) session store and session routing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SessionsConfig {
    /// Time-to-live of idle sessions (default 1 h).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Most sessions (default 100 000).
    pub max: usize,
    /// Default affinity: `"hint"` (default), `"strict"` or `"strict_fail_fast"`.
    #[serde(deserialize_with = "de::affinity")]
    pub affinity: Affinity,
    /// A call in an unknown session creates it (default false).
    pub create_on_use: bool,
    /// A shared store: `redis://HOST:PORT/DB` or `redis+unix:///path/redis.sock` (default: none,
    /// the in-memory store; needs snakepit's `redis` feature).
    pub store: Option<String>,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            ttl: Duration::from_secs(3600),
            max: 100_000,
            affinity: Affinity::Hint,
            create_on_use: false,
            store: None,
        }
    }
}

/// `[remote]`: the pool's workers are on remote agents (`snakepit agent`), reached over gRPC on
/// TCP with mutual TLS, instead of local processes (feature `remote`: `PoolBuilder::remote`).
///
/// A pool whose `agents` names some is remote: it has no `[worker]` source (`script`, `module`
/// or `command`; naming one as well is an error), and unless `size` is set it has as many
/// workers as the agents reachable when it starts. With `agents` empty (the default) the
/// other keys are unused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RemoteConfig {
    /// The agents: `https://HOST[:PORT]` URLs (port 7443 by default; a DNS name may stand for
    /// several agents, resolved again every `resolve_every`). In a file, an array; a string is
    /// split at commas (`SNAKEPIT_CFG_REMOTE__AGENTS=https://a,https://b`). Default: none (the
    /// workers are local).
    #[serde(deserialize_with = "de::url_list")]
    pub agents: Vec<String>,
    /// The agents' CA certificate (PEM), for `https://` agents.
    pub tls_ca: Option<PathBuf>,
    /// This front end's client certificate (PEM), for `https://` agents.
    pub tls_cert: Option<PathBuf>,
    /// This front end's private key (PEM), for `https://` agents.
    pub tls_key: Option<PathBuf>,
    /// Allow `http://` agent URLs: plaintext, for loopback addresses only (default false).
    pub insecure_plaintext: bool,
    /// An HTTP/2 keepalive ping this often on each agent connection (default 2 s).
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the agent is lost (default 3 s).
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// How long a TCP connection and TLS handshake to an agent may take (default 5 s).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often the agents' DNS names are resolved again (default 10 s).
    #[serde(with = "humantime_serde")]
    pub resolve_every: Duration,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            agents: Vec::new(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            insecure_plaintext: false,
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(5),
            resolve_every: Duration::from_secs(10),
        }
    }
}

impl RemoteConfig {
    /// Whether the pool's workers are remote: `agents` names some.
    pub fn is_remote(&self) -> bool {
        !self.agents.is_empty()
    }

    /// The remote settings these describe (feature `remote`), for
    /// [`PoolBuilder::remote_options`](crate::PoolBuilder::remote_options): the agents, mutual
    /// TLS when `tls_ca`, `tls_cert` and `tls_key` are all set, and the timings; the rest are
    /// [`RemoteOptions`](snakepit_remote::RemoteOptions)' defaults.
    #[cfg(feature = "remote")]
    pub fn options(&self) -> snakepit_remote::RemoteOptions {
        let mut o = snakepit_remote::RemoteOptions::new(self.agents.iter().cloned());
        if let (Some(ca), Some(cert), Some(key)) = (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            o.tls = Some(snakepit_remote::ClientTls::new(ca.clone(), cert.clone(), key.clone()));
        }
        o.insecure_plaintext = self.insecure_plaintext;
        o.keepalive_interval = self.keepalive_interval;
        o.keepalive_timeout = self.keepalive_timeout;
        o.connect_timeout = self.connect_timeout;
        o.resolve_every = self.resolve_every;
        o
    }
}
