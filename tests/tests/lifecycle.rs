//! Lifecycle with real python3 workers: heartbeats, recycling, restart intensity, circuit.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use snakepit::{Error, Heartbeat, Python};
use snakepit_tests::Reaper;

async fn wait(pool: &snakepit::Pool, what: &str, cond: impl FnMut(&snakepit::PoolStats) -> bool) {
    if let Err(s) = pool.wait_stats(cond, Duration::from_secs(15)).await {
        panic!("{what}: not reached within 15 s; stats: {s:?}");
    }
}

#[tokio::test]
async fn a_stopped_worker_misses_heartbeats_and_is_replaced() {
    let r = Reaper::new();
    let hb = Heartbeat {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
        max_missed: 2,
    };
    let pool =
        r.builder().adapter(Python::showcase()).size(1).heartbeat(Some(hb)).build().await.expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    let t = Instant::now();
    kill(Pid::from_raw(pid.as_i64().expect("int") as i32), Signal::SIGSTOP).expect("SIGSTOP");
    wait(&pool, "replaced", |s| s.unresponsive == 1 && s.restarts == 1 && s.ready == 1).await;
    // interval × max_missed + timeout + start-up, with room for a slow machine.
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert_ne!(pool.execute("pid", json!(null)).await.expect("pid"), pid);
    pool.shutdown().await;
}

