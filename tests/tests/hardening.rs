//! Hardening (issue 12) with real workers: caps on what a worker can make the host hold (stderr
//! lines, outstanding host calls), stream credit overruns caught every time, a hostile working
//! directory, and a cleared environment. Workers "written from docs/protocol.md alone" are small
//! Python programs speaking the framing directly.
//!
//! The memory tests read the host's (this test process's) peak RSS, `VmHWM`: run them with
//! nextest (one process per test), as `cargo xtask ci` does.

use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::{Error, ExitInfo, Generic, ProcessProfile, Python, Zygote};
use snakepit_tests::{venv_python, Reaper};

/// The most the host may reach while a worker floods it.
const PEAK_LIMIT: u64 = 150 << 20;

/// This process's peak resident set size (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kb << 10
}

/// The framing of docs/protocol.md §1, and the handshake of §3, for raw test workers.
const RAW_PRELUDE: &str = r#"
import json, os, struct, sys
IN, OUT = sys.stdin.buffer, sys.stdout.buffer

def frame(m):
    b = json.dumps(m).encode()
    return struct.pack(">I", len(b)) + b

def send(m):
    OUT.write(frame(m))
    OUT.flush()

def read():
    h = IN.read(4)
    if len(h) < 4:
        sys.exit(0)
    return json.loads(IN.read(struct.unpack(">I", h)[0]))

def serve(tools, handle):
    read()  # hello
    send({"t": "ready", "version": 1, "pid": os.getpid(), "max_in_flight": 1, "bridge": "raw",
          "tools": tools})
    while True:
        m = read()
        if m["t"] == "call":
            handle(m)
        elif m["t"] == "ping":
            send({"t": "pong", "id": m["id"]})
        elif m["t"] == "shutdown":
            sys.exit(0)
"#;

fn raw_worker(r: &Reaper, name: &str, body: &str) -> Generic {
    let path = r.script(name, &format!("{RAW_PRELUDE}\n{body}"));
    Generic::new("python3").arg(path).handshake_timeout(Duration::from_secs(20))
}

