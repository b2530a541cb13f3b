//! The conformance kit: one suite of protocol behaviours, run against every transport with the
//! Python bridge (real python3 workers), with cold workers and with workers forked from a zygote. gRPC workers run on the repository's `.venv` python
//! (grpcio), which `cargo xtask setup` (run by `cargo xtask ci`) creates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use snakepit::{
    Bytes, Error, ExitInfo, Grpc, Payload, Pool, PoolBuilder, ProcessProfile, Python, StdioTransport, Zygote,
};
use snakepit_tests::{venv_python, wait_for_file, Reaper};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Stdio,
    Grpc,
    StdioZygote,
    GrpcZygote,
}

impl Kind {
    fn grpc(self) -> bool {
        matches!(self, Kind::Grpc | Kind::GrpcZygote)
    }
}

fn builder(r: &Reaper, kind: Kind) -> PoolBuilder {
    let b = r.builder();
    let b = match kind {
        Kind::StdioZygote | Kind::GrpcZygote => b.profile(Zygote(ProcessProfile)),
        Kind::Stdio | Kind::Grpc => b,
    };
    match kind {
        Kind::Stdio | Kind::StdioZygote => b.adapter(Python::showcase()).transport(StdioTransport::new()),
        Kind::Grpc | Kind::GrpcZygote => b
            .adapter(Python::showcase().interpreter(venv_python()))
            .transport(Grpc::default().socket_root(r.dir().join("s"))),
    }
}

async fn pool(r: &Reaper, kind: Kind, size: usize) -> Arc<Pool> {
    Arc::new(builder(r, kind).size(size).build().await.expect("pool"))
}

