//! The shared-memory arena end to end with real Python workers: large segments go through it
//! (both ways, cold and forked workers, streams, concurrent calls), a full arena falls back to
//! the pipe, regions a tool keeps a view of are never reused, and a worker that names a region
//! outside its part breaks its connection.
//!
//! The arena counters are process-wide, so the tests of this file run one at a time.

use std::time::Duration;

use serde_json::json;
use snakepit::shm::{counters, Counters};
use snakepit::{Bytes, Payload, ProcessProfile, Python, ThreadProfile, Zygote};
use snakepit_tests::{venv_python, Reaper};

const WORKER: &str = r#"
import os, struct
from snakepit_bridge import tool

kept = []

@tool
def echo(data):
    assert isinstance(data, memoryview), type(data)
    return data

@tool
def checksum(data):
    return {"len": len(data), "sum": sum(bytes(data[:4096])), "readonly": data.readonly}

@tool
def keep(data):
    import numpy as np
    kept.append(np.frombuffer(data, dtype=np.uint8))
    return len(kept)

@tool
def kept_sum():
    return [int(a[:4096].sum()) for a in kept]

@tool
def chunks(n, size):
    for i in range(n):
        yield bytes([i]) * size

@tool
def scale(a, k):
    return a * k

@tool
def bad_region(ctx):
    # A result naming [0, 16): the host's part of the arena, not ours.
    body = b'{"t":"result","id":%d,"ok":{"$seg":0},"seg":[[0,16]]}' % ctx.request_id
    from snakepit_bridge._core import protocol_fd
    os.write(protocol_fd(), struct.pack(">I", (4 + len(body)) | (1 << 31)) + struct.pack(">I", len(body)) + body)
    import time
    time.sleep(60)
"#;

/// One test at a time: the counters are process-wide.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn python(r: &Reaper) -> Python {
    Python::script(r.script("w.py", WORKER)).interpreter(venv_python())
}

fn data(n: usize, seed: u8) -> Bytes {
    Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
}

fn delta(before: Counters) -> Counters {
    let now = counters();
    let mut d = Counters::default();
    d.to_worker = now.to_worker - before.to_worker;
    d.from_worker = now.from_worker - before.from_worker;
    d.arena_full = now.arena_full - before.arena_full;
    d.retired = now.retired - before.retired;
    d
}

