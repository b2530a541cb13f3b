//! Unit tests of the framing layer against an in-memory peer (real workers are exercised by the
//! workspace's integration tests).

use super::*;
use std::sync::atomic::AtomicUsize;

use futures::StreamExt;
use tokio::io::{duplex, AsyncWriteExt, DuplexStream};

fn wid() -> WorkerId {
    WorkerId { slot: 0, generation: 0 }
}

impl StdioConnection {
    /// How many calls wait for a reply, abandoned ones included (what `idle` waits for).
    fn in_flight(&self) -> usize {
        self.shared.pending().len()
    }
}

struct Peer {
    rd: DuplexStream,
    wr: DuplexStream,
}

impl Peer {
    async fn read_msg(&mut self) -> serde_json::Value {
        let mut h = [0u8; 4];
        self.rd.read_exact(&mut h).await.expect("header");
        let mut body = vec![0; u32::from_be_bytes(h) as usize];
        self.rd.read_exact(&mut body).await.expect("body");
        serde_json::from_slice(&body).expect("json")
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.expect("write");
    }

    async fn send(&mut self, v: serde_json::Value) {
        let b = v.to_string().into_bytes();
        let mut f = (b.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&b);
        self.send_raw(&f).await;
    }
}

/// A segmented frame body: `u32 json_len`, the JSON with its `seg` table, the segments.
fn segmented_frame(mut msg: serde_json::Value, segments: &[&[u8]]) -> Vec<u8> {
    msg["seg"] = serde_json::json!(segments.iter().map(|s| s.len()).collect::<Vec<_>>());
    let json = msg.to_string().into_bytes();
    let len = 4 + json.len() + segments.iter().map(|s| s.len()).sum::<usize>();
    let mut f = ((len as u32) | 1 << 31).to_be_bytes().to_vec();
    f.extend_from_slice(&(json.len() as u32).to_be_bytes());
    f.extend_from_slice(&json);
    for s in segments {
        f.extend_from_slice(s);
    }
    f
}

impl Peer {
    /// Reads one frame, segmented or not: the message and its segments.
    async fn read_frame(&mut self) -> (serde_json::Value, Vec<Vec<u8>>) {
        let mut h = [0u8; 4];
        self.rd.read_exact(&mut h).await.expect("header");
        let h = u32::from_be_bytes(h);
        let mut body = vec![0; (h & !(1 << 31)) as usize];
        self.rd.read_exact(&mut body).await.expect("body");
        if h & 1 << 31 == 0 {
            return (serde_json::from_slice(&body).expect("json"), Vec::new());
        }
        let jl = u32::from_be_bytes(body[..4].try_into().expect("4 bytes")) as usize;
        let msg: serde_json::Value = serde_json::from_slice(&body[4..4 + jl]).expect("json");
        let mut at = 4 + jl;
        let mut segs = Vec::new();
        for n in msg["seg"].as_array().expect("seg table") {
            let n = n.as_u64().expect("len") as usize;
            segs.push(body[at..at + n].to_vec());
            at += n;
        }
        assert_eq!(at, body.len(), "segments fill the frame");
        (msg, segs)
    }
}

async fn connected_with(
    max_frame: usize,
    frame_timeout: Duration,
    ready: serde_json::Value,
) -> (StdioConnection, Peer, serde_json::Value) {
    let (host_in, worker_rd) = duplex(1 << 20);
    let (worker_wr, host_out) = duplex(1 << 20);
    let io = WorkerIo { worker: wid(), input: Box::new(host_in), output: Box::new(host_out) };
    let mut peer = Peer { rd: worker_rd, wr: worker_wr };
    let hello = Hello::new(wid(), max_frame, serde_json::Value::Null);
    let (conn, h) = tokio::join!(StdioConnection::connect(io, hello, frame_timeout), async {
        let h = peer.read_msg().await;
        peer.send(ready).await;
        h
    });
    (conn.expect("handshake").0, peer, h)
}

