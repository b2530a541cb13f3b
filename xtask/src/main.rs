//! `cargo xtask <task>`: project automation.
//!
//! * `ci`: the bridge package's checks (`py`), format check, clippy with `-D warnings` (the workspace, then the `snakepit` facade
//!   alone with no default features, `stdio`, `grpc` and all features), rustdoc with
//!   `-D warnings`, the quick bench, every test (cargo-nextest when it is installed, else
//!   `cargo test`), then two one-minute soaks (default, and pipelined at depth 4). What
//!   `.ci/run` runs.
//! * `test`: only the tests.
//! * `soak [--minutes N] [--size N] [--pipeline-depth N]`: the soak driver (`snakepit-tests`' `soak` binary, in
//!   release mode): a pool of real Python workers under mixed load (sequential and concurrent
//!   calls, streams, host calls, sessions) while crashes, hangs, garbage frames, SIGSTOPs,
//!   chaos kills and recycling by count and memory are injected; fails, naming the violation, if
//!   host RSS or fds grow, a reply is lost, duplicated or misrouted, or a process survives.
//!   `ci` runs it for one minute after the tests, then one more minute pipelined.
//! * `bench [--quick]`: `snakepit bench` (the `snakepit-cli` package) in release mode (table,
//!   `target/bench/bench.json`).
//! * `callgrind [--calls N]`: instructions and allocations per call with metrics off and on
//!   (the `metrics_cost` example under `valgrind --tool=callgrind`).
//! * `setup`: creates `.venv` (the repository's Python virtualenv) with the gRPC transport's
//!   Python dependencies (grpcio, protobuf; grpcio-tools for `proto`) and the bridge package's
//!   test tools (pytest, pytest-timeout, mypy, numpy, pydantic), orjson (the bridge's
//!   optional fast JSON codec) and scikit-learn (the bench's preload rows), pinned, from PyPI;
//!   then makes sure Node 18.19+ is there (as root with apt, it installs Debian's `nodejs` and
//!   `npm` when missing; else a missing Node fails it) and runs `npm ci` in
//!   `snakepit-adapters/node/` (the Node SDK's gRPC packages, from its committed lockfile);
//!   then Ruby (the snakepit-v0 tests), from Debian when missing and run as root.
//!   Idempotent; a package pip or npm cannot install fails it.
//! * `node`: the Node SDK's checks (`node --test` over `snakepit-adapters/node/test/`), after
//!   `setup`'s Node part. `ci` runs it after `py`.
//! * `py [--quick]`: the Python bridge package's checks: `mypy --strict`, its pytest suite (twice:
//!   with orjson, and without it, `SNAKEPIT_BRIDGE_ORJSON=0`), and
//!   (unless `--quick`) `pip install ./snakepit-adapters/python` into a fresh virtualenv with an
//!   import of the public API from `/`. `ci` runs it after `setup`.
//! * `proto [--check]`: regenerates the Python stubs of `proto/` into the bridge and copies the
//!   `.proto` into the Node SDK (the Rust side is generated at build time by protox); `--check`
//!   fails if the committed ones are stale.
//! * `fuzz [--seconds N] [--target T]`: runs the cargo-fuzz targets of `fuzz/` (all of them, or
//!   `T`) for `N` seconds each (default 60), one after the other, installing cargo-fuzz from
//!   crates.io first if it is missing (`cargo install cargo-fuzz --locked`). On the stable
//!   toolchain, without sanitizers (`-s none`: the targets check their own properties, and a
//!   panic is a crash); if that build fails, it is retried with `RUSTC_BOOTSTRAP=1` for the fuzz
//!   build only. libFuzzer grows a working corpus under `<target dir>/fuzz/corpus/<T>` from the
//!   committed `fuzz/corpus/<T>` and `fuzz/regressions/<T>` (which it never writes to); a new
//!   crash is minimised (`cargo fuzz tmin`) into `fuzz/regressions/<T>/`, and the task fails.
//!   The fuzz build uses `<target dir>/fuzz` (`$CARGO_TARGET_DIR`, else `target/`), so its
//!   instrumented artifacts never replace the workspace's. CI does not fuzz: the corpus and the
//!   regressions are replayed by `tests/tests/fuzz_corpus.rs`.

