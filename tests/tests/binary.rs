//! Binary segments end to end with real Python workers: bytes in and out without JSON or
//! base64, mixed payloads, numpy arrays, and workers that did not agree to segments.

use std::time::Duration;

use serde_json::json;
use snakepit::{Bytes, Error, Payload, Python};
use snakepit_tests::{venv_python, Reaper};

const WORKER: &str = r#"
from snakepit_bridge import tool

@tool
def echo(data):
    assert isinstance(data, memoryview), type(data)
    return data

@tool
def reverse(data):
    return bytes(data)[::-1]

@tool
def describe(image, width, meta):
    return {"len": len(image), "type": type(image).__name__, "width": width, "first": image[0], "meta": meta,
            "thumb": bytearray(image[:4])}

@tool
def array(n):
    import numpy as np
    return np.arange(n, dtype=np.float32).reshape(2, n // 2)

@tool
def array_sum(a):
    return {"sum": float(a.sum()), "shape": list(a.shape), "dtype": str(a.dtype), "writeable": a.flags.writeable}

@tool
def text(*args):
    return "not bytes"

@tool
def typed(name, image, extra=None):
    assert isinstance(image, memoryview), type(image)
    return {"name": name.upper(), "size": len(image), "thumb": bytes(image[:2]), "extra": extra}

@tool
def via_host(ctx, data):
    back = ctx.call_host("reverse", {"data": data})
    return {"type": type(back).__name__, "back": back}
"#;

fn python(r: &Reaper) -> Python {
    Python::script(r.script("w.py", WORKER)).interpreter(venv_python())
}

#[tokio::test]
async fn bytes_round_trip_without_json() {
    let r = Reaper::new();
    let pool = r.builder().adapter(python(&r)).size(1).build().await.expect("pool");
    for size in [0usize, 1, 64, 100 * 1024, 1 << 20, 5 << 20] {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        let back = pool.execute_bytes("echo", Bytes::from(data.clone())).await.expect("echo");
        assert_eq!(back.len(), size);
        assert!(back == data, "size {size}: bytes differ");
    }
    let back = pool.execute_bytes("reverse", Bytes::from_static(b"\x00\xffabc")).await.expect("reverse");
    assert_eq!(back.as_ref(), b"cba\xff\x00");
    let err = pool.execute_bytes("text", Bytes::new()).await.expect_err("a str is not bytes");
    assert_eq!(err.kind(), "codec", "{err}");
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn serde_bytes_fields_travel_as_segments_through_execute_as() {
    #[derive(serde::Serialize)]
    struct Args<'a> {
        name: &'a str,
        #[serde(with = "serde_bytes")]
        image: &'a [u8],
    }
    #[derive(serde::Deserialize, Debug)]
    struct Out {
        name: String,
        size: usize,
        thumb: serde_bytes::ByteBuf,
        extra: Option<serde_json::Value>,
    }
    let r = Reaper::new();
    let pool = r.builder().adapter(python(&r)).size(1).build().await.expect("pool");
    let image = vec![7u8; 300_000];
    let out: Out = pool.execute_as("typed", &Args { name: "cat", image: &image }).await.expect("typed");
    assert_eq!(
        (out.name.as_str(), out.size, out.thumb.as_ref(), out.extra),
        ("CAT", 300_000, &[7u8, 7][..], None)
    );
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn mixed_payloads_carry_json_and_segments_both_ways() {
    let r = Reaper::new();
    let pool = r.builder().adapter(python(&r)).size(1).build().await.expect("pool");
    let image = Bytes::from(vec![9u8; 1000]);
    let args = Payload::mixed(
        &json!({"image": {"$seg": 0}, "width": 40, "meta": {"tags": ["a"], "raw": {"$seg": 1}}}),
        vec![image, Bytes::from_static(b"xyz")],
    );
    let out = pool.execute_with("describe", args, Default::default()).await.expect("describe");
    assert_eq!(out.segments().len(), 2, "the memoryview in `meta` and the bytearray came back as segments");
    let v = out.to_value().expect("json");
    assert_eq!(v["len"], 1000);
    assert_eq!(v["type"], "memoryview");
    assert_eq!(v["width"], 40);
    assert_eq!(v["first"], 9);
    // Segments are numbered in the order the encoder meets them: `meta` comes before `thumb`.
    // The nested reference in `meta` reached the tool as a memoryview (echoed back as one).
    assert_eq!(v["meta"], json!({"tags": ["a"], "raw": {"$seg": 0}}));
    assert_eq!(out.segments()[0].as_ref(), b"xyz");
    assert_eq!(v["thumb"], json!({"$seg": 1}));
    assert_eq!(out.segments()[1].as_ref(), &[9, 9, 9, 9]);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn numpy_arrays_travel_as_segments_with_dtype_and_shape() {
    let r = Reaper::new();
    let pool = r.builder().adapter(python(&r)).size(1).build().await.expect("pool");
    let out = pool.execute_with("array", Payload::from(json!([6])), Default::default()).await.expect("array");
    let v = out.to_value().expect("json");
    assert_eq!(v, json!({"$seg": 0, "dtype": "<f4", "shape": [2, 3]}));
    let raw = out.segments()[0].clone();
    let floats: Vec<f32> =
        raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(floats, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    // And back: a reference with dtype and shape arrives as a (read-only) numpy array.
    let args = Payload::mixed(&json!({"a": {"$seg": 0, "dtype": "<f4", "shape": [2, 3]}}), vec![raw]);
    let s = pool
        .execute_with("array_sum", args, Default::default())
        .await
        .expect("sum")
        .to_value()
        .expect("json");
    assert_eq!(s, json!({"sum": 15.0, "shape": [2, 3], "dtype": "float32", "writeable": false}));
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_worker_without_segments_gets_a_bad_request_and_stays_healthy() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(python(&r).env("SNAKEPIT_BRIDGE_SEGMENTS", "0"))
        .size(1)
        .build()
        .await
        .expect("pool");
    match pool.execute_bytes("echo", Bytes::from_static(b"abc")).await {
        Err(Error::BadRequest(m)) => assert!(m.contains("does not accept"), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
    // Its binary results are refused in the worker as before (a typed error, not a frame).
    let e = pool.execute("reverse", json!(["abc"])).await.expect_err("bytes without segments");
    assert_eq!(e.kind(), "worker", "{e}");
    assert_eq!(pool.execute("text", json!(null)).await.expect("text"), json!("not bytes"));
    assert_eq!(pool.stats().crashes, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_segment_reference_out_of_range_is_a_worker_error() {
    let r = Reaper::new();
    let pool = r.builder().adapter(python(&r)).size(1).build().await.expect("pool");
    let args = Payload::mixed(&json!({"data": {"$seg": 3}}), vec![Bytes::from_static(b"a")]);
    match pool.execute_with("echo", args, Default::default()).await {
        Err(Error::Worker { error, .. }) => assert_eq!(error.kind, "BadSegment", "{error:?}"),
        other => panic!("unexpected {other:?}"),
    }
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// Over both transports: bytes through a host tool and back (the worker sends a segment in its
/// host call, the host tool answers with one).
async fn host_calls_carry_segments(grpc: bool) {
    let r = Reaper::new();
    let mut b = r.builder().adapter(python(&r)).size(1);
    if grpc {
        b = b.transport(snakepit::Grpc::default().socket_root(r.dir().join("s")));
    }
    let pool = b.build().await.expect("pool");
    pool.register_host_tool_payload("reverse", |args: Payload| async move {
        let v = args.to_value()?;
        assert_eq!(v, json!({"data": {"$seg": 0}}));
        let mut b = args.segments()[0].to_vec();
        b.reverse();
        Ok(Payload::from_bytes(b))
    });
    let out = pool
        .execute_with(
            "via_host",
            Payload::mixed(&json!({"data": {"$seg": 0}}), vec![Bytes::from_static(b"abc")]),
            Default::default(),
        )
        .await
        .expect("via_host");
    assert_eq!(out.to_value().expect("json"), json!({"type": "memoryview", "back": {"$seg": 0}}));
    assert_eq!(out.segments()[0].as_ref(), b"cba");
    // And a plain bytes round trip and a numpy array on this transport.
    let data = Bytes::from(vec![5u8; 200_000]);
    assert!(pool.execute_bytes("echo", data.clone()).await.expect("echo") == data);
    let a = pool.execute_with("array", Payload::from(json!([4])), Default::default()).await.expect("array");
    assert_eq!(a.to_value().expect("json"), json!({"$seg": 0, "dtype": "<f4", "shape": [2, 2]}));
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn host_calls_carry_segments_over_stdio() {
    host_calls_carry_segments(false).await;
}

#[tokio::test]
async fn host_calls_carry_segments_over_grpc() {
    host_calls_carry_segments(true).await;
}
