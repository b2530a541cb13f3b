//! The pool with real python3 workers: calls, typed results, errors, queueing, timeouts,
//! shutdown, the bridge's stdout safety and configuration.

use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::{CallOptions, Error, Payload, Python};
use snakepit_tests::{wait_for_file, Reaper, ADD_SCRIPT};

#[tokio::test]
async fn script_tools_answer_json_and_typed_calls() {
    let r = Reaper::new();
    let script = r.script("w.py", ADD_SCRIPT);
    let pool = r.builder().adapter(Python::script(&script)).size(2).build().await.expect("pool");
    assert_eq!(pool.tools(), ["add"]);
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 2})).await.expect("add"), json!(3));
    let s: String = pool.execute_as("add", &("ab", "cd")).await.expect("typed");
    assert_eq!(s, "abcd");
    let st = pool.stats();
    assert_eq!((st.size, st.ready, st.calls_ok, st.calls_failed), (2, 2, 2, 0));
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn base_adapter_with_setup_and_config() {
    let r = Reaper::new();
    let script = r.script(
        "model.py",
        r#"
from snakepit_bridge import BaseAdapter, tool

class Model(BaseAdapter):
    def setup(self):
        print("loading model at setup (goes to stderr)")
        self.weights = self.config["scale"] * 2

    @tool
    def predict(self, x):
        return x * self.weights

    @tool(name="whoami")
    def _whoami(self):
        return type(self).__name__
"#,
    );
    let pool = r
        .builder()
        .adapter(Python::script(&script).config(json!({"scale": 5})))
        .size(1)
        .build()
        .await
        .expect("pool");
    assert_eq!(pool.tools(), ["predict", "whoami"]);
    assert_eq!(pool.execute("predict", json!({"x": 3})).await.expect("predict"), json!(30));
    assert_eq!(pool.execute("whoami", json!(null)).await.expect("whoami"), json!("Model"));
    pool.shutdown().await;
}

#[tokio::test]
async fn print_at_import_and_in_tools_cannot_corrupt_frames() {
    let r = Reaper::new();
    let script = r.script(
        "noisy.py",
        r#"
import sys, os
print("hello at import time")
sys.stdout.write("\x00\x00\x00\x05junk")
sys.stdout.flush()
os.write(1, b"raw write to fd 1\n")
from snakepit_bridge import tool

@tool
def shout(text):
    print(text * 3)
    os.write(1, b"\x00\x00\x00\x02{}")
    return text.upper()
"#,
    );
    let pool = r.builder().adapter(Python::script(&script)).size(1).build().await.expect("pool");
    for _ in 0..3 {
        assert_eq!(pool.execute("shout", json!({"text": "hi"})).await.expect("shout"), json!("HI"));
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn tool_exception_is_a_typed_worker_error_and_the_worker_stays() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    match pool.execute("fail", json!({"type": "KeyError", "message": "missing thing"})).await {
        Err(Error::Worker { error, command, .. }) => {
            assert_eq!(command, "fail");
            assert_eq!(error.kind, "KeyError");
            assert!(error.message.contains("missing thing"));
            let tb = error.traceback.expect("traceback");
            assert!(tb.contains("Traceback") && tb.contains("showcase.py"), "{tb}");
        }
        other => panic!("unexpected {other:?}"),
    }
    match pool.execute("fail", json!({"type": "ModelNotLoaded", "message": "custom"})).await {
        Err(Error::Worker { error, .. }) => assert_eq!(error.kind, "ModelNotLoaded"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(pool.execute("pid", json!(null)).await.expect("pid"), pid, "same worker process");
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test]
async fn unknown_command_fails_in_the_host() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    match pool.execute("nope", json!(null)).await {
        Err(Error::UnknownCommand { command, available }) => {
            assert_eq!(command, "nope");
            assert!(available.contains(&"echo".to_string()));
        }
        other => panic!("unexpected {other:?}"),
    }
    // It never reached a worker.
    assert_eq!(pool.stats().busy, 0);
    pool.shutdown().await;
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // prepares a fake interpreter for the test
async fn interpreter_env_cwd_and_args_are_configurable() {
    let r = Reaper::new();
    let venv = r.dir().join("venv");
    let st = std::process::Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .expect("python3 -m venv");
    assert!(st.success());
    let py = venv.join("bin").join("python");
    let pool = r
        .builder()
        .adapter(Python::showcase().interpreter(&py).env("MY_SETTING", "42").cwd(r.dir()).arg("--flag"))
        .size(1)
        .build()
        .await
        .expect("pool");
    let info = pool.execute("info", json!(null)).await.expect("info");
    assert_eq!(info["executable"], json!(py.to_string_lossy()));
    assert_eq!(
        std::fs::canonicalize(info["cwd"].as_str().expect("cwd")).expect("canon"),
        std::fs::canonicalize(r.dir()).expect("canon")
    );
    assert_eq!(info["argv"][1], "--flag");
    assert_eq!(pool.execute("env", json!({"name": "MY_SETTING"})).await.expect("env"), json!("42"));
    pool.shutdown().await;
}

#[tokio::test]
async fn many_concurrent_calls_are_all_answered_correctly() {
    let r = Reaper::new();
    let pool =
        std::sync::Arc::new(r.builder().adapter(Python::showcase()).size(4).build().await.expect("pool"));
    let mut tasks = Vec::new();
    for i in 0..400i64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move { (i, pool.execute("add", json!({"a": i, "b": i})).await) }));
    }
    for t in tasks {
        let (i, r) = t.await.expect("join");
        assert_eq!(r.expect("add"), json!(2 * i));
    }
    assert_eq!(pool.stats().calls_ok, 400);
    pool.shutdown().await;
}

