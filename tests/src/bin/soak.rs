//! `soak`: a pool of real Python workers (`snakepit_bridge.showcase`) under mixed load while
//! faults are injected, for `--minutes N` (run by `cargo xtask soak --minutes N`, in release).
//!
//! Load: one sequential caller and several concurrent callers mixing echo calls, raw bytes (1 KiB
//! to 1 MiB, the large ones through the shared-memory arena), streams (read to the end or
//! dropped midway), host calls, session calls and raised exceptions, each call
//! carrying a unique token that the reply must echo. Faults, every few hundred milliseconds:
//! worker crashes, hangs past the deadline (interruptible, stubborn and busy-spinning), garbage
//! frames, SIGSTOP of a random worker, chaos kills before a call and after a reply, dropped
//! heartbeats, memory hoarding (recycled by memory) and recycling by request count.
//!
//! Checks, after a 15 s warm-up: host RSS grows by at most max(10 %, 8 MiB); the host's fd
//! count by at most the pool size; every call gets exactly one outcome, of a kind expected for
//! what it was, and a reply carries its own call's token; more clean calls fail than injected
//! faults can explain is a violation; no marked process is left after shutdown. Prints one
//! summary line and exits 1 naming every violation.
//!
//! `--pipeline-depth N` runs the pool pipelined: calls queued behind a crash then fail with
//! `not_started` (clean calls opt in to one retry), and those queued behind a garbage frame with
//! `protocol` (every call in flight on a connection that breaks the protocol); neither counts as
//! a clean failure, and the second may not pass `depth - 1` per garbage frame. A stopped worker
//! holds the calls queued behind its running one too, so each injected kill or SIGSTOP may fail
//! up to `depth` clean calls.

#![deny(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snakepit::chaos::Chaos;
use snakepit::{CallOptions, Error, Heartbeat, Payload, Pool, Python, StdioTransport};
use snakepit_tests::procs;

const WARMUP: Duration = Duration::from_secs(15);
/// The deadline of a clean call.
const CLEAN_TIMEOUT: Duration = Duration::from_secs(10);
/// The deadline of a call meant to hang past it.
const HANG_TIMEOUT: Duration = Duration::from_millis(300);
/// A call without an outcome this long after its deadline is a lost reply.
const LOST_AFTER: Duration = Duration::from_secs(30);

/// Error kinds any call may see because of a fault aimed elsewhere in its worker's life: a
/// chaos kill before the call, a SIGSTOP of its worker.
const AMBIENT: &[&str] = &["worker_crashed", "timeout"];

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every call the driver made, and what became of it.
#[derive(Debug, Default)]
struct Ledger {
    next: AtomicU64,
    /// Calls in flight: token → operation.
    calls: Mutex<HashMap<u64, &'static str>>,
    /// "op:kind" → count.
    outcomes: Mutex<BTreeMap<String, u64>>,
    violations: Mutex<Vec<String>>,
    /// Clean calls (not faults) that failed in a way only a fault explains.
    clean_failures: AtomicU64,
    /// The pool pipelines at this depth (> 1): `not_started` is ambient (queued behind a
    /// crash), and so is `protocol` (queued behind a garbage frame).
    depth: usize,
    /// Pipelined: calls that ended `protocol` queued behind a garbage frame.
    queued_protocol: AtomicU64,
    /// Faults that may fail one clean call each (chaos kills, SIGSTOPs).
    ambient_faults: AtomicU64,
    injected: Mutex<BTreeMap<&'static str, u64>>,
}

impl Ledger {
    fn issue(&self, op: &'static str) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.calls).insert(token, op);
        token
    }

    fn violation(&self, v: String) {
        eprintln!("soak: violation: {v}");
        lock(&self.violations).push(v);
    }

    fn inject(&self, fault: &'static str) {
        *lock(&self.injected).entry(fault).or_default() += 1;
    }

