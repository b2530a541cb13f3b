//! The pool's own paths, driven by `snakepit_testing::FakeWorker` on a paused clock: the
//! cancel-at-every-await sweep, and the rules every call path shares (streams included).

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use snakepit::{CallOptions, Error, Payload, Pool, WorkerError};
use snakepit_testing::{raise, FakeWorker};

fn panics_before_any_await(
    _: serde_json::Value,
) -> std::future::Ready<Result<serde_json::Value, WorkerError>> {
    panic!("a bug before the first await")
}

fn stream_panics_at_once(
    _: serde_json::Value,
) -> futures::stream::Empty<Result<serde_json::Value, WorkerError>> {
    panic!("a bug in the generator")
}

fn worker() -> FakeWorker {
    FakeWorker::new()
        .tool("panics_early", panics_before_any_await)
        .stream_tool("stream_panics", stream_panics_at_once)
        .tool("add", |args| async move {
            match (args["a"].as_i64(), args["b"].as_i64()) {
                (Some(a), Some(b)) => Ok(json!(a + b)),
                _ => Err(raise("TypeError", "add needs integers a and b")),
            }
        })
        .tool("panics", |_| async move { panic!("a bug in the tool") })
        .stream_tool("count", |args| {
            let n = args["n"].as_i64().unwrap_or(0);
            futures::stream::iter((0..n).map(|i| Ok(json!(i))))
        })
        .stream_tool("count_then_fail", |_| {
            futures::stream::iter(vec![Ok(json!(0)), Err(raise("ValueError", "midway"))])
        })
        .stream_tool("count_then_die", |_| futures::stream::iter(vec![Ok(json!(0))]))
        .fail_on("boom", "ValueError", "bad input")
        .crash_on("die")
        .delay("slow", Duration::from_millis(50))
}

async fn pool(w: FakeWorker, size: usize) -> Pool {
    Pool::builder()
        .adapter(w)
        .size(size)
        .restart_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .build()
        .await
        .expect("a pool of fake workers")
}

#[tokio::test(start_paused = true)]
async fn results_worker_errors_panics_and_crashes_are_typed() {
    let w = worker();
    let control = w.control();
    let pool = pool(w, 2).await;
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 2})).await.expect("add"), json!(3));
    let e = pool.execute("boom", json!({})).await.expect_err("boom raises");
    assert!(matches!(&e, Error::Worker { error, .. } if error.kind == "ValueError"), "{e:?}");
    // A panicking closure is a worker error of type `panic`; the worker is kept.
    let e = pool.execute("panics", json!({})).await.expect_err("panics");
    assert!(
        matches!(&e, Error::Worker { error, .. } if error.kind == "panic" && error.message.contains("a bug")),
        "{e:?}"
    );
    let e = pool.execute("panics_early", json!({})).await.expect_err("panics");
    assert!(matches!(&e, Error::Worker { error, .. } if error.kind == "panic"), "{e:?}");
    let mut s = pool.execute_stream("stream_panics", json!({})).await.expect("stream");
    let e = s.next().await.expect("an item").expect_err("the panic");
    assert!(matches!(&e, Error::Worker { error, .. } if error.kind == "panic"), "{e:?}");
    assert!(s.next().await.is_none());
    drop(s);
    assert_eq!(control.starts(), 2, "no worker was replaced");
    // An unregistered tool is refused host-side: no round trip.
    let e = pool.execute("nope", json!({})).await.expect_err("unknown");
    assert_eq!(e.kind(), "unknown_command");
    assert_eq!(control.calls("nope"), 0);
    // A crash is `WorkerCrashed`, and the slot restarts the worker with backoff.
    let e = pool.execute("die", json!({})).await.expect_err("die");
    assert_eq!(e.kind(), "worker_crashed", "{e:?}");
    let s = pool
        .wait_stats(|s| s.restarts == 1 && s.ready == 2, Duration::from_secs(10))
        .await
        .expect("restarted");
    assert_eq!((s.crashes, s.restarts, s.calls_ok, s.calls_failed), (1, 1, 1, 6));
    assert_eq!(control.starts(), 3);
    assert_eq!(pool.execute("add", json!({"a": 2, "b": 2})).await.expect("serves again"), json!(4));
    pool.shutdown().await;
    assert_eq!(control.live(), 0, "shutdown ends every worker");
}

