//! The Python adapter and the embedded `snakepit_bridge` package.

use std::path::PathBuf;
use std::sync::OnceLock;

use snakepit_core::{Adapter, Error, SpawnContext, SpawnSpec};

#[cfg(test)]
use crate::cache::cache_root;
use crate::cache::Bundle;
use crate::common::{common_adapter_methods, common_builders, Common};

/// The bridge package, embedded so that a built binary needs nothing else on disk.
const BRIDGE_FILES: &[(&str, &str)] = &[
    ("__init__.py", include_str!("../python/snakepit_bridge/__init__.py")),
    ("__main__.py", include_str!("../python/snakepit_bridge/__main__.py")),
    ("_core.py", include_str!("../python/snakepit_bridge/_core.py")),
    ("_version.py", include_str!("../python/snakepit_bridge/_version.py")),
    ("testing.py", include_str!("../python/snakepit_bridge/testing.py")),
    ("py.typed", include_str!("../python/snakepit_bridge/py.typed")),
    ("showcase.py", include_str!("../python/snakepit_bridge/showcase.py")),
    ("_zygote.py", include_str!("../python/snakepit_bridge/_zygote.py")),
    ("_shm.py", include_str!("../python/snakepit_bridge/_shm.py")),
    ("_cli.py", include_str!("../python/snakepit_bridge/_cli.py")),
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

/// The embedded package as a cache bundle.
const BUNDLE: Bundle =
    Bundle { prefix: "bridge", subdir: "snakepit_bridge", files: BRIDGE_FILES, marker: "_core.py" };

#[cfg(test)]
fn bridge_hash() -> u64 {
    BUNDLE.hash()
}

#[cfg(test)]
fn install_bridge(root: &std::path::Path) -> Result<PathBuf, snakepit_fs::Refused> {
    BUNDLE.install(root)
}

/// The directory to put on `PYTHONPATH` so that `import snakepit_bridge` works: the
/// `SNAKEPIT_BRIDGE_PATH` environment variable if set, else the embedded sources written out
/// once to `$XDG_CACHE_HOME/snakepit/bridge-<hash>/` (or `~/.cache/snakepit/...`, or
/// `$TMPDIR/snakepit-<euid>/...`).
///
/// The cache directory is trusted only if it passes `snakepit_fs::check_private_dir` (a real
/// directory owned by the effective uid, with no group or other access, under safe
/// ancestors): otherwise the bridge goes to a fresh `mkdtemp` directory under `$TMPDIR`, with
/// one warning naming the refused path.
///
/// A failed write-out is not remembered: the next call tries again.
pub fn bridge_dir() -> Result<PathBuf, crate::Error> {
    if let Some(p) = std::env::var_os("SNAKEPIT_BRIDGE_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    BUNDLE.dir(&DIR)
}

/// Runs the bridge like `python -m snakepit_bridge`, but without the working directory on
/// `sys.path`: `-m` (and `-c`) put it first, so a `snakepit_bridge/`, `runpy.py` or `json.py`
/// in the directory snakepit runs from would be imported instead of the real ones. `-c` puts it
/// there as `''` on every Python 3 version; the first statement drops it before anything is
/// imported from it (`sys` is built in). When `-P`/`PYTHONSAFEPATH` already left it out,
/// `sys.path[0]` is the bridge's `PYTHONPATH` entry and stays. (One form for every version: no
/// probe of the interpreter's version at spawn time. Not `-I`: it ignores `PYTHONPATH`, which is
/// how the bridge is found.) The arguments after it land in `sys.argv[1:]` as with `-m`.
///
/// The bridge's own modules are imported with bytecode writing on, whatever
/// `PYTHONDONTWRITEBYTECODE` says: their `__pycache__` lands in the bridge's private cache
/// directory (written once per interpreter version, atomically), and every later start skips
/// compiling `_core.py` (~6 ms here). The flag is restored before the worker's own code is
/// imported, so the user's setting still holds for it.
const BOOTSTRAP: &str = "import sys\nif sys.path and sys.path[0] == '':\n    del sys.path[0]\n\
                         w = sys.dont_write_bytecode\nsys.dont_write_bytecode = False\n\
                         import snakepit_bridge._core, snakepit_bridge._cli\nsys.dont_write_bytecode = w\ndel w\n\
                         import runpy\nrunpy.run_module('snakepit_bridge', run_name='__main__', alter_sys=True)\n";

/// [`BOOTSTRAP`] for [`Python::installed_bridge`]: says plainly when the interpreter has no
/// `snakepit_bridge` (instead of runpy's bare "No module named").
const INSTALLED_BOOTSTRAP: &str = "import sys\nif sys.path and sys.path[0] == '':\n    del sys.path[0]\n\
                                   import importlib.util\n\
                                   if importlib.util.find_spec('snakepit_bridge') is None:\n    \
                                   sys.exit('snakepit: %s has no snakepit_bridge package: pip install \
                                   ./snakepit-adapters/python into it, or leave out \
                                   Python::installed_bridge() to use the embedded copy' % sys.executable)\n\
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
    common: Common,
    bridge: Bridge,
}

/// Which `snakepit_bridge` package a worker runs.
#[derive(Debug, Clone)]
enum Bridge {
    /// The copy embedded in this crate, first on `PYTHONPATH` (the default).
    Embedded,
    /// The package in this directory, first on `PYTHONPATH`.
    Dir(PathBuf),
    /// Whatever `import snakepit_bridge` finds in the interpreter (site-packages, `PYTHONPATH`).
    Installed,
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
            common: Common::default(),
            bridge: Bridge::Embedded,
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

    common_builders!();

    /// Uses the `snakepit_bridge` package found in `dir` instead of the embedded one.
    pub fn bridge_path(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bridge = Bridge::Dir(dir.into());
        self
    }

    /// Uses the `snakepit_bridge` package the interpreter itself imports (one installed with
    /// `pip install ./snakepit-adapters/python`, or on the worker's `PYTHONPATH`) instead of
    /// the embedded copy.
    ///
    /// By default the embedded copy is put first on the worker's `PYTHONPATH`, so it wins over
    /// any installed one and the bridge always matches this host. With this option the
    /// installed package runs, whatever its version: the handshake negotiates the protocol
    /// version, and a bridge that speaks none of the host's fails the start with
    /// [`Error::VersionMismatch`] naming both sides' versions (`version_mismatch`). An
    /// interpreter without the package fails the start with an error that says so.
    pub fn installed_bridge(mut self) -> Self {
        self.bridge = Bridge::Installed;
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

    common_adapter_methods!();
}

impl Python {
    /// The bootstrap command line; `zygote` adds `--zygote`.
    fn spec(&self, ctx: &SpawnContext, zygote: bool) -> Result<SpawnSpec, Error> {
        let bridge = match &self.bridge {
            Bridge::Dir(d) => Some(d.clone()),
            Bridge::Installed => None,
            Bridge::Embedded => Some(bridge_dir().map_err(|e| {
                let crate::Error::Bridge(source) = e;
                Error::Spawn {
                    worker: ctx.worker,
                    program: self.interpreter.display().to_string(),
                    reason: "cannot install the snakepit_bridge sources".into(),
                    source: Some(source),
                }
            })?),
        };
        let bootstrap = if bridge.is_some() { BOOTSTRAP } else { INSTALLED_BOOTSTRAP };
        let mut spec = SpawnSpec::new(&self.interpreter).arg("-c").arg(bootstrap);
        spec.env_clear = self.common.env_clear;
        spec.env_allow = self.common.env_allow.clone();
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
        if !self.common.args.is_empty() {
            spec = spec.arg("--");
            spec.args.extend(self.common.args.iter().cloned());
        }
        // The bridge goes first on PYTHONPATH, ahead of the user's own entries.
        let user_path = self
            .common
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PYTHONPATH")
            .map(|(_, v)| v.clone())
            .or_else(|| spec.inherited("PYTHONPATH"));
        let user_path = user_path.filter(|p| !p.is_empty());
        let pythonpath = match (bridge, user_path) {
            (Some(b), Some(p)) => {
                let mut pp = b.into_os_string();
                pp.push(":");
                pp.push(p);
                Some(pp)
            }
            (Some(b), None) => Some(b.into_os_string()),
            (None, p) => p,
        };
        spec.env = self.common.env.iter().filter(|(k, _)| k != "PYTHONPATH").cloned().collect();
        if let Some(pp) = pythonpath {
            spec.env.push(("PYTHONPATH".into(), pp));
        }
        spec.env.push(("PYTHONUNBUFFERED".into(), "1".into()));
        spec.cwd = self.common.cwd.clone();
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snakepit_core::WorkerId;
    use std::path::Path;

    #[test]
    fn bridge_installs_once_and_is_complete() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let root = scratch.path().join("cache");
        let a = install_bridge(&root).expect("install");
        let b = install_bridge(&root).expect("install again");
        assert_eq!(a, b);
        for (name, text) in BRIDGE_FILES {
            assert_eq!(std::fs::read_to_string(a.join("snakepit_bridge").join(name)).expect("read"), *text);
        }
    }

    /// Points the bridge cache at `$TMPDIR/snakepit-<euid>` (HOME and XDG unset), with
    /// `TMPDIR` a scratch directory. Each test runs in its own process under nextest.
    fn shared_tmp_fallback(tmp: &Path) -> PathBuf {
        std::env::remove_var("SNAKEPIT_BRIDGE_PATH");
        std::env::remove_var("XDG_CACHE_HOME");
        std::env::remove_var("HOME");
        std::env::set_var("TMPDIR", tmp);
        let root = tmp.join(format!("snakepit-{}", snakepit_fs::euid()));
        assert_eq!(cache_root(), root);
        root
    }

    /// A bridge planted by someone else: `root/bridge-<hash>/snakepit_bridge/_core.py`.
    fn plant(root: &Path) -> PathBuf {
        let dir = root.join(format!("bridge-{:016x}", bridge_hash()));
        std::fs::create_dir_all(dir.join("snakepit_bridge")).expect("plant");
        std::fs::write(dir.join("snakepit_bridge").join("_core.py"), "raise SystemExit('planted')")
            .expect("plant");
        dir
    }

    #[test]
    fn a_symlinked_shared_cache_is_not_trusted() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let root = shared_tmp_fallback(scratch.path());
        let evil = scratch.path().join("evil");
        let planted = plant(&evil);
        std::os::unix::fs::symlink(&evil, &root).expect("symlink");
        let dir = bridge_dir().expect("bridge dir");
        assert!(!dir.starts_with(&evil) && !dir.starts_with(&root), "used the planted bridge: {dir:?}");
        assert!(dir.join("snakepit_bridge").join("_core.py").is_file());
        assert_eq!(
            std::fs::read_to_string(planted.join("snakepit_bridge/_core.py")).expect("read"),
            "raise SystemExit('planted')"
        );
    }

    #[test]
    fn a_bridge_planted_by_another_user_in_the_shared_cache_is_not_trusted() {
        if snakepit_fs::euid() != 0 {
            eprintln!(
                "not root: cannot plant a directory owned by another user; the symlink case covers the rest"
            );
            return;
        }
        let scratch = tempfile::tempdir().expect("tempdir");
        let root = shared_tmp_fallback(scratch.path());
        std::fs::create_dir(&root).expect("root");
        let planted = plant(&root);
        for p in [planted.clone(), planted.join("snakepit_bridge"), planted.join("snakepit_bridge/_core.py")]
        {
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).expect("chown");
        }
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
        let dir = bridge_dir().expect("bridge dir");
        assert!(!dir.starts_with(&root), "used the bridge another user planted: {dir:?}");
        assert!(dir.join("snakepit_bridge").join("_core.py").is_file());
        // And a failed cache did not poison the process: the next call answers the same.
        assert_eq!(bridge_dir().expect("again"), dir);
    }

    #[test]
    fn a_shared_cache_root_of_another_user_is_not_used() {
        if snakepit_fs::euid() != 0 {
            eprintln!(
                "not root: cannot plant a directory owned by another user; the symlink case covers the rest"
            );
            return;
        }
        let scratch = tempfile::tempdir().expect("tempdir");
        let root = shared_tmp_fallback(scratch.path());
        std::fs::create_dir(&root).expect("root");
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        std::os::unix::fs::chown(&root, Some(65534), Some(65534)).expect("chown");
        let dir = bridge_dir().expect("bridge dir");
        assert!(!dir.starts_with(&root), "used another user's cache root: {dir:?}");
        assert_eq!(std::fs::read_dir(&root).expect("ls").count(), 0, "wrote into another user's directory");
    }

    #[test]
    fn an_open_bridge_dir_is_not_reused_but_an_open_cache_root_of_ours_serves() {
        use std::os::unix::fs::PermissionsExt;
        let scratch = tempfile::tempdir().expect("tempdir");
        let root = scratch.path().join("cache");
        std::fs::create_dir(&root).expect("root");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let planted = plant(&root);
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = install_bridge(&root).expect_err("a bridge dir open to others");
        assert!(e.reason.contains("755"), "{e}");
        std::fs::remove_dir_all(&planted).expect("rm");
        let dir = install_bridge(&root).expect("a 0755 cache root of ours");
        assert_eq!(std::fs::metadata(&dir).expect("stat").permissions().mode() & 0o777, 0o700);
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

    #[test]
    fn an_installed_bridge_is_not_shadowed() {
        let ctx = SpawnContext::new(WorkerId { slot: 0, generation: 0 }, "r");
        let p = Python::script("w.py").installed_bridge().env("PYTHONPATH", "/user");
        let spec = p.spawn_spec(&ctx).expect("spec");
        let pp = spec.env.iter().find(|(k, _)| k == "PYTHONPATH").map(|(_, v)| v.clone());
        assert_eq!(pp, Some("/user".into()), "only the user's entries");
        assert_eq!(spec.args[1], INSTALLED_BOOTSTRAP);
        let spec = Python::script("w.py").installed_bridge().env_clear().spawn_spec(&ctx).expect("spec");
        assert!(spec.env.iter().all(|(k, _)| k != "PYTHONPATH"), "no PYTHONPATH at all: {:?}", spec.env);
    }

    /// The Python package's version (`snakepit_bridge/_version.py`, which `pyproject.toml`
    /// reads) is the crates' version.
    #[test]
    fn the_python_package_version_is_the_crates() {
        let text = include_str!("../python/snakepit_bridge/_version.py");
        let want = format!("__version__ = \"{}\"", env!("CARGO_PKG_VERSION"));
        assert!(text.lines().any(|l| l.trim() == want), "_version.py does not say {want}:\n{text}");
        let pyproject = include_str!("../python/pyproject.toml");
        assert!(
            pyproject.contains(r#"version = { attr = "snakepit_bridge._version.__version__" }"#),
            "pyproject.toml must take its version from _version.py"
        );
    }
}