#[tokio::test]
async fn timeout_fails_at_once_and_the_stuck_worker_is_replaced() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(Python::showcase())
        .size(1)
        .cancel_grace(Duration::from_millis(200))
        .build()
        .await
        .expect("pool");
    let mut pid = pool.execute("pid", json!(null)).await.expect("pid");
    // A cancel that reaches the worker before the tool runs is answered at once (and the worker
    // rightly kept); only a call whose tool was running (its `started` file exists) must cost the
    // worker. Retry until one was, so the test holds however slow the machine is.
    for attempt in 0..5 {
        let started = r.dir().join(format!("started-{attempt}"));
        let args = json!({"ms": 30_000, "started": started.to_string_lossy()});
        let t = Instant::now();
        match pool.execute_timeout("stubborn_sleep", args, Duration::from_millis(200)).await {
            Err(Error::Timeout { command, worker, .. }) => {
                assert_eq!(command, "stubborn_sleep");
                assert!(worker.is_some());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(5), "timeout took {:?}", t.elapsed());
        // The next call gets its own reply, not the late one.
        let echo = pool.execute("echo", json!({"mine": true})).await.expect("echo");
        assert_eq!(echo, json!({"mine": true}));
        let now = pool.execute("pid", json!(null)).await.expect("pid");
        if started.exists() {
            assert_ne!(now, pid, "a worker stuck in a tool that ignores cancel must be replaced");
            pool.shutdown().await;
            return;
        }
        pid = now;
    }
    panic!("the tool never started within its 200 ms timeout in 5 attempts");
}

