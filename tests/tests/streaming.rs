//! Streaming with real python3 workers: order, async generators, early drop, backpressure with
//! a slow consumer, errors midway, deadlines.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use snakepit::{CallOptions, Error, Payload, Python};
use snakepit_tests::Reaper;

fn host_rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("rss");
    pages * 4096
}

#[tokio::test]
async fn chunks_arrive_in_order_then_the_end() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    let mut s = pool.execute_stream("count", json!({"n": 1000})).await.expect("stream");
    let mut i = 0;
    while let Some(item) = s.next_json().await {
        assert_eq!(item.expect("chunk"), json!({"i": i}));
        i += 1;
    }
    assert_eq!(i, 1000);
    drop(s);
    // A generator called without streaming returns its items as a list.
    assert_eq!(
        pool.execute("count", json!({"n": 3})).await.expect("list"),
        json!([{"i": 0}, {"i": 1}, {"i": 2}])
    );
    // Async generators and async tools work too.
    let items: Vec<_> = pool.execute_stream("acount", json!({"n": 5})).await.expect("stream").collect().await;
    let items: Vec<i64> = items.into_iter().map(|p| p.expect("chunk").decode().expect("int")).collect();
    assert_eq!(items, [0, 1, 2, 3, 4]);
    assert_eq!(pool.execute("adouble", json!({"x": 21})).await.expect("async"), json!(42));
    let st = pool.stats();
    assert_eq!((st.busy, st.idle, st.calls_failed), (0, 1, 0), "{st:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_generator_and_frees_the_worker() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    let marker = r.dir().join("finally");
    let mut s = pool
        .execute_stream("count", json!({"n": 1_000_000_000u64, "path": marker.to_string_lossy()}))
        .await
        .expect("stream");
    for i in 0..3 {
        assert_eq!(s.next_json().await.expect("item").expect("chunk"), json!({"i": i}));
    }
    drop(s);
    pool.wait_stats(|s| s.idle == 1 && s.busy == 0, Duration::from_secs(10)).await.expect("worker freed");
    assert!(marker.exists(), "the generator's finally must have run");
    assert_eq!(pool.execute("pid", json!(null)).await.expect("pid"), pid, "same worker, not restarted");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_holds_the_producer_back_and_memory_stays_bounded() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).stream_window(16).build().await.expect("pool");
    let chunks = 10_000u64;
    let size = 64 * 1024;
    let before = host_rss();
    let mut peak = before;
    let t = Instant::now();
    let mut s = pool.execute_stream("count", json!({"n": chunks, "size": size})).await.expect("stream");
    let mut n = 0u64;
    let mut bytes = 0usize;
    while let Some(item) = s.next().await {
        let p = item.expect("chunk");
        bytes += p.len();
        n += 1;
        if n.is_multiple_of(500) {
            peak = peak.max(host_rss());
            // A slow consumer: give the producer every chance to run ahead.
            tokio::task::yield_now().await;
        }
    }
    let elapsed = t.elapsed();
    assert_eq!(n, chunks);
    let growth = peak.saturating_sub(before);
    eprintln!(
        "streamed {n} chunks of 64 KiB ({:.0} MiB) in {elapsed:?}: {:.0} chunks/s, {:.0} MiB/s; host RSS grew {:.1} MiB",
        bytes as f64 / 1048576.0,
        n as f64 / elapsed.as_secs_f64(),
        bytes as f64 / 1048576.0 / elapsed.as_secs_f64(),
        growth as f64 / 1048576.0
    );
    // 10k × 64 KiB = 640 MiB went through; the host never held more than a window of it.
    assert!(growth < 48 * 1024 * 1024, "host RSS grew by {growth} bytes");
    pool.shutdown().await;
}

#[tokio::test]
async fn an_error_midway_ends_the_stream_with_a_typed_error() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    let mut s = pool.execute_stream("fail_after", json!({"n": 5})).await.expect("stream");
    for i in 0..5 {
        assert_eq!(s.next_json().await.expect("item").expect("chunk"), json!(i));
    }
    match s.next_json().await {
        Some(Err(Error::Worker { error, .. })) => {
            assert_eq!(error.kind, "ValueError");
            assert!(error.message.contains("after 5"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(s.next_json().await.is_none());
    drop(s);
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 1})).await.expect("worker fine"), json!(2));
    pool.shutdown().await;
}

#[tokio::test]
async fn a_stream_past_its_deadline_times_out_and_the_worker_is_kept() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).stream_window(4).build().await.expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    let opts = CallOptions::timeout(Duration::from_millis(200));
    let mut s = pool
        .execute_stream_with(None, "count", Payload::from(json!({"n": 1_000_000_000u64})), opts)
        .await
        .expect("stream");
    let mut got = 0;
    let err = loop {
        match s.next().await {
            Some(Ok(_)) => got += 1,
            Some(Err(e)) => break e,
            None => panic!("the stream cannot end on its own"),
        }
    };
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(got > 0);
    drop(s);
    assert_eq!(pool.execute("pid", json!(null)).await.expect("pid"), pid);
    pool.shutdown().await;
}