#[tokio::test]
async fn binary_segments_both_ways_when_agreed() {
    let ready =
        serde_json::json!({"t":"ready","version":1,"pid":42,"tools":[{"name":"echo"}],"segments":true});
    let (conn, mut peer, hello) = connected_with(1 << 20, DEFAULT_FRAME_TIMEOUT, ready).await;
    assert_eq!(hello["segments"], true, "the stdio host offers segments");
    let args = Payload::mixed(
        &serde_json::json!({"a": {"$seg": 0}, "b": {"$seg": 1}}),
        vec![Bytes::from_static(b"first"), Bytes::from(vec![7u8; 100_000])],
    );
    let (r, _) = tokio::join!(conn.call(Request::new("echo", args)), async {
        let (m, segs) = peer.read_frame().await;
        assert_eq!(m["args"], serde_json::json!({"a": {"$seg": 0}, "b": {"$seg": 1}}));
        assert_eq!(segs[0], b"first");
        assert_eq!(segs[1], vec![7u8; 100_000]);
        let reply =
            segmented_frame(serde_json::json!({"t":"result","id":m["id"],"ok":{"$seg":1}}), &[b"x", b"yz"]);
        peer.send_raw(&reply).await;
    });
    let p = r.expect("result");
    assert_eq!(p.segments().len(), 2);
    assert_eq!(p.into_segment().expect("bytes").as_ref(), b"yz");
}

#[tokio::test]
async fn segments_to_a_worker_that_did_not_agree_are_a_bad_request_and_nothing_is_written() {
    let (conn, mut peer) = connected(1024, DEFAULT_FRAME_TIMEOUT).await;
    let r = conn.call(Request::new("echo", Payload::from_bytes(Bytes::from_static(b"abc")))).await;
    assert!(matches!(r, Err(Error::BadRequest(ref m)) if m.contains("does not accept")), "{r:?}");
    let (p, _) = tokio::join!(conn.ping(), async {
        let m = peer.read_msg().await;
        assert_eq!(m["t"], "ping", "the refused call wrote nothing");
        peer.send(serde_json::json!({"t":"pong","id":m["id"]})).await;
    });
    p.expect("pong");
}