#[tokio::test]
async fn large_segments_go_through_the_arena_both_ways() {
    let _one = SERIAL.lock().await;
    let r = Reaper::new();
    let pool = r.builder().adapter(python(&r)).size(1).build().await.expect("pool");
    let before = counters();
    for (i, size) in [64 * 1024, 1 << 20, 1 << 20, 5 << 20, 20 << 20].into_iter().enumerate() {
        let d = data(size, i as u8);
        let back = pool.execute_bytes("echo", d.clone()).await.expect("echo");
        assert!(back == d, "{size} bytes: differ");
    }
    let d = delta(before);
    assert_eq!((d.to_worker, d.from_worker, d.arena_full), (5, 5, 0), "{d:?}");
    // Below the threshold: in the frame.
    let before = counters();
    let small = data(64 * 1024 - 1, 9);
    assert!(pool.execute_bytes("echo", small.clone()).await.expect("echo") == small);
    assert_eq!(delta(before), Counters::default());
    // The tool sees a read-only view.
    let out = pool.execute_with("checksum", Payload::from_bytes(data(1 << 20, 3)), Default::default()).await;
    let v = out.expect("checksum").to_value().expect("json");
    assert_eq!(v["len"], 1 << 20);
    assert_eq!(v["readonly"], true);
    let want: u64 = data(4096, 3).iter().map(|&b| u64::from(b)).sum();
    assert_eq!(v["sum"], want);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn numpy_arrays_and_streams_use_the_arena() {
    let _one = SERIAL.lock().await;
    let r = Reaper::new();
    let pool = r.builder().adapter(python(&r)).size(1).build().await.expect("pool");
    let before = counters();
    // 512 x 512 float32 = 1 MiB each way.
    let floats: Vec<u8> = (0..512 * 512).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let args = Payload::mixed(
        &json!({"a": {"$seg": 0, "dtype": "<f4", "shape": [512, 512]}, "k": 2}),
        vec![Bytes::from(floats)],
    );
    let out = pool.execute_with("scale", args, Default::default()).await.expect("scale");
    let v = out.to_value().expect("json");
    assert_eq!(v["dtype"], "<f4");
    assert_eq!(v["shape"], json!([512, 512]));
    let seg = out.segments()[0].clone();
    let last = f32::from_le_bytes(seg[seg.len() - 4..].try_into().expect("4 bytes"));
    assert_eq!(last, (512.0 * 512.0 - 1.0) * 2.0);
    // A stream of 6 chunks of 512 KiB, through a window of 2.
    use futures::StreamExt;
    let mut s = pool.execute_stream("chunks", json!({"n": 6, "size": 512 * 1024})).await.expect("stream");
    let mut n = 0u8;
    while let Some(item) = s.next().await {
        let chunk = item.expect("chunk").into_segment().expect("bytes");
        assert_eq!(chunk.len(), 512 * 1024);
        assert!(chunk.iter().all(|&b| b == n));
        n += 1;
    }
    assert_eq!(n, 6);
    let d = delta(before);
    assert_eq!(d.to_worker, 1, "{d:?}");
    assert!(d.from_worker >= 7, "the result and most chunks came through the arena: {d:?}");
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_full_arena_falls_back_to_the_pipe() {
    let _one = SERIAL.lock().await;
    let r = Reaper::new();
    // 256 KiB: 128 KiB each way.
    let pool = r
        .builder()
        .adapter(python(&r))
        .size(1)
        .shm_max(256 * 1024)
        .shm_threshold(16 * 1024)
        .build()
        .await
        .expect("pool");
    let before = counters();
    let big = data(1 << 20, 1);
    assert!(pool.execute_bytes("echo", big.clone()).await.expect("echo") == big);
    let fits = data(64 * 1024, 2);
    assert!(pool.execute_bytes("echo", fits.clone()).await.expect("echo") == fits);
    let d = delta(before);
    assert_eq!((d.arena_full, d.to_worker, d.from_worker), (1, 1, 1), "{d:?}");
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_region_the_tool_keeps_a_view_of_is_never_reused() {
    let _one = SERIAL.lock().await;
    let r = Reaper::new();
    let pool = r.builder().adapter(python(&r)).size(1).build().await.expect("pool");
    let before = counters();
    let first = data(1 << 20, 1);
    let n = pool
        .execute_with("keep", Payload::from_bytes(first.clone()), Default::default())
        .await
        .expect("keep");
    assert_eq!(n.to_value().expect("json"), 1);
    assert_eq!(delta(before).retired, 1);
    // The next calls take other regions: the kept array still reads the first call's bytes.
    for seed in 2..6 {
        let d = data(1 << 20, seed);
        assert!(pool.execute_bytes("echo", d.clone()).await.expect("echo") == d);
    }
    let sums = pool.execute("kept_sum", json!(null)).await.expect("kept_sum");
    let want: u64 = first[..4096].iter().map(|&b| u64::from(b)).sum();
    assert_eq!(sums, json!([want]));
    // Without a kept view the regions are reused: nothing more retired.
    assert_eq!(delta(before).retired, 1);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_region_outside_the_workers_part_is_a_protocol_error_and_the_worker_is_replaced() {
    let _one = SERIAL.lock().await;
    let r = Reaper::new();
    let pool = r.builder().adapter(python(&r)).size(1).build().await.expect("pool");
    let err = pool.execute("bad_region", json!(null)).await.expect_err("out of range");
    assert_eq!(err.kind(), "protocol", "{err}");
    assert!(err.to_string().contains("outside the worker's part"), "{err}");
    // A new worker takes its place.
    let d = data(1 << 20, 7);
    let back = tokio::time::timeout(Duration::from_secs(30), pool.execute_bytes("echo", d.clone()))
        .await
        .expect("replaced in time")
        .expect("echo");
    assert!(back == d);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn forked_and_threaded_workers_use_the_arena_too() {
    let _one = SERIAL.lock().await;
    let r = Reaper::new();
    let before = counters();
    let pool =
        r.builder().adapter(python(&r)).size(2).profile(Zygote(ProcessProfile)).build().await.expect("pool");
    for seed in 0..4 {
        let d = data(1 << 20, seed);
        assert!(pool.execute_bytes("echo", d.clone()).await.expect("echo") == d);
    }
    pool.shutdown().await;
    let d = delta(before);
    assert_eq!((d.to_worker, d.from_worker), (4, 4), "forked workers: {d:?}");
    let before = counters();
    let pool =
        r.builder().adapter(python(&r)).size(1).profile(ThreadProfile::new(4)).build().await.expect("pool");
    let calls = (0..16u8).map(|seed| {
        let pool = &pool;
        async move {
            let d = data(512 * 1024 + usize::from(seed) * 4096, seed);
            let back = pool.execute_bytes("echo", d.clone()).await.expect("echo");
            assert!(back == d, "call {seed}: bytes differ");
        }
    });
    futures::future::join_all(calls).await;
    pool.shutdown().await;
    let d = delta(before);
    assert_eq!((d.to_worker, d.from_worker), (16, 16), "concurrent calls in one worker: {d:?}");
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_worker_that_declines_the_arena_closes_its_descriptor() {
    let _one = SERIAL.lock().await;
    let r = Reaper::new();
    for (var, value) in [("SNAKEPIT_BRIDGE_SHM", "0"), ("SNAKEPIT_BRIDGE_SEGMENTS", "0")] {
        let pool = r.builder().adapter(python(&r).env(var, value)).size(1).build().await.expect("pool");
        assert_eq!(pool.worker_handshakes()[0].as_ref().map(|h| h.shm), Some(false), "{var}");
        let pid = pool.worker_pids()[0].expect("pid");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds");
        let arenas: Vec<_> = fds
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|l| l.to_string_lossy().contains("memfd:snakepit-arena"))
            .collect();
        assert!(arenas.is_empty(), "{var}={value}: the worker still holds {arenas:?}");
        // Large bytes still work, over the pipe (or refused without segments).
        let out = pool.execute_bytes("echo", data(1 << 20, 1)).await;
        assert!(out.is_ok() || var == "SNAKEPIT_BRIDGE_SEGMENTS", "{var}: {out:?}");
        pool.shutdown().await;
    }
    r.assert_none_left(Duration::from_secs(5));
}