#[tokio::test]
async fn full_queue_is_saturated_at_once() {
    let r = Reaper::new();
    let pool = std::sync::Arc::new(
        r.builder().adapter(Python::showcase()).size(1).max_queue(2).build().await.expect("pool"),
    );
    let gate = r.dir().join("gate");
    let p = pool.clone();
    let busy = tokio::spawn(async move { p.execute("sleep", json!({"ms": 1500})).await });
    wait(&pool, |s| s.busy == 1).await;
    let mut queued = Vec::new();
    for _ in 0..2 {
        let p = pool.clone();
        queued.push(tokio::spawn(async move { p.execute("echo", json!(1)).await }));
    }
    wait(&pool, |s| s.queued == 2).await;
    let t = Instant::now();
    let touch = json!({"path": gate.to_string_lossy()});
    match pool.execute("touch", touch).await {
        Err(Error::PoolSaturated { max_queue: 2 }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_millis(500));
    busy.await.expect("join").expect("sleep");
    for q in queued {
        assert_eq!(q.await.expect("join").expect("echo"), json!(1));
    }
    assert!(!gate.exists(), "a rejected call must never run");
    pool.shutdown().await;
}

#[tokio::test]
async fn queue_timeout_and_dropped_queued_calls_never_run() {
    let r = Reaper::new();
    let pool = std::sync::Arc::new(
        r.builder()
            .adapter(Python::showcase())
            .size(1)
            .queue_timeout(Duration::from_millis(200))
            .build()
            .await
            .expect("pool"),
    );
    let timed_out = r.dir().join("timed_out");
    let dropped = r.dir().join("dropped");
    let p = pool.clone();
    let busy = tokio::spawn(async move { p.execute("sleep", json!({"ms": 1000})).await });
    wait(&pool, |s| s.busy == 1).await;
    match pool.execute("touch", json!({"path": timed_out.to_string_lossy()})).await {
        Err(Error::QueueTimeout { command, .. }) => assert_eq!(command, "touch"),
        other => panic!("unexpected {other:?}"),
    }
    let p = pool.clone();
    let d = dropped.clone();
    let queued = tokio::spawn(async move { p.execute("touch", json!({"path": d.to_string_lossy()})).await });
    wait(&pool, |s| s.queued == 1).await;
    queued.abort();
    let _ = queued.await;
    assert_eq!(pool.stats().queued, 0);
    busy.await.expect("join").expect("sleep");
    // One more call through the single worker: anything queued before it would have run first.
    pool.execute("ping", json!(null)).await.expect("ping");
    assert!(!timed_out.exists(), "a call that timed out in the queue ran later");
    assert!(!dropped.exists(), "a dropped queued call ran later");
    pool.shutdown().await;
}

#[tokio::test]
async fn deadline_while_queued_is_a_timeout() {
    let r = Reaper::new();
    let pool =
        std::sync::Arc::new(r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool"));
    let p = pool.clone();
    let busy = tokio::spawn(async move { p.execute("sleep", json!({"ms": 800})).await });
    wait(&pool, |s| s.busy == 1).await;
    let opts = CallOptions::deadline(Instant::now() + Duration::from_millis(100));
    match pool.execute_with("echo", Payload::from(json!(1)), opts).await {
        Err(Error::Timeout { worker: None, .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    busy.await.expect("join").expect("sleep");
    pool.shutdown().await;
}

#[tokio::test]
async fn dropping_a_running_call_replaces_its_worker() {
    let r = Reaper::new();
    let pool =
        std::sync::Arc::new(r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool"));
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    let p = pool.clone();
    let started = r.dir().join("started");
    let args = json!({"ms": 30_000, "started": started.to_string_lossy()});
    let running = tokio::spawn(async move { p.execute("stubborn_sleep", args).await });
    // Drop the call once the tool runs: a cancel that reaches the worker before the tool starts
    // is answered at once (and the worker rightly kept).
    assert!(wait_for_file(&started, Duration::from_secs(10)).await, "the tool did not start");
    running.abort();
    let _ = running.await;
    assert_ne!(pool.execute("pid", json!(null)).await.expect("pid"), pid);
    pool.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_running_calls_finish_and_refuses_new_ones() {
    let r = Reaper::new();
    let pool =
        std::sync::Arc::new(r.builder().adapter(Python::showcase()).size(2).build().await.expect("pool"));
    let p = pool.clone();
    let running = tokio::spawn(async move { p.execute("sleep", json!({"ms": 300})).await });
    wait(&pool, |s| s.busy == 1).await;
    pool.shutdown().await;
    assert_eq!(running.await.expect("join").expect("finished during grace"), json!(300));
    assert!(matches!(pool.execute("ping", json!(null)).await, Err(Error::ShuttingDown)));
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn dropping_the_pool_kills_and_reaps_every_worker() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(3).build().await.expect("pool");
    let pids: Vec<u32> = pool.worker_pids().into_iter().flatten().collect();
    assert_eq!(pids.len(), 3);
    assert_eq!(r.alive().len(), 3);
    drop(pool);
    r.assert_none_left(Duration::from_secs(5));
}

/// Waits (bounded) until the pool's stats satisfy `cond`.
async fn wait(pool: &snakepit::Pool, cond: impl FnMut(&snakepit::PoolStats) -> bool) {
    if let Err(s) = pool.wait_stats(cond, Duration::from_secs(10)).await {
        panic!("condition not reached within 10 s; stats: {s:?}");
    }
}

#[tokio::test]
async fn shutdown_escalates_to_sigkill_for_a_worker_that_ignores_eof_and_sigterm() {
    let r = Reaper::new();
    let script = r.script(
        "stubborn.py",
        r#"
import signal, threading
from snakepit_bridge import tool

signal.signal(signal.SIGTERM, signal.SIG_IGN)

@tool
def block():
    threading.Event().wait()
"#,
    );
    let pool = std::sync::Arc::new(
        r.builder()
            .adapter(Python::script(&script))
            .size(1)
            .shutdown_grace(Duration::from_millis(200))
            .build()
            .await
            .expect("pool"),
    );
    let p = pool.clone();
    let stuck = tokio::spawn(async move { p.execute("block", json!(null)).await });
    wait(&pool, |s| s.busy == 1).await;
    let t = Instant::now();
    pool.shutdown().await;
    // grace for the call, then stdin EOF, SIGTERM (ignored), SIGKILL: about 3 × 200 ms.
    assert!(t.elapsed() < Duration::from_secs(5), "shutdown took {:?}", t.elapsed());
    match stuck.await.expect("join") {
        Err(Error::WorkerCrashed { exit, .. }) => assert_eq!(exit, snakepit::ExitInfo::Signal(9)),
        other => panic!("unexpected {other:?}"),
    }
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_worker_that_answers_within_the_cancel_grace_is_kept_and_its_late_reply_dropped() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(Python::showcase())
        .size(1)
        .cancel_grace(Duration::from_secs(5))
        .build()
        .await
        .expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    let t = Instant::now();
    // A tool that ignores the cancel: its late *result* arrives within the grace.
    let r1 = pool.execute_timeout("stubborn_sleep", json!({"ms": 400}), Duration::from_millis(100)).await;
    assert!(matches!(r1, Err(Error::Timeout { .. })), "{r1:?}");
    assert!(t.elapsed() < Duration::from_millis(350), "the caller must get Timeout at once");
    // The same worker serves the next call once it has answered the abandoned one; the late
    // `400` is never handed to this caller.
    assert_eq!(pool.execute("pid", json!(null)).await.expect("pid"), pid);
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test]
async fn detach_policy_keeps_the_worker_of_a_dropped_call() {
    let r = Reaper::new();
    let pool = std::sync::Arc::new(
        r.builder()
            .adapter(Python::showcase())
            .size(1)
            .drop_policy(snakepit::DropPolicy::Detach)
            .build()
            .await
            .expect("pool"),
    );
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    let p = pool.clone();
    let running = tokio::spawn(async move { p.execute("sleep", json!({"ms": 300})).await });
    wait(&pool, |s| s.busy == 1).await;
    running.abort();
    let _ = running.await;
    assert_eq!(pool.execute("pid", json!(null)).await.expect("pid"), pid, "detached, not killed");
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test]
async fn cancel_interrupts_the_tool_runs_its_finally_and_keeps_the_worker() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(Python::showcase())
        .size(1)
        .cancel_grace(Duration::from_secs(20))
        .build()
        .await
        .expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    // Retry until the cancel reached the running tool (its `started` file exists): a cancel that
    // arrives before the tool starts is answered by the bridge and no `finally` is involved.
    for attempt in 0..5 {
        let started = r.dir().join(format!("started-{attempt}"));
        let marker = r.dir().join(format!("finally-ran-{attempt}"));
        let t = Instant::now();
        let args =
            json!({"ms": 30_000, "path": marker.to_string_lossy(), "started": started.to_string_lossy()});
        let res = pool.execute_timeout("sleep_then_touch", args, Duration::from_millis(100)).await;
        assert!(matches!(res, Err(Error::Timeout { .. })), "{res:?}");
        // The worker answers the cancel (it does not sleep 30 s, nor wait out the 20 s grace).
        assert_eq!(pool.execute("pid", json!(null)).await.expect("pid"), pid);
        assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
        assert_eq!(pool.stats().restarts, 0);
        if started.exists() {
            assert!(marker.exists(), "the tool's finally block must have run");
            pool.shutdown().await;
            return;
        }
    }
    panic!("the tool never started within its 100 ms timeout in 5 attempts");
}

#[tokio::test]
async fn results_that_are_not_json_are_typed_errors_and_the_worker_stays() {
    let r = Reaper::new();
    let script = r.script(
        "w.py",
        r#"
import os
from snakepit_bridge import tool

@tool
def nan():
    return float("nan")

@tool
def cycle():
    a = []
    a.append(a)
    return a

@tool
def obj():
    return object()

@tool
def pid():
    return os.getpid()

@tool
def unicode(s):
    return s + "\u00e9\u4e2d"
"#,
    );
    let pool = r.builder().adapter(Python::script(&script)).size(1).build().await.expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    for cmd in ["nan", "cycle", "obj"] {
        match pool.execute(cmd, json!(null)).await {
            Err(Error::Worker { error, .. }) => {
                assert!(error.message.contains("not JSON-serialisable"), "{cmd}: {error:?}")
            }
            other => panic!("{cmd}: unexpected {other:?}"),
        }
    }
    assert_eq!(
        pool.execute("unicode", json!(["\u{1F40D}"])).await.expect("utf-8"),
        json!("\u{1F40D}\u{e9}\u{4e2d}")
    );
    assert_eq!(pool.execute("pid", json!(null)).await.expect("pid"), pid, "the same worker served all");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_pool_serves_calls_timeouts_and_many_callers() {
    let r = Reaper::new();
    let pool = std::sync::Arc::new(
        r.builder()
            .adapter(Python::showcase())
            .size(2)
            .busy_poll(Duration::from_micros(50))
            .build()
            .await
            .expect("pool"),
    );
    for i in 0..200 {
        assert_eq!(pool.execute("add", json!({"a": i, "b": 1})).await.expect("add"), json!(i + 1));
    }
    let calls = (0..64).map(|i| {
        let p = pool.clone();
        async move { p.execute("echo", json!({"i": i})).await }
    });
    for (i, r) in futures::future::join_all(calls).await.into_iter().enumerate() {
        assert_eq!(r.expect("echo"), json!({"i": i}));
    }
    let t = Instant::now();
    let res = pool.execute_timeout("sleep", json!({"ms": 5_000}), Duration::from_millis(100)).await;
    assert!(matches!(res, Err(Error::Timeout { .. })), "{res:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(pool.execute("ping", json!(null)).await.expect("ping"), json!("pong"));
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}
