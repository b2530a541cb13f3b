//! The [`Adapter`] trait: what program a worker runs, and how.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, Payload, WorkerId};

/// What the supervisor knows when it asks an adapter for a spawn spec.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SpawnContext {
    /// The worker about to be started.
    pub worker: WorkerId,
    /// The pool instance's run id (also put in the worker's environment as `SNAKEPIT_RUN_ID`).
    pub run_id: String,
}

impl SpawnContext {
    /// A context for `worker` in the pool run `run_id`.
    pub fn new(worker: WorkerId, run_id: impl Into<String>) -> Self {
        SpawnContext { worker, run_id: run_id.into() }
    }
}

/// Where a worker process speaks the protocol (`docs/protocol.md` §1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolIo {
    /// On its stdin (fd 0) and stdout (fd 1). A worker must move the protocol off fd 1 itself
    /// before user code can print (the Python bootstrap does).
    #[default]
    Stdio,
    /// On fd 3 (host → worker) and fd 4 (worker → host), for runtimes that cannot `dup2`
    /// (Node): fd 0 is `/dev/null`, fds 1 and 2 are the worker's stderr pipe, and
    /// `SNAKEPIT_PROTOCOL_FDS=3,4` is in its environment. Nothing the worker prints can reach
    /// the protocol. The supervisor opens fds 3 and 4 in the worker only, not in its shepherd.
    Fds,
}

/// Which wire protocol a worker speaks: snakepit's own, or the original Snakepit's stdio
/// envelope (`docs/protocol.md` §9), which only the `SnakepitV0` transport speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protocol {
    /// Protocol v1 (`docs/protocol.md`).
    #[default]
    V1,
    /// The original Elixir Snakepit's envelope (`snakepit-v0`).
    SnakepitV0,
}

/// How to start one worker process.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SpawnSpec {
    /// The program (a path, or a name looked up in `PATH`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables (set on top of the host's environment, or of what
    /// [`env_clear`](Self::env_clear) keeps of it).
    pub env: Vec<(OsString, OsString)>,
    /// Environment variables to remove.
    pub env_remove: Vec<OsString>,
    /// Start from an empty environment instead of the host's: the worker then gets only
    /// `PATH` and the variables named in [`env_allow`](Self::env_allow) from the host (those
    /// it has), plus [`env`](Self::env), the pool's own variables and what snakepit sets itself
    /// (`SNAKEPIT_RUN_ID`, `SNAKEPIT_WORKER_ID`). Off by default: a worker inherits the host's
    /// whole environment, secrets included.
    pub env_clear: bool,
    /// With [`env_clear`](Self::env_clear): the host's variables the worker still gets.
    pub env_allow: Vec<OsString>,
    /// The working directory (the host's when `None`).
    pub cwd: Option<PathBuf>,
    /// Where the worker speaks the protocol (its stdin/stdout by default).
    pub protocol_io: ProtocolIo,
}

impl SpawnSpec {
    /// A spec that runs `program` with no arguments.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        SpawnSpec { program: program.into(), ..Default::default() }
    }

    /// Appends an argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Sets where the worker speaks the protocol (see [`ProtocolIo`]).
    pub fn protocol_io(mut self, io: ProtocolIo) -> Self {
        self.protocol_io = io;
        self
    }

    /// Starts the worker from an empty environment (see [`env_clear`](Self::env_clear)).
    pub fn env_clear(mut self) -> Self {
        self.env_clear = true;
        self
    }

    /// Keeps these host variables when the environment is cleared.
    pub fn env_allow<I, K>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: Into<OsString>,
    {
        self.env_allow.extend(names.into_iter().map(Into::into));
        self
    }

    /// The value a host variable has for the worker before [`env`](Self::env) and the pool's
    /// variables are applied: the host's own, unless the environment is cleared and `name`
    /// is neither `PATH` nor allowed.
    pub fn inherited(&self, name: &str) -> Option<OsString> {
        if self.env_clear && name != "PATH" && !self.env_allow.iter().any(|k| k == name) {
            return None;
        }
        std::env::var_os(name)
    }
}

/// What to run in a worker and how to treat its commands; one per pool. Like deadpool's
/// `Manager`, it is small and synchronous: the supervisor does the process work.
pub trait Adapter: Send + Sync + 'static {
    /// A short name for logs (`python:script.py`).
    fn name(&self) -> String;

    /// How to start a worker process. The default refuses: an adapter either names a program
    /// here or supplies its own [`launcher`](Adapter::launcher).
    fn spawn_spec(&self, _ctx: &SpawnContext) -> Result<SpawnSpec, Error> {
        Err(Error::BadRequest(format!("adapter `{}` has no program to spawn", self.name())))
    }

    /// An in-process (or otherwise non-process) way to start this adapter's workers, used
    /// instead of spawning [`spawn_spec`](Adapter::spawn_spec)'s program through the pool's
    /// transport. `None` (the default): workers are processes, started by the supervisor's
    /// process launcher. See [`Launcher`](crate::Launcher).
    fn launcher(&self) -> Option<std::sync::Arc<dyn crate::Launcher>> {
        None
    }

    /// How to start this adapter's zygote (for [`crate::StartMode::Zygote`]), or `None` when it
    /// has none (the default). The zygote speaks the zygote protocol of `docs/protocol.md` on a
    /// `SOCK_SEQPACKET` socket at fd 0.
    fn zygote_spec(&self, _ctx: &SpawnContext) -> Result<Option<SpawnSpec>, Error> {
        Ok(None)
    }

    /// How long a worker may take from spawn to `ready` (model loading may take minutes).
    fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// Configuration handed to the worker in `hello` (the Python bridge passes it to `setup`).
    fn worker_config(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Validates a call before it is queued; an error fails the call without a round trip.
    fn validate(&self, _command: &str, _args: &Payload) -> Result<(), Error> {
        Ok(())
    }

    /// A default timeout for `command`, used when the caller gives none.
    fn timeout_for(&self, _command: &str) -> Option<Duration> {
        None
    }

    /// The protocol the worker speaks (default: v1). A pool refuses (`bad_request`) to run a
    /// worker on a transport that does not speak it.
    fn protocol(&self) -> Protocol {
        Protocol::V1
    }
}
