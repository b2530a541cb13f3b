//! The behaviours of the conformance kit, in the order `snakepit conform` runs them (see
//! `docs/conformance.md` for what each checks and the tools it needs).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use snakepit::core::handshake::CHOSE_UNOFFERED;
use snakepit::core::Ready;
use snakepit::{Bytes, Error, ExitInfo, Heartbeat, Payload, Pool};

use super::{Kit, Outcome};

/// A behaviour's result: `Ok` passes, `Err` fails or skips.
type Check = Result<(), Outcome>;

/// The frame limit of the frame-limit behaviours: small enough to cross with a test payload,
/// big enough for any worker's `ready` (its tool list and docs).
const SMALL_FRAME: usize = 64 * 1024;
type Case = for<'a> fn(&'a Kit) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// Fails the behaviour with a message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Outcome::Fail(format!($($msg)+)));
        }
    };
}

/// Boxes each `async fn(&Kit) -> Check` into a [`Case`].
macro_rules! cases {
    ($($name:ident: $core:expr),* $(,)?) => {
        /// Every behaviour after `handshake`: (name, core, check).
        pub(crate) const ALL: &[(&str, bool, Case)] = &[
            $((stringify!($name), $core, |k| Box::pin(async move { outcome($name(k).await) }))),*
        ];
    };
}

cases!(
    version_refusal: true,
    call_result: true,
    error_mapping: true,
    unknown_command: true,
    large_payload: true,
    crash_seen_at_once: true,
    ping: true,
    shutdown: true,
    frame_limit: true,
    result_frame_limit: false,
    stream_order: false,
    stream_drop_cancels: false,
    stream_error_midway: false,
    host_calls: false,
    session_variables: false,
    timeout_late_reply_dropped: false,
    heartbeat_replaces_stopped_worker: false,
    cancel_interrupts_running_tool: false,
    stdout_safety: false,
    grandchild_cleanup: false,
    binary_segments: false,
    shared_memory: false,
    pipeline_order: false,
    pipeline_cancel_queued: false,
    pipeline_crash: false,
);

fn outcome(c: Check) -> Outcome {
    match c {
        Ok(()) => Outcome::Pass,
        Err(o) => o,
    }
}

/// `Err(Fail)` with the call's error.
fn call<T>(what: &str, r: Result<T, Error>) -> Result<T, Outcome> {
    r.map_err(|e| Outcome::Fail(format!("{what}: {e}")))
}

/// Waits for the pool's counters to satisfy `pred`, or fails naming `what`.
async fn wait(
    pool: &Pool,
    what: &str,
    within: Duration,
    pred: impl Fn(&snakepit::PoolStats) -> bool,
) -> Check {
    match pool.wait_stats(pred, within).await {
        Ok(_) => Ok(()),
        Err(s) => Err(Outcome::Fail(format!("{what} within {within:?} (stats: {s:?})"))),
    }
}

/// The worker's pid through its `pid` tool, checked against the pid the host verified (so the
/// kit never signals a process the worker merely names).
async fn pid_of(pool: &Pool) -> Result<i32, Outcome> {
    let v = call("pid", pool.execute("pid", Value::Null).await)?;
    let claimed = v.as_i64().ok_or_else(|| Outcome::Fail(format!("pid gave {v}, not an integer")))?;
    let verified: Vec<i64> = pool.worker_pids().into_iter().flatten().map(i64::from).collect();
    match i32::try_from(claimed) {
        Ok(pid) if pid > 0 && verified.contains(&claimed) => Ok(pid),
        _ => Err(Outcome::Fail(format!(
            "pid gave {claimed}, not the worker's process (the host verified {verified:?})"
        ))),
    }
}

/// Live (non-zombie) processes whose environment holds `SNAKEPIT_RUN_ID=run_id`.
fn run_pids(run_id: &str) -> Vec<i32> {
    let needle = format!("SNAKEPIT_RUN_ID={run_id}");
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
                && alive(*pid)
        })
        .collect()
}

