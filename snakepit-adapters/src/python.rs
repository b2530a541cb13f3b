//! The Python adapter and the embedded `snakepit_bridge` package.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use snakepit_core::{Adapter, Error, SpawnContext, SpawnSpec};

/// The bridge package, embedded so that a built binary needs nothing else on disk.
const BRIDGE_FILES: &[(&str, &str)] = &[
    ("__init__.py", include_str!("../python/snakepit_bridge/__init__.py")),
    ("__main__.py", include_str!("../python/snakepit_bridge/__main__.py")),
    ("_core.py", include_str!("../python/snakepit_bridge/_core.py")),
    ("showcase.py", include_str!("../python/snakepit_bridge/showcase.py")),
    ("_zygote.py", include_str!("../python/snakepit_bridge/_zygote.py")),
    ("_grpc.py", include_str!("../python/snakepit_bridge/_grpc.py")),
    (
        "_proto/snakepit/v1/snakepit_pb2.py",
        include_str!("../python/snakepit_bridge/_proto/snakepit/v1/snakepit_pb2.py"),
    ),
    (
        "_proto/snakepit/v1/snakepit_pb2_grpc.py",
        include_str!("../python/snakepit_bridge/_proto/snakepit/v1/snakepit_pb2_grpc.py"),
    ),
];

/// A stable hash (FNV-1a) of the embedded sources, naming their cache directory.
fn bridge_hash() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, text) in BRIDGE_FILES {
        for b in name.bytes().chain([0]).chain(text.bytes()).chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("snakepit");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".cache").join("snakepit");
    }
    std::env::temp_dir().join(format!("snakepit-{}", nix_uid()))
}

fn nix_uid() -> u32 {
    // Only used to keep users apart in a shared temp dir.
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap_or(0)
}

