//! `snakepit serve`: JSON requests one per line on stdin, replies one per line on stdout (in
//! completion order).
//!
//! Everything it holds is bounded. At most `max_queue + size` requests (what the pool can run
//! or queue) are admitted at once: without a free admission, stdin is not read, so `serve`
//! never refuses a request with `pool_saturated` because it read ahead. A request line is at
//! most the transport's frame limit plus 64 KiB; a longer one is answered `bad_request` and
//! discarded as it is read ([`input`]). Replies wait for stdout in a bounded queue
//! ([`output`]): when nobody reads stdout, the admitted requests wait to hand over their reply,
//! and a stream stops pulling items, so its worker runs out of credit and waits too.
//!
//! Ending: at the end of stdin, every admitted request finishes or reaches its own deadline
//! (`timeout_ms`, else `--default-timeout-ms`). On the first SIGTERM or SIGINT, `serve` stops
//! reading, gives running requests `--shutdown-grace-ms`, fails the rest with `shutting_down`,
//! stops the workers and exits 0; a second signal exits at once (143 or 130), and the workers'
//! shepherds kill them as the host's lifelines close.
//!
//! `--config FILE` takes the pool's settings and worker from a configuration file
//! ([`config`]); the options given on the command line override it.

mod config;
mod input;
mod json;
mod output;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use snakepit::core::Transport;
use snakepit::{CallOptions, Error, Pool};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

pub(crate) use self::config::Explicit;
use self::input::{Line, LineReader};
use self::json::{parse, Request};
use self::output::{Id, Out};
use crate::{TransportArgs, TransportKind, WorkerArgs};

/// The `serve` subcommand's options.
#[derive(clap::Args, Clone)]
pub(crate) struct ServeArgs {
    /// A configuration file (TOML, documented by snakepit.example.toml): the pool's settings
    /// and its `[worker]`, with `SNAKEPIT_CFG_*` variables over the file and these options over
    /// both (an option with a default only when given). Without it, no variable is read.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// With a --config file of several `[pools.NAME]` tables: the pool to serve.
    #[arg(long, value_name = "NAME", requires = "config")]
    pool: Option<String>,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    transport: TransportArgs,
    /// Number of workers (default: CPU count).
    #[arg(long, value_parser = at_least_one)]
    size: Option<usize>,
    /// Pool instance name: a restart reaps what a SIGKILLed previous run of it left behind.
    #[arg(long)]
    instance: Option<String>,
    /// Most requests waiting for a worker; `serve` admits this many plus one per worker, and
    /// reads no further until one is answered.
    #[arg(long, default_value_t = 1000)]
    max_queue: usize,
    /// Timeout of a request without `timeout_ms` (default: none).
    #[arg(long, value_name = "MS")]
    default_timeout_ms: Option<u64>,
    /// Longest a request may run on its worker, whatever its timeout: it then fails with
    /// `timeout` and its worker is replaced unless it answers the cancel within 2 s (default:
    /// none).
    #[arg(long, value_name = "MS")]
    max_call_time_ms: Option<u64>,
    /// On SIGTERM/SIGINT: how long running requests may take to finish before they fail with
    /// `shutting_down` (a --config file's `shutdown_grace` is each step of stopping a worker).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    shutdown_grace_ms: u64,
    /// A request whose `"session"` does not exist creates it (else it fails with
    /// `session_not_found`).
    #[arg(long)]
    create_sessions_on_use: bool,
    /// Serves Prometheus metrics at `http://ADDR/metrics` (port 0: a free port; the address is
    /// printed on stderr as `metrics: http://ADDR/metrics`). An address that cannot be bound
    /// makes `serve` exit 1 before it starts its workers.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Keeps sessions in Redis, shared with other `serve` processes on it:
    /// `redis://HOST:PORT/DB` or `redis+unix:///path/redis.sock` (default: in memory).
    #[arg(long, value_name = "URL")]
    session_store: Option<String>,
    /// Workers on remote agents (`snakepit agent`) instead of --script/--module/--command:
    /// `https://HOST:PORT` URLs, comma-separated (a DNS name may stand for several agents; it
    /// is resolved again every 10 s). Without --size, the pool has the agents' workers.
    #[arg(long, value_delimiter = ',', value_name = "URL,...", conflicts_with_all = ["script", "module", "worker_command", "config"])]
    remote: Vec<String>,
    /// With --remote: the agents' CA (PEM).
    #[arg(long, value_name = "PEM", requires = "remote")]
    tls_ca: Option<std::path::PathBuf>,
    /// With --remote: this front end's client certificate (PEM).
    #[arg(long, value_name = "PEM", requires = "remote")]
    tls_cert: Option<std::path::PathBuf>,
    /// With --remote: its private key (PEM).
    #[arg(long, value_name = "PEM", requires = "remote")]
    tls_key: Option<std::path::PathBuf>,
    /// With --remote: allows `http://` agent URLs, on loopback addresses only.
    #[arg(long, requires = "remote")]
    insecure_plaintext: bool,
}