/// Whether `pid` is a live process (not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Polls (every 20 ms, up to `within`) until `gone()` holds; the remaining pids otherwise.
async fn until_gone(within: Duration, pids: impl Fn() -> Vec<i32>) -> Result<(), Vec<i32>> {
    let t = Instant::now();
    loop {
        let left = pids();
        if left.is_empty() {
            return Ok(());
        }
        if t.elapsed() > within {
            return Err(left);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts one worker; its `ready` tells the other behaviours what it offers.
pub(crate) async fn handshake(k: &Kit) -> Result<Ready, String> {
    let pool = k.builder().build().await.map_err(|e| format!("the worker did not start: {e}"))?;
    let ready = pool.worker_handshakes().into_iter().flatten().next();
    let pids = pool.worker_pids();
    pool.shutdown().await;
    let ready = ready.ok_or("no live worker after start-up")?;
    if pids.first().copied().flatten().is_none() {
        return Err(format!(
            "ready.pid {} is not the worker's process (nor a child of its shepherd)",
            ready.pid
        ));
    }
    Ok(ready)
}

async fn version_refusal(k: &Kit) -> Check {
    match k.builder().offer_versions(vec![99]).build().await {
        // The host's own check, not a `refuse`: the worker answered `ready`.
        Err(Error::VersionMismatch { reason, .. }) if reason.starts_with(CHOSE_UNOFFERED) => {
            Err(Outcome::Fail(format!("offered only version 99, the worker answered ready: {reason}")))
        }
        Err(Error::VersionMismatch { .. }) => Ok(()),
        Err(e) => Err(Outcome::Fail(format!("offered only version 99: expected version_mismatch, got {e}"))),
        Ok(pool) => {
            pool.shutdown().await;
            Err(Outcome::Fail("offered only version 99, the worker answered ready".into()))
        }
    }
}

async fn call_result(k: &Kit) -> Check {
    k.needs(&["add", "echo"])?;
    let pool = k.pool(k.builder()).await?;
    let sum = call("add", pool.execute("add", json!({"a": 2, "b": 3})).await)?;
    ensure!(sum == json!(5), "add {{a: 2, b: 3}} gave {sum}");
    let v = json!({"x": [1, "two", {"three": 3.5, "four": null, "five": true}], "é": "ü"});
    let back = call("echo", pool.execute("echo", v.clone()).await)?;
    ensure!(back == v, "echo changed its argument: {back}");
    pool.shutdown().await;
    Ok(())
}

async fn error_mapping(k: &Kit) -> Check {
    k.needs(&["fail"])?;
    let pool = k.pool(k.builder()).await?;
    match pool.execute("fail", json!({"type": "KeyError", "message": "k"})).await {
        Err(Error::Worker { error, .. }) => {
            ensure!(error.kind == "KeyError", "expected error type KeyError, got {}", error.kind);
            ensure!(error.message.contains('k'), "expected message k, got {:?}", error.message);
        }
        other => return Err(Outcome::Fail(format!("expected a worker error, got {other:?}"))),
    }
    ensure!(pool.stats().crashes == 0, "the worker did not survive the error");
    pool.shutdown().await;
    Ok(())
}

async fn unknown_command(k: &Kit) -> Check {
    ensure!(!k.has("no_such_tool_xyz"), "the worker offers no_such_tool_xyz");
    let pool = k.pool(k.builder()).await?;
    let r = pool.execute("no_such_tool_xyz", Value::Null).await;
    ensure!(matches!(r, Err(Error::UnknownCommand { .. })), "expected unknown_command, got {r:?}");
    pool.shutdown().await;
    Ok(())
}

async fn large_payload(k: &Kit) -> Check {
    k.needs(&["echo"])?;
    let pool = k.pool(k.builder()).await?;
    let big = json!("x".repeat(300_000));
    let back = call("echo of 300 000 characters", pool.execute("echo", big.clone()).await)?;
    ensure!(back == big, "the 300 000 characters came back changed");
    pool.shutdown().await;
    Ok(())
}

async fn crash_seen_at_once(k: &Kit) -> Check {
    k.needs(&["crash", "echo"])?;
    let pool = k.pool(k.builder()).await?;
    let t = Instant::now();
    match pool.execute("crash", json!({"code": 3})).await {
        Err(Error::WorkerCrashed { exit: ExitInfo::Code(3), .. }) => {}
        other => {
            return Err(Outcome::Fail(format!("expected worker_crashed with exit code 3, got {other:?}")))
        }
    }
    ensure!(t.elapsed() < Duration::from_secs(5), "the crash was seen after {:?}", t.elapsed());
    let again = call("a call after the crash", pool.execute("echo", json!("again")).await)?;
    ensure!(again == json!("again"), "echo after the crash gave {again}");
    pool.shutdown().await;
    Ok(())
}

async fn ping(k: &Kit) -> Check {
    let hb =
        Heartbeat { interval: Duration::from_millis(50), timeout: Duration::from_secs(2), max_missed: 2 };
    let pool = k.pool(k.builder().heartbeat(Some(hb))).await?;
    wait(&pool, "5 pongs", Duration::from_secs(10), |s| s.heartbeats >= 5).await?;
    let s = pool.stats();
    ensure!(s.unresponsive == 0 && s.crashes == 0, "the worker was replaced: {s:?}");
    pool.shutdown().await;
    Ok(())
}

async fn shutdown(k: &Kit) -> Check {
    k.needs(&["sleep"])?;
    let pool = Arc::new(k.pool(k.builder()).await?);
    let run_id = pool.run_id().to_string();
    let p = pool.clone();
    let running = tokio::spawn(async move { p.execute("sleep", json!({"ms": 200})).await });
    wait(&pool, "the sleep to start", Duration::from_secs(10), |s| s.busy == 1).await?;
    pool.shutdown().await;
    let r = running.await.map_err(|e| Outcome::Fail(format!("the caller panicked: {e}")))?;
    let r = call("the sleep running at shutdown", r)?;
    ensure!(r.as_f64() == Some(200.0), "sleep gave {r}");
    if let Err(left) = until_gone(Duration::from_secs(5), || run_pids(&run_id)).await {
        return Err(Outcome::Fail(format!("processes left 5 s after shutdown: {left:?}")));
    }
    Ok(())
}

async fn frame_limit(k: &Kit) -> Check {
    k.needs(&["echo", "add"])?;
    let pool = k.pool(k.builder_max_frame(SMALL_FRAME)).await?;
    let r = pool.execute("echo", json!("x".repeat(SMALL_FRAME + 10_000))).await;
    ensure!(
        matches!(r, Err(Error::FrameTooLarge { max: SMALL_FRAME, .. })),
        "expected frame_too_large, got {r:?}"
    );
    let sum = call("add after the refused frame", pool.execute("add", json!({"a": 1, "b": 1})).await)?;
    ensure!(sum == json!(2), "add gave {sum}");
    pool.shutdown().await;
    Ok(())
}

async fn result_frame_limit(k: &Kit) -> Check {
    k.needs(&["big", "add"])?;
    let pool = k.pool(k.builder_max_frame(SMALL_FRAME)).await?;
    match pool.execute("big", json!({"bytes": SMALL_FRAME + 10_000})).await {
        Err(Error::Worker { error, .. }) if error.kind == "FrameTooLarge" => {}
        other => return Err(Outcome::Fail(format!("expected a FrameTooLarge worker error, got {other:?}"))),
    }
    call("add after it", pool.execute("add", json!({"a": 1, "b": 1})).await)?;
    ensure!(pool.stats().crashes == 0, "the worker was replaced");
    pool.shutdown().await;
    Ok(())
}

async fn stream_order(k: &Kit) -> Check {
    k.needs(&["count"])?;
    let pool = k.pool(k.builder()).await?;
    let mut s = call("count", pool.execute_stream("count", json!({"n": 500})).await)?;
    let mut i = 0;
    while let Some(item) = s.next_json().await {
        let item = call("a chunk", item)?;
        ensure!(item == json!({"i": i}), "item {i} was {item}");
        i += 1;
    }
    ensure!(i == 500, "the stream ended after {i} of 500 items");
    drop(s);
    pool.shutdown().await;
    Ok(())
}

async fn stream_drop_cancels(k: &Kit) -> Check {
    k.needs(&["count"])?;
    let pool = k.pool(k.builder()).await?;
    let marker = k.path("stream_finally");
    let mut s =
        call("count", pool.execute_stream("count", json!({"n": 1_000_000_000u64, "path": marker})).await)?;
    for _ in 0..3 {
        match s.next().await {
            Some(Ok(_)) => {}
            other => return Err(Outcome::Fail(format!("expected an item, got {other:?}"))),
        }
    }
    drop(s);
    wait(&pool, "the worker to be free again", Duration::from_secs(10), |s| s.busy == 0 && s.idle == 1)
        .await?;
    let t = Instant::now();
    while !std::path::Path::new(&marker).exists() {
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "the stream's cleanup did not create `path` within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pool.shutdown().await;
    Ok(())
}

async fn stream_error_midway(k: &Kit) -> Check {
    k.needs(&["fail_after"])?;
    let pool = k.pool(k.builder()).await?;
    let s = call("fail_after", pool.execute_stream("fail_after", json!({"n": 2})).await)?;
    let items: Vec<_> = s.collect().await;
    ensure!(items.len() == 3, "expected 2 items and an error, got {items:?}");
    ensure!(
        matches!(&items[2], Err(Error::Worker { error, .. }) if error.kind == "ValueError"),
        "expected a ValueError last, got {:?}",
        items[2]
    );
    pool.shutdown().await;
    Ok(())
}

async fn host_calls(k: &Kit) -> Check {
    k.needs(&["ask_host"])?;
    let pool = k.pool(k.builder()).await?;
    pool.register_host_tool("twice", |v| async move { Ok(json!(v["n"].as_i64().unwrap_or(0) * 2)) });
    let r = call("ask_host", pool.execute("ask_host", json!({"name": "twice", "args": {"n": 21}})).await)?;
    ensure!(r == json!({"ok": 42}), "expected {{\"ok\": 42}}, got {r}");
    pool.shutdown().await;
    Ok(())
}

async fn session_variables(k: &Kit) -> Check {
    k.needs(&["remember"])?;
    let pool = k.pool(k.builder()).await?;
    let s = call("create_session", pool.create_session("conformance", Value::Null).await)?;
    let r = call("remember", s.execute("remember", json!({"name": "k", "value": "v"})).await)?;
    ensure!(r == json!("v"), "remember gave {r}");
    let held = call("the host's session", s.get("k").await)?;
    ensure!(held == Some(json!("v")), "the host's session holds {held:?}");
    pool.shutdown().await;
    Ok(())
}

async fn timeout_late_reply_dropped(k: &Kit) -> Check {
    let sleeper = if k.has("stubborn_sleep") { "stubborn_sleep" } else { "sleep" };
    k.needs(&[sleeper, "echo"])?;
    let pool = k.pool(k.builder()).await?;
    let t = Instant::now();
    let r = pool.execute_timeout(sleeper, json!({"ms": 1000}), Duration::from_millis(100)).await;
    ensure!(matches!(r, Err(Error::Timeout { .. })), "expected timeout, got {r:?}");
    ensure!(t.elapsed() < Duration::from_millis(800), "the timeout came after {:?}", t.elapsed());
    let mine = call("echo after the timeout", pool.execute("echo", json!("mine")).await)?;
    ensure!(mine == json!("mine"), "the next caller got {mine}");
    pool.shutdown().await;
    Ok(())
}

async fn heartbeat_replaces_stopped_worker(k: &Kit) -> Check {
    k.needs(&["pid"])?;
    let hb = Heartbeat {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(200),
        max_missed: 2,
    };
    let pool = k.pool(k.builder().heartbeat(Some(hb))).await?;
    let pid = pid_of(&pool).await?;
    kill(Pid::from_raw(pid), Signal::SIGSTOP).map_err(|e| Outcome::Fail(format!("SIGSTOP: {e}")))?;
    wait(&pool, "the stopped worker to be replaced", Duration::from_secs(10), |s| {
        s.unresponsive >= 1 && s.ready == 1
    })
    .await?;
    let now = pid_of(&pool).await?;
    ensure!(now != pid, "the same worker still answers");
    pool.shutdown().await;
    Ok(())
}

async fn cancel_interrupts_running_tool(k: &Kit) -> Check {
    k.needs(&["spin", "pid"])?;
    let pool = k.pool(k.builder().cancel_grace(Duration::from_secs(20))).await?;
    let pid = pid_of(&pool).await?;
    let t = Instant::now();
    let r = pool.execute_timeout("spin", json!({"seconds": 30}), Duration::from_millis(100)).await;
    ensure!(matches!(r, Err(Error::Timeout { .. })), "expected timeout, got {r:?}");
    let now = pid_of(&pool).await?;
    ensure!(now == pid, "the worker was replaced (pid {pid} -> {now}): the cancel did not interrupt spin");
    ensure!(t.elapsed() < Duration::from_secs(10), "the worker answered again only after {:?}", t.elapsed());
    ensure!(pool.stats().restarts == 0, "the worker was restarted");
    pool.shutdown().await;
    Ok(())
}

async fn stdout_safety(k: &Kit) -> Check {
    k.needs(&["print_stdout", "echo"])?;
    let pool = k.pool(k.builder()).await?;
    for _ in 0..3 {
        call(
            "print_stdout",
            pool.execute("print_stdout", json!({"text": "conformance: this line goes to stdout"})).await,
        )?;
    }
    let back = call("echo after printing", pool.execute("echo", json!("after")).await)?;
    ensure!(back == json!("after"), "echo gave {back}");
    let s = pool.stats();
    ensure!(s.crashes == 0, "printing broke the worker: {s:?}");
    pool.shutdown().await;
    Ok(())
}

async fn grandchild_cleanup(k: &Kit) -> Check {
    k.needs(&["grandchild"])?;
    let pool = k.pool(k.builder()).await?;
    let run_id = pool.run_id().to_string();
    let mut kids = Vec::new();
    for setsid in [false, true] {
        let v = call("grandchild", pool.execute("grandchild", json!({"setsid": setsid})).await)?;
        let pid = v.as_i64().and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0);
        let pid = pid.ok_or_else(|| Outcome::Fail(format!("grandchild gave {v}, not a pid")))?;
        // Only a process of this run counts (it inherited the worker's SNAKEPIT_RUN_ID).
        ensure!(
            run_pids(&run_id).contains(&pid),
            "grandchild gave {pid}, which is not a live child of the worker"
        );
        kids.push(pid);
    }
    pool.shutdown().await;
    let left_of_run = || run_pids(&run_id).into_iter().filter(|p| kids.contains(p)).collect();
    if let Err(left) = until_gone(Duration::from_secs(5), left_of_run).await {
        for p in &left {
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
        }
        return Err(Outcome::Fail(format!("children left 5 s after shutdown: {left:?}")));
    }
    Ok(())
}

async fn binary_segments(k: &Kit) -> Check {
    k.needs(&["echo"])?;
    if !k.ready.as_ref().is_some_and(|r| r.segments) {
        return Err(Outcome::Skip("needs binary segments (the worker does not announce `segments`)".into()));
    }
    let pool = k.pool(k.builder()).await?;
    let data = Bytes::from((0..=255u8).cycle().take(300_000).collect::<Vec<_>>());
    let back = call("echo of 300 000 bytes", pool.execute_bytes("echo", data.clone()).await)?;
    ensure!(back == data, "the bytes came back changed");
    let args = Payload::mixed(&json!({"a": {"$seg": 0}, "n": 1}), vec![Bytes::from_static(b"xy")]);
    let out = call("echo of a mixed payload", pool.execute_with("echo", args, Default::default()).await)?;
    let v = out.to_value().map_err(|e| Outcome::Fail(format!("the mixed echo: {e}")))?;
    ensure!(v == json!({"a": {"$seg": 0}, "n": 1}), "the mixed echo's JSON is {v}");
    ensure!(out.segments() == [Bytes::from_static(b"xy")], "the mixed echo's segments differ");
    pool.shutdown().await;
    Ok(())
}

async fn shared_memory(k: &Kit) -> Check {
    k.needs(&["echo"])?;
    let pool = k.pool(k.builder()).await?;
    if !pool.worker_handshakes().iter().flatten().all(|h| h.shm) {
        pool.shutdown().await;
        return Err(Outcome::Skip("needs shared memory (the worker mapped no arena)".into()));
    }
    let before = snakepit::shm::counters();
    let data = Bytes::from((0..=255u8).cycle().take(1 << 20).collect::<Vec<_>>());
    let back = call("echo of 1 MiB", pool.execute_bytes("echo", data.clone()).await)?;
    ensure!(back == data, "the bytes came back changed");
    let after = snakepit::shm::counters();
    ensure!(
        after.to_worker > before.to_worker && after.from_worker > before.from_worker,
        "the bytes did not go through the arena: {after:?}"
    );
    pool.shutdown().await;
    Ok(())
}

/// A pool of one worker offered a pipeline of 4, or `Skip` when the worker does not pipeline.
async fn pipelined(k: &Kit) -> Result<Arc<Pool>, Outcome> {
    let b = k.builder().pipeline_depth(4).cancel_grace(Duration::from_millis(300));
    let pool = Arc::new(k.pool(b).await?);
    if pool.worker_handshakes().iter().flatten().all(|h| h.pipeline_depth == 4) {
        return Ok(pool);
    }
    pool.shutdown().await;
    Err(Outcome::Skip("needs pipelining (the worker does not announce `pipeline_depth`)".into()))
}

async fn pipeline_order(k: &Kit) -> Check {
    k.needs(&["journal"])?;
    let pool = pipelined(k).await?;
    let out = futures::future::join_all((0..24).map(|i| pool.execute("journal", json!({"entry": i})))).await;
    if let Some(Err(e)) = out.iter().find(|r| r.is_err()) {
        return Err(Outcome::Fail(format!("a journal call failed: {e}")));
    }
    let journal = call("journal", pool.execute("journal", json!({})).await)?;
    ensure!(journal == json!((0..24).collect::<Vec<_>>()), "the worker ran them in the order {journal}");
    pool.shutdown().await;
    Ok(())
}

async fn pipeline_cancel_queued(k: &Kit) -> Check {
    k.needs(&["sleep", "touch", "pid"])?;
    let pool = pipelined(k).await?;
    let pid = pid_of(&pool).await?;
    let marker = k.path("queued_ran");
    let long = pool.execute("sleep", json!({"ms": 800}));
    let queued = pool.execute_timeout("touch", json!({"path": marker}), Duration::from_millis(100));
    let (long, queued) = tokio::join!(long, queued);
    call("the long call ahead", long)?;
    ensure!(
        matches!(queued, Err(Error::Timeout { .. })),
        "expected timeout for the queued call, got {queued:?}"
    );
    let now = pid_of(&pool).await?;
    ensure!(now == pid, "the worker was replaced");
    ensure!(!std::path::Path::new(&marker).exists(), "the cancelled queued call ran");
    pool.shutdown().await;
    Ok(())
}

async fn pipeline_crash(k: &Kit) -> Check {
    k.needs(&["crash", "echo", "add"])?;
    let pool = pipelined(k).await?;
    let crash = pool.execute("crash", json!({"code": 3}));
    let queued = futures::future::join_all((0..3).map(|i| pool.execute("echo", json!(i))));
    let (crash, queued) = tokio::join!(crash, queued);
    ensure!(matches!(crash, Err(Error::WorkerCrashed { .. })), "expected worker_crashed, got {crash:?}");
    for q in queued {
        ensure!(
            matches!(q, Err(Error::NotStarted { .. })),
            "expected not_started for a queued call, got {q:?}"
        );
    }
    let sum = call("add on the replacement", pool.execute("add", json!({"a": 1, "b": 2})).await)?;
    ensure!(sum == json!(3), "add gave {sum}");
    pool.shutdown().await;
    Ok(())
}