#![deny(unsafe_code)]
// xtask drives cargo, python and pip: starting processes is its whole job.
#![allow(clippy::disallowed_methods)]

use std::process::{Command, ExitCode};
use std::time::Instant;

mod callgrind;
mod debian;
mod node;

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

/// What `.venv` holds: the gRPC transport's packages, and the bridge package's test and type
/// check tools plus the libraries its encoder tests convert (numpy, pydantic), orjson, and
/// scikit-learn with its dependencies (the bench's preload rows: a real model worker). Pinned.
const PY_DEPS: &[&str] = &[
    "grpcio==1.85.1",
    "protobuf==7.36.2",
    "grpcio-tools==1.85.1",
    "pytest==9.2.0",
    "pytest-timeout==2.4.0",
    "mypy==2.4.1",
    "pydantic==2.14.3",
    "numpy==2.4.6",
    "orjson==3.13.0",
    "scikit-learn==1.9.1",
    "scipy==1.17.1",
    "joblib==1.6.0",
    "threadpoolctl==3.8.0",
    "narwhals==2.29.0",
    "cloudpickle==3.1.3",
];

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn venv_python() -> std::path::PathBuf {
    root().join(".venv").join("bin").join("python")
}

fn setup() -> Result<(), String> {
    py_setup()?;
    node::setup()?;
    debian::ensure_ruby()?;
    debian::ensure_redis()
}

fn py_setup() -> Result<(), String> {
    let venv = root().join(".venv");
    let stamp = venv.join(".snakepit-deps");
    let want = PY_DEPS.join(" ");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) && venv_python().exists() {
        eprintln!("setup: .venv is up to date");
        return Ok(());
    }
    let python = std::env::var("SNAKEPIT_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut c = Command::new(&python);
    c.args(["-m", "venv"]).arg(&venv);
    run("venv", c)?;
    let mut c = Command::new(venv_python());
    c.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(PY_DEPS);
    run("pip install", c)?;
    std::fs::write(&stamp, want).map_err(|e| format!("cannot write {}: {e}", stamp.display()))
}

fn bridge_dir() -> std::path::PathBuf {
    root().join("snakepit-adapters").join("python")
}

