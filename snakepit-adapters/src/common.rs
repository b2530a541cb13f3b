//! What every process adapter (`Python`, `Node`, `Generic`) is configured with — arguments,
//! environment, working directory, start-up and per-command timeouts, the worker config — and
//! the builder methods and `Adapter` methods that read it, written once.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// The settings shared by the process adapters.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    /// Arguments for the worker's program or script, after the adapter's own.
    pub(crate) args: Vec<OsString>,
    /// Environment variables set for the worker.
    pub(crate) env: Vec<(OsString, OsString)>,
    /// Start from an empty environment (see `SpawnSpec::env_clear`).
    pub(crate) env_clear: bool,
    /// With `env_clear`: host variables the worker still gets.
    pub(crate) env_allow: Vec<OsString>,
    /// The worker's working directory.
    pub(crate) cwd: Option<PathBuf>,
    /// How long start-up may take until `ready`.
    pub(crate) handshake_timeout: Duration,
    /// Default timeouts per command.
    pub(crate) timeouts: HashMap<String, Duration>,
    /// The worker configuration sent in `hello`.
    pub(crate) config: serde_json::Value,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            args: Vec::new(),
            env: Vec::new(),
            env_clear: false,
            env_allow: Vec::new(),
            cwd: None,
            handshake_timeout: Duration::from_secs(30),
            timeouts: HashMap::new(),
            config: serde_json::Value::Null,
        }
    }
}

/// The builder methods over a `common: Common` field (inside the adapter's `impl`).
macro_rules! common_builders {
    () => {
        /// Appends an argument for the worker (a script sees it in its argument list).
        pub fn arg(mut self, a: impl Into<std::ffi::OsString>) -> Self {
            self.common.args.push(a.into());
            self
        }

        /// Sets an environment variable for the worker.
        pub fn env(mut self, k: impl Into<std::ffi::OsString>, v: impl Into<std::ffi::OsString>) -> Self {
            self.common.env.push((k.into(), v.into()));
            self
        }

        /// Starts the worker from an empty environment instead of the host's (by default it
        /// inherits the host's whole environment, secrets included): it then gets only `PATH`,
        /// the variables allowed with [`env_allow`](Self::env_allow), those set with
        /// [`env`](Self::env) or on the pool, what the adapter itself needs (the bridge's
        /// `PYTHONPATH` or `NODE_PATH`, with the host's own entries only if that variable is
        /// allowed) and `SNAKEPIT_RUN_ID` / `SNAKEPIT_WORKER_ID`.
        pub fn env_clear(mut self) -> Self {
            self.common.env_clear = true;
            self
        }

        /// With [`env_clear`](Self::env_clear): host variables the worker still gets (`HOME`,
        /// `LANG`, `VIRTUAL_ENV`, ...), when the host has them.
        pub fn env_allow<I, K>(mut self, names: I) -> Self
        where
            I: IntoIterator<Item = K>,
            K: Into<std::ffi::OsString>,
        {
            self.common.env_allow.extend(names.into_iter().map(Into::into));
            self
        }

        /// Sets the worker's working directory.
        pub fn cwd(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
            self.common.cwd = Some(dir.into());
            self
        }

        /// How long start-up (loading the code, `setup()`) may take until `ready`; default 30 s.
        pub fn handshake_timeout(mut self, t: std::time::Duration) -> Self {
            self.common.handshake_timeout = t;
            self
        }

        /// A default timeout for one command.
        pub fn command_timeout(mut self, command: impl Into<String>, t: std::time::Duration) -> Self {
            self.common.timeouts.insert(command.into(), t);
            self
        }

        /// Configuration handed to the worker in `hello` (`self.config` of a Python
        /// `BaseAdapter`, `this.config` of a Node `Adapter`).
        pub fn config(mut self, config: serde_json::Value) -> Self {
            self.common.config = config;
            self
        }
    };
}

/// The `Adapter` methods that read a `common: Common` field (inside `impl Adapter`).
macro_rules! common_adapter_methods {
    () => {
        fn handshake_timeout(&self) -> std::time::Duration {
            self.common.handshake_timeout
        }

        fn worker_config(&self) -> serde_json::Value {
            self.common.config.clone()
        }

        fn timeout_for(&self, command: &str) -> Option<std::time::Duration> {
            self.common.timeouts.get(command).copied()
        }
    };
}

pub(crate) use {common_adapter_methods, common_builders};