    /// Records the one outcome of call `token`: `Ok(())`, or the error kind it ended with.
    fn record(&self, token: u64, op: &'static str, kind: &str, expected: &[&str], clean: bool) {
        // A call's entry goes with its first outcome, so the ledger holds only calls in flight
        // (its size must not pass for a leak of the pool).
        if lock(&self.calls).remove(&token).is_none() {
            self.violation(format!("duplicated outcome (or one for a call never made): {op} call {token}"));
            return;
        }
        *lock(&self.outcomes).entry(format!("{op}:{kind}")).or_default() += 1;
        if self.depth > 1 && kind == "not_started" {
            return;
        }
        if self.depth > 1 && kind == "protocol" && op != "garbage" {
            self.queued_protocol.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !expected.contains(&kind) {
            if clean {
                self.clean_failures.fetch_add(1, Ordering::Relaxed);
            }
            if !AMBIENT.contains(&kind) {
                self.violation(format!("unexpected outcome: {op} call {token} ended with `{kind}`"));
            }
        }
    }
}

/// One call's result as the driver sees it: a kind, or a violation found in the reply itself.
type Outcome = Result<&'static str, String>;

fn kind(e: &Error) -> &'static str {
    e.kind()
}

fn check_echo(token: u64, got: &Value, what: &str) -> Outcome {
    if got.get("t").and_then(Value::as_u64) == Some(token) {
        Ok("ok")
    } else {
        Err(format!("misrouted reply: {what} call {token} got {got}"))
    }
}

struct Driver {
    pool: Pool,
    chaos: Chaos,
    ledger: Ledger,
    stop: AtomicBool,
    marker: String,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("marker", &self.marker).finish()
    }
}

impl Driver {
    /// Runs one call of `op` with a fresh token and records its outcome (or its loss).
    async fn call(self: &Arc<Self>, op: &'static str, expected: &[&str], clean: bool) {
        let token = self.ledger.issue(op);
        let fut = self.run(op, token);
        let outcome = match tokio::time::timeout(CLEAN_TIMEOUT + LOST_AFTER, fut).await {
            Ok(o) => o,
            Err(_) => Err(format!(
                "lost reply: {op} call {token} had no outcome after {:?}",
                CLEAN_TIMEOUT + LOST_AFTER
            )),
        };
        match outcome {
            Ok(kind) => self.ledger.record(token, op, kind, expected, clean),
            Err(v) => {
                self.ledger.record(token, op, "violation", &["violation"], clean);
                self.ledger.violation(v);
            }
        }
    }