/// A count of at least 1.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// How the read loop ended.
enum End {
    /// The end of stdin (or an unreadable stdin).
    Eof,
    /// The first SIGTERM or SIGINT.
    Signal,
}

pub(crate) async fn run(a: ServeArgs, explicit: Explicit) -> ExitCode {
    // Installed first, so a signal during start-up already takes the graceful path.
    let (stop_tx, mut stop) = watch::channel(false);
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => {
            tokio::spawn(watch_signals(term, int, stop_tx));
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("snakepit serve: cannot install the signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    }
    let plan = match &a.config {
        Some(file) => config::plan(&a, &explicit, file),
        None => plan(&a),
    };
    let Plan { builder, mut admitted, max_frame, grace, size_known } = match plan {
        Ok(p) => p,
        Err(m) => {
            eprintln!("snakepit serve: {m}");
            return ExitCode::from(2);
        }
    };
    if let Some(addr) = a.metrics_addr {
        // Before the pool: it takes its metric handles when it starts.
        match snakepit::metrics::install_prometheus(addr) {
            Ok(bound) => eprintln!("metrics: http://{bound}/metrics"),
            Err(e) => {
                eprintln!("snakepit serve: --metrics-addr {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let pool = match builder.build().await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("snakepit serve: the pool could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !size_known {
        // A remote pool without a size has its agents' workers, known now.
        admitted += pool.stats().size;
    }
    // What the pool runs or queues without refusing: `max_queue` plus one call per worker (the
    // CLI's profiles run one call at a time per worker).
    let admit = Arc::new(Semaphore::new(admitted));
    match signal(SignalKind::hangup()) {
        Ok(hup) => {
            tokio::spawn(reload_on_hangup(hup, pool.clone(), a.clone(), explicit, admit.clone()));
        }
        Err(e) => tracing::warn!("cannot install the SIGHUP handler (no reloads): {e}"),
    }
    let (out, rx) = tokio::sync::mpsc::channel(output::QUEUED_LINES);
    let writer = output::spawn_writer(rx);
    let (cancel_tx, cancel) = watch::channel(false);
    let max_line = max_frame + input::HEAD;
    let mut input =
        LineReader::new(tokio::io::BufReader::with_capacity(64 * 1024, tokio::io::stdin()), max_line);
    let mut tasks = JoinSet::new();
    let end = 'read: loop {
        // An admission first: without one, stdin is not read.
        let permit = loop {
            tokio::select! {
                biased;
                Ok(()) = stop.changed() => break 'read End::Signal,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                p = admit.clone().acquire_owned() => match p {
                    Ok(p) => break p,
                    Err(_) => break 'read End::Eof,
                },
            }
        };
        let line = loop {
            tokio::select! {
                biased;
                Ok(()) = stop.changed() => break 'read End::Signal,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                l = input.next() => break l,
            }
        };
        let (pool, out, cancel) = (pool.clone(), out.clone(), cancel.clone());
        match line {
            Ok(None) => break End::Eof,
            Ok(Some(Line::Whole(l))) if l.iter().all(u8::is_ascii_whitespace) => {}
            Ok(Some(Line::Whole(l))) => {
                tasks.spawn(async move {
                    answer(&pool, l, &out, cancel).await;
                    drop(permit);
                });
            }
            Ok(Some(Line::TooLong(head))) => {
                let id = json::shallow_id(&head).map_or_else(Id::null, |r| Id::new(Some(r)));
                let line = output::bad_request(&id, format!("request line exceeds {max_line} bytes"));
                tasks.spawn(async move {
                    let _ = out.send(line).await;
                    drop(permit);
                });
            }
            Err(e) => {
                let line = output::bad_request(&Id::null(), format!("unreadable input: {e}"));
                tasks.spawn(async move {
                    let _ = out.send(line).await;
                    drop(permit);
                });
                break End::Eof;
            }
        }
    };
    let signalled = match end {
        End::Signal => true,
        // Drain: every admitted request finishes or reaches its deadline, unless a signal comes.
        End::Eof => loop {
            tokio::select! {
                r = tasks.join_next() => if r.is_none() { break false },
                Ok(()) = stop.changed() => break true,
            }
        },
    };
    if signalled {
        let finished =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "requests still running after the shutdown grace; failing them with shutting_down"
            );
            cancel_tx.send_replace(true);
            // Their error lines go out if stdout is read; a stdout nobody reads holds up no exit.
            let sent = tokio::time::timeout(Duration::from_secs(1), async {
                while tasks.join_next().await.is_some() {}
            });
            if sent.await.is_err() {
                tasks.abort_all();
            }
        }
    }
    drop(out);
    pool.shutdown().await;
    let writer = tokio::task::spawn_blocking(move || writer.join());
    if signalled {
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    } else {
        let _ = writer.await;
    }
    ExitCode::SUCCESS
}

/// What `serve` starts and how it bounds its work.
struct Plan {
    /// The pool.
    builder: snakepit::PoolBuilder,
    /// Requests admitted at once: `max_queue` plus one per worker (the pool's queue bound).
    admitted: usize,
    /// The transport's frame limit.
    max_frame: usize,
    /// How long running requests may take to finish after SIGTERM/SIGINT.
    grace: Duration,
    /// Whether the size is known before the pool starts (not for remote agents without
    /// `--size`).
    size_known: bool,
}

/// The frame limit of the transport's kind.
fn max_frame(kind: TransportKind) -> usize {
    match kind {
        TransportKind::Stdio => Transport::max_frame(&snakepit::StdioTransport::default()),
        TransportKind::Grpc => Transport::max_frame(&snakepit::Grpc::default()),
    }
}

/// The pool the command line alone describes; an `Err` is a usage error.
fn plan(a: &ServeArgs) -> Result<Plan, String> {
    if !a.remote.is_empty() {
        return remote_plan(a);
    }
    if a.worker.script.is_none() && a.worker.module.is_none() && a.worker.command.is_none() {
        return Err("name the workers with --script, --module or --command, or give --config FILE".into());
    }
    let size = a.size.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())).max(1);
    // `serve`'s own admission (below) bounds what it holds; the pool's queue may take every
    // admitted request, so that a worker being restarted, recycled or still answering a cancel
    // never turns `serve`'s read-ahead into a `pool_saturated` refusal.
    let admitted = a.max_queue + size;
    let b = a.worker.source().and_then(|s| a.transport.apply(Pool::builder(), s))?;
    let b = settings(a, b.size(size).max_queue(admitted));
    Ok(Plan {
        builder: b,
        admitted,
        max_frame: max_frame(a.transport.transport),
        grace: Duration::from_millis(a.shutdown_grace_ms),
        size_known: true,
    })
}

