//! Tools the tests need from Debian (`node`, `ruby`, `redis-server`): installed with apt when missing and
//! xtask runs as root, else a clear message of what to install.

use std::process::Command;

use crate::run;

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Installs `packages` with apt (after `apt-get update`) when run as root on a system with
/// apt; does nothing otherwise (the caller then reports what is missing).
pub(crate) fn install(packages: &[&str]) -> Result<(), String> {
    if !is_root() || Command::new("apt-get").arg("--version").output().is_err() {
        return Ok(());
    }
    let mut c = Command::new("apt-get");
    c.args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive");
    run("apt-get update", c)?;
    let mut c = Command::new("apt-get");
    c.args(["install", "-y", "-q"]).args(packages).env("DEBIAN_FRONTEND", "noninteractive");
    run(&format!("apt-get install {}", packages.join(" ")), c)
}

/// Whether `program --version` runs.
pub(crate) fn runs(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// `program` from Debian package `package` when missing and run as root; still missing, it
/// fails under `CI=true`, else it is a warning naming what `needs` it.
fn ensure(program: &str, package: &str, needs: &str) -> Result<(), String> {
    if !runs(program) {
        install(&[package])?;
    }
    match (runs(program), std::env::var_os("CI").is_some()) {
        (true, _) => Ok(()),
        (false, true) => Err(format!("no `{program}`: install it (Debian: apt-get install {package})")),
        (false, false) => {
            eprintln!("setup: no `{program}` (apt-get install {package}): {needs} will fail or skip");
            Ok(())
        }
    }
}

/// `redis-server`, for the shared-session tests (the harness starts its own on a Unix socket
/// in a temporary directory).
pub(crate) fn ensure_redis() -> Result<(), String> {
    ensure("redis-server", "redis-server", "the Redis session tests")
}

/// Ruby, for the snakepit-v0 tests (the original Snakepit's Ruby bridge).
pub(crate) fn ensure_ruby() -> Result<(), String> {
    ensure("ruby", "ruby", "the snakepit-v0 Ruby tests")
}