    async fn run(&self, op: &'static str, token: u64) -> Outcome {
        let pool = &self.pool;
        let clean = CallOptions::timeout(CLEAN_TIMEOUT).retry_not_started(true);
        let hang = CallOptions::timeout(HANG_TIMEOUT);
        let value = |r: Result<Payload, Error>| r.and_then(|p| p.to_value());
        match op {
            "echo" | "seq_echo" => {
                let pad = "x".repeat((token % 7) as usize * 97);
                match value(
                    pool.execute_with("echo", Payload::from(json!({"t": token, "pad": pad})), clean).await,
                ) {
                    Ok(v) => check_echo(token, &v, op),
                    Err(e) => Ok(kind(&e)),
                }
            }
            "bytes" => {
                // Raw bytes, 1 KiB to 1 MiB: the large ones through the shared-memory arena.
                let size = [1024usize, 100 * 1024, 1 << 20][(token % 3) as usize];
                let mut data = vec![(token % 251) as u8; size];
                data[..8].copy_from_slice(&token.to_be_bytes());
                let data = snakepit::Bytes::from(data);
                match pool.execute_with("echo", Payload::from_bytes(data.clone()), clean).await {
                    Ok(p) => match p.into_segment() {
                        Ok(back) if back == data => Ok("ok"),
                        Ok(back) => Err(format!(
                            "misrouted or corrupted bytes: call {token} ({size} B) got {} bytes starting {:?}",
                            back.len(),
                            &back[..back.len().min(8)]
                        )),
                        Err(e) => Ok(kind(&e)),
                    },
                    Err(e) => Ok(kind(&e)),
                }
            }
            "host" => {
                let args = json!({"name": "echo", "args": {"t": token}});
                match value(pool.execute_with("ask_host", Payload::from(args), clean).await) {
                    Ok(v) => check_echo(token, v.get("ok").unwrap_or(&Value::Null), op),
                    Err(e) => Ok(kind(&e)),
                }
            }
            "fail" => {
                let args = json!({"type": "ValueError", "message": format!("token-{token}-end")});
                match pool.execute_with("fail", Payload::from(args), clean).await {
                    Ok(p) => Err(format!("`fail` call {token} succeeded: {:?}", p.to_value())),
                    Err(e @ Error::Worker { .. })
                        if !e.to_string().contains(&format!("token-{token}-end")) =>
                    {
                        Err(format!("misrouted error: fail call {token} got {e}"))
                    }
                    Err(e) => Ok(kind(&e)),
                }
            }
            "session" => self.session(token).await,
            "stream" | "stream_drop" => self.stream(op, token).await,
            "crash" => Ok(pool
                .execute_with("crash", Payload::from(json!({"code": 3})), clean)
                .await
                .err()
                .as_ref()
                .map_or("ok", kind)),
            "hang" => Ok(pool
                .execute_with("sleep", Payload::from(json!({"ms": 5000})), hang)
                .await
                .err()
                .as_ref()
                .map_or("ok", kind)),
            "stubborn" => Ok(pool
                .execute_with("stubborn_sleep", Payload::from(json!({"ms": 5000})), hang)
                .await
                .err()
                .as_ref()
                .map_or("ok", kind)),
            "spin" => Ok(pool
                .execute_with("spin", Payload::from(json!({"seconds": 5})), hang)
                .await
                .err()
                .as_ref()
                .map_or("ok", kind)),
            "garbage" => {
                let g = ["text", "json", "oversize", "partial"][(token % 4) as usize];
                Ok(pool
                    .execute_with("garbage", Payload::from(json!({"kind": g})), clean)
                    .await
                    .err()
                    .as_ref()
                    .map_or("ok", kind))
            }
            "leak" => Ok(pool
                .execute_with("leak", Payload::from(json!({"mb": 40})), clean)
                .await
                .err()
                .as_ref()
                .map_or("ok", kind)),
            other => Err(format!("driver bug: unknown op {other}")),
        }
    }

    /// A session: create, a write through the host from the worker, a read (maybe elsewhere),
    /// close. The token must come back both times.
    async fn session(&self, token: u64) -> Outcome {
        let id = format!("soak-{token}");
        let session = match self.pool.create_session(&id, json!({"t": token})).await {
            Ok(s) => s,
            Err(e) => return Err(format!("session {id}: create failed: {e}")),
        };
        let opts = CallOptions::timeout(CLEAN_TIMEOUT).retry_not_started(true);
        let set = json!({"name": "v", "value": {"t": token}});
        let r = self.pool.execute_in_session_with(&id, "remember", Payload::from(set), opts.clone()).await;
        let outcome = match r.and_then(|p| p.to_value()) {
            Ok(v) => match check_echo(token, &v, "session remember") {
                Ok(_) => {
                    let get = Payload::from(json!({"name": "v"}));
                    match self
                        .pool
                        .execute_in_session_with(&id, "recall", get, opts)
                        .await
                        .and_then(|p| p.to_value())
                    {
                        Ok(v) => check_echo(token, &v, "session recall"),
                        Err(e) => Ok(kind(&e)),
                    }
                }
                Err(v) => Err(v),
            },
            Err(e) => Ok(kind(&e)),
        };
        match session.close().await {
            Ok(true) => outcome,
            Ok(false) => Err(format!("session {id}: gone before its close")),
            Err(e) => Err(format!("session {id}: close failed: {e}")),
        }
    }

