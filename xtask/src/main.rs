//! `cargo xtask <task>`: project automation.
//!
//! * `ci`: format check, clippy with `-D warnings`, then every test (cargo-nextest when it is
//!   installed, else `cargo test`). What `.ci/run` runs.
//! * `test`: only the tests.

use std::process::{Command, ExitCode};
use std::time::Instant;

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run(name: &str, mut cmd: Command) -> Result<(), String> {
    eprintln!("==> {name}: {cmd:?}");
    let start = Instant::now();
    let status = cmd.status().map_err(|e| format!("{name}: cannot run: {e}"))?;
    eprintln!("<== {name}: {status} in {:.1}s", start.elapsed().as_secs_f64());
    if status.success() {
        Ok(())
    } else {
        Err(format!("{name} failed ({status})"))
    }
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn test() -> Result<(), String> {
    if has_nextest() {
        let mut c = cargo();
        c.args(["nextest", "run", "--workspace", "--all-targets", "--no-fail-fast"]);
        if std::env::var_os("CI").is_some() {
            c.args(["--profile", "ci"]);
        }
        // nextest does not run doctests; run them first so that nextest's summary closes the log.
        let mut d = cargo();
        d.args(["test", "--workspace", "--doc", "--quiet"]);
        run("doctests", d)?;
        run("nextest", c)
    } else {
        let mut c = cargo();
        c.args(["test", "--workspace", "--all-targets", "--no-fail-fast"]);
        run("cargo test", c)
    }
}

fn ci() -> Result<(), String> {
    let start = Instant::now();
    let mut c = cargo();
    c.args(["fmt", "--all", "--", "--check"]);
    run("fmt", c)?;
    let mut c = cargo();
    c.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    run("clippy", c)?;
    let mut c = cargo();
    c.args(["clippy", "-p", "snakepit", "--no-default-features", "--", "-D", "warnings"]);
    run("clippy (facade, no default features)", c)?;
    test()?;
    eprintln!("ci: all green in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let r = match task.as_str() {
        "ci" => ci(),
        "test" => test(),
        _ => {
            eprintln!("usage: cargo xtask <ci|test>");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
