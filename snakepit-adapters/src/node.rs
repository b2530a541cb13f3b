//! The Node.js adapter and the embedded `snakepit-bridge` npm package.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use snakepit_core::{Adapter, Error, ProtocolIo, SpawnContext, SpawnSpec};

use crate::cache::Bundle;
use crate::common::{common_adapter_methods, common_builders, Common};

/// The package, embedded so that a built binary needs nothing else on disk.
const PACKAGE_FILES: &[(&str, &str)] = &[
    ("package.json", include_str!("../node/package.json")),
    ("index.js", include_str!("../node/index.js")),
    ("index.mjs", include_str!("../node/index.mjs")),
    ("index.d.ts", include_str!("../node/index.d.ts")),
    ("bootstrap.mjs", include_str!("../node/bootstrap.mjs")),
    ("hooks.mjs", include_str!("../node/hooks.mjs")),
    ("lib/call.js", include_str!("../node/lib/call.js")),
    ("lib/codec.js", include_str!("../node/lib/codec.js")),
    ("lib/errors.js", include_str!("../node/lib/errors.js")),
    ("lib/grpc.js", include_str!("../node/lib/grpc.js")),
    ("lib/invoke.js", include_str!("../node/lib/invoke.js")),
    ("lib/io.js", include_str!("../node/lib/io.js")),
    ("lib/stdio.js", include_str!("../node/lib/stdio.js")),
    ("lib/tools.js", include_str!("../node/lib/tools.js")),
    ("lib/worker.js", include_str!("../node/lib/worker.js")),
    ("proto/snakepit/v1/snakepit.proto", include_str!("../node/proto/snakepit/v1/snakepit.proto")),
    ("showcase.js", include_str!("../node/showcase.js")),
    ("README.md", include_str!("../node/README.md")),
];

/// Where the package goes in its cache directory: `NODE_PATH` names the `node_modules` above.
const PACKAGE_DIR: &str = "node_modules/snakepit-bridge";

const BUNDLE: Bundle =
    Bundle { prefix: "node-bridge", subdir: PACKAGE_DIR, files: PACKAGE_FILES, marker: "index.js" };

/// The directory holding `node_modules/snakepit-bridge/` (what the Node adapter puts on
/// `NODE_PATH`): `SNAKEPIT_NODE_BRIDGE_PATH` if set, else the embedded package written out
/// once to `$XDG_CACHE_HOME/snakepit/node-bridge-<hash>/` (or `~/.cache/snakepit/...`, or
/// `$TMPDIR/snakepit-<euid>/...`), under the same rules as the Python bridge
/// ([`bridge_dir`](crate::bridge_dir)).
pub fn node_bridge_dir() -> Result<PathBuf, crate::Error> {
    if let Some(p) = std::env::var_os("SNAKEPIT_NODE_BRIDGE_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    BUNDLE.dir(&DIR)
}

/// What a Node worker runs.
#[derive(Debug, Clone)]
enum Entry {
    Script(PathBuf),
    Showcase,
}

/// Runs a Node.js worker script (CommonJS or ESM) that uses the `snakepit-bridge` package:
///
/// ```js
/// const { tool, serve } = require("snakepit-bridge");   // or: import { tool, serve } from "snakepit-bridge"
/// tool("add", ({ a, b }) => a + b);
/// serve();
/// ```
///
/// The worker starts as `node --import <cache>/node_modules/snakepit-bridge/bootstrap.mjs
/// SCRIPT` with that `node_modules` first on `NODE_PATH` (for `require`; the bootstrap
/// registers a resolve hook for `import`), so nothing is installed by the user and nothing is
/// written next to the script. It speaks the protocol on fds 3 and 4
/// ([`ProtocolIo::Fds`]): `console.log` anywhere, even at load time, cannot corrupt it.
///
/// Concurrency is the pool's profile, as for Python: `ThreadProfile::new(n)` lets the bridge
/// run up to `n` calls at once on its event loop (a synchronous tool still blocks it).
/// Cancellation is cooperative (`ctx.signal`). The zygote start mode is not available for
/// Node workers.
#[derive(Debug, Clone)]
pub struct Node {
    entry: Entry,
    interpreter: PathBuf,
    common: Common,
    bridge: Option<PathBuf>,
    node_path: Vec<PathBuf>,
}

impl Node {
    fn new(entry: Entry) -> Self {
        let interpreter = std::env::var_os("SNAKEPIT_NODE")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("node"));
        Node { entry, interpreter, common: Common::default(), bridge: None, node_path: Vec::new() }
    }

    /// Runs the worker script at `path` (`.js`, `.cjs` or `.mjs`).
    pub fn script(path: impl Into<PathBuf>) -> Self {
        Self::new(Entry::Script(path.into()))
    }

    /// The bundled showcase worker (`snakepit-bridge/showcase.js`): the conformance tools.
    pub fn showcase() -> Self {
        Self::new(Entry::Showcase)
    }

    /// The interpreter to run (default: `$SNAKEPIT_NODE` or `node`).
    pub fn interpreter(mut self, path: impl Into<PathBuf>) -> Self {
        self.interpreter = path.into();
        self
    }

    common_builders!();

    /// Appends `dir` to the worker's `NODE_PATH`, after the bridge's own entry, the user's
    /// `NODE_PATH` and `$SNAKEPIT_NODE_PATH`: where packages the worker needs live (the gRPC
    /// transport's `@grpc/grpc-js`, say, in a `node_modules` that `npm ci` filled).
    pub fn node_path(mut self, dir: impl Into<PathBuf>) -> Self {
        self.node_path.push(dir.into());
        self
    }

    /// Uses the package in `dir/node_modules/snakepit-bridge/` instead of the embedded one.
    pub fn bridge_path(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bridge = Some(dir.into());
        self
    }

    fn spec(&self) -> Result<SpawnSpec, Error> {
        let bad = |e: crate::Error| Error::Spawn {
            worker: snakepit_core::WorkerId { slot: 0, generation: 0 },
            program: self.interpreter.display().to_string(),
            reason: e.to_string(),
            source: None,
        };
        let dir = match &self.bridge {
            Some(d) => d.clone(),
            None => node_bridge_dir().map_err(bad)?,
        };
        // Absolute: it becomes a file:// URL and a NODE_PATH entry the worker's cwd must not
        // change.
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let package = dir.join(PACKAGE_DIR);
        let script = match &self.entry {
            Entry::Script(p) => p.clone(),
            Entry::Showcase => package.join("showcase.js"),
        };
        let mut spec = SpawnSpec::new(&self.interpreter).protocol_io(ProtocolIo::Fds);
        spec.env_clear = self.common.env_clear;
        spec.env_allow = self.common.env_allow.clone();
        spec = spec.arg("--import").arg(file_url(&package.join("bootstrap.mjs"))).arg(script);
        spec.args.extend(self.common.args.iter().cloned());
        // The package's node_modules first on NODE_PATH, then the user's entries, then
        // `$SNAKEPIT_NODE_PATH` and the adapter's `node_path` entries (the gRPC transport's
        // packages).
        let user = self
            .common
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "NODE_PATH")
            .map(|(_, v)| v.clone())
            .or_else(|| spec.inherited("NODE_PATH"));
        let mut node_path = dir.join("node_modules").into_os_string();
        let extras = [user, std::env::var_os("SNAKEPIT_NODE_PATH")].into_iter().flatten();
        for extra in extras.chain(self.node_path.iter().map(|p| p.clone().into_os_string())) {
            if !extra.is_empty() {
                node_path.push(":");
                node_path.push(extra);
            }
        }
        spec.env = self.common.env.iter().filter(|(k, _)| k != "NODE_PATH").cloned().collect();
        spec.env.push(("NODE_PATH".into(), node_path));
        spec.cwd = self.common.cwd.clone();
        Ok(spec)
    }
}

