//! An adapter for any program that speaks protocol v1 itself.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use snakepit_core::{Adapter, Error, ProtocolIo, SpawnContext, SpawnSpec};

/// Runs `program args...` as a worker; the program must speak protocol v1 on stdin/stdout, or
/// on fds 3 and 4 with [`protocol_io`](Self::protocol_io) (see `docs/protocol.md` §1).
#[derive(Debug, Clone)]
pub struct Generic {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    env_clear: bool,
    env_allow: Vec<OsString>,
    cwd: Option<PathBuf>,
    handshake_timeout: Duration,
    timeouts: HashMap<String, Duration>,
    config: serde_json::Value,
    protocol_io: ProtocolIo,
}

impl Generic {
    /// A worker running `program`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Generic {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            env_clear: false,
            env_allow: Vec::new(),
            cwd: None,
            handshake_timeout: Duration::from_secs(30),
            timeouts: HashMap::new(),
            config: serde_json::Value::Null,
            protocol_io: ProtocolIo::Stdio,
        }
    }

    /// Appends an argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Sets an environment variable for the worker.
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Starts the worker from an empty environment instead of the host's (by default it
    /// inherits the host's whole environment, secrets included): it then gets only `PATH`, the
    /// variables allowed with [`env_allow`](Self::env_allow), those set with
    /// [`env`](Self::env) or on the pool, and `SNAKEPIT_RUN_ID` / `SNAKEPIT_WORKER_ID`.
    pub fn env_clear(mut self) -> Self {
        self.env_clear = true;
        self
    }

    /// With [`env_clear`](Self::env_clear): host variables the worker still gets (`HOME`,
    /// `LANG`, ...), when the host has them.
    pub fn env_allow<I, K>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: Into<OsString>,
    {
        self.env_allow.extend(names.into_iter().map(Into::into));
        self
    }

    /// Sets the worker's working directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Sets how long start-up may take until `ready`.
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Sets a default timeout for one command.
    pub fn command_timeout(mut self, command: impl Into<String>, t: Duration) -> Self {
        self.timeouts.insert(command.into(), t);
        self
    }

    /// Where the worker speaks the protocol: its stdin/stdout (the default), or fds 3 and 4
    /// ([`ProtocolIo::Fds`]: its stdout then goes to its stderr, so nothing it prints can
    /// reach the protocol).
    pub fn protocol_io(mut self, io: ProtocolIo) -> Self {
        self.protocol_io = io;
        self
    }

    /// Sets the configuration sent to the worker in `hello`.
    pub fn config(mut self, config: serde_json::Value) -> Self {
        self.config = config;
        self
    }
}

impl Adapter for Generic {
    fn name(&self) -> String {
        format!("generic:{}", self.program.display())
    }

    fn spawn_spec(&self, _ctx: &SpawnContext) -> Result<SpawnSpec, Error> {
        let mut spec = SpawnSpec::new(&self.program);
        spec.args = self.args.clone();
        spec.env = self.env.clone();
        spec.env_clear = self.env_clear;
        spec.env_allow = self.env_allow.clone();
        spec.cwd = self.cwd.clone();
        spec.protocol_io = self.protocol_io;
        Ok(spec)
    }

    fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    fn worker_config(&self) -> serde_json::Value {
        self.config.clone()
    }

    fn timeout_for(&self, command: &str) -> Option<Duration> {
        self.timeouts.get(command).copied()
    }
}
