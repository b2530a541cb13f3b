//! Pools that change while they serve, with real python3 workers: `resize` up and down under
//! load, sessions on removed workers, `reload` to new code under load (outcomes counted: no
//! call may fail), a reload whose workers cannot start, and `Pool` as a cheap shared handle.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use snakepit::{Affinity, CallOptions, Error, Payload, Pool, Python};
use snakepit_tests::Reaper;

/// Calls that ended well and badly while a load ran.
#[derive(Default)]
struct Outcomes {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// `callers` tasks calling `sleep` (`ms` each) until `stop`; each failure is printed.
fn load(
    pool: &Pool,
    callers: usize,
    ms: u64,
    stop: &Arc<AtomicBool>,
    out: &Arc<Outcomes>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..callers)
        .map(|_| {
            let (pool, stop, out) = (pool.clone(), stop.clone(), out.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match pool.execute("sleep", json!({"ms": ms})).await {
                        Ok(_) => out.ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("a call failed under load: {e}");
                            out.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect()
}

async fn finish(tasks: Vec<tokio::task::JoinHandle<()>>, stop: &AtomicBool) {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
}

fn live_pids(pool: &Pool) -> Vec<u32> {
    let mut pids: Vec<u32> = pool.worker_pids().into_iter().flatten().collect();
    pids.sort_unstable();
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_grows_and_shrinks_under_load_and_no_call_fails() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(2).build().await.expect("pool");
    let (stop, out) = (Arc::new(AtomicBool::new(false)), Arc::new(Outcomes::default()));
    let tasks = load(&pool, 6, 20, &stop, &out);
    pool.wait_stats(|s| s.calls_ok >= 10, Duration::from_secs(20)).await.expect("load runs");

    pool.resize(4).await.expect("grow");
    let s = pool.stats();
    assert_eq!((s.size, s.ready), (4, 4), "{s:?}");
    assert_eq!(live_pids(&pool).len(), 4);
    let ok = pool.stats().calls_ok;
    pool.wait_stats(|s| s.calls_ok >= ok + 20, Duration::from_secs(20)).await.expect("served after growing");

    pool.resize(1).await.expect("shrink");
    let s = pool.stats();
    assert_eq!((s.size, s.ready), (1, 1), "{s:?}");
    assert_eq!(live_pids(&pool).len(), 1);
    let ok = pool.stats().calls_ok;
    pool.wait_stats(|s| s.calls_ok >= ok + 10, Duration::from_secs(20))
        .await
        .expect("served after shrinking");
    finish(tasks, &stop).await;
    assert_eq!(out.failed.load(Ordering::Relaxed), 0, "no call fails while the pool resizes");
    assert!(out.ok.load(Ordering::Relaxed) > 40);
    // The removed workers are gone, not only out of the pool.
    assert!(matches!(pool.resize(0).await, Err(Error::BadRequest(_))));
    pool.resize(2).await.expect("grow again");
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 2})).await.expect("add"), json!(3));
    pool.shutdown().await;
    assert!(matches!(pool.resize(3).await, Err(Error::ShuttingDown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_a_removed_worker_move_on_hint_and_are_lost_when_strict() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(2).build().await.expect("pool");
    // Two session calls at once land on the two workers.
    for sid in ["a", "b"] {
        pool.create_session(sid, json!(null)).await.expect("session");
    }
    let call = |sid: &'static str| {
        let pool = pool.clone();
        async move {
            pool.execute_in_session_with(
                sid,
                "sleep",
                Payload::from(json!({"ms": 300})),
                CallOptions::default(),
            )
            .await
        }
    };
    let (x, y) = tokio::join!(call("a"), call("b"));
    x.expect("a");
    y.expect("b");
    let mut on_slot1 = None;
    for sid in ["a", "b"] {
        let worker = pool.session(sid).await.expect("session").record().await.expect("record").worker;
        if worker.is_some_and(|w| w.slot == 1) {
            on_slot1 = Some(sid);
        }
    }
    let sid = on_slot1.expect("one session is pinned to slot 1");
    pool.resize(1).await.expect("shrink");
    let strict = CallOptions::default().with_affinity(Affinity::Strict);
    let e =
        pool.execute_in_session_with(sid, "ping", Payload::null(), strict.clone()).await.expect_err("strict");
    assert_eq!(e.kind(), "session_lost", "{e}");
    // The slot comes back with a new worker: a new id, never the one the session held.
    pool.resize(2).await.expect("grow back");
    let e = pool.execute_in_session_with(sid, "ping", Payload::null(), strict).await.expect_err("strict");
    assert_eq!(e.kind(), "session_lost", "a returning slot's worker is not the session's: {e}");
    let hint = CallOptions::default().with_affinity(Affinity::Hint);
    pool.execute_in_session_with(sid, "ping", Payload::null(), hint).await.expect("hint moves on");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_reload_ends_both_and_leaves_no_worker() {
    let r = Reaper::new();
    let new_code = r.script("v2.py", NEW_CODE);
    let pool = r.builder().adapter(Python::showcase()).size(3).build().await.expect("pool");
    let reloading = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.reload(Python::script(&new_code)).await })
    };
    // Once the first new worker is in, shut down mid-reload.
    pool.wait_stats(|s| s.recycled >= 1, Duration::from_secs(20)).await.expect("reload started");
    tokio::time::timeout(Duration::from_secs(30), pool.shutdown()).await.expect("shutdown ends");
    let r2 =
        tokio::time::timeout(Duration::from_secs(30), reloading).await.expect("reload ends").expect("join");
    assert!(matches!(r2, Ok(()) | Err(Error::ShuttingDown)), "{r2:?}");
    assert!(live_pids(&pool).is_empty());
    // The Reaper checks on drop that no worker process is left.
}