/// `path` as a `file://` URL (what `--import` takes), with the characters a URL path cannot
/// hold percent-encoded.
fn file_url(path: &Path) -> OsString {
    use std::os::unix::ffi::OsStrExt;
    let mut url = String::from("file://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            url.push(char::from(b));
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url.into()
}

impl Adapter for Node {
    fn name(&self) -> String {
        match &self.entry {
            Entry::Script(p) => format!("node:{}", p.display()),
            Entry::Showcase => "node:showcase".into(),
        }
    }

    fn spawn_spec(&self, _ctx: &SpawnContext) -> Result<SpawnSpec, Error> {
        self.spec()
    }

    fn zygote_spec(&self, _ctx: &SpawnContext) -> Result<Option<SpawnSpec>, Error> {
        Err(Error::BadRequest("zygote start mode is not supported for Node workers".into()))
    }

    common_adapter_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_installs_and_is_complete() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let dir = BUNDLE.install(&scratch.path().join("cache")).expect("install");
        for (name, text) in PACKAGE_FILES {
            assert_eq!(std::fs::read_to_string(dir.join(PACKAGE_DIR).join(name)).expect("read"), *text);
        }
    }

    /// Every file of the package's `lib/` is embedded (a file added there and not listed would
    /// break every embedded worker that requires it).
    #[test]
    fn every_lib_file_is_embedded() {
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("node").join("lib");
        for e in std::fs::read_dir(&lib).expect("node/lib") {
            let name = format!("lib/{}", e.expect("entry").file_name().to_string_lossy());
            assert!(PACKAGE_FILES.iter().any(|(n, _)| *n == name), "{name} is not in PACKAGE_FILES");
        }
    }

    #[test]
    fn spec_runs_the_bootstrap_on_protocol_fds_with_node_path_first() {
        let n = Node::script("w.mjs").bridge_path("/b").env("NODE_PATH", "/user").arg("x");
        let spec = n.spec().expect("spec");
        assert_eq!(spec.protocol_io, ProtocolIo::Fds);
        let args: Vec<_> = spec.args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["--import", "file:///b/node_modules/snakepit-bridge/bootstrap.mjs", "w.mjs", "x"]);
        let np =
            spec.env.iter().find(|(k, _)| k == "NODE_PATH").map(|(_, v)| v.to_string_lossy().into_owned());
        assert!(np.is_some_and(|p| p.starts_with("/b/node_modules:/user")));
    }

    #[test]
    fn file_urls_escape_what_a_url_path_cannot_hold() {
        assert_eq!(file_url(Path::new("/a b/#c%.mjs")), OsString::from("file:///a%20b/%23c%25.mjs"));
    }

    /// The npm package's version is the crates' version.
    #[test]
    fn the_npm_package_version_is_the_crates() {
        let pkg: serde_json::Value =
            serde_json::from_str(include_str!("../node/package.json")).expect("json");
        assert_eq!(pkg["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(pkg["name"], "snakepit-bridge");
    }
}