#[tokio::test(start_paused = true)]
async fn cancel_at_every_await_leaves_the_pool_whole() {
    let w = worker();
    let control = w.control();
    let pool =
        Pool::builder().adapter(w).size(2).cancel_grace(Duration::from_secs(5)).build().await.expect("pool");
    for polls in 0..30 {
        let mut fut = Box::pin(pool.execute("slow", json!({})));
        for _ in 0..polls {
            if futures::poll!(fut.as_mut()).is_ready() {
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
    // Cancelled calls were answered in time: no worker was replaced.
    assert_eq!(control.starts(), 2);
    assert_eq!(pool.execute("add", json!({"a": 2, "b": 2})).await.expect("add"), json!(4));
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_stream_at_every_await_leaves_the_pool_whole() {
    let pool = pool(worker(), 1).await;
    for polls in 0..20 {
        let mut fut = Box::pin(async {
            let mut s = pool.execute_stream("count", json!({"n": 100})).await?;
            let mut n = 0;
            while let Some(item) = s.next().await {
                item?;
                n += 1;
            }
            Ok::<_, Error>(n)
        });
        for _ in 0..polls {
            if futures::poll!(fut.as_mut()).is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(fut);
        let settled =
            pool.wait_stats(|s| s.idle == 1 && s.busy == 0 && s.queued == 0, Duration::from_secs(10)).await;
        assert!(settled.is_ok(), "after {polls} polls: {settled:?}");
    }
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_finished_stream_counts_once_as_ok_and_an_error_ended_one_once_as_failed() {
    let pool = pool(worker(), 1).await;
    let mut s = pool.execute_stream("count", json!({"n": 5})).await.expect("stream");
    let mut items = Vec::new();
    while let Some(item) = s.next_json().await {
        items.push(item.expect("item"));
    }
    assert_eq!(items, (0..5).map(|i| json!(i)).collect::<Vec<_>>());
    assert!(s.next().await.is_none(), "ended streams stay ended");
    drop(s);
    let st = pool.stats();
    assert_eq!((st.calls_ok, st.calls_failed), (1, 0));

    let mut s = pool.execute_stream("count_then_fail", json!({})).await.expect("stream");
    assert_eq!(s.next_json().await.expect("first").expect("ok"), json!(0));
    let e = s.next_json().await.expect("the error item").expect_err("midway");
    assert!(matches!(&e, Error::Worker { error, .. } if error.kind == "ValueError"), "{e:?}");
    assert!(s.next().await.is_none());
    drop(s);
    let st = pool.stats();
    assert_eq!((st.calls_ok, st.calls_failed), (1, 1));
    // The worker served both and is idle again.
    pool.wait_stats(|s| s.idle == 1 && s.busy == 0, Duration::from_secs(5)).await.expect("idle");
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_to_an_unknown_command_is_refused_without_a_round_trip() {
    let w = worker();
    let control = w.control();
    let pool = pool(w, 1).await;
    let e = pool.execute_stream("nope", json!({})).await.expect_err("unknown");
    assert_eq!(e.kind(), "unknown_command");
    assert_eq!(control.calls("nope"), 0);
    assert_eq!(pool.stats().calls_failed, 1);
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_request_that_crashed_workers_is_quarantined() {
    let w = worker().crash_on("count_then_die");
    let control = w.control();
    let pool = Pool::builder()
        .adapter(w)
        .size(2)
        .quarantine(2)
        .restart_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .build()
        .await
        .expect("pool");
    for crashes in 1..=2 {
        let r = pool.execute_stream("count_then_die", json!({"x": 1})).await;
        let e = match r {
            Ok(mut s) => s.next().await.expect("an item").expect_err("the worker died"),
            Err(e) => e,
        };
        assert_eq!(e.kind(), "worker_crashed", "{e:?}");
        pool.wait_stats(|s| s.restarts == crashes && s.ready == 2, Duration::from_secs(10))
            .await
            .expect("restart");
    }
    let e = pool.execute_stream("count_then_die", json!({"x": 1})).await.expect_err("quarantined");
    assert_eq!(e.kind(), "quarantined");
    assert_eq!(control.calls("count_then_die"), 2, "the third never reached a worker");
    // Other arguments are another request.
    let other = pool.execute_stream("count_then_die", json!({"x": 2})).await;
    assert!(other.is_ok(), "{other:?}");
    drop(other);
    // Plain calls share the same quarantine rules.
    let opts = CallOptions::default().with_key(7);
    for _ in 0..2 {
        let e = pool.execute_with("die", Payload::from(json!({})), opts.clone()).await.expect_err("die");
        assert_eq!(e.kind(), "worker_crashed");
    }
    let e = pool.execute_with("die", Payload::from(json!({})), opts).await.expect_err("quarantined");
    assert_eq!(e.kind(), "quarantined");
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_circuit_opens_when_every_slot_fails_to_start() {
    let w = worker();
    let control = w.control();
    let pool = pool(w, 2).await;
    control.fail_starts(1_000);
    control.crash_all();
    pool.wait_stats(|s| s.circuit_open, Duration::from_secs(10)).await.expect("circuit opens");
    let e = pool.execute("add", json!({"a": 1, "b": 1})).await.expect_err("unavailable");
    assert_eq!(e.kind(), "unavailable");
    assert!(e.to_string().contains("start-up failure requested"), "carries the last start error: {e}");
    control.fail_starts(0);
    pool.wait_stats(|s| !s.circuit_open && s.ready == 2, Duration::from_secs(60)).await.expect("recovers");
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 1})).await.expect("add"), json!(2));
    pool.shutdown().await;
}

/// `max_call_time` caps a call and a stream whatever their own deadline: each fails with
/// `Timeout` once it has run that long on its worker (time queued does not count), the worker is
/// sent `cancel`, answers it and serves the next call.
#[tokio::test(start_paused = true)]
async fn max_call_time_caps_calls_and_streams_whatever_their_deadline() {
    let w = FakeWorker::new()
        .tool("hang", |_| futures::future::pending::<Result<serde_json::Value, WorkerError>>())
        .stream_tool("forever", |_| {
            futures::stream::iter(vec![Ok(json!(0))]).chain(futures::stream::pending())
        })
        .delay("slow", Duration::from_secs(3))
        .delay("half", Duration::from_millis(500));
    let control = w.control();
    let pool = Pool::builder()
        .adapter(w)
        .size(1)
        .max_call_time(Duration::from_secs(1))
        .build()
        .await
        .expect("a pool of fake workers");
    for timeout in [None, Some(Duration::from_secs(3600))] {
        let t0 = tokio::time::Instant::now();
        let opts = CallOptions::default().with_timeout(timeout);
        let e = pool.execute_with("hang", Payload::null(), opts).await.expect_err("capped");
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert_near(t0.elapsed(), Duration::from_secs(1));
    }
    // A shorter own deadline still wins.
    let t0 = tokio::time::Instant::now();
    let e =
        pool.execute_with("hang", Payload::null(), CallOptions::timeout(Duration::from_millis(300))).await;
    assert!(matches!(e, Err(Error::Timeout { .. })), "{e:?}");
    assert_near(t0.elapsed(), Duration::from_millis(300));
    // A stream: the first item arrives, then the cap ends it.
    let t0 = tokio::time::Instant::now();
    let mut s = pool.execute_stream("forever", json!({})).await.expect("stream");
    assert_eq!(s.next_json().await.expect("item").expect("ok"), json!(0));
    let e = s.next().await.expect("the cap").expect_err("timeout");
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_near(t0.elapsed(), Duration::from_secs(1));
    drop(s);
    // Time queued does not count: `half` (0.5 s) waits 1 s behind `slow` (3 s, capped at 1 s)
    // and still completes, 1.5 s after it was made.
    let (a, b) = tokio::join!(pool.execute("slow", json!({})), async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        pool.execute("half", json!({})).await
    });
    assert!(matches!(a, Err(Error::Timeout { .. })), "{a:?}");
    assert_eq!(b.expect("half"), json!(null));
    assert_eq!(control.starts(), 1, "each capped call's worker answered its cancel and was kept");
}

/// `elapsed` is `d` up to the timer's millisecond granularity.
#[track_caller]
fn assert_near(elapsed: Duration, d: Duration) {
    assert!(elapsed >= d && elapsed <= d + Duration::from_millis(5), "{elapsed:?}, expected {d:?}");
}

#[tokio::test(start_paused = true)]
async fn an_absurd_timeout_is_no_deadline_not_a_panic() {
    let pool = Pool::builder()
        .adapter(worker())
        .size(1)
        .default_timeout(Duration::MAX)
        .max_call_time(Duration::MAX)
        .build()
        .await
        .expect("pool");
    let opts = CallOptions::timeout(Duration::from_millis(u64::MAX));
    let r = pool.execute_with("add", Payload::from(json!({"a": 1, "b": 2})), opts).await;
    assert_eq!(r.expect("answered").to_value().expect("json"), json!(3));
    let mut s = pool.execute_stream("count", json!({"n": 2})).await.expect("stream");
    assert_eq!(s.next_json().await.expect("item").expect("ok"), json!(0));
    drop(s);
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn fake_workers_take_and_return_bytes() {
    let worker = FakeWorker::new()
        .payload_tool("reverse", |p: Payload| async move {
            let mut b = p.into_segment().map_err(|e| raise("TypeError", e.to_string()))?.to_vec();
            b.reverse();
            Ok(Payload::from_bytes(b))
        })
        .tool("json_view", |args| async move { Ok(args) });
    let pool = Pool::builder().adapter(worker).size(1).build().await.expect("pool");
    let back = pool.execute_bytes("reverse", snakepit::Bytes::from_static(b"abc")).await.expect("reverse");
    assert_eq!(back.as_ref(), b"cba");
    // A JSON tool sees the references, not the bytes.
    let v = pool
        .execute_with("json_view", Payload::from_bytes(vec![1u8, 2]), CallOptions::default())
        .await
        .expect("json_view");
    assert_eq!(v.to_value().expect("json"), json!({"$seg": 0}));
    // Its `{"$seg":0}` result carries no segment: not bytes.
    let e = pool.execute_bytes("json_view", snakepit::Bytes::new()).await.expect_err("no segment");
    assert_eq!(e.kind(), "codec", "{e}");
    pool.shutdown().await;
}

/// A pipelined fake worker runs its calls one at a time in the order sent; a queued call whose
/// deadline passes is answered without running; a crash fails the queued calls with
/// `NotStarted`, which `retry_not_started` runs again.
#[tokio::test(start_paused = true)]
async fn a_pipelined_fake_worker_keeps_the_protocols_semantics() {
    use std::sync::{Arc, Mutex};
    let ran = Arc::new(Mutex::new(Vec::new()));
    let log = ran.clone();
    let w = worker().delay("record", Duration::from_millis(10)).tool("record", move |args| {
        let log = log.clone();
        async move {
            log.lock().expect("log").push(args["i"].clone());
            Ok(args["i"].clone())
        }
    });
    let pool = Pool::builder().adapter(w).size(1).pipeline_depth(4).build().await.expect("pool");
    assert_eq!(pool.worker_handshakes()[0].as_ref().map(|r| r.pipeline_depth), Some(4));
    // In order, one at a time: 8 calls of 10 ms take 80 ms on the paused clock.
    let t = tokio::time::Instant::now();
    let calls = (0..8).map(|i| pool.execute("record", json!({"i": i})));
    let out = futures::future::join_all(calls).await;
    assert_eq!(
        out.into_iter().map(|r| r.expect("record")).collect::<Vec<_>>(),
        (0..8).map(|i| json!(i)).collect::<Vec<_>>()
    );
    assert_eq!(t.elapsed(), Duration::from_millis(80));
    assert_eq!(*ran.lock().expect("log"), (0..8).map(|i| json!(i)).collect::<Vec<_>>());
    // A queued call times out: it never runs, and the worker is kept.
    ran.lock().expect("log").clear();
    let slow = pool.execute("slow", json!(null));
    let queued = pool.execute_timeout("record", json!({"i": "queued"}), Duration::from_millis(5));
    let (slow, queued) = tokio::join!(slow, queued);
    assert!(slow.is_ok(), "{slow:?}");
    assert!(matches!(queued, Err(Error::Timeout { .. })), "{queued:?}");
    assert!(ran.lock().expect("log").is_empty(), "the cancelled call ran");
    // A crash: the running call crashed, the queued ones did not start (or ran again, opted in).
    let die = pool.execute("die", json!(null));
    let plain = pool.execute("record", json!({"i": 1}));
    let retried = pool.execute_with(
        "record",
        Payload::from(json!({"i": 2})),
        CallOptions::default().retry_not_started(true),
    );
    let (die, plain, retried) = tokio::join!(die, plain, retried);
    assert!(matches!(die, Err(Error::WorkerCrashed { .. })), "{die:?}");
    assert!(matches!(plain, Err(Error::NotStarted { .. })), "{plain:?}");
    assert_eq!(retried.expect("retried").to_value().expect("json"), json!(2));
    assert_eq!(pool.stats().restarts, 1);
    pool.shutdown().await;
}