#[tokio::test]
async fn healthy_idle_workers_answer_heartbeats() {
    let r = Reaper::new();
    let hb =
        Heartbeat { interval: Duration::from_millis(20), timeout: Duration::from_secs(2), max_missed: 1 };
    let pool =
        r.builder().adapter(Python::showcase()).size(2).heartbeat(Some(hb)).build().await.expect("pool");
    for _ in 0..50 {
        pool.execute("cpu", json!({"n": 5000})).await.expect("cpu");
    }
    let s = pool.stats();
    assert_eq!((s.unresponsive, s.restarts), (0, 0), "{s:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn recycling_by_request_count_never_drops_a_call() {
    let r = Reaper::new();
    let pool = std::sync::Arc::new(
        r.builder()
            .adapter(Python::showcase())
            .size(2)
            .max_requests(10)
            .recycle_jitter(0.0)
            .build()
            .await
            .expect("pool"),
    );
    let mut pids = std::collections::HashSet::new();
    // The old worker keeps serving until its replacement is ready, so how many calls one
    // recycle takes depends on start-up time: call until three recycles happened (bounded).
    for _ in 0..3000 {
        if pool.stats().recycled >= 3 {
            break;
        }
        let info = pool.execute("info", json!(null)).await.expect("no call may fail while recycling");
        pids.insert(info["pid"].clone());
        pool.execute("sleep", json!({"ms": 2})).await.expect("no call may fail while recycling");
    }
    assert!(pool.stats().recycled >= 3, "{:?}", pool.stats());
    assert!(pids.len() >= 3, "{pids:?}");
    let s = pool.stats();
    assert_eq!((s.calls_failed, s.restarts), (0, 0), "{s:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn recycling_by_age_replaces_first_and_lets_the_in_flight_call_finish() {
    let r = Reaper::new();
    let pool = std::sync::Arc::new(
        r.builder()
            .adapter(Python::showcase())
            .size(1)
            .max_age(Duration::from_millis(300))
            .recycle_jitter(0.0)
            .build()
            .await
            .expect("pool"),
    );
    let old = pool.execute("pid", json!(null)).await.expect("pid");
    let p = pool.clone();
    // The long call holds the old worker until the test opens the gate (however slow the
    // machine, it is still running when the replacement serves).
    let gate = r.dir().join("gate");
    let args = json!({"path": gate.to_string_lossy()});
    let long = tokio::spawn(async move { p.execute("wait_for", args).await });
    wait(&pool, "recycled", |s| s.recycled >= 1).await;
    // Capacity never dropped: the replacement serves while the old worker still runs its call.
    let new = pool.execute("pid", json!(null)).await.expect("pid");
    assert_ne!(new, old);
    assert!(!long.is_finished(), "the long call should still be running on the old worker");
    std::fs::write(&gate, b"").expect("open the gate");
    assert_eq!(long.await.expect("join").expect("the in-flight call finishes"), json!(true));
    pool.shutdown().await;
}

#[tokio::test]
async fn a_slot_that_keeps_crashing_is_paused_and_the_pool_degraded() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(Python::showcase())
        .size(1)
        .restart_limit(2, Duration::from_secs(60))
        .build()
        .await
        .expect("pool");
    for i in 0..3 {
        wait(&pool, "ready", |s| s.ready == 1).await;
        let r = pool.execute("crash", json!({"code": 1})).await;
        assert!(matches!(r, Err(Error::WorkerCrashed { .. })), "crash {i}: {r:?}");
    }
    wait(&pool, "degraded", |s| s.degraded && s.circuit_open).await;
    let t = Instant::now();
    match pool.execute("ping", json!(null)).await {
        Err(Error::Unavailable(msg)) => assert!(msg.contains("circuit open"), "{msg}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_millis(500), "must fail fast");
    pool.shutdown().await;
}

#[tokio::test]
async fn circuit_opens_while_workers_cannot_start_and_closes_when_they_can() {
    let r = Reaper::new();
    let flag = r.dir().join("broken");
    let script = r.script(
        "flaky.py",
        &format!(
            r#"
import os, sys
if os.path.exists({flag:?}):
    raise RuntimeError("dependency unavailable")
from snakepit_bridge import tool

@tool
def die():
    os._exit(1)

@tool
def ok():
    return "ok"
"#,
            flag = flag.to_string_lossy()
        ),
    );
    let pool = r.builder().adapter(Python::script(&script)).size(1).build().await.expect("pool");
    std::fs::write(&flag, b"").expect("flag");
    assert!(matches!(pool.execute("die", json!(null)).await, Err(Error::WorkerCrashed { .. })));
    wait(&pool, "circuit open", |s| s.circuit_open).await;
    let t = Instant::now();
    match pool.execute("ok", json!(null)).await {
        Err(Error::Unavailable(msg)) => assert!(msg.contains("dependency unavailable"), "{msg}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_millis(500), "must fail fast");
    std::fs::remove_file(&flag).expect("unflag");
    wait(&pool, "recovered", |s| !s.circuit_open && s.ready == 1).await;
    assert_eq!(pool.execute("ok", json!(null)).await.expect("ok"), json!("ok"));
    pool.shutdown().await;
}

#[tokio::test]
async fn a_worker_over_its_memory_limit_is_recycled() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(Python::showcase())
        .size(1)
        .max_memory(150 << 20, Duration::from_millis(50))
        .recycle_jitter(0.0)
        .build()
        .await
        .expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    assert_eq!(pool.execute("leak", json!({"mb": 200})).await.expect("leak"), json!(200));
    wait(&pool, "recycled for memory", |s| s.recycled == 1).await;
    assert_ne!(pool.execute("pid", json!(null)).await.expect("pid"), pid);
    assert_eq!(pool.stats().calls_failed, 0);
    pool.shutdown().await;
}

/// A run directory that fails the ownership check (here: a symlink to a private directory, as
/// anyone could plant in a shared temp dir; as root also one owned by another user) disables the
/// run registry for the pool, and only that: the pool starts and serves, and no run file is
/// written through it.
#[tokio::test]
async fn a_refused_run_dir_disables_the_registry_not_the_pool() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let r = Reaper::new();
    let target = r.dir().join("target");
    std::fs::DirBuilder::new().mode(0o700).create(&target).expect("dir");
    let link = r.dir().join("link");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let mut refused = vec![link];
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("stat")) == 0 {
        let theirs = r.dir().join("theirs");
        std::fs::DirBuilder::new().mode(0o700).create(&theirs).expect("dir");
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
        refused.push(theirs);
    } else {
        eprintln!("not root: cannot plant a run dir owned by another user; only the symlink case runs");
    }
    for dir in refused {
        let pool = r.builder().adapter(Python::showcase()).size(1).run_dir(&dir).build().await.expect("pool");
        assert_eq!(pool.execute("add", json!({"a": 1, "b": 2})).await.expect("call"), json!(3));
        let files: Vec<_> = std::fs::read_dir(&dir).expect("ls").flatten().map(|e| e.path()).collect();
        assert!(files.is_empty(), "a run file was written into the refused {dir:?}: {files:?}");
        pool.shutdown().await;
    }
}
