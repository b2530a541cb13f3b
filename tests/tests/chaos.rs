//! Chaos with real python3 workers: a crash storm under load, and dropping `execute` futures at
//! every await point.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use snakepit::{Error, Python};
use snakepit_tests::Reaper;

/// 30 rounds killing 2 random workers every 25 ms during 2000 calls: every call succeeds with
/// its own reply or fails with a typed error, none hangs, the pool is back to full strength and
/// every killed process is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_storm() {
    let r = Reaper::new();
    let pool = Arc::new(
        r.builder()
            .adapter(Python::showcase())
            .size(4)
            .restart_limit(1000, Duration::from_secs(60))
            .restart_backoff(Duration::from_millis(5), Duration::from_millis(50))
            .queue_timeout(Duration::from_secs(20))
            .build()
            .await
            .expect("pool"),
    );
    let calls = 2000usize;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut callers = Vec::new();
    for _ in 0..16 {
        let pool = pool.clone();
        let next = next.clone();
        callers.push(tokio::spawn(async move {
            let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= calls {
                    return outcomes;
                }
                let payload = json!({"i": i, "tag": format!("call-{i}")});
                let fut = pool.execute_timeout("echo", payload.clone(), Duration::from_secs(5));
                let r = tokio::time::timeout(Duration::from_secs(15), fut)
                    .await
                    .expect("a call hung past its timeout");
                match &r {
                    Ok(v) => assert_eq!(v, &payload, "a reply went to the wrong caller"),
                    Err(Error::WorkerCrashed { .. } | Error::Timeout { .. } | Error::QueueTimeout { .. }) => {
                    }
                    Err(e) => panic!("untyped or unexpected error: {e:?}"),
                }
                let kind = match r {
                    Ok(_) => "ok",
                    Err(e) => e.kind(),
                };
                *outcomes.entry(kind).or_default() += 1;
            }
        }));
    }
    let mut killed = Vec::new();
    let mut rounds = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    while rounds < 30 {
        tick.tick().await;
        let mut pids: Vec<u32> = pool.worker_pids().into_iter().flatten().collect();
        fastrand::shuffle(&mut pids);
        for pid in pids.into_iter().take(2) {
            if kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
                killed.push(pid);
            }
        }
        rounds += 1;
    }
    let mut total: BTreeMap<&'static str, usize> = BTreeMap::new();
    for c in callers {
        for (k, v) in c.await.expect("caller") {
            *total.entry(k).or_default() += v;
        }
    }
    assert_eq!(total.values().sum::<usize>(), calls);
    let t = Instant::now();
    pool.wait_stats(|s| s.ready == 4, Duration::from_secs(20)).await.expect("back to 4 workers");
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in &killed {
        assert!(snakepit_tests::procs::wait_exit(*pid as i32, deadline), "killed worker {pid} still alive");
    }
    let s = pool.stats();
    eprintln!(
        "crash storm: {} kills, outcomes {total:?}, restarts {}, back to full strength {:?} after the storm",
        killed.len(),
        s.restarts,
        t.elapsed()
    );
    assert!(total.get("ok").copied().unwrap_or(0) > calls / 2, "{total:?}");
    pool.shutdown().await;
}

/// Drops `execute` after 0, 1, 2, ... polls: whatever point it was cancelled at, no slot leaks
/// and no worker stays stuck.
#[tokio::test]
async fn cancel_at_every_await() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(Python::showcase())
        .size(2)
        .cancel_grace(Duration::from_secs(5))
        .build()
        .await
        .expect("pool");
    for polls in 0..40 {
        let mut fut = Box::pin(pool.execute("sleep", json!({"ms": 5})));
        for _ in 0..polls {
            let step = futures::poll!(fut.as_mut());
            if step.is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(fut);
        // Whatever was interrupted settles: both workers idle again, nothing queued or busy.
        let settled =
            pool.wait_stats(|s| s.idle == 2 && s.busy == 0 && s.queued == 0, Duration::from_secs(10)).await;
        assert!(settled.is_ok(), "after {polls} polls: {settled:?}");
    }
    // And the pool still serves.
    assert_eq!(pool.execute("add", json!({"a": 2, "b": 2})).await.expect("add"), json!(4));
    pool.shutdown().await;
}

mod chaos_module {
    use super::*;
    use snakepit::chaos::Chaos;
    use snakepit::Heartbeat;

    #[tokio::test]
    async fn kill_before_and_after_chosen_calls() {
        let r = Reaper::new();
        let chaos = Chaos::new().kill_before_call(3).kill_after_reply(5);
        let pool = r.builder().adapter(Python::showcase()).size(1).chaos(chaos).build().await.expect("pool");
        let mut outcomes = Vec::new();
        for i in 1..=7 {
            pool.wait_stats(|s| s.ready == 1, Duration::from_secs(10)).await.expect("ready");
            let r = pool.execute("add", json!({"a": i, "b": 0})).await;
            outcomes.push(match r {
                Ok(v) => {
                    assert_eq!(v, json!(i));
                    "ok"
                }
                Err(e) => e.kind(),
            });
            if i == 5 {
                // The worker that answered call 5 dies right after: wait for its replacement.
                pool.wait_stats(|s| s.restarts == 2 && s.ready == 1, Duration::from_secs(10))
                    .await
                    .expect("replaced");
            }
        }
        assert_eq!(outcomes, ["ok", "ok", "worker_crashed", "ok", "ok", "ok", "ok"]);
        assert_eq!(pool.stats().restarts, 2);
        pool.shutdown().await;
    }

    #[tokio::test]
    async fn delayed_handshake_times_out() {
        let r = Reaper::new();
        let err = r
            .builder()
            .adapter(Python::showcase().handshake_timeout(Duration::from_millis(300)))
            .chaos(Chaos::new().delay_handshake(Duration::from_secs(30)))
            .size(1)
            .build()
            .await
            .expect_err("must time out");
        assert!(matches!(err, Error::HandshakeTimeout { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn dropped_heartbeats_replace_a_healthy_worker() {
        let r = Reaper::new();
        let hb =
            Heartbeat { interval: Duration::from_millis(50), timeout: Duration::from_secs(1), max_missed: 2 };
        let pool = r
            .builder()
            .adapter(Python::showcase())
            .size(1)
            .heartbeat(Some(hb))
            .chaos(Chaos::new().drop_heartbeats(2))
            .build()
            .await
            .expect("pool");
        pool.wait_stats(|s| s.unresponsive == 1 && s.restarts == 1 && s.ready == 1, Duration::from_secs(10))
            .await
            .expect("replaced after two dropped heartbeats");
        pool.shutdown().await;
    }
}
