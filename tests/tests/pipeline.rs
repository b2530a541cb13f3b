//! Pipelined workers end to end, with real Python workers over stdio: calls queued in a
//! worker run in the order sent; a queued call that is cancelled (deadline) is answered
//! `Cancelled` without running, and its grace does not run while the call ahead works; the
//! running call is interrupted by its own position's signal, never the next call; a crash fails
//! the running call with `WorkerCrashed` and the queued ones with `NotStarted`, which
//! `retry_not_started` runs again; streams and host calls keep the queued calls.

use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;
use serde_json::{json, Value};
use snakepit::{CallOptions, Error, Python};
use snakepit_tests::Reaper;

const WORKER: &str = r#"
import os, time
from snakepit_bridge import tool

ran = []

@tool
def record(i, sleep=0.0):
    ran.append(i)
    if sleep:
        time.sleep(sleep)
    return i

@tool
def order():
    return ran

@tool
def spin(seconds):
    # A busy tool: only the cancel signal stops it before it ends.
    ran.append("spin")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "finished"

@tool
def pid():
    return os.getpid()

@tool
def crash():
    os._exit(3)

@tool
def count(n):
    for i in range(n):
        yield i

@tool
def blob(n):
    return bytes(n)

@tool
def ask(ctx, x):
    return ctx.call_host("double", {"x": x})
"#;

fn python(r: &Reaper) -> Python {
    Python::script(r.script("w.py", WORKER))
}

/// One worker with a pipeline of 4 and the given cancel grace.
async fn pipelined(r: &Reaper, grace: Duration) -> snakepit::Pool {
    let b = r.builder().adapter(python(r)).size(1).pipeline_depth(4).cancel_grace(grace);
    b.build().await.expect("pool")
}

async fn call(pool: &snakepit::Pool, cmd: &str, args: Value) -> Result<Value, Error> {
    pool.execute(cmd, args).await
}

async fn call_with(pool: &snakepit::Pool, cmd: &str, args: Value, opts: CallOptions) -> Result<Value, Error> {
    pool.execute_with(cmd, args.into(), opts).await?.to_value()
}