/// The options that apply to any pool `serve` runs (without a file).
fn settings(a: &ServeArgs, mut b: snakepit::PoolBuilder) -> snakepit::PoolBuilder {
    if let Some(i) = &a.instance {
        b = b.instance(i);
    }
    if let Some(ms) = a.default_timeout_ms {
        b = b.default_timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = a.max_call_time_ms {
        b = b.max_call_time(Duration::from_millis(ms));
    }
    b = b.create_sessions_on_use(a.create_sessions_on_use);
    if let Some(url) = &a.session_store {
        b = b.session_store_url(url);
    }
    b
}

/// `serve --remote URL,...`: workers on agents.
fn remote_plan(a: &ServeArgs) -> Result<Plan, String> {
    let mut opts =
        snakepit::RemoteOptions::new(a.remote.iter().cloned()).insecure_plaintext(a.insecure_plaintext);
    match (&a.tls_ca, &a.tls_cert, &a.tls_key) {
        (Some(ca), Some(cert), Some(key)) => opts = opts.tls(snakepit::ClientTls::new(ca, cert, key)),
        (None, None, None) => {}
        _ => return Err("--tls-ca, --tls-cert and --tls-key go together".into()),
    }
    let mut b = Pool::builder().remote_options(opts);
    // Without --size the pool takes the agents' workers; `serve` admits the queue plus them.
    let admitted = a.max_queue + a.size.unwrap_or(0);
    b = match a.size {
        Some(n) => b.size(n).max_queue(admitted),
        None => b.max_queue(a.max_queue + 4096),
    };
    b = settings(a, b);
    Ok(Plan {
        builder: b,
        admitted,
        max_frame: snakepit::core::DEFAULT_MAX_FRAME,
        grace: Duration::from_millis(a.shutdown_grace_ms),
        size_known: a.size.is_some(),
    })
}

/// The first SIGTERM/SIGINT starts the graceful stop; a second one exits at once with 128 + its
/// number. Exiting closes the workers' lifelines, and their shepherds kill them.
async fn watch_signals(mut term: Signal, mut int: Signal, stop: watch::Sender<bool>) {
    async fn next(term: &mut Signal, int: &mut Signal) -> (&'static str, i32) {
        tokio::select! {
            _ = term.recv() => ("SIGTERM", 143),
            _ = int.recv() => ("SIGINT", 130),
        }
    }
    let (name, _) = next(&mut term, &mut int).await;
    tracing::info!(
        "{name}: no more requests are read; finishing the running ones (a second signal kills them)"
    );
    stop.send_replace(true);
    let (name, code) = next(&mut term, &mut int).await;
    eprintln!("snakepit serve: second signal ({name}): killing the workers");
    std::process::exit(code);
}

/// On each SIGHUP: with `--config`, reads the file again and reloads the workers with its
/// `[worker]` (a rolling replacement: no request fails) and resizes the pool to its `size`; a
/// file that does not parse or validate keeps the pool as it is, with one ERROR naming the
/// key. Without `--config`, a rolling restart of the same workers. Other settings apply at the
/// next start.
async fn reload_on_hangup(
    mut hup: Signal,
    pool: Pool,
    a: ServeArgs,
    explicit: Explicit,
    admit: Arc<Semaphore>,
) {
    while hup.recv().await.is_some() {
        if !a.remote.is_empty() {
            tracing::info!("SIGHUP: the workers are the agents' (send the agents SIGHUP to restart theirs)");
            continue;
        }
        let Some(file) = &a.config else {
            rolling_restart(&pool).await;
            continue;
        };
        let cfg = match config::load(&a, &explicit, file) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("SIGHUP: {e}; the pool is kept as it is");
                continue;
            }
        };
        if cfg.remote.is_remote() {
            tracing::info!("SIGHUP: the workers are the agents' (send the agents SIGHUP to restart theirs)");
            continue;
        }
        let adapter = match cfg.adapter() {
            Ok(ad) => ad,
            Err(e) => {
                tracing::error!("SIGHUP: {e}; the pool is kept as it is");
                continue;
            }
        };
        tracing::info!(file = %file.display(), "SIGHUP: reloading the workers");
        // A larger pool admits more requests at once (a smaller one keeps the bound).
        admit.add_permits(reload(&pool, adapter, cfg.size.unwrap_or(1)).await);
    }
}

