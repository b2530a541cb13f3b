//! The binary-payload rows: raw bytes through segments (in the frame, or through the
//! shared-memory arena), numpy arrays, and the second floor for them, `multiprocessing`'s
//! shared memory driven by hand from Python.

use super::*;

/// `calls` sequential raw-bytes echoes of `payload` bytes (binary segments: no JSON, no base64),
/// from a runtime task like [`pool_run`]'s callers (not the `block_on` thread, whose wake-ups
/// would cross threads on every reply).
pub(super) async fn bytes_run(pool: &Arc<Pool>, payload: usize, calls: u64) -> Sample {
    let data = snakepit::Bytes::from(vec![b'x'; payload]);
    timed(pool, calls, move |pool| {
        let data = data.clone();
        async move { pool.execute_bytes("echo", data).await.is_ok_and(|b| b.len() == payload) }
    })
    .await
}

/// `calls` sequential round trips of a float64 numpy array of `payload` bytes through the
/// `echo` tool: it gets the array (a read-only view, no copy) and returns it.
pub(super) async fn numpy_run(pool: &Arc<Pool>, payload: usize, calls: u64) -> Sample {
    let n = payload / 8;
    let data = snakepit::Bytes::from(vec![0u8; n * 8]);
    let args = Payload::mixed(&json!({"$seg": 0, "dtype": "<f8", "shape": [n]}), vec![data]);
    timed(pool, calls, move |pool| {
        let args = args.clone();
        async move {
            let out = pool.execute_with("echo", args, Default::default()).await;
            out.is_ok_and(|p| p.segments().first().is_some_and(|s| s.len() == n * 8))
        }
    })
    .await
}

/// Runs `call` `calls` times in sequence on a runtime task (after a short warm-up) and
/// measures each.
async fn timed<F, Fut>(pool: &Arc<Pool>, calls: u64, call: F) -> Sample
where
    F: Fn(Arc<Pool>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let pool = pool.clone();
    let task = tokio::spawn(async move {
        for _ in 0..calls.clamp(2, 20) {
            let _ = call(pool.clone()).await;
        }
        let mut h = hist();
        let start = Instant::now();
        for _ in 0..calls {
            let t = Instant::now();
            if call(pool.clone()).await {
                let _ = h.record(t.elapsed().as_nanos() as u64);
            }
        }
        sample(&h, calls, start.elapsed())
    });
    match task.await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench: a binary run failed: {e}");
            sample(&hist(), 0, Duration::ZERO)
        }
    }
}

/// The numpy floor: two Python processes and `multiprocessing.shared_memory`, by hand. The
/// parent copies the array into one block, signals the child over a pipe; the child wraps it
/// (no copy), copies it into a second block (what returning it costs) and signals back; the
/// parent copies the result out. The same three copies as a snakepit round trip.
const NUMPY_FLOOR: &str = r#"
import os, sys, time
import numpy as np
from multiprocessing import shared_memory

n, calls = int(sys.argv[1]) // 8, int(sys.argv[2])
a = shared_memory.SharedMemory(create=True, size=n * 8)
b = shared_memory.SharedMemory(create=True, size=n * 8)
try:
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_child_w)
        os.close(to_parent_r)
        while os.read(to_child_r, 1):
            x = np.ndarray((n,), dtype=np.float64, buffer=a.buf)
            y = np.ndarray((n,), dtype=np.float64, buffer=b.buf)
            np.copyto(y, x)
            del x, y
            os.write(to_parent_w, b"k")
        os._exit(0)
    os.close(to_child_r)
    os.close(to_parent_w)
    src = np.zeros(n)
    A = np.ndarray((n,), dtype=np.float64, buffer=a.buf)
    B = np.ndarray((n,), dtype=np.float64, buffer=b.buf)
    times = []
    for i in range(calls + 2):
        t = time.perf_counter_ns()
        np.copyto(A, src)
        os.write(to_child_w, b"c")
        os.read(to_parent_r, 1)
        out = B.copy()
        if i >= 2:
            times.append(time.perf_counter_ns() - t)
    del A, B, out
    os.close(to_child_w)
    os.waitpid(pid, 0)
    print("\n".join(map(str, times)))
finally:
    a.close(); a.unlink(); b.close(); b.unlink()
"#;

/// Runs [`NUMPY_FLOOR`] with `python` (which must have numpy).
#[allow(clippy::disallowed_methods)] // the numpy floor: a bare Python script, measured without snakepit
pub(super) fn numpy_floor(python: &std::path::Path, payload: usize, calls: u64) -> Result<Sample, String> {
    let start = Instant::now();
    let out = Command::new(python)
        .args(["-c", NUMPY_FLOOR, &payload.to_string(), &calls.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("the numpy floor exited with {}", out.status));
    }
    let mut h = hist();
    let mut total = 0u64;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let ns: u64 = line.trim().parse().map_err(|e| format!("numpy floor output {line:?}: {e}"))?;
        total += ns;
        let _ = h.record(ns);
    }
    let elapsed = if total > 0 { Duration::from_nanos(total) } else { start.elapsed() };
    Ok(sample(&h, calls, elapsed))
}

/// Whether `python` imports numpy.
pub(super) fn has_numpy(python: &std::path::Path) -> bool {
    has_module(python, "numpy")
}

/// Whether `python` imports `module`.
#[allow(clippy::disallowed_methods)] // a probe of the interpreter, not a worker
pub(super) fn has_module(python: &std::path::Path, module: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {module}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