#[tokio::test]
async fn the_worker_announces_its_depth_and_runs_queued_calls_in_the_order_sent() {
    let r = Reaper::new();
    let pool = pipelined(&r, Duration::from_secs(2)).await;
    let ready = pool.worker_handshakes().remove(0).expect("ready");
    assert_eq!(ready.pipeline_depth, 4);
    assert_eq!(ready.cancel_signals.len(), 5, "depth + 1: {ready:?}");
    assert_eq!(ready.cancel_signal_for(6), Some(ready.cancel_signals[1]));
    // join_all polls in order: the first four frames go out in index order, the rest wait in
    // the pool's FIFO queue and follow in order.
    let calls =
        (0..40).map(|i| call(&pool, "record", json!({"i": i, "sleep": if i == 0 { 0.05 } else { 0.0 }})));
    let out: Vec<_> = join_all(calls).await.into_iter().map(|r| r.expect("record")).collect();
    assert_eq!(out, (0..40).map(|i| json!(i)).collect::<Vec<_>>());
    let ran = call(&pool, "order", json!({})).await.expect("order");
    assert_eq!(ran, json!((0..40).collect::<Vec<_>>()), "run in the order sent");
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_queued_call_whose_deadline_passes_never_runs_and_its_worker_stays() {
    let r = Reaper::new();
    let pool = pipelined(&r, Duration::from_millis(200)).await;
    let before = call(&pool, "pid", json!({})).await.expect("pid");
    // The first call works 800 ms; the second waits behind it and times out after 100 ms: it
    // is cancelled by the frame alone. Its grace (200 ms) must not run while the first works.
    let long = call(&pool, "record", json!({"i": "long", "sleep": 0.8}));
    let queued =
        call_with(&pool, "record", json!({"i": "queued"}), CallOptions::timeout(Duration::from_millis(100)));
    let (long, queued) = tokio::join!(long, queued);
    assert_eq!(long.expect("long"), json!("long"));
    assert!(matches!(queued, Err(Error::Timeout { .. })), "{queued:?}");
    let ran = call(&pool, "order", json!({})).await.expect("order");
    assert_eq!(ran, json!(["long"]), "the cancelled call never ran");
    assert_eq!(call(&pool, "pid", json!({})).await.expect("pid"), before, "the worker was kept");
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn the_running_call_is_interrupted_by_its_own_signal_and_the_next_one_runs() {
    let r = Reaper::new();
    let pool = pipelined(&r, Duration::from_secs(5)).await;
    let before = call(&pool, "pid", json!({})).await.expect("pid");
    // Several rounds, so the interrupted call sits at different positions modulo the depth.
    for round in 0..6 {
        let spin = call_with(
            &pool,
            "spin",
            json!({"seconds": 30}),
            CallOptions::timeout(Duration::from_millis(150)),
        );
        let next = call(&pool, "record", json!({"i": round}));
        let (spin, next) = tokio::join!(spin, next);
        assert!(matches!(spin, Err(Error::Timeout { .. })), "round {round}: {spin:?}");
        assert_eq!(next.expect("next"), json!(round), "round {round}: the queued call ran");
    }
    assert_eq!(call(&pool, "pid", json!({})).await.expect("pid"), before, "interrupted, not killed");
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_crash_fails_the_running_call_and_the_queued_ones_did_not_start() {
    let r = Reaper::new();
    let pool = pipelined(&r, Duration::from_secs(2)).await;
    let crash = call(&pool, "crash", json!({}));
    let queued = (0..3).map(|i| call(&pool, "record", json!({"i": i})));
    let (crash, queued) = tokio::join!(crash, join_all(queued));
    assert!(matches!(crash, Err(Error::WorkerCrashed { .. })), "{crash:?}");
    for q in &queued {
        match q {
            Err(e @ Error::NotStarted { command, .. }) => {
                assert_eq!(command, "record");
                assert_eq!(e.kind(), "not_started");
            }
            other => panic!("a queued call: {other:?}"),
        }
    }
    // Opted in: the queued calls run once more, on the replacement.
    let crash = call(&pool, "crash", json!({}));
    let opts = || CallOptions::default().retry_not_started(true);
    let queued = (0..3).map(|i| call_with(&pool, "record", json!({"i": i}), opts()));
    let (crash, queued) = tokio::join!(crash, join_all(queued));
    assert!(matches!(crash, Err(Error::WorkerCrashed { .. })), "{crash:?}");
    let queued: Vec<_> = queued.into_iter().map(|q| q.expect("retried")).collect();
    assert_eq!(queued, vec![json!(0), json!(1), json!(2)]);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn streams_and_host_calls_keep_the_calls_queued_behind_them() {
    let r = Reaper::new();
    let pool = pipelined(&r, Duration::from_secs(2)).await;
    pool.register_host_tool("double", |args| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(json!(args["x"].as_i64().unwrap_or(0) * 2))
    });
    let stream = async {
        let s = pool.execute_stream("count", json!({"n": 50})).await.expect("stream");
        s.map(|c| c.expect("chunk").to_value().expect("json")).collect::<Vec<_>>().await
    };
    let asks = join_all((0..3).map(|x| call(&pool, "ask", json!({"x": x}))));
    let records = join_all((0..3).map(|i| call(&pool, "record", json!({"i": i}))));
    let (items, asks, records) = tokio::join!(stream, asks, records);
    assert_eq!(items, (0..50).map(|i| json!(i)).collect::<Vec<_>>());
    assert_eq!(
        asks.into_iter().map(|a| a.expect("ask")).collect::<Vec<_>>(),
        vec![json!(0), json!(2), json!(4)]
    );
    assert_eq!(
        records.into_iter().map(|a| a.expect("record")).collect::<Vec<_>>(),
        vec![json!(0), json!(1), json!(2)]
    );
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// Results large enough for the shared-memory arena make the host send `release` frames while
/// calls are queued: the bridge's read-ahead takes them without waiting for more input.
#[tokio::test]
async fn arena_releases_between_queued_calls_do_not_stall_the_worker() {
    let r = Reaper::new();
    let pool = pipelined(&r, Duration::from_secs(2)).await;
    let calls = (0..64).map(|i| {
        let n = if i % 2 == 0 { 256 * 1024 } else { 16 };
        call_with(&pool, "blob", json!({"n": n}), CallOptions::timeout(Duration::from_secs(20)))
    });
    let out = join_all(calls).await;
    assert!(out.iter().all(Result::is_ok), "{:?}", out.iter().find(|r| r.is_err()));
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// `DropPolicy::Detach`: a call dropped while queued behind another caller's long call runs when
/// its turn comes (its deadline, passed meanwhile, makes it cancelled then); the worker is not
/// killed for it while the call ahead runs.
#[tokio::test]
async fn a_detached_call_dropped_while_queued_does_not_cost_the_call_ahead() {
    let r = Reaper::new();
    let b =
        r.builder().adapter(python(&r)).size(1).pipeline_depth(4).drop_policy(snakepit::DropPolicy::Detach);
    let pool = b.cancel_grace(Duration::from_secs(2)).build().await.expect("pool");
    let before = call(&pool, "pid", json!({})).await.expect("pid");
    let long = call(&pool, "record", json!({"i": "long", "sleep": 0.8}));
    // Dropped after 50 ms, long before its 300 ms deadline: detached.
    let queued = tokio::time::timeout(
        Duration::from_millis(50),
        call_with(&pool, "record", json!({"i": "queued"}), CallOptions::timeout(Duration::from_millis(300))),
    );
    let (long, queued) = tokio::join!(long, queued);
    assert!(queued.is_err(), "dropped: {queued:?}");
    assert_eq!(long.expect("the call ahead is not killed"), json!("long"));
    assert_eq!(call(&pool, "pid", json!({})).await.expect("pid"), before, "the worker was kept");
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}