async fn call_result_and_error_mapping(kind: Kind) {
    let r = Reaper::new();
    let pool = pool(&r, kind, 2).await;
    assert_eq!(pool.execute("add", json!({"a": 2, "b": 3})).await.expect("add"), json!(5));
    assert_eq!(pool.execute("echo", json!({"x": [1, "two"]})).await.expect("echo"), json!({"x": [1, "two"]}));
    match pool.execute("fail", json!({"type": "KeyError", "message": "k"})).await {
        Err(Error::Worker { error, .. }) => {
            assert_eq!(error.kind, "KeyError");
            assert!(error.traceback.unwrap_or_default().contains("Traceback"));
        }
        other => panic!("{kind:?}: unexpected {other:?}"),
    }
    assert!(matches!(pool.execute("nope", json!(null)).await, Err(Error::UnknownCommand { .. })));
    let big = "x".repeat(300_000);
    assert_eq!(pool.execute("echo", json!(big)).await.expect("300 kB"), json!(big));
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

async fn crash_is_seen_at_once(kind: Kind) {
    let r = Reaper::new();
    let pool = pool(&r, kind, 1).await;
    let pid = pool.execute("pid", json!(null)).await.expect("pid").as_i64().expect("int") as i32;
    let p = pool.clone();
    let call = tokio::spawn(async move {
        p.execute_timeout("sleep", json!({"ms": 60_000}), Duration::from_secs(60)).await
    });
    pool.wait_stats(|s| s.busy == 1, Duration::from_secs(10)).await.expect("busy");
    let t = Instant::now();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    match call.await.expect("join") {
        Err(Error::WorkerCrashed { exit, .. }) => assert_eq!(exit, ExitInfo::Signal(9)),
        other => panic!("{kind:?}: unexpected {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{kind:?}: crash seen after {:?}", t.elapsed());
    assert_ne!(pool.execute("pid", json!(null)).await.expect("served again"), json!(pid));
    pool.shutdown().await;
}

async fn streaming_in_order_and_drop_cancels(kind: Kind) {
    let r = Reaper::new();
    let pool = pool(&r, kind, 1).await;
    let mut s = pool.execute_stream("count", json!({"n": 500})).await.expect("stream");
    let mut i = 0;
    while let Some(item) = s.next_json().await {
        assert_eq!(item.expect("chunk"), json!({"i": i}));
        i += 1;
    }
    assert_eq!(i, 500);
    drop(s);
    let marker = r.dir().join("finally");
    let mut s = pool
        .execute_stream("count", json!({"n": 1_000_000_000u64, "path": marker.to_string_lossy()}))
        .await
        .expect("stream");
    for _ in 0..3 {
        s.next().await.expect("item").expect("chunk");
    }
    drop(s);
    pool.wait_stats(|s| s.busy == 0 && s.idle == 1, Duration::from_secs(10)).await.expect("freed");
    assert!(
        wait_for_file(&marker, Duration::from_secs(10)).await,
        "{kind:?}: the generator's finally did not run"
    );
    let items: Vec<_> =
        pool.execute_stream("fail_after", json!({"n": 2})).await.expect("stream").collect().await;
    assert_eq!(items.len(), 3);
    assert!(matches!(&items[2], Err(Error::Worker { error, .. }) if error.kind == "ValueError"));
    pool.shutdown().await;
}

async fn host_calls_and_sessions(kind: Kind) {
    let r = Reaper::new();
    let pool = pool(&r, kind, 1).await;
    pool.register_host_tool("twice", |v| async move { Ok(json!(v["n"].as_i64().unwrap_or(0) * 2)) });
    assert_eq!(
        pool.execute("ask_host", json!({"name": "twice", "args": {"n": 21}})).await.expect("host"),
        json!({"ok": 42})
    );
    let s = pool.create_session("conf", json!(null)).await.expect("session");
    assert_eq!(
        s.execute("remember", json!({"name": "k", "value": "v"})).await.expect("remember"),
        json!("v")
    );
    assert_eq!(s.get("k").await.expect("get"), Some(json!("v")));
    pool.shutdown().await;
}

async fn timeout_then_the_worker_is_kept_or_replaced(kind: Kind) {
    let r = Reaper::new();
    let pool = pool(&r, kind, 1).await;
    let t = Instant::now();
    let res = pool.execute_timeout("stubborn_sleep", json!({"ms": 500}), Duration::from_millis(100)).await;
    assert!(matches!(res, Err(Error::Timeout { .. })), "{kind:?}: {res:?}");
    assert!(t.elapsed() < Duration::from_millis(450));
    // The late reply never reaches the next caller.
    assert_eq!(pool.execute("echo", json!("mine")).await.expect("echo"), json!("mine"));
    pool.shutdown().await;
}

async fn unknown_version_is_refused(kind: Kind) {
    let r = Reaper::new();
    let b = builder(&r, kind);
    let adapter =
        if kind.grpc() { Python::showcase().interpreter(venv_python()) } else { Python::showcase() };
    let err =
        b.adapter(adapter.env("SNAKEPIT_BRIDGE_VERSIONS", "99")).size(1).build().await.expect_err("refused");
    assert!(matches!(err, Error::VersionMismatch { .. }), "{kind:?}: {err:?}");
    r.assert_none_left(Duration::from_secs(5));
}

async fn heartbeat_replaces_a_stopped_worker(kind: Kind) {
    let r = Reaper::new();
    let hb = snakepit::Heartbeat {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(200),
        max_missed: 2,
    };
    let pool = builder(&r, kind).size(1).heartbeat(Some(hb)).build().await.expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    kill(Pid::from_raw(pid.as_i64().expect("int") as i32), Signal::SIGSTOP).expect("SIGSTOP");
    pool.wait_stats(|s| s.unresponsive == 1 && s.ready == 1, Duration::from_secs(10))
        .await
        .expect("replaced");
    assert_ne!(pool.execute("pid", json!(null)).await.expect("pid"), pid);
    pool.shutdown().await;
}

async fn shutdown_is_graceful_and_leaves_nothing(kind: Kind) {
    let r = Reaper::new();
    let pool = pool(&r, kind, 2).await;
    let p = pool.clone();
    let running = tokio::spawn(async move { p.execute("sleep", json!({"ms": 200})).await });
    pool.wait_stats(|s| s.busy == 1, Duration::from_secs(10)).await.expect("busy");
    pool.shutdown().await;
    assert_eq!(running.await.expect("join").expect("finished"), json!(200));
    r.assert_none_left(Duration::from_secs(5));
}

async fn frame_limit_on_requests(kind: Kind) {
    let r = Reaper::new();
    let b = builder(&r, kind).size(1);
    let b = if kind.grpc() {
        b.transport(Grpc::default().socket_root(r.dir().join("s")).max_frame(4096))
    } else {
        b.transport(StdioTransport::new().max_frame(4096))
    };
    let pool = b.build().await.expect("pool");
    match pool.execute("echo", json!("x".repeat(10_000))).await {
        Err(Error::FrameTooLarge { max: 4096, .. }) => {}
        other => panic!("{kind:?}: unexpected {other:?}"),
    }
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 1})).await.expect("still fine"), json!(2));
    pool.shutdown().await;
}