/// SIGHUP without a file (`serve` and `agent`): a rolling restart of the same workers.
pub(crate) async fn rolling_restart(pool: &Pool) {
    tracing::info!("SIGHUP: restarting the workers one by one");
    match pool.rolling_restart().await {
        Ok(()) => tracing::info!("SIGHUP: every worker restarted"),
        Err(e) => tracing::error!("SIGHUP: the rolling restart stopped: {e}"),
    }
}

/// SIGHUP with a file (`serve` and `agent`): the workers reloaded with `adapter` (a rolling
/// replacement), then the pool resized to `size`. Returns how many workers it gained.
pub(crate) async fn reload(pool: &Pool, adapter: Arc<dyn snakepit::Adapter>, size: usize) -> usize {
    if let Err(e) = pool.reload_shared(adapter).await {
        tracing::error!("SIGHUP: the reload stopped: {e}");
        return 0;
    }
    let before = pool.stats().size;
    let mut gained = 0;
    if size != before {
        match pool.resize(size).await {
            Ok(()) => gained = size.saturating_sub(before),
            Err(e) => tracing::error!("SIGHUP: cannot resize to {size}: {e}"),
        }
    }
    tracing::info!(workers = size, "SIGHUP: reloaded");
    gained
}

/// Answers one request line; on shutdown after the grace, answers `shutting_down` instead.
async fn answer(pool: &Pool, line: Vec<u8>, out: &Out, mut cancel: watch::Receiver<bool>) {
    let req = match parse(line) {
        Ok(r) => r,
        Err(line) => {
            let _ = out.send(line).await;
            return;
        }
    };
    let id = req.id.clone();
    let cancelled = async move {
        if cancel.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        biased;
        () = cancelled => {
            let _ = out.send(output::error_line(&id, &Error::ShuttingDown.to_json())).await;
        }
        () = run_request(pool, req, out) => {}
    }
}

