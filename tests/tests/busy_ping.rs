//! Heartbeats of busy workers (`PoolBuilder::busy_heartbeat`, docs/protocol.md §6), with real
//! Python workers: a busy tool running Python code answers pings from the bridge's reader
//! thread and is left alone; a worker stopped with SIGSTOP while it runs a call with no deadline
//! is found and replaced; a tool holding the GIL in C is taken for hung (the documented limit);
//! without busy heartbeats none of them is pinged.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use snakepit::{Error, Heartbeat, Pool, ProcessProfile, Python, ThreadProfile};
use snakepit_tests::Reaper;

const WORKER: &str = r#"
import ctypes, os, time
from snakepit_bridge import tool

@tool
def pid():
    return os.getpid()

@tool
def spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "finished"

@tool
def nap(seconds):
    time.sleep(seconds)
    return "rested"

@tool
def hold_gil(seconds):
    # libc sleep called through PyDLL keeps the GIL for the whole call.
    ctypes.PyDLL(None).sleep(int(seconds))
    return "held"
"#;

fn heartbeat() -> Option<Heartbeat> {
    Some(Heartbeat {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        max_missed: 4,
    })
}

async fn start(r: &Reaper, busy: bool, threads: bool) -> Pool {
    let b = r.builder().adapter(Python::script(r.script("w.py", WORKER))).size(1).heartbeat(heartbeat());
    let b = if threads { b.profile(ThreadProfile::new(2)) } else { b.profile(ProcessProfile) };
    b.busy_heartbeat(busy).build().await.expect("pool")
}

#[tokio::test]
async fn a_busy_worker_answers_pings_and_is_left_alone() {
    for threads in [false, true] {
        let r = Reaper::new();
        let pool = start(&r, true, threads).await;
        assert!(pool.worker_handshakes()[0].as_ref().is_some_and(|h| h.busy_ping), "announced");
        // Busy Python code, then a blocking sleep: about 10 heartbeats; 4 missed in a row would
        // kill it.
        assert_eq!(pool.execute("spin", json!({"seconds": 0.6})).await.expect("spin"), json!("finished"));
        assert_eq!(pool.execute("nap", json!({"seconds": 0.6})).await.expect("nap"), json!("rested"));
        let s = pool.stats();
        assert_eq!((s.unresponsive, s.restarts), (0, 0), "threads: {threads}: {s:?}");
        pool.shutdown().await;
        r.assert_none_left(Duration::from_secs(5));
    }
}

#[tokio::test]
async fn a_worker_stopped_during_a_call_is_replaced() {
    let r = Reaper::new();
    let pool = std::sync::Arc::new(start(&r, true, false).await);
    let pid = pool.execute("pid", json!(null)).await.expect("pid").as_i64().expect("int") as i32;
    let p = pool.clone();
    let call = tokio::spawn(async move { p.execute("nap", json!({"seconds": 30})).await });
    pool.wait_stats(|s| s.busy == 1, Duration::from_secs(10)).await.expect("busy");
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("stop");
    let out =
        tokio::time::timeout(Duration::from_secs(20), call).await.expect("found in time").expect("join");
    assert!(matches!(out, Err(Error::WorkerCrashed { .. })), "{out:?}");
    pool.wait_stats(|s| s.unresponsive == 1 && s.ready == 1, Duration::from_secs(20))
        .await
        .expect("replaced");
    assert_ne!(pool.execute("pid", json!(null)).await.expect("pid"), json!(pid));
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_tool_holding_the_gil_is_taken_for_hung_and_without_busy_heartbeats_nothing_is() {
    let r = Reaper::new();
    let pool = start(&r, true, false).await;
    // Killed after 4 missed pings (~2.4 s), before the 5 s are over.
    let out = pool.execute("hold_gil", json!({"seconds": 5})).await;
    assert!(matches!(out, Err(Error::WorkerCrashed { .. })), "{out:?}");
    assert_eq!(pool.stats().unresponsive, 1);
    pool.shutdown().await;
    // Off (the default): the busy worker is not pinged, the call runs to its end.
    let pool = start(&r, false, false).await;
    assert!(!pool.worker_handshakes()[0].as_ref().is_some_and(|h| h.busy_ping), "not offered");
    assert_eq!(pool.execute("hold_gil", json!({"seconds": 1})).await.expect("held"), json!("held"));
    assert_eq!(pool.stats().unresponsive, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}
