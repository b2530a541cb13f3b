//! Sessions with real python3 workers: affinity modes, a pinned worker dying, rehydration,
//! variables, quotas, concurrent creation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use snakepit::{Affinity, CallOptions, Error, Payload, Python, VarType};
use snakepit_tests::Reaper;

async fn pid_in(pool: &snakepit::Pool, session: &str, mode: Affinity) -> Result<i64, Error> {
    let opts = CallOptions::default().with_affinity(mode);
    let p = pool.execute_in_session_with(session, "pid", Payload::null(), opts).await?;
    p.decode()
}

#[tokio::test]
async fn hint_prefers_the_sessions_worker_and_falls_back_when_busy() {
    let r = Reaper::new();
    let pool = Arc::new(r.builder().adapter(Python::showcase()).size(3).build().await.expect("pool"));
    pool.create_session("s", json!({"user": "ada"})).await.expect("create");
    let first = pid_in(&pool, "s", Affinity::Hint).await.expect("pid");
    // Other traffic in between does not move the session.
    for _ in 0..10 {
        pool.execute("add", json!({"a": 1, "b": 1})).await.expect("add");
        assert_eq!(pid_in(&pool, "s", Affinity::Hint).await.expect("pid"), first);
    }
    // Its worker busy: a hint call runs elsewhere at once.
    let p = pool.clone();
    let busy = tokio::spawn(async move {
        p.execute_in_session_with("s", "sleep", Payload::from(json!({"ms": 800})), CallOptions::default())
            .await
    });
    pool.wait_stats(|s| s.busy == 1, Duration::from_secs(10)).await.expect("busy");
    let t = Instant::now();
    let elsewhere = pid_in(&pool, "s", Affinity::Hint).await.expect("pid");
    assert_ne!(elsewhere, first);
    assert!(t.elapsed() < Duration::from_millis(600), "a hint call must not wait");
    busy.await.expect("join").expect("sleep");
    pool.shutdown().await;
}

#[tokio::test]
async fn strict_waits_for_its_worker_and_fail_fast_does_not() {
    let r = Reaper::new();
    let pool = Arc::new(r.builder().adapter(Python::showcase()).size(2).build().await.expect("pool"));
    pool.create_session("s", json!(null)).await.expect("create");
    let pinned = pid_in(&pool, "s", Affinity::Strict).await.expect("pid");
    let p = pool.clone();
    let busy = tokio::spawn(async move {
        let opts = CallOptions::default().with_affinity(Affinity::Strict);
        p.execute_in_session_with("s", "sleep", Payload::from(json!({"ms": 400})), opts).await
    });
    pool.wait_stats(|s| s.busy == 1, Duration::from_secs(10)).await.expect("busy");
    match pid_in(&pool, "s", Affinity::StrictFailFast).await {
        Err(Error::WorkerBusy { session, .. }) => assert_eq!(session, "s"),
        other => panic!("unexpected {other:?}"),
    }
    // Strict waits (while the other worker is idle) and runs on the pinned one.
    assert_eq!(pid_in(&pool, "s", Affinity::Strict).await.expect("pid"), pinned);
    busy.await.expect("join").expect("sleep");
    pool.shutdown().await;
}

#[tokio::test]
async fn a_lost_pinned_worker_is_session_lost_for_strict_and_moves_on_for_hint() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(2).build().await.expect("pool");
    pool.create_session("s", json!(null)).await.expect("create");
    let pinned = pid_in(&pool, "s", Affinity::Strict).await.expect("pid");
    kill(Pid::from_raw(pinned as i32), Signal::SIGKILL).expect("kill");
    pool.wait_stats(|s| s.restarts == 1 && s.ready == 2, Duration::from_secs(10)).await.expect("restarted");
    match pid_in(&pool, "s", Affinity::Strict).await {
        Err(Error::SessionLost { session, .. }) => assert_eq!(session, "s"),
        other => panic!("unexpected {other:?}"),
    }
    // Never a hang: fail-fast too.
    assert!(matches!(pid_in(&pool, "s", Affinity::StrictFailFast).await, Err(Error::SessionLost { .. })));
    let moved = pid_in(&pool, "s", Affinity::Hint).await.expect("hint moves on");
    assert_ne!(moved, pinned);
    // ... and re-pins the session: strict works again.
    assert_eq!(pid_in(&pool, "s", Affinity::Strict).await.expect("pid"), moved);
    pool.shutdown().await;
}