async fn run_request(pool: &Pool, req: Request, out: &Out) {
    let opts = CallOptions::default().with_timeout(req.timeout);
    if req.stream || pool.is_stream_tool(&req.command) {
        return run_stream(pool, req, opts, out).await;
    }
    let args = match crate::b64::decode_args(req.args) {
        Ok(a) => a,
        Err(m) => {
            let _ = out.send(output::bad_request(&req.id, m)).await;
            return;
        }
    };
    let outcome = match &req.session {
        Some(sid) => pool.execute_in_session_with(sid, &req.command, args, opts).await,
        None => pool.execute_with(&req.command, args, opts).await,
    };
    let line = match outcome.map(crate::b64::encode_result) {
        Ok(Ok(p)) => output::value_line(&req.id, "ok", &p).unwrap_or_else(|e| e),
        Ok(Err(m)) => output::error_line(&req.id, &serde_json::json!({"kind": "protocol", "message": m})),
        Err(e) => output::error_line(&req.id, &e.to_json()),
    };
    let _ = out.send(line).await;
}

/// One line per item `{"id":..,"chunk":..}`, then `{"id":..,"end":true}`, or an error line. The
/// next item is pulled only once the last one is queued for stdout: a stdout nobody reads stops
/// the stream's credit, and so its worker.
async fn run_stream(pool: &Pool, req: Request, opts: CallOptions, out: &Out) {
    let args = match crate::b64::decode_args(req.args) {
        Ok(a) => a,
        Err(m) => {
            let _ = out.send(output::bad_request(&req.id, m)).await;
            return;
        }
    };
    let mut stream = match pool.execute_stream_with(req.session.as_deref(), &req.command, args, opts).await {
        Ok(s) => s,
        Err(e) => {
            let _ = out.send(output::error_line(&req.id, &e.to_json())).await;
            return;
        }
    };
    while let Some(item) = stream.next().await {
        let (line, last) = match item.map(crate::b64::encode_result) {
            Ok(Ok(p)) => match output::value_line(&req.id, "chunk", &p) {
                Ok(line) => (line, false),
                Err(line) => (line, true),
            },
            Ok(Err(m)) => {
                (output::error_line(&req.id, &serde_json::json!({"kind": "protocol", "message": m})), true)
            }
            Err(e) => (output::error_line(&req.id, &e.to_json()), true),
        };
        if out.send(line).await.is_err() || last {
            return;
        }
    }
    let _ = out.send(output::end_line(&req.id)).await;
}
