//! `snakepit bench`: snakepit against the physical floor, measured in the same run.
//!
//! The floor is a hand-written loop writing 4-byte-framed JSON to one Python process that echoes
//! it back (no pool, no supervisor). Configurations run interleaved (A B C A B C ...) for several
//! repetitions so that machine noise hits all alike; each figure is the median over repetitions,
//! with the spread of p50. Results are printed as a table with ratios to the matching floor and
//! written as JSON to `target/bench/bench.json`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;
use snakepit::{Payload, Pool, Python};

mod bytes;
mod metrics;
mod model;
mod node;
mod pipeline;
mod redis;
mod remote;
mod startup;
use bytes::{bytes_run, has_numpy, numpy_floor, numpy_run};
use startup::{bare_pass, bare_spawns, pool_ready, HEAVY};

/// Options of `snakepit bench`.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// A short run for CI smoke tests (fewer calls, sizes and repetitions).
    #[arg(long)]
    quick: bool,
    /// Where to write bench.json.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Pin the host (all its threads) and every process it starts to CPU 0, so floor and pool
    /// run on the same CPU (both ends of each pipe share it).
    #[arg(long)]
    pub pin: bool,
    /// The Python for gRPC workers (default: .venv/bin/python when it exists; gRPC is skipped
    /// otherwise).
    #[arg(long)]
    grpc_python: Option<PathBuf>,
    /// Run only the configurations whose name contains this (e.g. `seq 64`, `K=16`, `start-up`).
    #[arg(long)]
    only: Option<String>,
}

const ECHO: &str = r#"
import os, struct
r = os.fdopen(0, "rb", buffering=1 << 16)
while True:
    h = r.read(4)
    if len(h) < 4:
        break
    b = r.read(struct.unpack(">I", h)[0])
    v = memoryview(h + b)
    while v:
        v = v[os.write(1, v):]
"#;

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    p50_us: f64,
    p99_us: f64,
    per_s: f64,
}

fn sample(h: &Histogram<u64>, calls: u64, elapsed: Duration) -> Sample {
    Sample {
        p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        per_s: calls as f64 / elapsed.as_secs_f64(),
    }
}

fn hist() -> Histogram<u64> {
    // Constant, valid bounds: 1 ns to 60 s, 3 significant figures.
    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn frame(payload_len: usize, id: u64) -> Vec<u8> {
    let body =
        json!({"t": "call", "id": id, "cmd": "echo", "args": {"data": "x".repeat(payload_len)}}).to_string();
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body.as_bytes());
    f
}

/// What the raw-pipe loop talks to.
#[derive(Clone, Copy)]
enum Peer {
    /// The floor: a Python process that echoes each frame's bytes.
    Echo,
    /// The real bridge (`showcase.echo`), greeted by hand: no pool, no tokio. The gap between
    /// this and the floor is the bridge's own cost; the gap between the pool and this is the
    /// host's.
    Bridge,
}

/// Reads one frame (header and body) into `buf`.
fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut h = [0u8; 4];
    r.read_exact(&mut h)?;
    buf.resize(u32::from_be_bytes(h) as usize, 0);
    r.read_exact(buf)
}

/// A plain blocking loop over a pipe to one Python process; `k` calls in flight.
#[allow(clippy::disallowed_methods)] // the raw-pipe floor: a bare python3 child, measured without snakepit
fn floor(python: &str, peer: Peer, payload: usize, calls: u64, k: usize) -> std::io::Result<Sample> {
    let mut cmd = Command::new(python);
    match peer {
        Peer::Echo => cmd.args(["-c", ECHO]),
        Peer::Bridge => cmd
            .args(["-m", "snakepit_bridge", "--module", "snakepit_bridge.showcase"])
            .env("PYTHONPATH", snakepit::adapters::bridge_dir().map_err(std::io::Error::other)?),
    };
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let (Some(mut input), Some(mut output)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(std::io::Error::other("no pipes"));
    };
    let mut buf = Vec::new();
    if let Peer::Bridge = peer {
        let hello = json!({"t": "hello", "versions": [1], "codecs": ["json"], "worker": "bench",
            "max_frame": 1 << 26, "config": null, "max_in_flight": 1})
        .to_string();
        input.write_all(&(hello.len() as u32).to_be_bytes())?;
        input.write_all(hello.as_bytes())?;
        read_frame(&mut output, &mut buf)?;
    }
    let msg = frame(payload, 1);
    // Warm up (the interpreter's start-up is not part of a call).
    for _ in 0..if payload >= 1 << 20 { 3 } else { 50 } {
        input.write_all(&msg)?;
        read_frame(&mut output, &mut buf)?;
    }
    let mut h = hist();
    let mut sent_at = std::collections::VecDeque::with_capacity(k);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut done = 0u64;
    // A writer thread would hide nothing here: with k in flight the pipe buffers hold them.
    while done < calls {
        while sent < calls && sent_at.len() < k {
            input.write_all(&msg)?;
            sent_at.push_back(Instant::now());
            sent += 1;
        }
        read_frame(&mut output, &mut buf)?;
        if let Some(t) = sent_at.pop_front() {
            let _ = h.record(t.elapsed().as_nanos() as u64);
        }
        done += 1;
    }
    let elapsed = start.elapsed();
    drop(input);
    let _ = child.wait();
    Ok(sample(&h, calls, elapsed))
}