#[tokio::test]
async fn a_strict_call_waiting_for_a_worker_that_dies_gets_session_lost() {
    let r = Reaper::new();
    let pool = Arc::new(r.builder().adapter(Python::showcase()).size(2).build().await.expect("pool"));
    pool.create_session("s", json!(null)).await.expect("create");
    pid_in(&pool, "s", Affinity::Strict).await.expect("pin");
    let p = pool.clone();
    let crashing = tokio::spawn(async move {
        let opts = CallOptions::default().with_affinity(Affinity::Strict);
        p.execute_in_session_with("s", "sleep", Payload::from(json!({"ms": 300})), opts).await
    });
    pool.wait_stats(|s| s.busy == 1, Duration::from_secs(10)).await.expect("busy");
    let p = pool.clone();
    let waiter = tokio::spawn(async move { pid_in(&p, "s", Affinity::Strict).await });
    pool.wait_stats(|s| s.queued == 1, Duration::from_secs(10)).await.expect("queued");
    // Kill the workers while one strict call runs on the pinned one and another waits for it
    // (with the other worker idle): the waiting call must get SessionLost, never hang.
    for pid in pool.worker_pids().into_iter().flatten() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    assert!(matches!(crashing.await.expect("join"), Err(Error::WorkerCrashed { .. })));
    match waiter.await.expect("join") {
        Err(Error::SessionLost { .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn rehydrate_restores_state_on_a_new_worker_instead_of_session_lost() {
    let r = Reaper::new();
    let marker = r.dir().join("rehydrated");
    let m = marker.to_string_lossy().into_owned();
    let pool = r
        .builder()
        .adapter(Python::showcase())
        .size(1)
        .affinity(Affinity::Strict)
        .rehydrate(move |rec| {
            assert_eq!(rec.id, "s");
            Some(("touch".to_string(), Payload::from(json!({"path": m.clone()}))))
        })
        .build()
        .await
        .expect("pool");
    pool.create_session("s", json!(null)).await.expect("create");
    let first = pool.execute_in_session("s", "pid", json!(null)).await.expect("pid");
    assert!(matches!(
        pool.execute_in_session("s", "crash", json!({"code": 1})).await,
        Err(Error::WorkerCrashed { .. })
    ));
    pool.wait_stats(|s| s.restarts == 1 && s.ready == 1, Duration::from_secs(10)).await.expect("restarted");
    let second = pool.execute_in_session("s", "pid", json!(null)).await.expect("rehydrated, not lost");
    assert_ne!(first, second);
    assert!(marker.exists(), "the rehydrate command ran on the new worker");
    pool.shutdown().await;
}

#[tokio::test]
async fn variables_quota_and_concurrent_creation_through_the_pool() {
    let r = Reaper::new();
    let pool = Arc::new(
        r.builder().adapter(Python::showcase()).size(1).max_sessions(3).build().await.expect("pool"),
    );
    let s = pool.create_session("a", json!({"plan": "pro"})).await.expect("a");
    s.set("greeting", json!("hi")).await.expect("set");
    s.set_typed("temperature", json!(0.7), VarType::Float { min: Some(0.0), max: Some(2.0) })
        .await
        .expect("typed");
    assert!(matches!(s.set("temperature", json!(9.0)).await, Err(Error::InvalidVariable { .. })));
    assert_eq!(s.get("greeting").await.expect("get"), Some(json!("hi")));
    assert!(s.delete("greeting").await.expect("delete"));
    assert_eq!(s.get("greeting").await.expect("get"), None);
    assert_eq!(s.record().await.expect("record").metadata, json!({"plan": "pro"}));
    // 100 concurrent creators of one id: one session.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let p = pool.clone();
        tasks.push(tokio::spawn(async move { p.create_session("b", json!({"i": i})).await.map(|_| ()) }));
    }
    for t in tasks {
        t.await.expect("join").expect("create b");
    }
    pool.create_session("c", json!(null)).await.expect("c");
    assert!(matches!(
        pool.create_session("d", json!(null)).await,
        Err(Error::SessionQuotaExceeded { max: 3 })
    ));
    assert_eq!(pool.list_sessions().await.expect("list"), ["a", "b", "c"]);
    assert!(pool.session("a").await.expect("a").close().await.expect("close"));
    assert!(matches!(pool.session("a").await, Err(Error::SessionNotFound { .. })));
    assert!(matches!(
        pool.execute_in_session("a", "ping", json!(null)).await,
        Err(Error::SessionNotFound { .. })
    ));
    pool.create_session("d", json!(null)).await.expect("room again");
    pool.shutdown().await;
}

/// Global variables: pool-wide, outside any session; the host (`pool.globals()`) and workers of
/// both SDKs (`ctx.globals`) see the same values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_variables_are_shared_by_the_host_and_python_and_node_workers() {
    let r = Reaper::new();
    let py = r.script(
        "globals.py",
        "from snakepit_bridge import tool, serve\n\n@tool\ndef bump(ctx):\n    n = ctx.globals.get('n', 0) + 1\n    ctx.globals.set('n', n)\n    return n\n\n@tool\ndef drop(ctx):\n    return ctx.globals.delete('n')\n\nserve()\n",
    );
    let js = r.script(
        "globals.js",
        "const { tool, serve } = require('snakepit-bridge');\ntool('bump', async (_a, ctx) => { const n = ((await ctx.globals.get('n')) || 0) + 1; await ctx.globals.set('n', n); return n; });\nserve();\n",
    );
    // One store for both pools: the globals are the store's.
    let store = snakepit::MemoryStore::default();
    let py_pool = r
        .builder()
        .adapter(Python::script(&py))
        .session_store(store.clone())
        .size(1)
        .build()
        .await
        .expect("python");
    let js_pool = r
        .builder()
        .adapter(snakepit::Node::script(&js))
        .session_store(store)
        .size(1)
        .build()
        .await
        .expect("node");
    py_pool.globals().set("n", json!(40)).await.expect("set");
    assert_eq!(py_pool.execute("bump", json!(null)).await.expect("python bump"), json!(41));
    assert_eq!(js_pool.execute("bump", json!(null)).await.expect("node bump"), json!(42));
    // In a session too: the same globals.
    let s = py_pool.create_session("g", json!(null)).await.expect("session");
    assert_eq!(s.execute("bump", json!(null)).await.expect("bump in a session"), json!(43));
    assert_eq!(js_pool.globals().get("n").await.expect("get"), Some(json!(43)));
    assert_eq!(py_pool.execute("drop", json!(null)).await.expect("drop"), json!(true));
    assert_eq!(py_pool.globals().get("n").await.expect("get"), None);
    assert!(!py_pool.globals().delete("n").await.expect("delete"));
    py_pool.shutdown().await;
    js_pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// `create_sessions_on_use`: a call in an unknown session creates it (the original Snakepit's
/// `execute_in_session`), within the quota; off, it is `SessionNotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_created_on_use_when_asked_within_the_quota() {
    let r = Reaper::new();
    let off = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    let e = off.execute_in_session("nobody", "remember", json!({"name": "k", "value": 1})).await;
    assert!(matches!(e, Err(Error::SessionNotFound { .. })), "{e:?}");
    off.shutdown().await;
    let on = r
        .builder()
        .adapter(Python::showcase())
        .create_sessions_on_use(true)
        .max_sessions(1)
        .size(1)
        .build()
        .await
        .expect("pool");
    let v =
        on.execute_in_session("new", "remember", json!({"name": "k", "value": 1})).await.expect("created");
    assert_eq!(v, json!(1));
    assert_eq!(on.list_sessions().await.expect("list"), ["new"]);
    assert_eq!(on.session("new").await.expect("session").get("k").await.expect("get"), Some(json!(1)));
    let full = on.execute_in_session("another", "ping", json!(null)).await;
    assert!(matches!(full, Err(Error::SessionQuotaExceeded { .. })), "{full:?}");
    on.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// The pool's session API beyond create/get: a per-session TTL, metadata updates, the store's
/// counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_ttl_metadata_updates_and_session_stats() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).max_sessions(2).size(1).build().await.expect("pool");
    let opts = snakepit::SessionOptions::default().with_ttl(Duration::from_millis(200));
    pool.create_session_with("brief", json!({"user": "ada", "turns": 0}), opts).await.expect("brief");
    pool.create_session("kept", json!(null)).await.expect("kept");
    let rec = pool
        .update_session("brief", |m| m["turns"] = json!(m["turns"].as_i64().unwrap_or(0) + 1))
        .await
        .expect("update");
    assert_eq!(rec.metadata, json!({"user": "ada", "turns": 1}));
    assert!(matches!(
        pool.create_session("third", json!(null)).await,
        Err(Error::SessionQuotaExceeded { .. })
    ));
    // The brief session expires on its own TTL. Watched through the list, which does not
    // refresh it (an access would: the TTL is refreshed on use).
    let t = Instant::now();
    while pool.list_sessions().await.expect("list").contains(&"brief".to_string()) {
        assert!(t.elapsed() < Duration::from_secs(10), "the 200 ms session did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(pool.session("brief").await, Err(Error::SessionNotFound { .. })));
    assert!(pool.session("kept").await.is_ok());
    let st = pool.session_stats().await.expect("stats");
    assert_eq!((st.live, st.created, st.expired, st.quota_refusals), (1, 2, 1, 1));
    pool.shutdown().await;
}