const NEW_CODE: &str = r#"
from snakepit_bridge import tool, serve
import time

@tool
def sleep(ms: float) -> float:
    time.sleep(ms / 1000)
    return ms

@tool
def version() -> int:
    return 2

serve()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_replaces_every_worker_under_load_and_no_call_fails() {
    let r = Reaper::new();
    let new_code = r.script("v2.py", NEW_CODE);
    let pool = r.builder().adapter(Python::showcase()).size(3).build().await.expect("pool");
    let before = live_pids(&pool);
    assert!(!pool.tools().contains(&"version".to_string()));
    let (stop, out) = (Arc::new(AtomicBool::new(false)), Arc::new(Outcomes::default()));
    let tasks = load(&pool, 8, 10, &stop, &out);
    pool.wait_stats(|s| s.calls_ok >= 10, Duration::from_secs(20)).await.expect("load runs");
    pool.reload(Python::script(&new_code)).await.expect("reload");
    let ok = pool.stats().calls_ok;
    pool.wait_stats(|s| s.calls_ok >= ok + 100, Duration::from_secs(20))
        .await
        .expect("served after the reload");
    finish(tasks, &stop).await;
    let (ok, failed) = (out.ok.load(Ordering::Relaxed), out.failed.load(Ordering::Relaxed));
    println!("reload under load: calls ok {ok}, failed {failed}");
    assert_eq!(failed, 0, "no call fails during a reload");
    let after = live_pids(&pool);
    assert_eq!(after.len(), 3, "capacity kept");
    assert!(after.iter().all(|p| !before.contains(p)), "every worker replaced: {before:?} -> {after:?}");
    assert_eq!(pool.execute("version", json!({})).await.expect("new code"), json!(2));
    assert!(pool.tools().contains(&"version".to_string()));
    let s = pool.stats();
    assert_eq!((s.size, s.ready, s.crashes), (3, 3, 0), "{s:?}");
    // A rolling restart keeps the adapter and replaces the workers again.
    pool.rolling_restart().await.expect("rolling restart");
    let again = live_pids(&pool);
    assert!(again.iter().all(|p| !after.contains(p)));
    assert_eq!(pool.execute("version", json!({})).await.expect("same code"), json!(2));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_workers_cannot_start_changes_nothing() {
    let r = Reaper::new();
    let broken = r.script("broken.py", "raise SystemExit('cannot load the model')\n");
    let pool = r.builder().adapter(Python::showcase()).size(2).build().await.expect("pool");
    let before = live_pids(&pool);
    let e = pool.reload(Python::script(&broken)).await.expect_err("the new workers cannot start");
    assert!(e.to_string().contains("cannot load the model"), "{e}");
    assert_eq!(live_pids(&pool), before, "the old workers keep serving");
    let s = pool.stats();
    assert_eq!((s.size, s.ready), (2, 2));
    assert_eq!(pool.execute("add", json!({"a": 2, "b": 2})).await.expect("old code"), json!(4));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_are_one_pool_and_shutdown_on_any_stops_it_for_all() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    fn shared<T: Clone + Send + Sync + 'static>(_: &T) {}
    shared(&pool);
    let other = pool.clone();
    assert_eq!(other.execute("add", json!({"a": 1, "b": 1})).await.expect("clone"), json!(2));
    drop(other);
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 1})).await.expect("still up"), json!(2));
    // A session handle is 'static too: it moves into a task.
    pool.create_session("s", json!(null)).await.expect("session");
    let session = pool.session("s").await.expect("session");
    shared(&session);
    let echoed = tokio::spawn(async move { session.execute("add", json!({"a": 2, "b": 3})).await })
        .await
        .expect("join")
        .expect("session call");
    assert_eq!(echoed, json!(5));
    let third = pool.clone();
    third.shutdown().await;
    let e = pool.execute("add", json!({"a": 1, "b": 1})).await.expect_err("shut down");
    assert_eq!(e.kind(), "shutting_down");
    assert!(live_pids(&pool).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoscaler_grows_under_queueing_and_shrinks_when_idle() {
    let r = Reaper::new();
    let scale = snakepit::Autoscale::new(1, 3).interval(Duration::from_millis(100)).after(2, 5);
    let pool = r.builder().adapter(Python::showcase()).size(1).autoscale(scale).build().await.expect("pool");
    assert_eq!(pool.stats().size, 1);
    let (stop, out) = (Arc::new(AtomicBool::new(false)), Arc::new(Outcomes::default()));
    let tasks = load(&pool, 4, 100, &stop, &out);
    pool.wait_stats(|s| s.size == 3 && s.ready == 3, Duration::from_secs(20)).await.expect("grown to max");
    finish(tasks, &stop).await;
    assert_eq!(out.failed.load(Ordering::Relaxed), 0);
    pool.wait_stats(|s| s.size == 1, Duration::from_secs(20)).await.expect("shrunk to min when idle");
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 1})).await.expect("add"), json!(2));
    // Bounds are checked when the pool is built.
    let bad = r.builder().adapter(Python::showcase()).autoscale(snakepit::Autoscale::new(3, 2)).build().await;
    assert!(matches!(bad, Err(Error::BadRequest(_))), "{bad:?}");
    pool.shutdown().await;
}
