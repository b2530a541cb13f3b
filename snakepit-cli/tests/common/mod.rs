//! What the CLI's test files share: the guard of a test's processes and the binary under test.

#![allow(dead_code)]

use std::process::Command;
use std::time::Duration;

#[path = "../../../tests/src/procs.rs"]
#[allow(dead_code, unreachable_pub)]
pub(crate) mod procs;

pub(crate) mod remote;

/// A scratch directory and the marker of this test's processes: on drop, none may be left
/// (they are killed, and the test fails unless it is failing already).
pub(crate) struct Guard(pub(crate) String, pub(crate) tempfile::TempDir);

impl Guard {
    pub(crate) fn new() -> Self {
        Guard(procs::new_marker(), tempfile::tempdir().expect("tempdir"))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let left = procs::wait_none_left(&self.0, Duration::from_secs(5));
        procs::kill_marked(&self.0);
        if !left.is_empty() && !std::thread::panicking() {
            panic!("processes left behind: {left:?}");
        }
    }
}

/// The binary under test: this package's, or `$SNAKEPIT_CLI_BIN` (to show that a regression
/// test fails on an older build), with `marker` on its workers and warnings only on stderr.
#[allow(clippy::disallowed_methods)] // runs the CLI binary under test
pub(crate) fn snakepit(marker: &str) -> Command {
    let bin = std::env::var_os("SNAKEPIT_CLI_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_snakepit").into());
    let mut c = Command::new(bin);
    c.env(procs::MARKER_VAR, marker).env("SNAKEPIT_LOG", "warn");
    c
}