/// The gRPC floor: a bare tonic client calling the bridge's `Worker.Execute` on its socket
/// (no pool, no supervisor); the bridge is started and greeted by hand.
#[allow(clippy::disallowed_methods)] // the gRPC floor: a bare bridge process, measured without snakepit
async fn grpc_floor(python: &std::path::Path, payload: usize, calls: u64) -> Result<Sample, String> {
    use snakepit::grpc::proto::{worker_client::WorkerClient, CallRequest};
    let dir = std::env::temp_dir().join(format!("spb{:x}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let sock = dir.join("f.sock");
    let _ = std::fs::remove_file(&sock);
    let bridge = snakepit::adapters::bridge_dir().map_err(|e| e.to_string())?;
    let mut child = Command::new(python)
        .args(["-m", "snakepit_bridge", "--module", "snakepit_bridge.showcase"])
        .env("PYTHONPATH", bridge)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let result = async {
        let (Some(mut input), Some(mut output)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("no pipes".to_string());
        };
        let hello = json!({"t": "hello", "versions": [1], "max_frame": 64 << 20, "config": null,
            "transport": {"kind": "grpc", "socket": sock.to_string_lossy(), "token": "t"}})
        .to_string();
        input.write_all(&(hello.len() as u32).to_be_bytes()).map_err(|e| e.to_string())?;
        input.write_all(hello.as_bytes()).map_err(|e| e.to_string())?;
        let mut h = [0u8; 4];
        output.read_exact(&mut h).map_err(|e| e.to_string())?;
        let mut ready = vec![0u8; u32::from_be_bytes(h) as usize];
        output.read_exact(&mut ready).map_err(|e| e.to_string())?;
        let channel =
            snakepit::grpc::unix_channel(&sock, Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
        let mut client = WorkerClient::new(channel);
        let args = json!({"data": "x".repeat(payload)}).to_string().into_bytes();
        let req = |id: u64| {
            let mut r = tonic::Request::new(CallRequest {
                id,
                command: "echo".into(),
                args: args.clone(),
                ..Default::default()
            });
            if let Ok(v) = "t".parse() {
                r.metadata_mut().insert("x-snakepit-token", v);
            }
            r
        };
        for i in 0..20 {
            client.execute(req(i)).await.map_err(|e| e.to_string())?;
        }
        let mut hs = hist();
        let start = Instant::now();
        for i in 0..calls {
            let t = Instant::now();
            client.execute(req(i)).await.map_err(|e| e.to_string())?;
            let _ = hs.record(t.elapsed().as_nanos() as u64);
        }
        let s = sample(&hs, calls, start.elapsed());
        drop(input);
        Ok(s)
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn pool_run(pool: &Arc<Pool>, payload: usize, calls: u64, callers: usize) -> Sample {
    let args = Payload::from(json!({"data": "x".repeat(payload)}));
    for _ in 0..20 {
        let _ = pool.execute_with("echo", args.clone(), Default::default()).await;
    }
    callers_run(pool, "echo", args, calls, callers).await
}

/// `calls` calls of `command` shared by `callers` concurrent callers, each round trip recorded.
async fn callers_run(
    pool: &Arc<Pool>,
    command: &'static str,
    args: Payload,
    calls: u64,
    callers: usize,
) -> Sample {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let pool = pool.clone();
        let args = args.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                let t = Instant::now();
                if pool.execute_with(command, args.clone(), Default::default()).await.is_ok() {
                    let _ = h.record(t.elapsed().as_nanos() as u64);
                }
            }
            h
        }));
    }
    let mut h = hist();
    for t in tasks {
        if let Ok(x) = t.await {
            let _ = h.add(x);
        }
    }
    sample(&h, calls, start.elapsed())
}

