//! Entry points for the fuzz targets (`fuzz/`) and their corpus replay test; not an API.

use futures::StreamExt;
use snakepit_core::{Connection, Error, Hello, Payload, Request, WorkerId, WorkerIo, DEFAULT_MAX_FRAME};

use crate::{StdioConnection, DEFAULT_FRAME_TIMEOUT};

/// The allocation bound of [`fuzz_worker_output`] per input byte: peak live heap
/// `<= WORKER_OUTPUT_K * N + WORKER_OUTPUT_C` for an input of `N` bytes.
pub const WORKER_OUTPUT_K: usize = 8;

/// The constant part of [`fuzz_worker_output`]'s allocation bound: the frame reader reserves up
/// to 4 MiB for a header announcing a large frame (whatever arrives), the buffer may double once
/// past that, plus the runtime, the connection and the frames it writes.
pub const WORKER_OUTPUT_C: usize = 16 * 1024 * 1024;

/// Runs `bytes` as everything a worker writes on its protocol output, from the first byte (the
/// `ready` frame of the handshake) to end-of-file, through a real [`StdioConnection`] (the
/// default 64 MiB `max_frame`, a shared-memory arena of 64 KiB each way offered; the worker's
/// stdin is a sink) on a current-thread runtime.
///
/// Once the handshake is through, two calls (ids 1 and 2), a ping (id 3) and a stream of window
/// 2 (id 4) are in flight before the reader task sees the frames after `ready`, and each is
/// driven to its end; the end of the input closes the connection, so every run ends, with no
/// timer involved.
///
/// Properties (checked here; a violation panics): every call, ping and stream ends with a value
/// or one of the typed errors a worker can cause (`Protocol`, `Disconnected`, `Worker`). The
/// host's allocations are
/// bounded by [`WORKER_OUTPUT_K`]` * N + `[`WORKER_OUTPUT_C`] (checked by the replay test).
///
/// Returns the handshake's error if the first frame is not an acceptable `ready`, else the
/// number of calls, pings and stream items that got a value.
pub fn fuzz_worker_output(bytes: &[u8]) -> Result<usize, Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime builds"); // not input data
    rt.block_on(drive(bytes.to_vec()))
}

fn expected(e: &Error) -> bool {
    matches!(e, Error::Protocol { .. } | Error::Disconnected { .. } | Error::Worker { .. })
}

async fn drive(bytes: Vec<u8>) -> Result<usize, Error> {
    let worker = WorkerId { slot: 0, generation: 0 };
    let io = WorkerIo {
        worker,
        input: Box::new(tokio::io::sink()),
        output: Box::new(std::io::Cursor::new(bytes)),
    };
    // A small shared-memory arena (64 KiB each way): a `ready` that maps it lets the frames
    // that follow name regions in it.
    let arena = snakepit_core::shm::Arena::create(2 * snakepit_core::shm::GRANULE).expect("an arena"); // not input data
    let offer = snakepit_core::ShmOffer::new(std::sync::Arc::new(arena), -1, 1024);
    let hello = Hello::new(worker, DEFAULT_MAX_FRAME, serde_json::Value::Null).with_shm(Some(offer));
    let (conn, _ready) = StdioConnection::connect(io, hello, DEFAULT_FRAME_TIMEOUT).await?;
    let call =
        |n: u64| Request::new("tool", Payload::json(&serde_json::json!({ "n": n })).expect("json args"));
    let one = conn.start(call(1));
    let two = conn.start(call(2));
    let ping = conn.ping();
    let stream = async {
        let mut s = conn.stream(call(4), 2).await?;
        let mut items = 0usize;
        while let Some(item) = s.next().await {
            match item {
                Ok(_) => items += 1,
                Err(e) => {
                    assert!(expected(&e), "stream item failed with an unexpected error: {e:?}");
                    break;
                }
            }
        }
        Ok::<usize, Error>(items)
    };
    let (one, two, ping, stream) = tokio::join!(one, two, ping, stream);
    let mut ok = 0;
    for r in [one.map(|_| 1), two.map(|_| 1), ping.map(|_| 1), stream] {
        match r {
            Ok(n) => ok += n,
            Err(e) => assert!(expected(&e), "a call failed with an unexpected error: {e:?}"),
        }
    }
    // Host calls the worker made run on their own tasks: let them finish before the runtime goes.
    conn.shutdown().await;
    drop(conn);
    tokio::task::yield_now().await;
    Ok(ok)
}

/// Runs `bytes` as everything a `snakepit-v0` worker writes on its stdout (the answer to the
/// readiness probe first) through a real [`SnakepitV0`](crate::SnakepitV0) connection, with two
/// calls and a ping in flight once the probe is answered; the end of the input closes the
/// connection, so every run ends.
///
/// Properties (a violation panics): every call and ping ends with a value or a typed error a
/// worker can cause (`Protocol`, `Disconnected`, `Worker`); the allocation bound is
/// [`fuzz_worker_output`]'s (the same frame reader).
///
/// Returns the probe's error if the first reply is not a good answer to call 0, else how many
/// of the calls and the ping got a value.
pub fn fuzz_v0_output(bytes: &[u8]) -> Result<usize, Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime builds"); // not input data
    rt.block_on(drive_v0(bytes.to_vec()))
}

async fn drive_v0(bytes: Vec<u8>) -> Result<usize, Error> {
    use snakepit_core::Transport;
    use tokio::io::AsyncWriteExt;
    let worker = WorkerId { slot: 0, generation: 0 };
    // When the first frame answers the probe, the rest of the input follows only once the
    // calls and the ping are in flight, so that their answers find them waiting; otherwise it
    // all goes at once (the probe fails, or is answered later).
    let first = bytes.get(..4).map(|h| 4 + u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize);
    let split = match first {
        Some(n)
            if n <= bytes.len()
                && matches!(crate::v0::parse_reply(&bytes[4..n]), Ok(crate::v0::V0Reply::Ok(0, _))) =>
        {
            n
        }
        _ => bytes.len(),
    };
    let (mut tx, rx) = tokio::io::duplex(bytes.len().max(1));
    tx.write_all(&bytes[..split]).await.expect("the pipe holds the whole input"); // not input data
    if split == bytes.len() {
        drop(tx);
        tx = tokio::io::duplex(1).0;
    }
    let io = WorkerIo { worker, input: Box::new(tokio::io::sink()), output: Box::new(rx) };
    let hello = Hello::new(worker, DEFAULT_MAX_FRAME, serde_json::Value::Null);
    let (conn, _ready) = crate::SnakepitV0::new().connect(io, hello).await?;
    let call =
        |n: u64| Request::new("tool", Payload::json(&serde_json::json!({ "n": n })).expect("json args"));
    let tasks = [
        tokio::spawn({
            let c = conn.clone();
            async move { c.call(call(1)).await.map(|_| ()) }
        }),
        tokio::spawn({
            let c = conn.clone();
            async move { c.call(call(2)).await.map(|_| ()) }
        }),
        tokio::spawn({
            let c = conn.clone();
            async move { c.ping().await.map(|_| ()) }
        }),
    ];
    // The spawned calls run up to their wait for an answer; then the rest of the input.
    tokio::task::yield_now().await;
    let _ = tx.write_all(&bytes[split..]).await;
    drop(tx);
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("a call task does not panic") {
            Ok(()) => ok += 1,
            Err(e) => assert!(expected(&e), "a v0 call failed with an unexpected error: {e:?}"),
        }
    }
    conn.shutdown().await;
    Ok(ok)
}
