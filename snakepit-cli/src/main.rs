//! The `snakepit` command-line tool (the `snakepit-cli` package): `demo`, `serve`, `call`, `reap`
//! and `bench`, built on the `snakepit` library.

#![deny(unsafe_code)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use snakepit::{CallOptions, Payload, Pool, Python};

mod bench;
mod demo;

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
    Serve {
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        transport: TransportArgs,
        /// Number of workers (default: CPU count).
        #[arg(long)]
        size: Option<usize>,
        /// Pool instance name: a restart reaps what a SIGKILLed previous run of it left behind.
        #[arg(long)]
        instance: Option<String>,
    },
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
        /// Its arguments as JSON (default: null).
        #[arg(default_value = "null")]
        args: String,
        /// Timeout in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct WorkerArgs {
    /// A Python worker script.
    #[arg(long)]
    script: Option<PathBuf>,
    /// An importable Python worker module (e.g. snakepit_bridge.showcase).
    #[arg(long)]
    module: Option<String>,
}

/// Which transport the workers speak.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TransportKind {
    /// Framed stdio (no dependencies).
    Stdio,
    /// gRPC over a Unix socket (the worker's python needs grpcio: `cargo xtask setup`).
    Grpc,
}

/// Transport and interpreter options shared by the subcommands.
#[derive(Args, Clone, Debug)]
pub struct TransportArgs {
    /// The transport.
    #[arg(long, value_enum, default_value = "stdio")]
    pub transport: TransportKind,
    /// The Python interpreter (default: $SNAKEPIT_PYTHON, or for gRPC the repository's
    /// .venv/bin/python when it exists, else python3).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Fork the workers from a warm zygote that imported the worker code once.
    #[arg(long)]
    pub zygote: bool,
}

impl TransportArgs {
    /// Applies the options to a builder and its adapter.
    pub fn apply(&self, b: snakepit::PoolBuilder, adapter: Python) -> snakepit::PoolBuilder {
        let venv = PathBuf::from(".venv/bin/python");
        let adapter = match (&self.python, self.transport) {
            (Some(p), _) => adapter.interpreter(p),
            (None, TransportKind::Grpc) if std::env::var_os("SNAKEPIT_PYTHON").is_none() && venv.exists() => {
                adapter.interpreter(venv)
            }
            _ => adapter,
        };
        let b = b.adapter(adapter);
        let b = if self.zygote { b.profile(snakepit::Zygote(snakepit::ProcessProfile)) } else { b };
        match self.transport {
            TransportKind::Stdio => b,
            TransportKind::Grpc => b.transport(snakepit::Grpc::default()),
        }
    }
}

impl WorkerArgs {
    fn adapter(&self) -> Python {
        match (&self.script, &self.module) {
            (Some(s), _) => Python::script(s),
            (None, Some(m)) => Python::module(m),
            (None, None) => Python::showcase(),
        }
    }
}

/// Logs to stderr, filtered by `$SNAKEPIT_LOG` (a `tracing` filter) or else by `default`.
fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SNAKEPIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(match cli.cmd {
        // The demo crashes workers on purpose and reports them in its summary: the pool's
        // warning for each planned exit would only interleave with the progress bar.
        Cmd::Demo(_) => demo::DEFAULT_LOG_FILTER,
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
            Cmd::Serve { worker, transport, size, instance } => {
                serve(worker, transport, size, instance).await
            }
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
    let pool = match transport.apply(Pool::builder(), worker.adapter()).size(1).build().await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}", e.to_json());
            return ExitCode::FAILURE;
        }
    };
    let opts = CallOptions::default().with_timeout(timeout_ms.map(Duration::from_millis));
    let r = pool.execute_with(&command, Payload::from(args), opts).await;
    pool.shutdown().await;
    match r {
        Ok(p) => {
            println!("{}", String::from_utf8_lossy(p.bytes()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", e.to_json());
            ExitCode::FAILURE
        }
    }
}

/// One request line of `snakepit serve`.
#[derive(serde::Deserialize)]
struct LineRequest {
    #[serde(default)]
    id: serde_json::Value,
    command: String,
    #[serde(default)]
    args: serde_json::Value,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    stream: bool,
}

fn error_line(id: &serde_json::Value, e: &serde_json::Value) -> String {
    serde_json::json!({"id": id, "error": e}).to_string()
}

/// One line per chunk `{"id":..,"chunk":..}`, then `{"id":..,"end":true}`, or an error line.
async fn serve_stream(
    pool: &Pool,
    req: LineRequest,
    opts: CallOptions,
    tx: &tokio::sync::mpsc::UnboundedSender<String>,
) {
    use futures::StreamExt;
    let id = req.id.to_string();
    let mut stream = match pool.execute_stream_with(None, &req.command, Payload::from(req.args), opts).await {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(error_line(&req.id, &e.to_json()));
            return;
        }
    };
    while let Some(item) = stream.next().await {
        let line = match item {
            Ok(p) => format!("{{\"id\":{id},\"chunk\":{}}}", String::from_utf8_lossy(p.bytes())),
            Err(e) => {
                let _ = tx.send(error_line(&req.id, &e.to_json()));
                return;
            }
        };
        if tx.send(line).is_err() {
            return;
        }
    }
    let _ = tx.send(format!("{{\"id\":{id},\"end\":true}}"));
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

async fn serve(
    worker: WorkerArgs,
    transport: TransportArgs,
    size: Option<usize>,
    instance: Option<String>,
) -> ExitCode {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut b = transport.apply(Pool::builder(), worker.adapter());
    if let Some(n) = size {
        b = b.size(n);
    }
    if let Some(i) = instance {
        b = b.instance(i);
    }
    let pool = match b.build().await {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("snakepit serve: the pool could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    // One writer: each reply is a whole line, flushed at once.
    let writer = std::thread::spawn(move || {
        let stdout = std::io::stdout();
        while let Some(line) = rx.blocking_recv() {
            let mut out = stdout.lock();
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                break;
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut tasks = tokio::task::JoinSet::new();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("snakepit serve: cannot install the SIGTERM handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l,
            _ = term.recv() => { tracing::info!("SIGTERM: finishing in-flight calls"); break }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: finishing in-flight calls"); break }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let line = match line {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(error_line(
                    &serde_json::Value::Null,
                    &serde_json::json!({"kind": "bad_request", "message": format!("unreadable input: {e}")}),
                ));
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let received = Instant::now();
        let req: LineRequest = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                let id = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("id").cloned())
                    .unwrap_or(serde_json::Value::Null);
                let _ = tx.send(error_line(
                    &id,
                    &serde_json::json!({"kind": "bad_request", "message": format!("malformed request: {e}")}),
                ));
                continue;
            }
        };
        let pool = pool.clone();
        let tx = tx.clone();
        tasks.spawn(async move {
            let opts = CallOptions::default()
                .with_deadline(req.timeout_ms.map(|ms| received + Duration::from_millis(ms)));
            if req.stream || pool.is_stream_tool(&req.command) {
                serve_stream(&pool, req, opts, &tx).await;
                return;
            }
            let line = match pool.execute_with(&req.command, Payload::from(req.args), opts).await {
                Ok(p) => {
                    let id = req.id.to_string();
                    let ok = String::from_utf8_lossy(p.bytes());
                    format!("{{\"id\":{id},\"ok\":{ok}}}")
                }
                Err(e) => error_line(&req.id, &e.to_json()),
            };
            let _ = tx.send(line);
        });
    }
    while tasks.join_next().await.is_some() {}
    drop(tx);
    pool.shutdown().await;
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    ExitCode::SUCCESS
}