    /// A generator of `n` items, read to the end (or dropped after a few for `stream_drop`):
    /// exactly 0..n in order.
    async fn stream(&self, op: &'static str, token: u64) -> Outcome {
        let n = 1 + token % 40;
        let stop_after = if op == "stream_drop" { n / 2 } else { n + 1 };
        let opts = CallOptions::timeout(CLEAN_TIMEOUT).retry_not_started(true);
        let mut s =
            match self.pool.execute_stream_with(None, "count", Payload::from(json!({"n": n})), opts).await {
                Ok(s) => s,
                Err(e) => return Ok(kind(&e)),
            };
        let mut i = 0u64;
        loop {
            if i == stop_after {
                return Ok("ok"); // dropped midway: cancelled in the worker
            }
            match s.next_json().await {
                None if i == n => return Ok("ok"),
                None => return Err(format!("stream call {token}: ended after {i} of {n} items")),
                Some(Ok(v)) if v.get("i").and_then(Value::as_u64) == Some(i) && i < n => i += 1,
                Some(Ok(v)) => return Err(format!("stream call {token}: item {i} of {n} was {v}")),
                Some(Err(e)) => return Ok(kind(&e)),
            }
        }
    }

    /// Concurrent callers: a weighted mix of clean calls.
    async fn mixed(self: Arc<Self>, seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        while !self.stop.load(Ordering::Relaxed) {
            let op = match rng.u32(0..100) {
                0..=39 => "echo",
                40..=44 => "bytes",
                45..=59 => "stream",
                60..=67 => "stream_drop",
                68..=79 => "host",
                80..=91 => "session",
                _ => "fail",
            };
            let expected: &[&str] = if op == "fail" { &["worker"] } else { &["ok"] };
            self.call(op, expected, true).await;
            // Load pacing: the machine is shared.
            tokio::time::sleep(Duration::from_millis(rng.u64(1..4))).await;
        }
    }

    /// One caller making plain calls one after the other.
    async fn sequential(self: Arc<Self>) {
        while !self.stop.load(Ordering::Relaxed) {
            self.call("seq_echo", &["ok"], true).await;
        }
    }

    /// Injects a fault every few hundred milliseconds; fault calls run on their own tasks.
    async fn faults(self: Arc<Self>, seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut tasks = tokio::task::JoinSet::new();
        while !self.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(rng.u64(200..600))).await;
            while tasks.try_join_next().is_some() {}
            let call = |op: &'static str, expected: &'static [&'static str]| {
                let d = self.clone();
                async move { d.call(op, expected, false).await }
            };
            match rng.u32(0..11) {
                0 => drop(tasks.spawn(call("crash", &["worker_crashed"]))),
                1 => drop(tasks.spawn(call("hang", &["timeout"]))),
                2 => drop(tasks.spawn(call("stubborn", &["timeout"]))),
                3 => drop(tasks.spawn(call("spin", &["timeout"]))),
                4 => drop(tasks.spawn(call("garbage", &["protocol"]))),
                5 => drop(tasks.spawn(call("leak", &["ok"]))),
                6 => {
                    self.chaos.clone().kill_before_call(self.chaos.calls() + 1 + rng.u64(0..20));
                    self.ledger.ambient_faults.fetch_add(1, Ordering::Relaxed);
                    self.ledger.inject("chaos_kill_before");
                }
                7 => {
                    self.chaos.clone().kill_after_reply(self.chaos.calls() + 1 + rng.u64(0..20));
                    // The kill is sent as the reply is settled: a call handed the dying worker
                    // in that window fails too.
                    self.ledger.ambient_faults.fetch_add(1, Ordering::Relaxed);
                    self.ledger.inject("chaos_kill_after");
                }
                8 => {
                    self.chaos.clone().drop_heartbeats(2);
                    self.ledger.inject("drop_heartbeats");
                }
                _ => {
                    if self.sigstop(&mut rng) {
                        self.ledger.ambient_faults.fetch_add(1, Ordering::Relaxed);
                        self.ledger.inject("sigstop");
                    }
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// SIGSTOPs a random live worker (checked to carry this run's marker): its call times out
    /// or its heartbeats fail, and it is killed and replaced.
    fn sigstop(&self, rng: &mut fastrand::Rng) -> bool {
        let marked = procs::marked_pids(&self.marker);
        let pids: Vec<i32> =
            self.pool.worker_pids().into_iter().flatten().filter_map(|p| i32::try_from(p).ok()).collect();
        let pids: Vec<i32> = pids.into_iter().filter(|p| marked.contains(p)).collect();
        if pids.is_empty() {
            return false;
        }
        let pid = pids[rng.usize(0..pids.len())];
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).is_ok()
    }
}

/// The host's resident set in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// The host's open descriptors.
fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn parse_args() -> Result<(f64, usize, usize), String> {
    let mut minutes: f64 = 1.0;
    let mut size = 4;
    let mut depth = 1;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().ok_or_else(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--minutes" => minutes = v.parse().map_err(|e| format!("--minutes {v}: {e}"))?,
            "--size" => size = v.parse().map_err(|e| format!("--size {v}: {e}"))?,
            "--pipeline-depth" => depth = v.parse().map_err(|e| format!("--pipeline-depth {v}: {e}"))?,
            _ => {
                return Err(format!(
                    "unknown argument {a} (usage: soak [--minutes N] [--size N] [--pipeline-depth N])"
                ))
            }
        }
    }
    if !minutes.is_finite() || minutes * 60.0 <= WARMUP.as_secs_f64() + 5.0 || minutes > 10_000.0 || size == 0
    {
        return Err(format!("--minutes must leave time after the {WARMUP:?} warm-up, --size at least 1"));
    }
    Ok((minutes, size, depth))
}