/// Item 8: a 100 MiB stderr line is cut at 16 KiB as it is read, and the tail a crash reports
/// holds at most 8 KiB of the last lines; control characters are escaped.
#[tokio::test]
async fn a_100_mib_stderr_line_then_a_crash_keeps_the_host_small() {
    let r = Reaper::new();
    let script = r.script(
        "loud.py",
        r#"
import os
from snakepit_bridge import tool

@tool
def flood_then_crash():
    block = b"x" * (1 << 20)
    for _ in range(100):
        os.write(2, block)
    os.write(2, b"\n")
    os._exit(3)

@tool
def noise_then_crash():
    os.write(2, b"before\rthe\x1b[31mcrash\n")
    os._exit(4)
"#,
    );
    let pool = r.builder().adapter(Python::script(&script)).size(1).build().await.expect("pool");
    let flood = pool.execute("flood_then_crash", json!(null)).await;
    let peak = peak_rss();
    eprintln!("host peak RSS: {} MiB", peak >> 20);
    match flood {
        Err(Error::WorkerCrashed { exit, stderr_tail, .. }) => {
            assert_eq!(exit, ExitInfo::Code(3));
            assert!(stderr_tail.len() <= 8 * 1024, "a tail of {} bytes", stderr_tail.len());
            assert!(stderr_tail.ends_with("xxx…[truncated]\n"), "a tail of {} bytes", stderr_tail.len());
        }
        other => panic!("unexpected {:?}", other.map_err(|e| e.to_string().len())),
    }
    assert!(peak < PEAK_LIMIT, "host peak RSS {} MiB", peak >> 20);
    pool.wait_stats(|s| s.ready == 1, Duration::from_secs(10)).await.expect("restarted");
    match pool.execute("noise_then_crash", json!(null)).await {
        Err(Error::WorkerCrashed { exit, stderr_tail, .. }) => {
            assert_eq!(exit, ExitInfo::Code(4));
            assert!(stderr_tail.contains(r"before\rthe\u{1b}[31mcrash"), "{stderr_tail:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// Item 9: a worker that sends a million `host_call`s and never reads its answers is stopped
/// at the 65th outstanding one: its call fails with `protocol`, it is replaced, and the host
/// stays small.
#[tokio::test]
async fn a_million_host_calls_from_a_worker_that_does_not_read_are_a_protocol_error() {
    let r = Reaper::new();
    let adapter = raw_worker(
        &r,
        "hostflood.py",
        r#"
def handle(m):
    if m["cmd"] == "pid":
        send({"t": "result", "id": m["id"], "ok": os.getpid()})
        return
    rid = m["id"]
    try:
        for base in range(0, 1_000_000, 10_000):
            OUT.write(b"".join(frame({"t": "host_call", "id": base + i, "call": rid, "name": "nope",
                                      "args": None}) for i in range(10_000)))
        OUT.flush()
        send({"t": "result", "id": rid, "ok": "all sent"})
    except BrokenPipeError:
        os._exit(1)

serve([{"name": "flood"}, {"name": "pid"}], handle)
"#,
    );
    let pool = r.builder().adapter(adapter).size(1).build().await.expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    let t = Instant::now();
    let flood = pool.execute_timeout("flood", json!(null), Duration::from_secs(60)).await;
    let peak = peak_rss();
    eprintln!("answered after {:?}; host peak RSS: {} MiB", t.elapsed(), peak >> 20);
    match flood {
        Err(Error::Protocol { detail, .. }) => assert!(detail.contains("host_call"), "{detail}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(peak < PEAK_LIMIT, "host peak RSS {} MiB", peak >> 20);
    let new_pid = pool.execute("pid", json!(null)).await.expect("served again");
    assert_ne!(new_pid, pid, "the flooding worker must be replaced");
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// Item 11: 2000 chunks against a window of 32, 50 times in a row: always `protocol` at the
/// 33rd chunk (the first read holds more than 32, and the credit granted before that read is
/// 32), whatever the consumer's speed: it runs on another thread and takes each chunk at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_overrunning_its_stream_credit_is_caught_every_time() {
    let r = Reaper::new();
    let adapter = raw_worker(
        &r,
        "overrun.py",
        r#"
def handle(m):
    # It never reads its credit: 2000 chunks, 90 to a write (each write is atomic), then the end.
    rid = m["id"]
    frames = [frame({"t": "chunk", "id": rid, "data": i}) for i in range(2000)]
    frames.append(frame({"t": "end", "id": rid}))
    try:
        for i in range(0, len(frames), 90):
            os.write(1, b"".join(frames[i:i + 90]))
    except BrokenPipeError:
        os._exit(1)

serve([{"name": "gen", "stream": True}], handle)
"#,
    );
    for round in 0..50 {
        let pool =
            r.builder().adapter(adapter.clone()).stream_window(32).size(1).build().await.expect("pool");
        let mut s = pool.execute_stream("gen", json!(null)).await.expect("stream");
        let mut got = 0;
        let outcome = loop {
            match s.next_json().await {
                Some(Ok(_)) => got += 1,
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        match outcome {
            Some(Error::Protocol { detail, .. }) => {
                assert!(detail.contains("credit"), "round {round}: {detail}")
            }
            other => panic!("round {round}: {got} chunks accepted, then {other:?}"),
        }
        assert!(got <= 32, "round {round}: {got} chunks accepted");
        drop(s);
        pool.shutdown().await;
    }
    r.assert_none_left(Duration::from_secs(5));
}

/// Files in a directory that would run if Python imported them from there.
fn hostile_dir(r: &Reaper) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = r.dir().join("hostile");
    let marks = r.dir().join("marks");
    std::fs::create_dir_all(dir.join("snakepit_bridge")).expect("mkdir");
    std::fs::create_dir_all(&marks).expect("mkdir");
    for name in ["snakepit_bridge/__init__.py", "runpy.py", "json.py"] {
        let mark = marks.join(name.replace('/', "_"));
        std::fs::write(dir.join(name), format!("open({:?}, 'w').write('ran')\n", mark.display().to_string()))
            .expect("write");
    }
    (dir, marks)
}

/// Item 3: a working directory holding `snakepit_bridge/`, `runpy.py` and `json.py` runs none of
/// them, cold or forked from a zygote, for a script and for a module; the worker's cwd is still
/// that directory.
#[tokio::test]
async fn a_hostile_working_directory_does_not_shadow_the_bridge() {
    let r = Reaper::new();
    let (dir, marks) = hostile_dir(&r);
    let scripts = r.dir().join("scripts");
    std::fs::create_dir_all(&scripts).expect("mkdir");
    let script = scripts.join("w.py");
    std::fs::write(
        &script,
        "import os\nfrom snakepit_bridge import tool\n\n@tool\ndef cwd():\n    return os.getcwd()\n",
    )
    .expect("write");
    for zygote in [false, true] {
        for module in [false, true] {
            let adapter = if module { Python::showcase() } else { Python::script(&script) }.cwd(&dir);
            let b = r.builder().adapter(adapter).size(1);
            let b = if zygote { b.profile(Zygote(ProcessProfile)) } else { b };
            let pool = b.build().await.expect("pool");
            let cwd = if module {
                pool.execute("info", json!(null)).await.expect("info")["cwd"].clone()
            } else {
                pool.execute("cwd", json!(null)).await.expect("cwd")
            };
            assert_eq!(cwd, json!(dir.display().to_string()), "zygote {zygote}, module {module}");
            // The bridge imports json lazily in places: use it.
            assert_eq!(pool.execute("echo", json!({"x": [1]})).await.ok(), module.then(|| json!({"x": [1]})));
            pool.shutdown().await;
            let ran: Vec<_> =
                std::fs::read_dir(&marks).expect("marks").flatten().map(|e| e.file_name()).collect();
            assert!(
                ran.is_empty(),
                "zygote {zygote}, module {module}: ran {ran:?} from the working directory"
            );
        }
    }
    r.assert_none_left(Duration::from_secs(5));
}

/// Item 17: `env_clear` gives the worker only PATH, the allowed variables and what snakepit and
/// the pool set; by default it inherits everything.
#[tokio::test]
async fn env_clear_keeps_only_path_the_allowed_and_the_explicit_variables() {
    let r = Reaper::new();
    // Variables this test process has (cargo and nextest set them).
    let secret = ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME"]
        .into_iter()
        .find(|k| std::env::var_os(k).is_some())
        .expect("a cargo variable in the test's environment");
    assert!(std::env::var_os("HOME").is_some() && std::env::var_os("PATH").is_some());
    for (clear, zygote) in [(false, false), (true, false), (true, true)] {
        let mut adapter = Python::showcase().env("MINE", "1");
        if clear {
            adapter = adapter.env_clear().env_allow(["HOME"]);
        }
        let b = r.builder().adapter(adapter).size(1);
        let b = if zygote { b.profile(Zygote(ProcessProfile)) } else { b };
        let pool = b.build().await.expect("pool");
        let env = |k: &'static str| {
            let pool = &pool;
            async move { pool.execute("env", json!({"name": k})).await.expect("env") }
        };
        let inherited = env(secret).await;
        assert_eq!(inherited.is_null(), clear, "{secret} with env_clear {clear}: {inherited}");
        assert_eq!(env("MINE").await, json!("1"));
        assert!(env("PATH").await.is_string());
        assert!(env("HOME").await.is_string());
        assert!(env("SNAKEPIT_RUN_ID").await.is_string());
        assert_eq!(env("SNAKEPIT_TEST_MARKER").await, json!(r.marker), "the pool's own variables");
        pool.shutdown().await;
    }
    // Generic too.
    let pool = r
        .builder()
        .adapter(
            Generic::new("python3")
                .arg("-c")
                .arg(format!(
                    "import os, sys; sys.stderr.write(repr(os.environ.get({secret:?}))); sys.exit(7)"
                ))
                .env_clear(),
        )
        .size(1)
        .build()
        .await;
    match pool {
        Err(Error::StartupFailed { stderr_tail, .. }) => assert_eq!(stderr_tail.trim(), "None"),
        other => panic!("unexpected {:?}", other.map(|_| ())),
    }
    r.assert_none_left(Duration::from_secs(5));
}

/// A gRPC worker (the Python bridge) whose JSON encoder sends `not json` for the value "BAD".
const BAD_JSON_GRPC: &str = r#"
import os, threading
from snakepit_bridge import tool, _core

_real = _core._dumps
_core._dumps = lambda v: b"not json" if v == "BAD" else _real(v)

@tool
def pid():
    return os.getpid()

@tool
def bad():
    return "BAD"

@tool
def bad_stream():
    yield 1
    yield "BAD"
    yield 3

@tool
def flood_host(n, ctx=None):
    # A misbehaving worker: straight to the gRPC Host caller, past the bridge's own bound of
    # 64 host calls in flight.
    T = _core._threaded[0]
    errors = []
    def one():
        try:
            T.grpc_host(ctx.request_id, "slow", None)
        except Exception as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors

@tool
def flood_host_politely(n, ctx=None):
    # The same flood through the bridge's API: it keeps at most 64 in flight.
    errors = []
    def one():
        try:
            ctx.call_host("quick", None)
        except Exception as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
"#;

fn grpc_pool(r: &Reaper) -> snakepit::PoolBuilder {
    let script = r.script("grpc_bad.py", BAD_JSON_GRPC);
    r.builder()
        .adapter(Python::script(script).interpreter(venv_python()))
        .transport(snakepit::Grpc::default().socket_root(r.dir().join("s")))
        .size(1)
}

/// Item 9, the other side: a worker using the bridge's API never exceeds the limit, however
/// many of its threads call the host at once (the bridge keeps 64 in flight; the rest wait).
#[tokio::test]
async fn a_threaded_bridge_keeps_its_host_calls_within_the_limit() {
    let r = Reaper::new();
    let pool = grpc_pool(&r).build().await.expect("pool");
    pool.register_host_tool("quick", |_| async {
        tokio::time::sleep(Duration::from_millis(20)).await; // the workload: calls overlap
        Ok(json!(null))
    });
    let errors =
        pool.execute_timeout("flood_host_politely", json!({"n": 150}), Duration::from_secs(30)).await;
    assert_eq!(errors.expect("no protocol error"), json!([]));
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// Item 7 (gRPC): an `ok` or a chunk that is not JSON fails that call with `protocol` and the
/// worker is replaced, as on stdio.
#[tokio::test]
async fn grpc_results_and_chunks_that_are_not_json_are_a_protocol_error() {
    let r = Reaper::new();
    let pool = grpc_pool(&r).build().await.expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    match pool.execute("bad", json!(null)).await {
        Err(Error::Protocol { detail, .. }) => assert!(detail.contains("not valid JSON"), "{detail}"),
        other => panic!("unexpected {other:?}"),
    }
    pool.wait_stats(|s| s.ready == 1 && s.restarts == 1, Duration::from_secs(20)).await.expect("replaced");
    let pid2 = pool.execute("pid", json!(null)).await.expect("served again");
    assert_ne!(pid2, pid, "the worker must be replaced");
    let mut s = pool.execute_stream("bad_stream", json!(null)).await.expect("stream");
    assert_eq!(s.next_json().await.map(|r| r.expect("first chunk")), Some(json!(1)));
    match s.next_json().await {
        Some(Err(Error::Protocol { detail, .. })) => assert!(detail.contains("not valid JSON"), "{detail}"),
        other => panic!("unexpected {other:?}"),
    }
    drop(s);
    pool.wait_stats(|s| s.ready == 1 && s.restarts == 2, Duration::from_secs(20)).await.expect("replaced");
    assert_ne!(pool.execute("pid", json!(null)).await.expect("served again"), pid2);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// Item 9 (gRPC): more than 64 `Host.Call`s in flight from one worker is a protocol
/// violation: its call fails with `protocol` and it is replaced.
#[tokio::test]
async fn grpc_host_calls_beyond_64_in_flight_are_a_protocol_error() {
    let r = Reaper::new();
    let pool = grpc_pool(&r).build().await.expect("pool");
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let rel = release.clone();
    pool.register_host_tool("slow", move |_| {
        let rel = rel.clone();
        async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), rel.notified()).await;
            Ok(json!(null))
        }
    });
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    let outcome = pool.execute_timeout("flood_host", json!({"n": 100}), Duration::from_secs(30)).await;
    release.notify_waiters();
    match outcome {
        Err(Error::Protocol { detail, .. }) => assert!(detail.contains("Host.Call"), "{detail}"),
        other => panic!("unexpected {other:?}"),
    }
    pool.wait_stats(|s| s.ready == 1 && s.restarts == 1, Duration::from_secs(20)).await.expect("replaced");
    assert_ne!(pool.execute("pid", json!(null)).await.expect("served again"), pid);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}
