//! The thread profile with real python3 workers: concurrent calls in one worker (threads for
//! sync tools, the event loop for async ones), host calls, streams and cancel alongside.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::{Error, Python, ThreadProfile};
use snakepit_tests::Reaper;

async fn pool(r: &Reaper, n: usize) -> Arc<snakepit::Pool> {
    Arc::new(
        r.builder()
            .adapter(Python::showcase())
            .size(1)
            .profile(ThreadProfile::new(n))
            .cancel_grace(Duration::from_secs(5))
            .build()
            .await
            .expect("pool"),
    )
}

async fn concurrently(
    pool: &Arc<snakepit::Pool>,
    command: &'static str,
    args: serde_json::Value,
    n: usize,
) -> Duration {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let p = pool.clone();
        let a = args.clone();
        tasks.push(tokio::spawn(async move { p.execute(command, a).await }));
    }
    for task in tasks {
        task.await.expect("join").expect("call");
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_sleeps_run_at_once_in_one_worker() {
    let r = Reaper::new();
    let pool = pool(&r, 8).await;
    assert_eq!(pool.worker_pids().len(), 1);
    let sync = concurrently(&pool, "sleep", json!({"ms": 100}), 8).await;
    let asynchronous = concurrently(&pool, "asleep", json!({"ms": 100}), 8).await;
    eprintln!(
        "8 × sleep(100 ms) on one thread-profile worker: sync tools {sync:?}, async tools {asynchronous:?}"
    );
    // A serial worker needs 800 ms.
    assert!(sync < Duration::from_millis(450), "sync tools took {sync:?}");
    assert!(asynchronous < Duration::from_millis(450), "async tools took {asynchronous:?}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_calls_streams_and_cancel_work_alongside_each_other() {
    let r = Reaper::new();
    let pool = pool(&r, 4).await;
    pool.register_host_tool("echo", |v| async move { Ok(v) });
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    // A long Python loop that gets cancelled, while other calls go on in the same worker.
    let p = pool.clone();
    let doomed = tokio::spawn(async move {
        p.execute_timeout("spin", json!({"seconds": 30}), Duration::from_millis(200)).await
    });
    let mut tasks = Vec::new();
    for i in 0..12 {
        let p = pool.clone();
        tasks.push(tokio::spawn(async move {
            p.execute("ask_host", json!({"name": "echo", "args": {"i": i}})).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.expect("join").expect("host call"), json!({"ok": {"i": i}}));
    }
    let mut s = pool.execute_stream("count", json!({"n": 200})).await.expect("stream");
    let mut n = 0;
    while let Some(item) = s.next_json().await {
        assert_eq!(item.expect("chunk"), json!({"i": n}));
        n += 1;
    }
    assert_eq!(n, 200);
    drop(s);
    assert!(matches!(doomed.await.expect("join"), Err(Error::Timeout { .. })));
    // The spin was cancelled inside the worker, which is kept.
    pool.wait_stats(|s| s.busy == 0, Duration::from_secs(10)).await.expect("settled");
    assert_eq!(pool.execute("pid", json!(null)).await.expect("pid"), pid);
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}