#[tokio::test]
async fn a_segmented_frame_the_worker_did_not_agree_to_is_a_protocol_error() {
    let (conn, mut peer) = connected(1024, DEFAULT_FRAME_TIMEOUT).await;
    let (r, _) = tokio::join!(conn.call(Request::new("echo", Payload::null())), async {
        let m = peer.read_msg().await;
        peer.send_raw(&segmented_frame(serde_json::json!({"t":"result","id":m["id"],"ok":null}), &[b"x"]))
            .await;
    });
    match r {
        Err(Error::Protocol { detail, .. }) => assert!(detail.contains("did not announce"), "{detail}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_segment_table_that_does_not_add_up_is_a_protocol_error() {
    for (table, want) in [
        (serde_json::json!([5]), "runs past the body"),
        (serde_json::json!([0]), "past the segments"),
        (serde_json::json!("x"), "malformed message"),
    ] {
        let ready =
            serde_json::json!({"t":"ready","version":1,"pid":42,"tools":[{"name":"echo"}],"segments":true});
        let (conn, mut peer, _) = connected_with(1024, DEFAULT_FRAME_TIMEOUT, ready).await;
        let (r, _) = tokio::join!(conn.call(Request::new("echo", Payload::null())), async {
            let m = peer.read_msg().await;
            let msg = serde_json::json!({"t":"result","id":m["id"],"ok":null,"seg":table});
            let json = msg.to_string().into_bytes();
            let len = 4 + json.len() + 1;
            let mut f = ((len as u32) | 1 << 31).to_be_bytes().to_vec();
            f.extend_from_slice(&(json.len() as u32).to_be_bytes());
            f.extend_from_slice(&json);
            f.push(b'z');
            peer.send_raw(&f).await;
        });
        match r {
            Err(Error::Protocol { detail, .. }) => assert!(detail.contains(want), "{table}: {detail}"),
            other => panic!("{table}: unexpected {other:?}"),
        }
    }
}

async fn connected(max_frame: usize, frame_timeout: Duration) -> (StdioConnection, Peer) {
    let (host_in, worker_rd) = duplex(1 << 20);
    let (worker_wr, host_out) = duplex(1 << 20);
    let io = WorkerIo { worker: wid(), input: Box::new(host_in), output: Box::new(host_out) };
    let mut peer = Peer { rd: worker_rd, wr: worker_wr };
    let hello = Hello::new(wid(), max_frame, serde_json::Value::Null);
    let (conn, ()) = tokio::join!(StdioConnection::connect(io, hello, frame_timeout), async {
        let h = peer.read_msg().await;
        assert_eq!(h["t"], "hello");
        assert_eq!(h["versions"], serde_json::json!([1]));
        peer.send(serde_json::json!({"t":"ready","version":1,"pid":42,"tools":[{"name":"echo"}]})).await;
    });
    let (conn, ready) = conn.expect("handshake");
    assert_eq!(ready.pid, 42);
    (conn, peer)
}

#[tokio::test]
async fn call_result_and_worker_error() {
    let (conn, mut peer) = connected(1024, DEFAULT_FRAME_TIMEOUT).await;
    let call = conn.call(Request::new("echo", Payload::json(&serde_json::json!({"x": 1})).expect("enc")));
    let peer_side = async {
        let m = peer.read_msg().await;
        assert_eq!(m["cmd"], "echo");
        peer.send(serde_json::json!({"t":"result","id":m["id"],"ok":{"y":[1,2]}})).await;
        let m = peer.read_msg().await;
        peer.send(serde_json::json!({"t":"error","id":m["id"],"error":{"type":"ValueError","message":"no"}}))
            .await;
    };
    let second = async {
        // Sent after the first so the peer sees them in order.
        tokio::task::yield_now().await;
        conn.call(Request::new("echo", Payload::null())).await
    };
    let (a, second, _) = tokio::join!(call, second, peer_side);
    let v: serde_json::Value = a.expect("ok").decode().expect("decode");
    assert_eq!(v["y"][1], 2);
    match second {
        Err(Error::Worker { error, .. }) => assert_eq!(error.kind, "ValueError"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn oversized_request_fails_before_writing() {
    // (The hello itself must fit: 256 bytes leaves room for it.)
    let (conn, mut peer) = connected(256, DEFAULT_FRAME_TIMEOUT).await;
    let big = serde_json::json!("x".repeat(500));
    match conn.call(Request::new("echo", Payload::json(&big).expect("enc"))).await {
        Err(Error::FrameTooLarge { max: 256, .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    // The connection is still usable: the next frame the peer sees is the ping.
    let (p, _) = tokio::join!(conn.ping(), async {
        let m = peer.read_msg().await;
        assert_eq!(m["t"], "ping");
        peer.send(serde_json::json!({"t":"pong","id":m["id"]})).await;
    });
    p.expect("pong");
}

#[tokio::test]
async fn invalid_untrusted_args_are_a_bad_request() {
    let (conn, _peer) = connected(1024, DEFAULT_FRAME_TIMEOUT).await;
    let p = Payload::from_encoded(Codec::Json, &b"{not json"[..]);
    assert!(matches!(conn.call(Request::new("echo", p)).await, Err(Error::BadRequest(_))));
}

#[tokio::test]
async fn garbage_fails_every_call_in_flight() {
    let (conn, mut peer) = connected(1024, DEFAULT_FRAME_TIMEOUT).await;
    let (a, _) = tokio::join!(conn.call(Request::new("echo", Payload::null())), async {
        let _ = peer.read_msg().await;
        peer.send_raw(b"\x00\x00\x00\x05hello").await;
    });
    assert!(matches!(a, Err(Error::Protocol { .. })), "{a:?}");
    assert!(matches!(conn.closed().await, CloseReason::Protocol(_)));
    assert!(matches!(conn.call(Request::new("echo", Payload::null())).await, Err(Error::Protocol { .. })));
}

#[tokio::test]
async fn oversized_inbound_frame_is_a_protocol_error() {
    let (conn, mut peer) = connected(1024, DEFAULT_FRAME_TIMEOUT).await;
    let (a, _) = tokio::join!(conn.call(Request::new("echo", Payload::null())), async {
        let _ = peer.read_msg().await;
        peer.send_raw(&(1u32 << 30).to_be_bytes()).await;
    });
    match a {
        Err(Error::Protocol { detail, .. }) => assert!(detail.contains("max_frame"), "{detail}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn stalled_frame_is_a_protocol_error() {
    let (conn, mut peer) = connected(1024, Duration::from_millis(200)).await;
    let (a, _) = tokio::join!(conn.call(Request::new("echo", Payload::null())), async {
        let _ = peer.read_msg().await;
        peer.send_raw(b"\x00\x00\x00\x64only ten!").await;
    });
    match a {
        // What the frame's own header announced (100), not its body read as a header.
        Err(Error::Protocol { detail, .. }) => {
            assert!(detail.contains("stalled: header announced 100 bytes, 9 arrived"), "{detail}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_frame_after_whole_frames_reports_its_own_header() {
    let (conn, mut peer) = connected(1024, Duration::from_millis(200)).await;
    let (a, _) = tokio::join!(conn.call(Request::new("echo", Payload::null())), async {
        let m = peer.read_msg().await;
        // An unrelated whole frame (a pong for nobody), then a header and part of a body, in one
        // write.
        let mut bytes = Vec::new();
        let pong = br#"{"t":"pong","id":999}"#;
        bytes.extend_from_slice(&(pong.len() as u32).to_be_bytes());
        bytes.extend_from_slice(pong);
        bytes.extend_from_slice(&300u32.to_be_bytes());
        bytes.extend_from_slice(format!(r#"{{"t":"result","id":{},"ok":"#, m["id"]).as_bytes());
        peer.send_raw(&bytes).await;
    });
    match a {
        Err(Error::Protocol { detail, .. }) => {
            assert!(detail.contains("header announced 300 bytes"), "{detail}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_beyond_the_credit_are_caught_whatever_the_consumers_speed() {
    // A consumer on another thread that takes every chunk the moment it arrives (and grants
    // credit as it goes): only counting chunks against the credit the worker could have seen
    // catches the overrun every time.
    for round in 0..50 {
        let (conn, mut peer) = connected(1 << 16, DEFAULT_FRAME_TIMEOUT).await;
        let mut stream = conn.stream(Request::new("gen", Payload::null()), 32).await.expect("stream");
        let m = peer.read_msg().await;
        assert_eq!(m["stream"], 32);
        let consume = async {
            let mut got = 0usize;
            loop {
                match stream.next().await {
                    Some(Ok(_)) => got += 1,
                    Some(Err(e)) => return (got, Some(e)),
                    None => return (got, None),
                }
            }
        };
        let flood = async {
            // A worker that ignores its credit: 2000 chunks and the end in one write.
            let mut bytes = Vec::new();
            for i in 0..2001 {
                let m = match i {
                    2000 => serde_json::json!({"t":"end","id":m["id"]}),
                    i => serde_json::json!({"t":"chunk","id":m["id"],"data":i}),
                };
                let b = m.to_string().into_bytes();
                bytes.extend_from_slice(&(b.len() as u32).to_be_bytes());
                bytes.extend_from_slice(&b);
            }
            peer.send_raw(&bytes).await;
        };
        let ((got, err), ()) = tokio::join!(consume, flood);
        match err {
            Some(Error::Protocol { detail, .. }) => {
                assert!(detail.contains("credit"), "round {round}: {detail}")
            }
            other => panic!("round {round}: {got} chunks accepted, then {other:?}"),
        }
        // The credit granted as the consumer went never exceeds the window plus what it took.
        assert!(got <= 32 + 32, "round {round}: {got} chunks accepted");
    }
}

#[tokio::test]
async fn the_65th_outstanding_host_call_is_a_protocol_error() {
    // The worker never reads its stdin after the call: answers cannot be written, so the host
    // calls stay outstanding.
    let (host_in, worker_rd) = duplex(64);
    let (worker_wr, host_out) = duplex(1 << 20);
    let io = WorkerIo { worker: wid(), input: Box::new(host_in), output: Box::new(host_out) };
    let mut peer = Peer { rd: worker_rd, wr: worker_wr };
    let hello = Hello::new(wid(), 1 << 16, serde_json::Value::Null);
    let (conn, ()) = tokio::join!(StdioConnection::connect(io, hello, DEFAULT_FRAME_TIMEOUT), async {
        let _ = peer.read_msg().await;
        peer.send(serde_json::json!({"t":"ready","version":1,"pid":42,"tools":[{"name":"echo"}]})).await;
    });
    let (conn, _) = conn.expect("handshake");
    let call =
        tokio::time::timeout(Duration::from_secs(10), conn.call(Request::new("echo", Payload::null())));
    let (a, ()) = tokio::join!(call, async {
        let m = peer.read_msg().await;
        for i in 0..(MAX_HOST_CALLS as u64 + 1) {
            peer.send(serde_json::json!({"t":"host_call","id":i,"call":m["id"],"name":"x","args":null}))
                .await;
        }
    });
    match a {
        Ok(Err(Error::Protocol { detail, .. })) => assert!(detail.contains("host_call"), "{detail}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn host_calls_answered_in_turn_are_not_limited() {
    let (conn, mut peer) = connected(1 << 16, DEFAULT_FRAME_TIMEOUT).await;
    let (a, ()) = tokio::join!(conn.call(Request::new("echo", Payload::null())), async {
        let m = peer.read_msg().await;
        for i in 0..(3 * MAX_HOST_CALLS as u64) {
            peer.send(serde_json::json!({"t":"host_call","id":i,"call":m["id"],"name":"x","args":null}))
                .await;
            let r = peer.read_msg().await;
            assert_eq!(r["t"], "host_result");
            assert_eq!(r["id"], i);
        }
        peer.send(serde_json::json!({"t":"result","id":m["id"],"ok":1})).await;
    });
    assert_eq!(a.expect("served").decode::<i64>().expect("int"), 1);
}

/// Counts WARN events on this thread.
struct WarnCounter(Arc<AtomicUsize>);

impl tracing::Subscriber for WarnCounter {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn replies_for_unknown_ids_log_at_most_one_warning_a_second() {
    let warns = Arc::new(AtomicUsize::new(0));
    // The current-thread test runtime runs the reader on this thread.
    let _log = tracing::subscriber::set_default(WarnCounter(warns.clone()));
    let (conn, mut peer) = connected(1 << 16, DEFAULT_FRAME_TIMEOUT).await;
    let t = Instant::now();
    for i in 0..2000 {
        peer.send(serde_json::json!({"t":"result","id":100_000 + i,"ok":null})).await;
    }
    // Still served afterwards, and so every stray reply has been read.
    let (a, ()) = tokio::join!(conn.call(Request::new("echo", Payload::null())), async {
        let m = peer.read_msg().await;
        peer.send(serde_json::json!({"t":"result","id":m["id"],"ok":1})).await;
    });
    a.expect("served");
    let seconds = t.elapsed().as_secs() as usize + 1;
    let n = warns.load(Ordering::Relaxed);
    assert!(n >= 1 && n <= seconds, "{n} warnings for 2000 stray replies in {seconds} s");
}

#[tokio::test]
async fn late_reply_for_dropped_call_is_not_delivered_to_the_next() {
    let (conn, mut peer) = connected(1024, DEFAULT_FRAME_TIMEOUT).await;
    {
        let fut = conn.call(Request::new("first", Payload::null()));
        // Poll once so the frame is sent, then drop the future.
        let _ = tokio::time::timeout(Duration::from_millis(1), fut).await;
    }
    let first = peer.read_msg().await;
    assert_eq!(first["cmd"], "first");
    let (b, _) = tokio::join!(conn.call(Request::new("second", Payload::null())), async {
        let second = peer.read_msg().await;
        // The late reply to the dropped call arrives first, then the real one.
        peer.send(serde_json::json!({"t":"result","id":first["id"],"ok":"late"})).await;
        peer.send(serde_json::json!({"t":"result","id":second["id"],"ok":"mine"})).await;
    });
    assert_eq!(b.expect("ok").decode::<String>().expect("decode"), "mine");
    assert_eq!(conn.in_flight(), 0);
}

#[tokio::test]
async fn eof_is_disconnected() {
    let (conn, peer) = connected(1024, DEFAULT_FRAME_TIMEOUT).await;
    drop(peer);
    assert_eq!(conn.closed().await, CloseReason::Eof);
    assert!(matches!(conn.call(Request::new("x", Payload::null())).await, Err(Error::Disconnected { .. })));
}

#[tokio::test]
async fn refuse_is_a_version_mismatch() {
    let (host_in, worker_rd) = duplex(4096);
    let (worker_wr, host_out) = duplex(4096);
    let io = WorkerIo { worker: wid(), input: Box::new(host_in), output: Box::new(host_out) };
    let mut peer = Peer { rd: worker_rd, wr: worker_wr };
    let (r, _) = tokio::join!(
        StdioConnection::connect(io, Hello::new(wid(), 1024, serde_json::Value::Null), DEFAULT_FRAME_TIMEOUT),
        async {
            let _ = peer.read_msg().await;
            peer.send(serde_json::json!({"t":"refuse","reason":"I speak 99 only"})).await;
        }
    );
    match r {
        Err(Error::VersionMismatch { reason, .. }) => assert!(reason.contains("99")),
        other => panic!("unexpected {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn reply_slots_are_reused_and_never_shared_with_a_dropped_call() {
    let (conn, mut peer) = connected(1024, DEFAULT_FRAME_TIMEOUT).await;
    let free = |conn: &StdioConnection| conn.shared.free_slots.lock().map(|f| f.len()).unwrap_or(0);
    for i in 0..5 {
        let (r, _) = tokio::join!(conn.start(Request::new("echo", Payload::null())), async {
            let m = peer.read_msg().await;
            peer.send(serde_json::json!({"t":"result","id":m["id"],"ok":i})).await;
        });
        assert_eq!(r.expect("ok").decode::<i32>().expect("decode"), i);
        // One slot serves every sequential call.
        assert_eq!(free(&conn), 1);
    }
    // A dropped call leaves a tombstone; its slot is free again, and its late reply cannot
    // reach the next call that takes that slot.
    drop(conn.start(Request::new("dropped", Payload::null())));
    let dropped = peer.read_msg().await;
    assert_eq!(conn.in_flight(), 1, "the worker still runs the dropped call");
    let (r, _) = tokio::join!(conn.start(Request::new("next", Payload::null())), async {
        let m = peer.read_msg().await;
        peer.send(serde_json::json!({"t":"result","id":dropped["id"],"ok":"late"})).await;
        peer.send(serde_json::json!({"t":"result","id":m["id"],"ok":"mine"})).await;
    });
    assert_eq!(r.expect("ok").decode::<String>().expect("decode"), "mine");
    assert_eq!(conn.in_flight(), 0);
    assert_eq!(free(&conn), 1);
}

/// The host end and the worker end of an unconnected pipe pair.
fn pipes() -> (WorkerIo, Peer) {
    let (host_in, worker_rd) = duplex(4096);
    let (worker_wr, host_out) = duplex(4096);
    let io = WorkerIo { worker: wid(), input: Box::new(host_in), output: Box::new(host_out) };
    (io, Peer { rd: worker_rd, wr: worker_wr })
}

#[tokio::test]
async fn handshake_failures_are_reported() {
    // A malformed first frame: a protocol error that keeps the parse error.
    let (io, mut peer) = pipes();
    let hello = Hello::new(wid(), 1024, serde_json::Value::Null);
    let (r, _) = tokio::join!(StdioConnection::connect(io, hello.clone(), DEFAULT_FRAME_TIMEOUT), async {
        let _ = peer.read_msg().await;
        peer.send_raw(b"\x00\x00\x00\x03{{{").await;
    });
    match r {
        Err(e @ Error::Protocol { .. }) => {
            assert!(std::error::Error::source(&e).is_some(), "{e}");
        }
        other => panic!("unexpected {:?}", other.map(|_| ())),
    }
    // The worker exits before answering.
    let (io, mut peer) = pipes();
    let (r, _) = tokio::join!(StdioConnection::connect(io, hello, DEFAULT_FRAME_TIMEOUT), async move {
        let _ = peer.read_msg().await;
        drop(peer);
    });
    assert!(matches!(r, Err(Error::Disconnected { .. })), "{:?}", r.map(|_| ()));
}

#[tokio::test]
async fn control_channel_pings_shuts_down_and_sees_the_worker_go() {
    let (io, mut peer) = pipes();
    let hello = Hello::new(wid(), 1024, serde_json::Value::Null);
    let (r, _) = tokio::join!(control::connect(io, hello, DEFAULT_FRAME_TIMEOUT), async {
        assert_eq!(peer.read_msg().await["t"], "hello");
        peer.send(serde_json::json!({"t":"ready","version":1,"pid":7,"address":"unix:/s"})).await;
    });
    let (control, ready) = r.expect("handshake");
    assert_eq!((control.worker(), ready.address.as_deref()), (wid(), Some("unix:/s")));
    let (rtt, _) = tokio::join!(control.ping(), async {
        let m = peer.read_msg().await;
        assert_eq!(m["t"], "ping");
        peer.send(serde_json::json!({"t":"pong","id":m["id"]})).await;
    });
    rtt.expect("pong");
    assert!(!control.is_closed());
    control.shutdown().await;
    assert_eq!(peer.read_msg().await["t"], "shutdown");
    drop(peer);
    assert_eq!(control.closed().await, CloseReason::Eof);
    assert!(control.is_closed());
}
