//! `snakepit conform` against real workers: the Python showcase (stdio, gRPC, zygote), the Node
//! showcase (stdio, gRPC), a Perl worker written from `docs/protocol.md` alone (stdio), a worker that
//! never answers, and the usage errors.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

#[path = "../../tests/src/procs.rs"]
#[allow(dead_code, unreachable_pub)]
mod procs;

/// The workspace root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `snakepit conform ARGS` to its end; every process it started is reaped (and the test
/// fails if one outlives it).
fn conform(args: &[&str]) -> (Output, String) {
    conform_env(args, &[])
}

/// [`conform`] with extra environment variables.
#[allow(clippy::disallowed_methods)] // runs the CLI binary under test
fn conform_env(args: &[&str], env: &[(&str, PathBuf)]) -> (Output, String) {
    let marker = procs::new_marker();
    let out = Command::new(env!("CARGO_BIN_EXE_snakepit"))
        .arg("conform")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(procs::MARKER_VAR, &marker)
        .env("SNAKEPIT_LOG", "error")
        .output()
        .expect("run snakepit conform");
    let left = procs::wait_none_left(&marker, Duration::from_secs(5));
    procs::kill_marked(&marker);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

/// Asserts a clean pass: exit 0, no FAIL line, and the summary line last. Returns the SKIP
/// lines.
fn passes(args: &[&str]) -> Vec<String> {
    passes_env(args, &[])
}

fn passes_env(args: &[&str], env: &[(&str, PathBuf)]) -> Vec<String> {
    let t = Instant::now();
    let (out, stdout) = conform_env(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: exit {:?}\n{stdout}\nstderr:\n{stderr}", out.status);
    assert!(!stdout.contains("FAIL"), "{args:?}:\n{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.contains(" passed, 0 failed"), "{args:?}: last line {last:?}");
    assert!(t.elapsed() < Duration::from_secs(60), "{args:?}: took {:?}", t.elapsed());
    stdout.lines().filter(|l| l.starts_with("SKIP")).map(String::from).collect()
}

fn venv_python() -> String {
    root().join(".venv/bin/python").to_string_lossy().into_owned()
}

#[test]
fn the_python_showcase_passes_every_behaviour_over_stdio() {
    let skipped = passes(&["--module", "snakepit_bridge.showcase"]);
    assert!(skipped.is_empty(), "{skipped:?}");
}

#[test]
fn the_python_showcase_passes_over_grpc() {
    let skipped =
        passes(&["--module", "snakepit_bridge.showcase", "--transport", "grpc", "--python", &venv_python()]);
    // gRPC offers neither an arena nor pipelining.
    assert!(skipped.iter().all(|l| l.contains("shared_memory") || l.contains("pipeline")), "{skipped:?}");
}

#[test]
fn the_python_showcase_passes_with_a_zygote() {
    let skipped = passes(&["--module", "snakepit_bridge.showcase", "--zygote"]);
    assert!(skipped.is_empty(), "{skipped:?}");
}

#[test]
fn the_node_showcase_passes_over_stdio() {
    let script = root().join("snakepit-adapters/node/showcase.js");
    let skipped = passes(&["--script", &script.to_string_lossy()]);
    // Node has no mmap: no shared memory.
    assert!(skipped.iter().all(|l| l.contains("shared_memory")), "{skipped:?}");
}

/// Node over gRPC needs `@grpc/grpc-js` and `@grpc/proto-loader` (`npm ci` in
/// snakepit-adapters/node, which `cargo xtask setup` runs); without them the test says so, and
/// fails under `CI=true`.
#[test]
fn the_node_showcase_passes_over_grpc() {
    let modules = root().join("snakepit-adapters/node/node_modules");
    if !modules.join("@grpc/grpc-js").is_dir() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} has no @grpc/grpc-js: run `cargo xtask setup`",
            modules.display()
        );
        eprintln!("SKIP: {} has no @grpc/grpc-js (run `cargo xtask setup`)", modules.display());
        return;
    }
    let script = root().join("snakepit-adapters/node/showcase.js");
    let skipped = passes_env(
        &["--script", &script.to_string_lossy(), "--transport", "grpc"],
        &[("SNAKEPIT_NODE_PATH", modules)],
    );
    assert!(skipped.iter().all(|l| l.contains("shared_memory") || l.contains("pipeline")), "{skipped:?}");
}

#[test]
fn a_perl_worker_written_from_the_protocol_document_passes_over_stdio() {
    let script = root().join("tests/workers/protocol_only.pl");
    let skipped = passes(&["--command", &format!("perl '{}'", script.display())]);
    assert!(
        skipped
            .iter()
            .all(|l| ["binary_segments", "shared_memory", "pipeline"].iter().any(|c| l.contains(c))),
        "{skipped:?}"
    );
}

#[test]
fn a_worker_that_never_answers_fails_the_handshake_and_the_run_ends() {
    let t = Instant::now();
    let (out, stdout) = conform(&["--command", "sleep 600", "--handshake-timeout-ms", "500"]);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines: Vec<_> = stdout.lines().collect();
    assert!(lines[0].starts_with("FAIL handshake: "), "{stdout}");
    assert_eq!(lines.last().copied(), Some("0 passed, 1 failed"), "{stdout}");
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
}

#[test]
fn usage_errors_exit_2() {
    let (out, _) = conform(&["--script", "w.js", "--zygote"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("zygote start mode is not supported for Node workers"), "{stderr}");
    let (out, _) = conform(&["--command", "perl 'open"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unbalanced quotes"));
}