fn main() -> ExitCode {
    let (minutes, size, depth) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let marker = procs::new_marker();
    let r = rt.block_on(soak(minutes, size, depth, marker.clone()));
    drop(rt);
    // Belt and braces: whatever the outcome, nothing of ours survives the driver.
    procs::kill_marked(&marker);
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn soak(minutes: f64, size: usize, depth: usize, marker: String) -> Result<bool, String> {
    let chaos = Chaos::new();
    let pool = Pool::builder()
        .adapter(Python::showcase())
        .transport(StdioTransport::new().frame_timeout(Duration::from_millis(500)))
        .env(procs::MARKER_VAR, &marker)
        .size(size)
        .pipeline_depth(depth)
        .queue_timeout(Duration::from_secs(20))
        .restart_backoff(Duration::from_millis(10), Duration::from_millis(200))
        .restart_limit(100_000, Duration::from_secs(60))
        .heartbeat(Some(Heartbeat {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(300),
            max_missed: 2,
        }))
        .cancel_grace(Duration::from_millis(300))
        .max_requests(400)
        .recycle_jitter(0.2)
        .max_memory(100 << 20, Duration::from_millis(250))
        .chaos(chaos.clone())
        .build()
        .await
        .map_err(|e| format!("pool: {e}"))?;
    pool.register_host_tool("echo", |v| async move { Ok(v) });
    let ledger = Ledger { depth, ..Ledger::default() };
    let d = Arc::new(Driver { pool, chaos, ledger, stop: AtomicBool::new(false), marker });

    let start = Instant::now();
    let total = Duration::from_secs_f64(minutes * 60.0);
    let seed = fastrand::u64(..);
    eprintln!("soak: {minutes} min, {size} workers, pipeline depth {depth}, seed {seed}");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(d.clone().sequential());
    for i in 0..6 {
        tasks.spawn(d.clone().mixed(seed.wrapping_add(i)));
    }
    tasks.spawn(d.clone().faults(seed.wrapping_add(100)));

    tokio::time::sleep(WARMUP).await;
    let (rss0, fds0) = (rss_kib(), fds());
    eprintln!("soak: after warm-up: rss {rss0} KiB, {fds0} fds, {:?}", d.pool.stats());
    let mut next_report = Instant::now() + Duration::from_secs(60);
    while start.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(1).min(total.saturating_sub(start.elapsed()))).await;
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(60);
            eprintln!(
                "soak: {:.0}s: rss {} KiB, {} fds, {} calls, {:?}",
                start.elapsed().as_secs_f64(),
                rss_kib(),
                fds(),
                d.ledger.next.load(Ordering::Relaxed),
                d.pool.stats()
            );
        }
    }
    d.stop.store(true, Ordering::Relaxed);
    let drain = tokio::time::timeout(CLEAN_TIMEOUT + LOST_AFTER * 2, async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                d.ledger.violation(format!("a driver task failed: {e}"));
            }
        }
    });
    if drain.await.is_err() {
        d.ledger.violation("driver tasks still running long after the stop".into());
    }
    // Quiesce: the pool whole and idle again, then measure.
    if let Err(e) = d
        .pool
        .wait_stats(|s| s.ready == s.size && s.busy == 0 && s.queued == 0, Duration::from_secs(30))
        .await
    {
        d.ledger
            .violation(format!("the pool did not come back whole and idle: {e:?} ({:?})", d.pool.stats()));
    }
    // A recycled or replaced worker may still be stopping (its pipes still open) when the pool
    // is whole again: give the count up to 10 s to settle, checking every 100 ms.
    let settle = Instant::now() + Duration::from_secs(10);
    let mut fds1 = fds();
    while fds1 > fds0 + size && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fds1 = fds();
    }
    let rss1 = rss_kib();
    let stats = d.pool.stats();

    let l = &d.ledger;
    let rss_allowed = (rss0 / 10).max(8 << 10);
    if rss1 > rss0 + rss_allowed {
        l.violation(format!("host RSS grew from {rss0} KiB to {rss1} KiB (allowed +{rss_allowed} KiB)"));
    }
    if fds1 > fds0 + size {
        l.violation(format!("host fds grew from {fds0} to {fds1} (allowed +{size})"));
    }
    {
        let calls = lock(&l.calls);
        let missing: Vec<_> = calls.iter().take(10).collect();
        if !missing.is_empty() {
            l.violation(format!("{} calls without an outcome, e.g. {missing:?}", calls.len()));
        }
    }
    let garbage = lock(&l.outcomes).get("garbage:protocol").copied().unwrap_or(0);
    let queued_protocol = l.queued_protocol.load(Ordering::Relaxed);
    if queued_protocol > garbage * (l.depth.max(1) as u64 - 1) {
        l.violation(format!(
            "{queued_protocol} calls failed `protocol` behind {garbage} garbage frames at pipeline depth {}",
            l.depth
        ));
    }
    let (clean_failures, ambient) =
        (l.clean_failures.load(Ordering::Relaxed), l.ambient_faults.load(Ordering::Relaxed));
    // Pipelined, a stopped worker fails the calls queued behind its running one as well.
    let per_fault = l.depth.max(1) as u64;
    if clean_failures > ambient * per_fault {
        l.violation(format!(
            "{clean_failures} clean calls failed but only {ambient} injected faults (chaos kills, SIGSTOPs) could fail \
             {per_fault} each"
        ));
    }

    d.pool.shutdown().await;
    let left = procs::wait_none_left(&d.marker, Duration::from_secs(10));
    if !left.is_empty() {
        l.violation(format!("processes left after shutdown: {left:?}"));
    }

    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    let outcomes = lock(&l.outcomes).clone();
    for (k, n) in &outcomes {
        *by_kind.entry(k.split_once(':').map_or(k.as_str(), |(_, kind)| kind)).or_default() += n;
    }
    let violations = lock(&l.violations).clone();
    eprintln!("soak: outcomes by call: {outcomes:?}");
    eprintln!("soak: faults injected: {:?}", lock(&l.injected));
    println!(
        "soak: {} minutes={minutes} calls={} outcomes={by_kind:?} restarts={} crashes={} recycled={} unresponsive={} rss_kib={rss0}->{rss1} fds={fds0}->{fds1} violations={}",
        if violations.is_empty() { "PASS" } else { "FAIL" },
        l.next.load(Ordering::Relaxed),
        stats.restarts,
        stats.crashes,
        stats.recycled,
        stats.unresponsive,
        violations.len(),
    );
    for v in &violations {
        eprintln!("soak: violation: {v}");
    }
    Ok(violations.is_empty())
}
