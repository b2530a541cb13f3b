//! `cargo xtask callgrind [--calls N]`: what metrics cost per call, in instructions.
//!
//! Runs the `metrics_cost` example (N sequential calls on one Python worker, current-thread
//! runtime) under `valgrind --tool=callgrind`, without and with a Prometheus recorder, counting
//! only the instructions run inside its measured loop (`--toggle-collect`: start-up, warm-up
//! and the recorder's clock calibration stay out), divided by N: the host's instructions per
//! call (the worker is another process and is not counted). Instruction counts repeat to a
//! fraction of a percent whatever else the machine does; the example also prints allocations
//! per call.

use std::path::Path;
use std::process::Command;

use crate::{cargo, root, run};

/// One run: the main process's instruction count and the example's own line.
fn measure(bin: &Path, metrics: bool, calls: u64) -> Result<(u64, String), String> {
    let dir = tempfile_dir()?;
    #[allow(clippy::disallowed_methods)] // xtask drives tools; no worker is spawned here
    let mut c = Command::new("valgrind");
    c.arg("--tool=callgrind")
        .arg("--toggle-collect=metrics_cost::measured_calls*")
        .arg(format!("--callgrind-out-file={}/callgrind.out.%p", dir.display()))
        .arg(bin)
        .args(["--calls", &calls.to_string()]);
    if metrics {
        c.arg("--metrics");
    }
    let out = c.output().map_err(|e| format!("cannot run valgrind ({e}): apt-get install valgrind"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("metrics_cost under callgrind failed ({}):\n{stderr}", out.status));
    }
    // `==PID== Command: ...` names the main process; forked children report their own totals.
    let pid = stderr
        .lines()
        .find(|l| l.contains("== Command: "))
        .and_then(|l| l.split("==").nth(1))
        .ok_or("no Command line in valgrind's output")?;
    let collected = stderr
        .lines()
        .find(|l| l.starts_with(&format!("=={pid}== Collected : ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.trim().parse().ok())
        .ok_or("no Collected line for the main process")?;
    Ok((collected, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("snakepit-callgrind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

pub(crate) fn callgrind(args: Vec<String>) -> Result<(), String> {
    let calls: u64 = match args.iter().position(|a| a == "--calls") {
        Some(i) => args.get(i + 1).and_then(|n| n.parse().ok()).ok_or("--calls N")?,
        None => 10_000,
    };
    let mut c = cargo();
    c.current_dir(root()).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "snakepit",
        "--example",
        "metrics_cost",
        "--features",
        "prometheus",
    ]);
    run("build metrics_cost", c)?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), Into::into);
    let bin = target.join("release/examples/metrics_cost");
    let mut per_call = Vec::new();
    println!("| metrics | instructions/call | allocations/call |");
    println!("|---|---:|---:|");
    for metrics in [false, true] {
        let (total, line) = measure(&bin, metrics, calls)?;
        let each = total as f64 / calls as f64;
        let allocs = line.rsplit('=').next().unwrap_or("?").to_owned();
        println!("| {} | {each:.0} | {allocs} |", if metrics { "on" } else { "off" });
        per_call.push(each);
    }
    if let [off, on] = per_call[..] {
        println!("\nmetrics on / off: {:.4} ({:+.2} %, {calls} calls)", on / off, (on / off - 1.0) * 100.0);
    }
    Ok(())
}
