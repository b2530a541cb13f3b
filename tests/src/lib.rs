//! Helpers for snakepit's integration tests: every test tags its workers with a marker in their
//! environment, and a [`Reaper`] guard proves none of them outlives the test (and kills them if
//! a test fails before it can clean up).

#![deny(unsafe_code)]
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snakepit::{Pool, PoolBuilder};

pub mod procs;
pub mod redis;

/// The repository's `.venv` python (grpcio, numpy, orjson), which `cargo xtask setup` creates
/// (`cargo xtask ci` runs it); a clear failure when it is missing.
pub fn venv_python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(p.exists(), "{} is missing: run `cargo xtask setup` (cargo xtask ci does)", p.display());
    p
}

/// Guards one test's processes. Declare it first so it drops last.
#[derive(Debug)]
pub struct Reaper {
    pub marker: String,
    dir: tempfile::TempDir,
}

impl Default for Reaper {
    fn default() -> Self {
        Self::new()
    }
}

impl Reaper {
    pub fn new() -> Self {
        Reaper { marker: procs::new_marker(), dir: tempfile::tempdir().expect("tempdir") }
    }

    /// A pool builder whose workers carry this test's marker.
    pub fn builder(&self) -> PoolBuilder {
        Pool::builder()
            .env(procs::MARKER_VAR, &self.marker)
            .restart_backoff(Duration::from_millis(10), Duration::from_millis(200))
    }

    /// A scratch directory that lives as long as the guard.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a worker script into the scratch directory.
    pub fn script(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write script");
        p
    }

    /// Live processes carrying this test's marker.
    pub fn alive(&self) -> Vec<i32> {
        procs::marked_pids(&self.marker)
    }

    /// Asserts that every marked process is gone within `within`.
    pub fn assert_none_left(&self, within: Duration) {
        let left = procs::wait_none_left(&self.marker, within);
        assert!(left.is_empty(), "processes left behind: {left:?}");
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let left = procs::wait_none_left(&self.marker, Duration::from_secs(5));
        procs::kill_marked(&self.marker);
        if !left.is_empty() && !std::thread::panicking() {
            panic!("processes left behind by the test: {left:?}");
        }
    }
}

/// A worker script with plain `@tool` functions.
pub const ADD_SCRIPT: &str = r#"
from snakepit_bridge import tool, serve

@tool
def add(a, b):
    return a + b

if __name__ == "__main__":
    serve()
"#;

/// Waits (bounded by `within`) until `path` exists, e.g. a marker a tool creates once it runs.
/// Returns whether it appeared.
pub async fn wait_for_file(path: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}