fn install_bridge(root: &Path) -> std::io::Result<PathBuf> {
    let dir = root.join(format!("bridge-{:016x}", bridge_hash()));
    if dir.join("snakepit_bridge").join("_core.py").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(root)?;
    // Write into a private temporary directory, then rename it into place atomically, so a
    // concurrent host never sees half a package.
    let tmp = root.join(format!(".tmp-{}-{:x}", std::process::id(), bridge_hash()));
    let pkg = tmp.join("snakepit_bridge");
    std::fs::create_dir_all(&pkg)?;
    for (name, text) in BRIDGE_FILES {
        let path = pkg.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text)?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.join("snakepit_bridge").join("_core.py").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The directory to put on `PYTHONPATH` so that `import snakepit_bridge` works: the
/// `SNAKEPIT_BRIDGE_PATH` environment variable if set, else the embedded sources written out
/// once to `$XDG_CACHE_HOME/snakepit/bridge-<hash>/`.
///
/// A failed write-out is not remembered: the next call tries again.
pub fn bridge_dir() -> Result<PathBuf, crate::Error> {
    if let Some(p) = std::env::var_os("SNAKEPIT_BRIDGE_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(d) = DIR.get() {
        return Ok(d.clone());
    }
    // Concurrent first calls may both write the sources out; `install_bridge` lets the second
    // one find the first one's copy.
    let dir = install_bridge(&cache_root()).map_err(crate::Error::Bridge)?;
    Ok(DIR.get_or_init(|| dir).clone())
}

/// Runs the bridge like `python -m snakepit_bridge`, but without the working directory on
/// `sys.path`: `-m` (and `-c`) put it first, so a `snakepit_bridge/`, `runpy.py` or `json.py`
/// in the directory snakepit runs from would be imported instead of the real ones. `-c` puts it
/// there as `''` on every Python 3 version; the first statement drops it before anything is
/// imported from it (`sys` is built in). When `-P`/`PYTHONSAFEPATH` already left it out,
/// `sys.path[0]` is the bridge's `PYTHONPATH` entry and stays. (One form for every version: no
/// probe of the interpreter's version at spawn time. Not `-I`: it ignores `PYTHONPATH`, which is
/// how the bridge is found.) The arguments after it land in `sys.argv[1:]` as with `-m`.
const BOOTSTRAP: &str = "import sys\nif sys.path and sys.path[0] == '':\n    del sys.path[0]\n\
                         import runpy\nrunpy.run_module('snakepit_bridge', run_name='__main__', alter_sys=True)\n";

#[derive(Debug, Clone)]
enum Entry {
    Script(PathBuf),
    Module(String),
}

/// Python workers: a script or a module served by the `snakepit_bridge` bootstrap
/// (`python -m snakepit_bridge --script PATH` / `--module NAME`), which moves the protocol off
/// fd 1 before any user code runs.
///
/// ```no_run
/// # use snakepit_adapters::Python;
/// let adapter = Python::script("workers/model.py")
///     .interpreter(".venv/bin/python")
///     .env("OMP_NUM_THREADS", "1")
///     .handshake_timeout(std::time::Duration::from_secs(120));
/// ```
#[derive(Debug, Clone)]
pub struct Python {
    entry: Entry,
    interpreter: PathBuf,
    adapter_class: Option<String>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    env_clear: bool,
    env_allow: Vec<OsString>,
    cwd: Option<PathBuf>,
    handshake_timeout: Duration,
    timeouts: HashMap<String, Duration>,
    config: serde_json::Value,
    bridge_dir: Option<PathBuf>,
}

impl Python {
    fn new(entry: Entry) -> Self {
        let interpreter = std::env::var_os("SNAKEPIT_PYTHON")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("python3"));
        Python {
            entry,
            interpreter,
            adapter_class: None,
            args: Vec::new(),
            env: Vec::new(),
            env_clear: false,
            env_allow: Vec::new(),
            cwd: None,
            handshake_timeout: Duration::from_secs(30),
            timeouts: HashMap::new(),
            config: serde_json::Value::Null,
            bridge_dir: None,
        }
    }

    /// Workers running the script at `path`.
    pub fn script(path: impl Into<PathBuf>) -> Self {
        Self::new(Entry::Script(path.into()))
    }

    /// Workers running the importable module `name` (e.g. `snakepit_bridge.showcase`).
    pub fn module(name: impl Into<String>) -> Self {
        Self::new(Entry::Module(name.into()))
    }

    /// The bundled showcase adapter (`snakepit_bridge.showcase`).
    pub fn showcase() -> Self {
        Self::module("snakepit_bridge.showcase")
    }

    /// The interpreter to run (default: `$SNAKEPIT_PYTHON` or `python3`); a venv's python works.
    pub fn interpreter(mut self, path: impl Into<PathBuf>) -> Self {
        self.interpreter = path.into();
        self
    }

    /// Serves this `BaseAdapter` subclass when the script defines several.
    pub fn adapter_class(mut self, name: impl Into<String>) -> Self {
        self.adapter_class = Some(name.into());
        self
    }

    /// Appends an argument for the script (it sees it in `sys.argv`).
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
    /// [`env`](Self::env) or on the pool, the bridge's `PYTHONPATH` (the host's own entries
    /// only if `PYTHONPATH` is allowed), `PYTHONUNBUFFERED`, and `SNAKEPIT_RUN_ID` /
    /// `SNAKEPIT_WORKER_ID`.
    pub fn env_clear(mut self) -> Self {
        self.env_clear = true;
        self
    }

    /// With [`env_clear`](Self::env_clear): host variables the worker still gets (`HOME`,
    /// `LANG`, `VIRTUAL_ENV`, ...), when the host has them.
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

    /// How long start-up (imports and `setup()`) may take until `ready`; default 30 s.
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// A default timeout for one command.
    pub fn command_timeout(mut self, command: impl Into<String>, t: Duration) -> Self {
        self.timeouts.insert(command.into(), t);
        self
    }

    /// Configuration handed to the worker (`self.config` of a `BaseAdapter`).
    pub fn config(mut self, config: serde_json::Value) -> Self {
        self.config = config;
        self
    }

    /// Uses the `snakepit_bridge` package found in `dir` instead of the embedded one.
    pub fn bridge_path(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bridge_dir = Some(dir.into());
        self
    }
}