/// Sequential calls of `command` in a session, or plain, recording each round trip.
async fn seq_calls(
    pool: &Pool,
    session: Option<&str>,
    command: &str,
    args: serde_json::Value,
    calls: u64,
) -> Sample {
    let args = Payload::from(args);
    let mut h = hist();
    let start = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        let r = match session {
            Some(s) => pool.execute_in_session_with(s, command, args.clone(), Default::default()).await,
            None => pool.execute_with(command, args.clone(), Default::default()).await,
        };
        if r.is_ok() {
            let _ = h.record(t.elapsed().as_nanos() as u64);
        }
    }
    sample(&h, calls, start.elapsed())
}

/// Chunks per second of one streamed generator (`n` small items).
async fn stream_rate(pool: &Pool, n: u64) -> Sample {
    use futures::StreamExt;
    let start = Instant::now();
    let mut got = 0u64;
    if let Ok(mut s) = pool.execute_stream("count", json!({"n": n})).await {
        while let Some(Ok(_)) = s.next().await {
            got += 1;
        }
    }
    let e = start.elapsed();
    Sample { p50_us: f64::NAN, p99_us: f64::NAN, per_s: got as f64 / e.as_secs_f64() }
}

fn host_rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

/// A horizontal bar chart of p50 latencies (log-free, µs) with the floors marked, as SVG.
fn plot(path: &std::path::Path, title: &str, rows: &[(String, f64, bool)]) -> Result<(), String> {
    use plotters::prelude::*;
    let rows: Vec<_> = rows.iter().filter(|r| r.1.is_finite()).collect();
    if rows.is_empty() {
        return Ok(());
    }
    let max = rows.iter().map(|r| r.1).fold(1.0f64, f64::max) * 1.15;
    let height = 60 + 28 * rows.len() as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let n = rows.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(300)
        .build_cartesian_2d(0f64..max, (0..n).into_segmented())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .y_labels(rows.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("p50 latency, µs")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let color = if r.2 { RGBColor(150, 150, 150) } else { RGBColor(40, 110, 180) };
            let i = i as i32;
            Rectangle::new([(0.0, SegmentValue::Exact(i)), (r.1, SegmentValue::Exact(i + 1))], color.filled())
        }))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) async fn run(args: BenchArgs) -> std::process::ExitCode {
    let python = std::env::var("SNAKEPIT_PYTHON").unwrap_or_else(|_| "python3".into());
    let grpc_python = args.grpc_python.clone().or_else(|| {
        let p = PathBuf::from(".venv/bin/python");
        p.exists().then_some(p)
    });
    let (calls, reps, sizes): (u64, usize, &[usize]) = if args.quick {
        (1500, 3, &[64, 100 * 1024])
    } else {
        (20_000, 5, &[64, 1024, 100 * 1024, 1024 * 1024])
    };
    // Raw-bytes echoes (binary segments), against the floor of the same size.
    let byte_sizes: &[usize] = if args.quick {
        &[64, 1024, 100 * 1024, 256 * 1024, 1024 * 1024]
    } else {
        &[64, 1024, 16 * 1024, 32 * 1024, 64 * 1024, 100 * 1024, 256 * 1024, 1024 * 1024, 10 << 20, 100 << 20]
    };
    let size_calls = |s: usize| {
        if s >= 100 << 20 {
            5
        } else if s >= 10 << 20 {
            20
        } else if s >= 1024 * 1024 {
            calls / 20
        } else if s >= 100 * 1024 {
            calls / 5
        } else {
            calls
        }
    };
    let cpus = if args.pin { 1 } else { std::thread::available_parallelism().map_or(2, |n| n.get()) };
    let mk = |b: snakepit::PoolBuilder| b.run_registry(false).heartbeat(None);
    // The stdio pools: one worker, 2×CPUs workers, and one worker with a 50 µs busy-poll window.
    let stdio = |size: usize, busy: Duration| {
        mk(Pool::builder())
            .adapter(Python::showcase().interpreter(&python))
            .size(size)
            .busy_poll(busy)
            .build()
    };
    let (p1, pn, pb) = match futures::future::try_join3(
        stdio(1, Duration::ZERO),
        stdio(cpus.max(2) * 2, Duration::ZERO),
        stdio(1, Duration::from_micros(50)),
    )
    .await
    {
        Ok((a, b, c)) => (Arc::new(a), Arc::new(b), Arc::new(c)),
        Err(e) => {
            eprintln!("bench: cannot start the pool: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The same bytes with the shared-memory arena off, and with it for every segment (big
    // enough for 100 MB each way).
    let shm_pool = |size: usize, threshold: usize| {
        mk(Pool::builder())
            .adapter(Python::showcase().interpreter(&python))
            .size(1)
            .shm_max(size)
            .shm_threshold(threshold)
            .build()
    };
    let (p_off, p_all) =
        match futures::future::try_join(shm_pool(0, usize::MAX), shm_pool(256 << 20, 1)).await {
            Ok((a, b)) => (Arc::new(a), Arc::new(b)),
            Err(e) => {
                eprintln!("bench: cannot start the pool: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
    // numpy rows need numpy in the interpreter (the repository's .venv has it).
    let numpy_python = grpc_python.clone().filter(|p| !args.quick && has_numpy(p));
    let p_np = match &numpy_python {
        Some(np) => mk(Pool::builder())
            .adapter(Python::showcase().interpreter(np))
            .size(1)
            .shm_max(256 << 20)
            .build()
            .await
            .ok()
            .map(Arc::new),
        None => None,
    };
    let pg = match &grpc_python {
        Some(gp) => mk(Pool::builder())
            .adapter(Python::showcase().interpreter(gp))
            .transport(snakepit::Grpc::default())
            .size(1)
            .build()
            .await
            .ok()
            .map(Arc::new),
        None => None,
    };
    p1.register_host_tool("bench_echo", |v| async move { Ok(v) });
    let allocs = allocations_per_call(&p1, 1000).await;
    // Host memory per idle worker: RSS before and after starting 16 more.
    let rss0 = host_rss();
    let idle16 = mk(Pool::builder()).adapter(Python::showcase().interpreter(&python)).size(16).build().await;
    let rss_per_worker = host_rss().saturating_sub(rss0) / 16;
    if let Ok(p) = idle16 {
        p.shutdown().await;
    }
    let nw = cpus.max(2) * 2;
    let want = |name: &str| args.only.as_deref().map_or(true, |o| name.contains(o));
    let piped = pipeline::pools(&python, grpc_python.as_deref(), nw, args.quick, &want).await;
    let node_seq = "node stdio 1 worker seq 64 B".to_string();
    let node_many = format!("node stdio {nw} workers 32 callers 64 B");
    let node_pools = if want(&node_seq) || want(&node_many) { node::pools(nw).await } else { None };
    let has_node = node_pools.is_some() || (want("start-up") && node::available());
    let redis_rows =
        ["stdio session-routed call (ping), redis", "session creates, memory", "session creates, redis"];
    let redis_server = if redis_rows.iter().any(|r| want(r)) { redis::Server::start() } else { None };
    let p_redis = match &redis_server {
        Some(server) => redis::pool(&python, server).await,
        None => None,
    };
    let scale = want(&remote::rows(1)) || want(&remote::rows(2));
    let remote_pools = if want(remote::SEQ) || want(remote::SEQ_TLS) || scale {
        remote::pools(&python, want(remote::SEQ), want(remote::SEQ_TLS), scale).await
    } else {
        None
    };
    // Last: the metrics recorder, once installed, is seen by every pool built after it.
    let metrics_seq = "stdio 1 worker seq 64 B, metrics on".to_string();
    let metrics_many = format!("stdio {nw} workers 32 callers 64 B, metrics on");
    let metrics_pools =
        if want(&metrics_seq) || want(&metrics_many) { metrics::pools(&python, nw).await } else { None };
    let mut results: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    let mut floors: BTreeMap<String, String> = BTreeMap::new();
    let want = |name: &str| args.only.as_deref().map_or(true, |o| name.contains(o));
    for rep in 0..reps {
        eprintln!("repetition {}/{reps}", rep + 1);
        for &s in sizes {
            let c = size_calls(s);
            let floor_name = format!("floor seq {s} B");
            if !want(&floor_name) {
            } else if let Ok(x) = floor(&python, Peer::Echo, s, c, 1) {
                results.entry(floor_name.clone()).or_default().push(x);
            }
            let name = format!("raw pipe -> bridge seq {s} B");
            if !want(&name) {
            } else if let Ok(x) = floor(&python, Peer::Bridge, s, c, 1) {
                results.entry(name.clone()).or_default().push(x);
                floors.insert(name, floor_name.clone());
            }
            let name = format!("stdio 1 worker seq {s} B");
            if want(&name) {
                floors.insert(name.clone(), floor_name.clone());
                results.entry(name).or_default().push(pool_run(&p1, s, c, 1).await);
            }
            let name = format!("stdio 1 worker seq {s} B, busy-poll 50us");
            if s == 64 && want(&name) {
                floors.insert(name.clone(), floor_name.clone());
                results.entry(name).or_default().push(pool_run(&pb, s, c, 1).await);
            }
            let gname = format!("grpc 1 worker seq {s} B");
            if let (Some(pg), Some(gp), true) = (&pg, &grpc_python, want(&gname)) {
                let gfloor = format!("floor grpc bare tonic->grpcio {s} B");
                match grpc_floor(gp, s, c).await {
                    Ok(x) => results.entry(gfloor.clone()).or_default().push(x),
                    Err(e) => eprintln!("bench: gRPC floor failed: {e}"),
                }
                floors.insert(gname.clone(), gfloor);
                results.entry(gname).or_default().push(pool_run(pg, s, c, 1).await);
            }
        }
        for &s in byte_sizes {
            let c = size_calls(s);
            let floor_name = format!("floor seq {s} B");
            let name = format!("stdio 1 worker bytes seq {s} B");
            if !want(&name) {
                continue;
            }
            if !sizes.contains(&s) && want(&floor_name) {
                if let Ok(x) = floor(&python, Peer::Echo, s, c, 1) {
                    results.entry(floor_name.clone()).or_default().push(x);
                }
            }
            floors.insert(name.clone(), floor_name.clone());
            // The default pool: in the frame below 64 KiB, through the arena from there (and
            // past its 32 MiB a way, the big arena's pool).
            let pool = if s > 32 << 20 { &p_all } else { &p1 };
            results.entry(name).or_default().push(bytes_run(pool, s, c).await);
            if s >= 100 * 1024 {
                let name = format!("stdio 1 worker bytes seq {s} B, shm off");
                if want(&name) && s <= 64 << 20 {
                    floors.insert(name.clone(), floor_name.clone());
                    results.entry(name).or_default().push(bytes_run(&p_off, s, c).await);
                }
            }
            // Below the default threshold (64 KiB): what the arena would cost there.
            if (1024..64 * 1024).contains(&s) {
                let name = format!("stdio 1 worker bytes seq {s} B, shm always");
                if want(&name) {
                    floors.insert(name.clone(), floor_name.clone());
                    results.entry(name).or_default().push(bytes_run(&p_all, s, c).await);
                }
            }
        }
        if let (Some(p), Some(np)) = (&p_np, &numpy_python) {
            let s = 100 << 20;
            let floor_name = "floor numpy 100 MB multiprocessing.shared_memory".to_string();
            let name = "stdio 1 worker numpy 100 MB round trip".to_string();
            if want(&name) {
                match numpy_floor(np, s, 5) {
                    Ok(x) => {
                        results.entry(floor_name.clone()).or_default().push(x);
                        floors.insert(name.clone(), floor_name);
                    }
                    Err(e) => eprintln!("bench: {e}"),
                }
                results.entry(name).or_default().push(numpy_run(p, s, 5).await);
            }
        }
        let kname = "floor K=16 64 B".to_string();
        if !want(&kname) {
        } else if let Ok(x) = floor(&python, Peer::Echo, 64, calls, 16) {
            results.entry(kname.clone()).or_default().push(x);
        }
        let name = "raw pipe -> bridge K=16 64 B".to_string();
        if !want(&name) {
        } else if let Ok(x) = floor(&python, Peer::Bridge, 64, calls, 16) {
            results.entry(name.clone()).or_default().push(x);
            floors.insert(name, kname.clone());
        }
        let name = format!("stdio {nw} workers 32 callers 64 B");
        if want(&name) {
            floors.insert(name.clone(), kname.clone());
            results.entry(name).or_default().push(pool_run(&pn, 64, calls, 32).await);
        }
        let name = "stdio 1 worker 16 callers 64 B".to_string();
        if want(&name) {
            floors.insert(name.clone(), kname.clone());
            results.entry(name).or_default().push(pool_run(&p1, 64, calls, 16).await);
        }
        let name = "stdio 1 worker 16 callers 64 B, busy-poll 50us".to_string();
        if want(&name) {
            floors.insert(name.clone(), kname.clone());
            results.entry(name).or_default().push(pool_run(&pb, 64, calls, 16).await);
        }
        for p in &piped {
            let name = format!("stdio 1 worker 16 callers 64 B{}", p.suffix);
            if want(&name) {
                floors.insert(name.clone(), kname.clone());
                results.entry(name).or_default().push(pool_run(&p.one, 64, calls, 16).await);
            }
            let name = format!("stdio {nw} workers 32 callers 64 B{}", p.suffix);
            if want(&name) {
                floors.insert(name.clone(), kname.clone());
                results.entry(name).or_default().push(pool_run(&p.many, 64, calls, 32).await);
            }
        }
        if let Some((one, many)) = &node_pools {
            if want(&node_seq) {
                floors.insert(node_seq.clone(), "floor seq 64 B".into());
                results.entry(node_seq.clone()).or_default().push(pool_run(one, 64, calls, 1).await);
            }
            if want(&node_many) {
                floors.insert(node_many.clone(), kname.clone());
                results.entry(node_many.clone()).or_default().push(pool_run(many, 64, calls, 32).await);
            }
        }
        if let Some((one, many)) = &metrics_pools {
            if want(&metrics_seq) {
                floors.insert(metrics_seq.clone(), "floor seq 64 B".into());
                results.entry(metrics_seq.clone()).or_default().push(pool_run(one, 64, calls, 1).await);
            }
            if want(&metrics_many) {
                floors.insert(metrics_many.clone(), kname.clone());
                results.entry(metrics_many.clone()).or_default().push(pool_run(many, 64, calls, 32).await);
            }
        }
        let sid = format!("bench-{rep}");
        let _ = p1.create_session(&sid, json!(null)).await;
        let name = "stdio session-routed call (ping)".to_string();
        if want(&name) {
            floors.insert(name.clone(), "floor seq 64 B".into());
            results
                .entry(name)
                .or_default()
                .push(seq_calls(&p1, Some(&sid), "ping", json!(null), calls / 2).await);
        }
        if let Some(pr) = &p_redis {
            let _ = pr.create_session(&sid, json!(null)).await;
            let name = redis_rows[0].to_string();
            if want(&name) {
                floors.insert(name.clone(), "floor seq 64 B".into());
                results
                    .entry(name)
                    .or_default()
                    .push(seq_calls(pr, Some(&sid), "ping", json!(null), calls / 2).await);
            }
            if want(redis_rows[1]) {
                let r = redis::creates(&p1, &format!("c{rep}"), calls / 4).await;
                results.entry(redis_rows[1].to_string()).or_default().push(r);
            }
            if want(redis_rows[2]) {
                let r = redis::creates(pr, &format!("c{rep}"), calls / 4).await;
                results.entry(redis_rows[2].to_string()).or_default().push(r);
            }
        }
        if let Some(rp) = &remote_pools {
            for (name, pool) in [(remote::SEQ, &rp.seq), (remote::SEQ_TLS, &rp.seq_tls)] {
                if let (Some(p), true) = (pool, want(name)) {
                    floors.insert(name.to_string(), "floor seq 64 B".into());
                    results.entry(name.to_string()).or_default().push(pool_run(p, 64, calls, 1).await);
                }
            }
            let n = if args.quick { 200 } else { 800 };
            for (agents, pool) in [(1, &rp.one), (2, &rp.two)] {
                if let (Some(p), true) = (pool, want(&remote::rows(agents))) {
                    results.entry(remote::rows(agents)).or_default().push(remote::sleep_rate(p, n).await);
                }
            }
        }
        let name = "stdio host callback round trip".to_string();
        if want(&name) {
            floors.insert(name.clone(), "floor seq 64 B".into());
            let args = json!({"name": "bench_echo", "args": 1});
            results.entry(name).or_default().push(seq_calls(&p1, None, "ask_host", args, calls / 2).await);
        }
        let name = "stdio stream chunks (count)".to_string();
        if want(&name) {
            results.entry(name).or_default().push(stream_rate(&p1, calls * 10).await);
        }
    }
    let heavy = std::env::temp_dir().join(format!("snakepit-heavy-{}.py", std::process::id()));
    let heavy = std::fs::write(&heavy, HEAVY).ok().map(|_| heavy);
    // Start-up, interleaved: for each size, the cold pool, the bare spawns and the zygote pool,
    // for each worker flavour; milliseconds per repetition.
    let mut starts: BTreeMap<(usize, &str, &str), Vec<f64>> = BTreeMap::new();
    let flavours: Vec<(&str, Option<&std::path::Path>)> = match &heavy {
        Some(h) => vec![("trivial", None), ("import-heavy", Some(h.as_path()))],
        None => vec![("trivial", None)],
    };
    let sizes_up: &[usize] = match (args.quick, want("start-up")) {
        (_, false) => &[],
        (true, true) => &[1, 4, 8],
        (false, true) => &[1, 4, 8, 16],
    };
    for rep in 0..reps {
        eprintln!("start-up repetition {}/{reps}", rep + 1);
        for &n in sizes_up {
            for (flavour, script) in &flavours {
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let cold = ms(pool_ready(&python, n, *script, false).await);
                starts.entry((n, flavour, "cold")).or_default().push(cold);
                starts.entry((n, flavour, "bare")).or_default().push(ms(bare_spawns(&python, n, *script)));
                starts.entry((n, flavour, "pass")).or_default().push(ms(bare_pass(&python, n)));
                let zygote = ms(pool_ready(&python, n, *script, true).await);
                starts.entry((n, flavour, "zygote")).or_default().push(zygote);
            }
            if has_node {
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                starts.entry((n, "node", "cold")).or_default().push(ms(node::pool_ready(n).await));
                starts.entry((n, "node", "bare")).or_default().push(ms(node::bare_spawns(n)));
                starts.entry((n, "node", "pass")).or_default().push(ms(node::bare_pass(n)));
            }
        }
    }
    if let Some(h) = &heavy {
        let _ = std::fs::remove_file(h);
    }
    // The preload rows: full mode, with scikit-learn in `.venv`.
    let mut models: BTreeMap<&str, Vec<model::ModelStart>> = BTreeMap::new();
    let model_python = grpc_python.clone().filter(|p| !args.quick && want("preload") && model::available(p));
    let model_script = std::env::temp_dir().join(format!("snakepit-model-{}.py", std::process::id()));
    if let (Some(py), Ok(())) = (&model_python, std::fs::write(&model_script, model::MODEL)) {
        for rep in 0..reps.min(3) {
            eprintln!("preload repetition {}/{}", rep + 1, reps.min(3));
            for (name, n, zygote) in
                [("1 cold", 1, false), ("8 cold", 8, false), ("8 zygote+preload", 8, true)]
            {
                if let Some(s) = model::start(py, &model_script, n, zygote).await {
                    models.entry(name).or_default().push(s);
                }
            }
        }
        let _ = std::fs::remove_file(&model_script);
    }
    for p in piped {
        for p in [p.one, p.many] {
            if let Ok(p) = Arc::try_unwrap(p) {
                p.shutdown().await;
            }
        }
    }
    let (node_one, node_many_pool) = node_pools.map_or((None, None), |(a, b)| (Some(a), Some(b)));
    for p in [Some(p1), Some(pn), Some(pb), pg, Some(p_off), Some(p_all), p_np, node_one, node_many_pool]
        .into_iter()
        .flatten()
    {
        if let Ok(p) = Arc::try_unwrap(p) {
            p.shutdown().await;
        }
    }
    // Report.
    println!(
        "snakepit bench ({} mode, {reps} interleaved repetitions, medians; {cpus} CPUs, {})",
        if args.quick { "quick" } else { "full" },
        if args.pin { "pinned: host and workers on CPU 0" } else { "unpinned" }
    );
    println!(
        "{:<48} {:>10} {:>10} {:>11} {:>9} {:>9} {:>13}",
        "configuration", "p50 µs", "p99 µs", "calls/s", "p50/floor", "tput/floor", "p50 spread µs"
    );
    let mut json_rows = Vec::new();
    let med = |v: &Vec<Sample>| {
        let p50s: Vec<f64> = v.iter().map(|s| s.p50_us).collect();
        let lo = p50s.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = p50s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (
            median(p50s),
            median(v.iter().map(|s| s.p99_us).collect()),
            median(v.iter().map(|s| s.per_s).collect()),
            lo,
            hi,
        )
    };
    for (name, v) in &results {
        let (p50, p99, tput, lo, hi) = med(v);
        let (r50, rt) = match floors.get(name).and_then(|f| results.get(f)) {
            Some(f) => {
                let (f50, _, ft, _, _) = med(f);
                (format!("{:.2}x", p50 / f50), format!("{:.2}x", tput / ft))
            }
            None => ("floor".into(), "floor".into()),
        };
        let num = |x: f64| if x.is_finite() { format!("{x:.1}") } else { "-".into() };
        let (r50, spread) =
            if p50.is_finite() { (r50, format!("{lo:.0}-{hi:.0}")) } else { ("-".into(), "-".into()) };
        let rt = if p50.is_finite() { rt } else { "-".to_string() };
        println!("{name:<48} {:>10} {:>10} {tput:>11.0} {r50:>9} {rt:>9} {spread:>13}", num(p50), num(p99));
        let finite = |x: f64| if x.is_finite() { Some(x) } else { None };
        json_rows.push(json!({"name": name, "p50_us": finite(p50), "p99_us": finite(p99), "per_s": tput,
            "floor": floors.get(name), "p50_min_us": finite(lo), "p50_max_us": finite(hi)}));
    }
    let chart_rows: Vec<(String, f64, bool)> =
        results.iter().map(|(n, v)| (n.clone(), med(v).0, n.starts_with("floor"))).collect();
    println!();
    let start_ms =
        |n: usize, f: &str, kind: &str| starts.get(&(n, f, kind)).map_or(f64::NAN, |v| median(v.clone()));
    // Start-up rows (none when `--only` picked no start-up configuration).
    if !starts.is_empty() {
        println!(
            "{:<28} {:>10} {:>10} {:>8} {:>11} {:>14} {:>8} {:>10}",
            "start-up (median ms)",
            "cold pool",
            "bare",
            "cold/bare",
            "zygote pool",
            "zygote/1 cold",
            "-c pass",
            "cold-pass"
        );
        let node_flavour: &[&str] = if has_node { &["node"] } else { &[] };
        for flavour in flavours.iter().map(|(f, _)| *f).chain(node_flavour.iter().copied()) {
            let one_cold = start_ms(1, flavour, "cold");
            for &n in sizes_up {
                let (cold, bare, zygote, pass) = (
                    start_ms(n, flavour, "cold"),
                    start_ms(n, flavour, "bare"),
                    start_ms(n, flavour, "zygote"),
                    start_ms(n, flavour, "pass"),
                );
                let name = format!("{n} workers, {flavour}");
                println!(
                    "{name:<28} {cold:>10.0} {bare:>10.0} {:>7.2}x {zygote:>11.0} {:>13.2}x {pass:>8.0} {:>10.0}",
                    cold / bare,
                    zygote / one_cold,
                    cold - pass
                );
                json_rows.push(json!({"name": format!("startup {name}"), "cold_ms": cold, "bare_ms": bare,
                    "zygote_ms": zygote, "one_cold_ms": one_cold, "pass_ms": pass}));
            }
        }
    }
    if !models.is_empty() {
        let med = |name: &str| {
            models.get(name).map_or((f64::NAN, f64::NAN), |v| {
                (
                    median(v.iter().map(|s| s.ms).collect()),
                    median(v.iter().map(|s| s.pss_kib as f64).collect()),
                )
            })
        };
        let (one_ms, one_pss) = med("1 cold");
        println!(
            "{:<44} {:>9} {:>13} {:>9} {:>14}",
            "preload: scikit-learn model (median)", "ready ms", "x 1 cold", "PSS MiB", "x 1 cold"
        );
        for name in ["1 cold", "8 cold", "8 zygote+preload"] {
            let (ms, pss) = med(name);
            println!(
                "{:<44} {ms:>9.0} {:>12.2}x {:>9.0} {:>13.2}x",
                format!("{name} worker(s)"),
                ms / one_ms,
                pss / 1024.0,
                pss / one_pss
            );
            json_rows.push(json!({"name": format!("preload {name}"), "ready_ms": ms, "pss_kib": pss,
                "one_cold_ms": one_ms, "one_cold_pss_kib": one_pss}));
        }
    }
    println!("host RSS per idle worker (16 workers started): {:.0} KiB", rss_per_worker as f64 / 1024.0);
    println!("host allocations per sequential 64 B call (stdio, 1 worker): {allocs:.1}");
    json_rows.push(json!({"name": "host allocations per call", "allocations": allocs}));
    json_rows.push(json!({"name": "host rss per idle worker", "bytes": rss_per_worker}));
    if std::fs::create_dir_all(&args.out).is_ok() {
        let svg = args.out.join(if args.pin { "bench-pinned.svg" } else { "bench.svg" });
        let title =
            format!("snakepit vs the floor (grey), p50, {}", if args.pin { "pinned" } else { "unpinned" });
        match plot(&svg, &title, &chart_rows) {
            Ok(()) => println!("plot: {}", svg.display()),
            Err(e) => eprintln!("bench: cannot draw {}: {e}", svg.display()),
        }
        let path = args.out.join(if args.pin { "bench-pinned.json" } else { "bench.json" });
        let doc = json!({"quick": args.quick, "pinned": args.pin, "repetitions": reps, "cpus": cpus, "results": json_rows});
        match std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap_or_default()) {
            Ok(()) => println!("\nwritten: {}", path.display()),
            Err(e) => eprintln!("bench: cannot write {}: {e}", path.display()),
        }
    }
    std::process::ExitCode::SUCCESS
}

/// Pins the calling thread (and so every thread and process it creates later) to CPU 0.
pub(crate) fn pin_to_cpu0() -> Result<(), String> {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).map_err(|e| e.to_string())?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(|e| e.to_string())
}

static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The system allocator, counting allocations.
pub(crate) struct CountingAlloc;

// SAFETY: every method forwards to the system allocator unchanged; the counter is a side effect.
#[allow(unsafe_code)] // a GlobalAlloc impl is unsafe by definition; it only forwards to System
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

/// Host allocations per sequential trivial call through `pool` (payload encoding included):
/// the least over five batches, since the counter also sees other tasks (a pool that just
/// started is still logging and reaping).
async fn allocations_per_call(pool: &Pool, calls: u64) -> f64 {
    let args = Payload::from(json!({"data": "x".repeat(64)}));
    for _ in 0..50 {
        let _ = pool.execute_with("echo", args.clone(), Default::default()).await;
    }
    let mut least = f64::INFINITY;
    for _ in 0..5 {
        let before = ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..calls {
            let _ = pool.execute_with("echo", args.clone(), Default::default()).await;
        }
        let n = ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed) - before;
        least = least.min(n as f64 / calls as f64);
    }
    least
}
