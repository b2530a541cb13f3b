//! The Node SDK (`snakepit-adapters/node/`): Node itself, its gRPC packages (`npm ci`), and its
//! own test suite (`node --test`).

use std::process::Command;

use crate::{root, run};

/// The oldest Node the SDK supports (`module.register`).
const MIN_NODE: (u32, u32) = (18, 19);

fn sdk_dir() -> std::path::PathBuf {
    root().join("snakepit-adapters").join("node")
}

/// The `node` to use: `$SNAKEPIT_NODE`, else `node` on `PATH`.
fn node() -> String {
    std::env::var("SNAKEPIT_NODE").unwrap_or_else(|_| "node".into())
}

/// Node's version, if it runs.
fn node_version() -> Option<(u32, u32)> {
    let out = Command::new(node()).arg("--version").output().ok()?;
    let v = String::from_utf8_lossy(&out.stdout);
    let mut parts = v.trim().trim_start_matches('v').split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// Makes sure Node (and npm) are there: installed from Debian (`nodejs`, `npm`) when missing
/// and run as root; otherwise a missing or too old Node fails with what to install.
fn ensure_node() -> Result<(), String> {
    if node_version().is_none() {
        crate::debian::install(&["nodejs", "npm"])?;
    }
    match node_version() {
        Some(v) if v >= MIN_NODE => Ok(()),
        Some((a, b)) => Err(format!(
            "Node {a}.{b} is too old for the Node SDK: it needs {}.{}+ (set $SNAKEPIT_NODE)",
            MIN_NODE.0, MIN_NODE.1
        )),
        None => Err(format!(
            "no `{}`: install Node.js {}.{}+ and npm (Debian: apt-get install nodejs npm)",
            node(),
            MIN_NODE.0,
            MIN_NODE.1
        )),
    }
}

/// Node, and the SDK's gRPC packages in `snakepit-adapters/node/node_modules` from its
/// committed lockfile (`npm ci`), skipped when the lockfile has not changed since the last run.
pub(crate) fn setup() -> Result<(), String> {
    ensure_node()?;
    let lock = sdk_dir().join("package-lock.json");
    let Ok(want) = std::fs::read(&lock) else {
        return Ok(()); // no dependencies to install
    };
    let stamp = sdk_dir().join("node_modules").join(".snakepit-lock");
    if std::fs::read(&stamp).is_ok_and(|s| s == want) {
        eprintln!("setup: snakepit-adapters/node/node_modules is up to date");
        return Ok(());
    }
    let mut c = Command::new("npm");
    c.current_dir(sdk_dir()).args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
    run("npm ci (snakepit-adapters/node)", c)?;
    std::fs::write(&stamp, want).map_err(|e| format!("cannot write {}: {e}", stamp.display()))
}

/// The SDK's own tests: `node --test` over `snakepit-adapters/node/test/`.
pub(crate) fn check() -> Result<(), String> {
    setup()?;
    let mut c = Command::new(node());
    c.current_dir(sdk_dir()).args(["--test", "test/"]);
    run("node SDK: node --test", c)
}
