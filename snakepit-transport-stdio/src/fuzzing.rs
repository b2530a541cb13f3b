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