/// The Python bridge package's own checks: `mypy --strict` and its pytest suite (in-process,
/// with `.venv/bin/python`), then, unless `quick`, `pip install` of the package into a fresh
/// virtualenv and an import of its public API from another directory.
fn py(quick: bool) -> Result<(), String> {
    setup()?;
    let mut c = Command::new(venv_python());
    c.current_dir(bridge_dir()).args(["-m", "mypy"]);
    run("bridge: mypy --strict", c)?;
    let mut c = Command::new(venv_python());
    c.current_dir(bridge_dir()).args(["-m", "pytest"]);
    run("bridge: pytest (with orjson)", c)?;
    // The same results are due without the optional codec.
    let mut c = Command::new(venv_python());
    c.current_dir(bridge_dir()).args(["-m", "pytest"]).env("SNAKEPIT_BRIDGE_ORJSON", "0");
    run("bridge: pytest (without orjson)", c)?;
    if quick {
        return Ok(());
    }
    let tmp = std::env::temp_dir().join(format!("snakepit-bridge-venv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = fresh_install(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// `pip install ./snakepit-adapters/python` into a new virtualenv at `venv`, then imports the
/// package from `/` and checks its version and its typing marker.
fn fresh_install(venv: &std::path::Path) -> Result<(), String> {
    let python = std::env::var("SNAKEPIT_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut c = Command::new(&python);
    c.args(["-m", "venv"]).arg(venv);
    run("bridge: fresh venv", c)?;
    let vpy = venv.join("bin").join("python");
    let mut c = Command::new(&vpy);
    c.current_dir(root()).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "./snakepit-adapters/python",
    ]);
    let installed = run("bridge: pip install ./snakepit-adapters/python", c);
    // setuptools builds in the source tree: leave it as it was.
    let _ = std::fs::remove_dir_all(bridge_dir().join("build"));
    let _ = std::fs::remove_dir_all(bridge_dir().join("snakepit_bridge.egg-info"));
    installed?;
    let check = format!(
        "import importlib.resources, snakepit_bridge\n\
         from snakepit_bridge import tool, serve, BaseAdapter\n\
         from snakepit_bridge.testing import FakeHost\n\
         assert snakepit_bridge.__version__ == {v:?}, snakepit_bridge.__version__\n\
         assert importlib.resources.files('snakepit_bridge').joinpath('py.typed').is_file()\n\
         assert importlib.resources.files('snakepit_bridge').joinpath('_proto/snakepit/v1/snakepit_pb2.py').is_file()\n\
         assert 'site-packages' in snakepit_bridge.__file__, snakepit_bridge.__file__\n\
         print('snakepit_bridge', snakepit_bridge.__version__, 'from', snakepit_bridge.__file__)\n",
        v = env!("CARGO_PKG_VERSION")
    );
    let mut c = Command::new(&vpy);
    c.current_dir("/").args(["-c", &check]);
    run("bridge: import the installed package", c)
}

fn proto(check: bool) -> Result<(), String> {
    setup()?;
    let out_dir = root().join("snakepit-adapters/python/snakepit_bridge/_proto");
    let tmp = std::env::temp_dir().join(format!("snakepit-proto-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let mut c = Command::new(venv_python());
    c.current_dir(root()).args(["-m", "grpc_tools.protoc", "-I", "proto"]);
    c.arg(format!("--python_out={}", tmp.display())).arg(format!("--grpc_python_out={}", tmp.display()));
    c.arg("proto/snakepit/v1/snakepit.proto");
    run("protoc (python)", c)?;
    let mut stale = Vec::new();
    // The Node SDK ships the .proto itself (its gRPC mode loads it with @grpc/proto-loader).
    let node_copy = root().join("snakepit-adapters/node/proto/snakepit/v1/snakepit.proto");
    let source = std::fs::read(root().join("proto/snakepit/v1/snakepit.proto")).map_err(|e| e.to_string())?;
    if std::fs::read(&node_copy).ok().as_ref() != Some(&source) {
        stale.push("node/proto/snakepit/v1/snakepit.proto");
        if !check {
            std::fs::create_dir_all(node_copy.parent().unwrap_or(&node_copy)).map_err(|e| e.to_string())?;
            std::fs::write(&node_copy, &source).map_err(|e| e.to_string())?;
        }
    }
    for f in ["snakepit/v1/snakepit_pb2.py", "snakepit/v1/snakepit_pb2_grpc.py"] {
        let new = std::fs::read(tmp.join(f)).map_err(|e| e.to_string())?;
        let old = std::fs::read(out_dir.join(f)).unwrap_or_default();
        if new != old {
            stale.push(f);
            if !check {
                std::fs::create_dir_all(out_dir.join("snakepit/v1")).map_err(|e| e.to_string())?;
                std::fs::write(out_dir.join(f), new).map_err(|e| e.to_string())?;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    match (check, stale.is_empty()) {
        (true, false) => Err(format!("generated files are stale ({stale:?}): run `cargo xtask proto`")),
        (false, false) => {
            eprintln!("proto: regenerated {stale:?}");
            Ok(())
        }
        _ => {
            eprintln!("proto: Python stubs and the Node SDK's copy are current");
            Ok(())
        }
    }
}

/// Runs `snakepit bench` unpinned, then pinned to one CPU (unless `--pin` or `--no-pin` is given).
fn bench(extra: Vec<String>) -> Result<(), String> {
    let explicit = extra.iter().any(|a| a == "--pin" || a == "--no-pin");
    let extra: Vec<String> = extra.into_iter().filter(|a| a != "--no-pin").collect();
    let mut runs = vec![extra.clone()];
    if !explicit {
        let mut pinned = extra;
        pinned.push("--pin".into());
        runs.push(pinned);
    }
    for args in runs {
        let mut c = cargo();
        c.current_dir(root())
            .args(["run", "--release", "--quiet", "-p", "snakepit-cli", "--", "bench"])
            .args(&args);
        run("bench", c)?;
    }
    Ok(())
}

/// Runs the soak driver in release mode with `args` (`--minutes N`, `--size N`,
/// `--pipeline-depth N`).
fn soak(args: Vec<String>) -> Result<(), String> {
    let mut c = cargo();
    c.current_dir(root())
        .args(["run", "--release", "--quiet", "-p", "snakepit-tests", "--bin", "soak", "--"])
        .args(&args);
    run("soak", c)
}

/// Feature combinations of the `snakepit` facade that `ci` lints on their own.
const FACADE_FEATURE_SETS: &[&[&str]] = &[
    &["--no-default-features"],
    &["--no-default-features", "--features", "stdio"],
    // gRPC without the Python adapter.
    &["--no-default-features", "--features", "grpc"],
    // Node without Python.
    &["--no-default-features", "--features", "stdio,node"],
    // Configuration and the Prometheus exporter on their own.
    &["--no-default-features", "--features", "config"],
    &["--no-default-features", "--features", "prometheus"],
    &["--no-default-features", "--features", "redis"],
    // Remote workers and the agent side, without any local transport.
    &["--no-default-features", "--features", "remote"],
    &["--no-default-features", "--features", "remote,config"],
    &["--all-features"],
];

fn ci() -> Result<(), String> {
    let start = Instant::now();
    setup()?;
    proto(true)?;
    py(false)?;
    node::check()?;
    let mut c = cargo();
    c.args(["fmt", "--all", "--", "--check"]);
    run("fmt", c)?;
    let mut c = cargo();
    c.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    run("clippy", c)?;
    // The facade's documented feature combinations: the workspace run above checks the facade
    // only once, with the union of the features its dependents enable.
    for features in FACADE_FEATURE_SETS {
        let mut c = cargo();
        c.args(["clippy", "-p", "snakepit"]).args(*features).args(["--", "-D", "warnings"]);
        run(&format!("clippy (facade, {})", features.join(" ")), c)?;
    }
    // Rustdoc: broken intra-doc links and other doc warnings fail the run.
    let mut c = cargo();
    c.args(["doc", "--workspace", "--no-deps", "--quiet"]).env("RUSTDOCFLAGS", "-D warnings");
    run("rustdoc", c)?;
    // A smoke run of the benchmarks (quick mode only), before the tests so that the test
    // runner's summary closes the log.
    bench(vec!["--quick".into()])?;
    test()?;
    // The soak is its own step, not a test: it needs the machine to itself for its RSS and fd
    // checks, and a release build.
    soak(vec!["--minutes".into(), "1".into()])?;
    // Again with pipelined workers: the same faults with calls queued in the workers.
    soak(vec!["--minutes".into(), "1".into(), "--pipeline-depth".into(), "4".into()])?;
    eprintln!("ci: all green in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// The cargo-fuzz targets of `fuzz/`.
const FUZZ_TARGETS: &[&str] = &["worker_output", "serve_lines", "zygote_control", "v0_output"];

fn fuzz_dir() -> std::path::PathBuf {
    root().join("fuzz")
}

/// `cargo fuzz` with the fuzz build's own target directory (and `RUSTC_BOOTSTRAP=1` if asked).
fn cargo_fuzz(bootstrap: bool) -> Command {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), Into::into);
    let mut c = cargo();
    c.current_dir(fuzz_dir()).arg("fuzz").env("CARGO_TARGET_DIR", target.join("fuzz"));
    if bootstrap {
        c.env("RUSTC_BOOTSTRAP", "1");
    }
    c
}

/// The files in `dir` (none if it does not exist).
fn files_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn fuzz(args: Vec<String>) -> Result<(), String> {
    let mut seconds = 60u64;
    let mut only = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it.next().and_then(|s| s.parse().ok()).ok_or("--seconds takes a number")?;
            }
            "--target" => only = Some(it.next().ok_or("--target takes a target name")?),
            other => return Err(format!("fuzz: unknown argument `{other}`")),
        }
    }
    let targets: Vec<&str> = match &only {
        Some(t) if FUZZ_TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => return Err(format!("fuzz: unknown target `{t}` (targets: {})", FUZZ_TARGETS.join(", "))),
        None => FUZZ_TARGETS.to_vec(),
    };
    let installed = cargo()
        .args(["fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        let mut c = cargo();
        c.args(["install", "cargo-fuzz", "--locked"]);
        run("install cargo-fuzz", c)?;
    }
    // Sanitizer-free builds work on stable; nightly-only flags would need the bootstrap escape.
    let mut bootstrap = false;
    let mut c = cargo_fuzz(false);
    c.args(["build", "-s", "none"]);
    if let Err(e) = run("fuzz build", c) {
        eprintln!("fuzz: {e}; retrying with RUSTC_BOOTSTRAP=1 (fuzz build only)");
        bootstrap = true;
        let mut c = cargo_fuzz(true);
        c.args(["build", "-s", "none"]);
        run("fuzz build (RUSTC_BOOTSTRAP=1)", c)?;
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), Into::into);
    let mut crashed = Vec::new();
    for t in targets {
        let work = target_dir.join("fuzz").join("corpus").join(t);
        std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
        let artifacts = fuzz_dir().join("artifacts").join(t);
        let before = files_in(&artifacts);
        let mut c = cargo_fuzz(bootstrap);
        c.args(["run", "-s", "none", t])
            .arg(&work)
            .arg(fuzz_dir().join("corpus").join(t))
            .arg(fuzz_dir().join("regressions").join(t))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]);
        if run(&format!("fuzz {t} ({seconds} s)"), c).is_ok() {
            continue;
        }
        let new: Vec<_> = files_in(&artifacts).into_iter().filter(|p| !before.contains(p)).collect();
        if new.is_empty() {
            return Err(format!("fuzz {t}: cargo fuzz failed without leaving a crash"));
        }
        for crash in new {
            let name = crash.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let before_tmin = files_in(&artifacts);
            let mut c = cargo_fuzz(bootstrap);
            c.args(["tmin", "-s", "none", t]).arg(&crash).args(["--", "-timeout=10", "-rss_limit_mb=2048"]);
            // tmin exits non-zero when the input still crashes, which is what we want.
            let _ = run(&format!("tmin {t} {name}"), c);
            let minimised = files_in(&artifacts)
                .into_iter()
                .filter(|p| !before_tmin.contains(p))
                .min_by_key(|p| std::fs::metadata(p).map_or(u64::MAX, |m| m.len()))
                .unwrap_or_else(|| crash.clone());
            let dest_dir = fuzz_dir().join("regressions").join(t);
            std::fs::create_dir_all(&dest_dir).map_err(|e| e.to_string())?;
            let dest = dest_dir.join(&name);
            std::fs::copy(&minimised, &dest)
                .map_err(|e| format!("cannot copy to {}: {e}", dest.display()))?;
            eprintln!("fuzz {t}: crash minimised into {}", dest.display());
            crashed.push(dest);
        }
    }
    if crashed.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzz: new crashes (fix them; each stays as a regression input): {crashed:?}"))
    }
}

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let r = match task.as_str() {
        "ci" => ci(),
        "test" => test(),
        "setup" => setup(),
        "bench" => bench(std::env::args().skip(2).collect()),
        "soak" => soak(std::env::args().skip(2).collect()),
        "callgrind" => callgrind::callgrind(std::env::args().skip(2).collect()),
        "proto" => proto(std::env::args().any(|a| a == "--check")),
        "py" => py(std::env::args().any(|a| a == "--quick")),
        "node" => node::check(),
        "fuzz" => fuzz(std::env::args().skip(2).collect()),
        _ => {
            eprintln!(
                "usage: cargo xtask <ci|test|setup|py [--quick]|node|proto [--check]|bench [--quick]|soak [--minutes N]|callgrind [--calls N]|fuzz [--seconds N] [--target T]>"
            );
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
