//! The `snakepit` command-line tool (the `snakepit-cli` package): `demo`, `serve`, `call`,
//! `conform`, `reap` and `bench`, built on the `snakepit` library.

#![deny(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use snakepit::{CallOptions, Payload, Pool};

mod agent;
mod b64;
mod bench;
mod conform;
mod demo;
mod serve;
mod worker;

pub(crate) use worker::{TransportArgs, TransportKind, WorkerArgs};

/// Counts allocations (for `snakepit bench`'s allocations-per-call figure); one relaxed atomic
/// add per allocation otherwise.
#[global_allocator]
static ALLOC: bench::CountingAlloc = bench::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "snakepit",
    version,
    about = "Supervised pools of Python workers, driven from the command line"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start 4 showcase workers and run a mixed workload (the main job).
    Demo(demo::DemoArgs),
    /// Serve JSON requests, one per line on stdin, replies one per line on stdout.
    Serve(serve::ServeArgs),
    /// Serve a local pool to remote front ends: gRPC on TCP with mutual TLS.
    Agent(agent::AgentArgs),
    /// Check that a worker (any language) follows protocol v1: one PASS/FAIL/SKIP line per
    /// behaviour (docs/conformance.md).
    Conform(conform::ConformArgs),
    /// Measure snakepit against the raw-pipe floor (also `cargo xtask bench`).
    Bench(bench::BenchArgs),
    /// Kill what SIGKILLed hosts left behind (per the run registry); never touches live hosts.
    Reap {
        /// Only list what would be killed.
        #[arg(long)]
        dry_run: bool,
        /// Only this pool instance.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Run one call and print its JSON result.
    Call {
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        transport: TransportArgs,
        /// The command (tool) to run.
        command: String,
        /// Its arguments as JSON (default: null); `{"$b64": "..."}` anywhere is sent as bytes.
        #[arg(default_value = "null")]
        args: String,
        /// Timeout in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
}

/// Logs to stderr, filtered by `$SNAKEPIT_LOG` (a `tracing` filter) or else by `default`.
fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SNAKEPIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    // `serve --config FILE` names its workers in the file, so there `--script`, `--module` and
    // `--command` are optional.
    let matches = Cli::command()
        .mut_subcommand("serve", |s| s.mut_group("WorkerArgs", |g| g.required(false)))
        .mut_subcommand("agent", |s| s.mut_group("WorkerArgs", |g| g.required(false)))
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let explicit = serve::Explicit::of(matches.subcommand_matches("serve"));
    init_tracing(match cli.cmd {
        // The demo crashes workers on purpose and reports them in its summary: the pool's
        // warning for each planned exit would only interleave with the progress bar.
        Cmd::Demo(_) => demo::DEFAULT_LOG_FILTER,
        // The kit crashes, stops and times out workers on purpose: only errors are news, and
        // the slots' reports of the workers it broke are not.
        Cmd::Conform(_) => "error,snakepit::worker=off,snakepit_supervisor::slot=off",
        _ => "warn",
    });
    if let Cmd::Bench(b) = &cli.cmd {
        // Before the runtime exists: its threads and the workers inherit the affinity.
        if b.pin {
            if let Err(e) = bench::pin_to_cpu0() {
                eprintln!("snakepit bench: cannot pin to CPU 0: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("snakepit: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async move {
        match cli.cmd {
            Cmd::Demo(args) => demo::run(args).await,
            Cmd::Bench(args) => bench::run(args).await,
            Cmd::Serve(args) => serve::run(args, explicit).await,
            Cmd::Agent(args) => agent::run(args).await,
            Cmd::Conform(args) => conform::run(args).await,
            Cmd::Reap { dry_run, instance } => reap(dry_run, instance),
            Cmd::Call { worker, transport, command, args, timeout_ms } => {
                call(worker, transport, command, args, timeout_ms).await
            }
        }
    });
    // A blocking read of stdin may still be parked on a runtime thread (serve stopped by a
    // signal while its input stays open): do not wait for it.
    rt.shutdown_background();
    code
}

async fn call(
    worker: WorkerArgs,
    transport: TransportArgs,
    command: String,
    args: String,
    timeout_ms: Option<u64>,
) -> ExitCode {
    let args: serde_json::Value = match serde_json::from_str(&args) {
        Ok(v) => v,
        Err(e) => {
            let err = serde_json::json!({"kind": "bad_request", "message": format!("ARGS is not JSON: {e}")});
            eprintln!("{err}");
            return ExitCode::FAILURE;
        }
    };
    let b = match worker.source().and_then(|s| transport.apply(Pool::builder(), s)) {
        Ok(b) => b,
        Err(m) => {
            eprintln!("snakepit call: {m}");
            return ExitCode::from(2);
        }
    };
    let pool = match b.size(1).build().await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}", e.to_json());
            return ExitCode::FAILURE;
        }
    };
    let opts = CallOptions::default().with_timeout(timeout_ms.map(Duration::from_millis));
    // `{"$b64": ...}` in ARGS are sent as bytes, and bytes in the result printed that way.
    let r = match b64::decode_args(Payload::from(args)) {
        Ok(args) => pool.execute_with(&command, args, opts).await.map_err(|e| e.to_json()),
        Err(m) => Err(serde_json::json!({"kind": "bad_request", "message": m})),
    };
    pool.shutdown().await;
    let r = r.and_then(|p| {
        b64::encode_result(p).map_err(|m| serde_json::json!({"kind": "protocol", "message": m}))
    });
    match r {
        Ok(p) => {
            println!("{}", String::from_utf8_lossy(p.bytes()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn reap(dry_run: bool, instance: Option<String>) -> ExitCode {
    let dir = snakepit::supervisor::registry::run_dir();
    let r = match snakepit::supervisor::registry::reap(&dir, instance.as_deref(), dry_run) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("snakepit reap: cannot use the run directory {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    let verb = if dry_run { "would kill" } else { "killed" };
    for run in &r.runs {
        println!("dead host {} (instance {:?}, run {})", run.host_pid, run.instance, run.run_id);
    }
    for pid in &r.pids {
        println!("{verb} {pid}");
    }
    for d in &r.dirs {
        println!("{} {}", if dry_run { "would remove" } else { "removed" }, d.display());
    }
    println!("{} dead run(s) in {}, {} process(es) {verb}", r.runs.len(), dir.display(), r.pids.len());
    ExitCode::SUCCESS
}
