//! `snakepit demo`: a real pool of Python (or Node) workers doing a mixed workload.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use snakepit::{Node, Pool, Python};

use crate::worker::Source;

/// The showcase the demo runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Language {
    /// `snakepit_bridge.showcase` on Python.
    Python,
    /// `snakepit-bridge/showcase.js` on Node.
    Node,
}

/// The demo's log filter unless `$SNAKEPIT_LOG` is set: warnings, except the pool's and the
/// supervisor's, which would report each planned worker crash in the middle of the progress bar.
/// The summary reports those crashes and their restarts instead; errors still show.
pub(crate) const DEFAULT_LOG_FILTER: &str = "warn,snakepit=error,snakepit_supervisor=error";

/// How long the summary waits for the pool to replace the crashed workers.
const RESTART_BOUND: Duration = Duration::from_secs(30);

/// Options of `snakepit demo`.
#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Number of workers.
    #[arg(long, default_value_t = 4)]
    size: usize,
    /// Number of calls.
    #[arg(long, default_value_t = 5000)]
    calls: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The workers' language: the Python or the Node showcase.
    #[arg(long, value_enum, default_value = "python")]
    language: Language,
    #[command(flatten)]
    transport: crate::TransportArgs,
}

#[derive(Clone, Copy)]
enum Kind {
    Echo,
    Add,
    Cpu,
    Fail,
    Crash,
    Print,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Echo => "echo",
            Kind::Add => "add",
            Kind::Cpu => "cpu",
            Kind::Fail => "fail",
            Kind::Crash => "crash",
            Kind::Print => "print_stdout",
        }
    }
}

/// Whether the i-th call of the workload crashes its worker (one call in 1000).
fn crashes(i: usize) -> bool {
    i % 1000 == 500
}

/// The i-th call of the workload: mostly echo and add, some CPU work, a few raising tools,
/// a print to stdout, and a worker crash every 1000 calls.
fn plan(i: usize) -> (Kind, serde_json::Value) {
    if crashes(i) {
        return (Kind::Crash, json!({"code": 3}));
    }
    match i % 20 {
        0..=9 => (Kind::Echo, json!({"msg": "hello", "i": i, "blob": "x".repeat(i % 7 * 100)})),
        10..=15 => (Kind::Add, json!({"a": i, "b": 2 * i})),
        16 | 17 => (Kind::Cpu, json!({"n": 20_000})),
        18 => (Kind::Fail, json!({"type": "ValueError", "message": format!("bad input {i}")})),
        _ => (Kind::Print, json!({"text": format!("print #{i} goes to stderr, not into the protocol")})),
    }
}