async fn cancel_interrupts_a_running_tool(kind: Kind) {
    let r = Reaper::new();
    let pool = builder(&r, kind).size(1).cancel_grace(Duration::from_secs(20)).build().await.expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    let t = Instant::now();
    let res = pool.execute_timeout("spin", json!({"seconds": 30}), Duration::from_millis(100)).await;
    assert!(matches!(res, Err(Error::Timeout { .. })), "{kind:?}: {res:?}");
    // The tool was interrupted (not run for 30 s, nor killed after the 20 s grace).
    assert_eq!(pool.execute("pid", json!(null)).await.expect("pid"), pid);
    assert!(t.elapsed() < Duration::from_secs(10), "{kind:?}: took {:?}", t.elapsed());
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

/// Bytes and mixed payloads as binary segments; a transport whose workers do not announce
/// segments refuses them with `bad_request` (and the case prints SKIP).
async fn binary_segments(kind: Kind) {
    let r = Reaper::new();
    let pool = pool(&r, kind, 1).await;
    let data = Bytes::from((0..=255u8).cycle().take(300_000).collect::<Vec<_>>());
    match pool.execute_bytes("echo", data.clone()).await {
        Err(Error::BadRequest(m)) => {
            eprintln!("SKIP binary_segments ({kind:?}): {m}");
            assert!(pool.execute("ping", json!(null)).await.is_ok(), "the worker is untouched");
            pool.shutdown().await;
            return;
        }
        r => assert!(r.expect("echo") == data, "{kind:?}: bytes differ"),
    }
    let args = Payload::mixed(&json!({"a": {"$seg": 0}, "n": 1}), vec![Bytes::from_static(b"xy")]);
    let out = pool.execute_with("echo", args, Default::default()).await.expect("mixed");
    assert_eq!(out.to_value().expect("json"), json!({"a": {"$seg": 0}, "n": 1}));
    assert_eq!(out.segments(), [Bytes::from_static(b"xy")]);
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

/// Large segments through the worker's shared-memory arena: a round trip of 1 MiB that the
/// host's arena counters see, a numpy-free mixed payload beside it; workers that did not map an
/// arena (the gRPC transport offers none) print SKIP. A region out of range is in tests/shm.rs
/// (it takes a misbehaving worker).
async fn shared_memory(kind: Kind) {
    let r = Reaper::new();
    let pool = pool(&r, kind, 1).await;
    let mapped = pool.worker_handshakes().iter().flatten().all(|h| h.shm);
    if !mapped {
        eprintln!("SKIP shared_memory ({kind:?}): the worker mapped no shared-memory arena");
        pool.shutdown().await;
        return;
    }
    let before = snakepit::shm::counters();
    let data = Bytes::from((0..=255u8).cycle().take(1 << 20).collect::<Vec<_>>());
    let back = pool.execute_bytes("echo", data.clone()).await.expect("echo");
    assert!(back == data, "{kind:?}: bytes differ");
    let after = snakepit::shm::counters();
    assert!(
        after.to_worker > before.to_worker && after.from_worker > before.from_worker,
        "{kind:?}: {after:?}"
    );
    let args = Payload::mixed(
        &json!({"big": {"$seg": 0}, "small": {"$seg": 1}}),
        vec![data.clone(), Bytes::from_static(b"s")],
    );
    let out = pool.execute_with("echo", args, Default::default()).await.expect("mixed");
    assert!(out.segments()[0] == data && out.segments()[1] == Bytes::from_static(b"s"), "{kind:?}");
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

/// A pool of one worker offered a pipeline of 4; `None` (and SKIP) when the worker does not
/// pipeline (the gRPC transport never offers it).
async fn pipelined(r: &Reaper, kind: Kind, case: &str) -> Option<Arc<Pool>> {
    let pool = Arc::new(
        builder(r, kind)
            .size(1)
            .pipeline_depth(4)
            .cancel_grace(Duration::from_millis(300))
            .build()
            .await
            .expect("pool"),
    );
    if pool.worker_handshakes().iter().flatten().all(|h| h.pipeline_depth == 4) {
        return Some(pool);
    }
    eprintln!("SKIP {case} ({kind:?}): the worker does not announce pipelining");
    pool.shutdown().await;
    None
}

/// Pipelining: the worker runs queued calls in the order sent (`join_all` sends them in order).
async fn pipeline_order_preserved(kind: Kind) {
    let r = Reaper::new();
    let Some(pool) = pipelined(&r, kind, "pipeline_order_preserved").await else { return };
    let calls = (0..24).map(|i| pool.execute("journal", json!({"entry": i})));
    let out = futures::future::join_all(calls).await;
    assert!(out.iter().all(Result::is_ok), "{kind:?}: {out:?}");
    let journal = pool.execute("journal", json!({})).await.expect("journal");
    assert_eq!(journal, json!((0..24).collect::<Vec<_>>()), "{kind:?}");
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// Pipelining: a call queued behind a long one whose deadline passes is answered `Cancelled`
/// by the worker without running, and the worker is kept although the call ahead outlasts the
/// cancel grace.
async fn pipeline_cancel_of_a_queued_call(kind: Kind) {
    let r = Reaper::new();
    let Some(pool) = pipelined(&r, kind, "pipeline_cancel_of_a_queued_call").await else { return };
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    let marker = r.dir().join("ran");
    let long = pool.execute("sleep", json!({"ms": 800}));
    let queued =
        pool.execute_timeout("touch", json!({"path": marker.to_string_lossy()}), Duration::from_millis(100));
    let (long, queued) = tokio::join!(long, queued);
    assert!(long.is_ok(), "{kind:?}: {long:?}");
    assert!(matches!(queued, Err(Error::Timeout { .. })), "{kind:?}: {queued:?}");
    // The worker has answered the queued call (the pool kept it): it never ran.
    assert_eq!(pool.execute("pid", json!(null)).await.expect("pid"), pid, "{kind:?}: kept");
    assert!(!marker.exists(), "{kind:?}: the cancelled call ran");
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// Pipelining: a crash with a full pipeline fails the running call with `WorkerCrashed` and
/// the queued ones with `NotStarted`.
async fn pipeline_crash_with_a_full_pipeline(kind: Kind) {
    let r = Reaper::new();
    let Some(pool) = pipelined(&r, kind, "pipeline_crash_with_a_full_pipeline").await else { return };
    let crash = pool.execute("crash", json!({"code": 3}));
    let queued = futures::future::join_all((0..3).map(|i| pool.execute("echo", json!(i))));
    let (crash, queued) = tokio::join!(crash, queued);
    assert!(matches!(crash, Err(Error::WorkerCrashed { .. })), "{kind:?}: {crash:?}");
    for q in queued {
        assert!(matches!(q, Err(Error::NotStarted { .. })), "{kind:?}: {q:?}");
    }
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 2})).await.expect("replaced"), json!(3));
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod stdio {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(Kind::Stdio).await })*
        }
        mod grpc {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(Kind::Grpc).await })*
        }
        mod stdio_zygote {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(Kind::StdioZygote).await })*
        }
        mod grpc_zygote {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(Kind::GrpcZygote).await })*
        }
    };
}

conformance!(
    call_result_and_error_mapping,
    crash_is_seen_at_once,
    streaming_in_order_and_drop_cancels,
    host_calls_and_sessions,
    timeout_then_the_worker_is_kept_or_replaced,
    unknown_version_is_refused,
    heartbeat_replaces_a_stopped_worker,
    shutdown_is_graceful_and_leaves_nothing,
    frame_limit_on_requests,
    cancel_interrupts_a_running_tool,
    binary_segments,
    shared_memory,
    pipeline_order_preserved,
    pipeline_cancel_of_a_queued_call,
    pipeline_crash_with_a_full_pipeline,
);