impl Adapter for Python {
    fn name(&self) -> String {
        match &self.entry {
            Entry::Script(p) => format!("python:{}", p.display()),
            Entry::Module(m) => format!("python:-m {m}"),
        }
    }

    fn spawn_spec(&self, ctx: &SpawnContext) -> Result<SpawnSpec, Error> {
        self.spec(ctx, false)
    }

    fn zygote_spec(&self, ctx: &SpawnContext) -> Result<Option<SpawnSpec>, Error> {
        self.spec(ctx, true).map(Some)
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

impl Python {
    /// The bootstrap command line; `zygote` adds `--zygote`.
    fn spec(&self, ctx: &SpawnContext, zygote: bool) -> Result<SpawnSpec, Error> {
        let bridge = match &self.bridge_dir {
            Some(d) => d.clone(),
            None => bridge_dir().map_err(|e| {
                let crate::Error::Bridge(source) = e;
                Error::Spawn {
                    worker: ctx.worker,
                    program: self.interpreter.display().to_string(),
                    reason: "cannot install the snakepit_bridge sources".into(),
                    source: Some(source),
                }
            })?,
        };
        let mut spec = SpawnSpec::new(&self.interpreter).arg("-c").arg(BOOTSTRAP);
        spec.env_clear = self.env_clear;
        spec.env_allow = self.env_allow.clone();
        if zygote {
            spec = spec.arg("--zygote");
        }
        spec = match &self.entry {
            Entry::Script(p) => spec.arg("--script").arg(p.as_os_str()),
            Entry::Module(m) => spec.arg("--module").arg(m.as_str()),
        };
        if let Some(c) = &self.adapter_class {
            spec = spec.arg("--adapter").arg(c.as_str());
        }
        if !self.args.is_empty() {
            spec = spec.arg("--");
            spec.args.extend(self.args.iter().cloned());
        }
        // The bridge goes first on PYTHONPATH, ahead of the user's own entries.
        let user_path = self
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PYTHONPATH")
            .map(|(_, v)| v.clone())
            .or_else(|| spec.inherited("PYTHONPATH"));
        let mut pythonpath = bridge.into_os_string();
        if let Some(p) = user_path.filter(|p| !p.is_empty()) {
            pythonpath.push(":");
            pythonpath.push(p);
        }
        spec.env = self.env.iter().filter(|(k, _)| k != "PYTHONPATH").cloned().collect();
        spec.env.push(("PYTHONPATH".into(), pythonpath));
        spec.env.push(("PYTHONUNBUFFERED".into(), "1".into()));
        spec.cwd = self.cwd.clone();
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snakepit_core::WorkerId;

    #[test]
    fn bridge_installs_once_and_is_complete() {
        let root = tempfile::tempdir().expect("tempdir");
        let a = install_bridge(root.path()).expect("install");
        let b = install_bridge(root.path()).expect("install again");
        assert_eq!(a, b);
        for (name, text) in BRIDGE_FILES {
            assert_eq!(std::fs::read_to_string(a.join("snakepit_bridge").join(name)).expect("read"), *text);
        }
    }

    #[test]
    fn spec_puts_bridge_first_on_pythonpath() {
        let p = Python::script("w.py").bridge_path("/b").env("PYTHONPATH", "/user").arg("x");
        let spec = p.spawn_spec(&SpawnContext::new(WorkerId { slot: 0, generation: 0 }, "r")).expect("spec");
        let pp = spec.env.iter().find(|(k, _)| k == "PYTHONPATH").map(|(_, v)| v.clone());
        assert_eq!(pp, Some("/b:/user".into()));
        let args: Vec<_> = spec.args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["-c", BOOTSTRAP, "--script", "w.py", "--", "x"]);
    }
}