/// Runs the demo: starts the pool, runs the workload with a progress bar, waits for the crashed
/// workers to be replaced and prints a summary table.
pub(crate) async fn run(args: DemoArgs) -> std::process::ExitCode {
    let t0 = Instant::now();
    let (source, showcase) = match args.language {
        Language::Python => (Source::Python(Python::showcase()), "snakepit_bridge.showcase"),
        Language::Node => (Source::Node(Node::showcase()), "snakepit-bridge/showcase.js"),
    };
    let lang = source.language();
    eprintln!("starting {} {lang} workers ({showcase}, {:?})...", args.size, args.transport.transport);
    let b = match args.transport.apply(Pool::builder(), source) {
        Ok(b) => b,
        Err(m) => {
            eprintln!("snakepit demo: {m}");
            return std::process::ExitCode::from(2);
        }
    };
    let pool = match b
        .size(args.size)
        .restart_backoff(Duration::from_millis(20), Duration::from_secs(1))
        .build()
        .await
    {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("snakepit demo: the pool could not start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let startup = t0.elapsed();
    eprintln!(
        "{} workers ready in {:.0} ms; tools: {}",
        args.size,
        startup.as_secs_f64() * 1e3,
        pool.tools().join(", ")
    );

    let bar = ProgressBar::new(args.calls as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} calls ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut callers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let pool = pool.clone();
        let next = next.clone();
        let bar = bar.clone();
        let total = args.calls;
        callers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).ok();
            let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
            let mut wrong = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let (kind, a) = plan(i);
                let t = Instant::now();
                let r = pool.execute_timeout(kind.name(), a, Duration::from_secs(10)).await;
                let us = t.elapsed().as_micros() as u64;
                if let Some(h) = hist.as_mut() {
                    let _ = h.record(us.max(1));
                }
                match r {
                    Ok(v) => {
                        if let Kind::Add = kind {
                            if v != json!(3 * i) {
                                wrong += 1;
                            }
                        }
                        *outcomes.entry("ok".into()).or_default() += 1;
                    }
                    Err(e) => *outcomes.entry(e.kind().to_string()).or_default() += 1,
                }
                bar.inc(1);
            }
            (hist, outcomes, wrong)
        }));
    }
    let mut hist = Histogram::<u64>::new(3).ok();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut wrong = 0;
    for c in callers {
        if let Ok((h, o, w)) = c.await {
            if let (Some(all), Some(h)) = (hist.as_mut(), h) {
                let _ = all.add(h);
            }
            for (k, v) in o {
                *outcomes.entry(k).or_default() += v;
            }
            wrong += w;
        }
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    // A crashed worker is counted as restarted once its replacement is ready, which may be after
    // the last call returned: wait (bounded) until the pool is whole again.
    let planned = (0..args.calls).filter(|i| crashes(*i)).count();
    let crashed = outcomes.get("worker_crashed").copied().unwrap_or(0);
    let whole = |s: &snakepit::PoolStats| s.ready == s.size && s.restarts >= crashed as u64;
    let (stats, restored) = match pool.wait_stats(whole, RESTART_BOUND).await {
        Ok(s) => (s, true),
        Err(s) => (s, false),
    };
    let (p50, p99, max) = hist
        .as_ref()
        .map(|h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max()))
        .unwrap_or_default();
    println!(
        "snakepit demo: {} {lang} workers over {:?}, {} callers",
        args.size, args.transport.transport, args.concurrency
    );
    println!("  {:<22} {:>10}", "start-up (all ready)", format!("{:.0} ms", startup.as_secs_f64() * 1e3));
    println!("  {:<22} {:>10}", "calls", args.calls);
    for (k, v) in &outcomes {
        println!("  {:<22} {:>10}", format!("  {k}"), v);
    }
    println!("  {:<22} {:>10}", "wrong results", wrong);
    println!("  {:<22} {:>10}", "planned crashes", planned);
    println!("  {:<22} {:>10}", "worker restarts", stats.restarts);
    if !restored {
        // Honest about the bound: the pool was not whole again in time.
        let late = format!("{} of {} ready after {} s", stats.ready, stats.size, RESTART_BOUND.as_secs());
        println!("  {:<22} {:>10}", "  NOT all restarted", late);
    }
    println!("  {:<22} {:>10}", "latency p50", format!("{p50} µs"));
    println!("  {:<22} {:>10}", "latency p99", format!("{p99} µs"));
    println!("  {:<22} {:>10}", "latency max", format!("{max} µs"));
    println!("  {:<22} {:>10}", "throughput", format!("{:.0}/s", args.calls as f64 / elapsed.as_secs_f64()));
    println!("  {:<22} {:>10}", "wall time", format!("{:.2} s", elapsed.as_secs_f64()));
    let expected_errors: usize = outcomes.iter().filter(|(k, _)| *k != "ok").map(|(_, v)| v).sum();
    let unexpected = outcomes.keys().any(|k| !matches!(k.as_str(), "ok" | "worker" | "worker_crashed"));
    let t = Instant::now();
    match Arc::try_unwrap(pool) {
        Ok(p) => p.shutdown().await,
        Err(p) => drop(p),
    }
    println!("  {:<22} {:>10}", "shutdown", format!("{:.0} ms", t.elapsed().as_secs_f64() * 1e3));
    if wrong > 0 || unexpected {
        eprintln!("snakepit demo: unexpected outcomes ({expected_errors} errors)");
        return std::process::ExitCode::FAILURE;
    }
    if crashed != planned {
        eprintln!("snakepit demo: {planned} planned crash(es) but {crashed} worker(s) crashed");
        return std::process::ExitCode::FAILURE;
    }
    if !restored {
        eprintln!(
            "snakepit demo: {crashed} worker(s) crashed but only {} restart(s) and {} of {} workers ready \
             {} s after the last call",
            stats.restarts,
            stats.ready,
            stats.size,
            RESTART_BOUND.as_secs()
        );
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
