//! `snakepit-v0` workers (the original Snakepit's stdio envelope) through the real supervisor:
//! the seed's Ruby bridge unchanged, and a Python v0 worker that misbehaves on demand.

use std::time::Duration;

use serde_json::json;
use snakepit::{Error, Generic, SnakepitV0};
use snakepit_tests::Reaper;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Ruby runs here; under `CI=true` its absence fails the test (`cargo xtask setup` installs it).
fn has_ruby() -> bool {
    #[allow(clippy::disallowed_methods)] // a probe of the interpreter
    let ok = std::process::Command::new("ruby").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "no ruby: run `cargo xtask setup` (apt-get install ruby)");
        eprintln!("SKIP: no ruby (apt-get install ruby)");
    }
    ok
}

/// The seed's Ruby bridge (tests/workers/v0/bridge.rb, the file unchanged), with `-rtime`: the
/// seed calls `Time#iso8601`, which Debian's Ruby defines only in the `time` library.
fn ruby_bridge() -> Generic {
    Generic::new("ruby").arg("-rtime").arg(root().join("tests/workers/v0/bridge.rb"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_ruby_bridge_runs_unchanged() {
    if !has_ruby() {
        return;
    }
    let r = Reaper::new();
    let v0 = SnakepitV0::new().tools(["ping", "process_data", "generate_report"]);
    let pool = r.builder().adapter(ruby_bridge()).transport(v0).size(2).build().await.expect("pool");
    assert_eq!(
        pool.execute("ping", json!({})).await.expect("ping"),
        json!({"status": "ok", "message": "pong"})
    );
    assert_eq!(
        pool.execute("process_data", json!({"data": "hello"})).await.expect("process_data"),
        json!({"processed": "HELLO", "length": 5})
    );
    // Declared tools: others are refused host-side.
    assert!(matches!(pool.execute("nope", json!({})).await, Err(Error::UnknownCommand { .. })));
    // Streams are not in v0.
    assert!(matches!(pool.execute_stream("ping", json!({})).await, Err(Error::BadRequest(_))));
    pool.shutdown().await;
    // Undeclared: every command goes to the worker, which reports unknown ones itself.
    let pool =
        r.builder().adapter(ruby_bridge()).transport(SnakepitV0::new()).size(1).build().await.expect("pool");
    match pool.execute("nope", json!({})).await {
        Err(Error::Worker { error, .. }) => {
            assert_eq!(error.kind, "SnakepitV0Error");
            assert_eq!(error.message, "Unknown command: nope");
        }
        other => panic!("unexpected {other:?}"),
    }
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// A v0 worker in Python: `echo`, `status_error` (the `{"status": "error"}` convention),
/// `fail` (`success: false`), `stray` (a reply for an id nobody waits for, then the real one),
/// `garbage` (a reply without `success`), `sleep`, `pid`.
const PY_V0: &str = r#"
import json, os, struct, sys, time
inp, out = sys.stdin.buffer, sys.stdout.buffer
def send(m):
    b = json.dumps(m).encode()
    out.write(struct.pack(">I", len(b)) + b); out.flush()
while True:
    h = inp.read(4)
    if len(h) < 4: break
    req = json.loads(inp.read(struct.unpack(">I", h)[0]))
    rid, cmd, args = req["id"], req["command"], req.get("args") or {}
    assert isinstance(req["timestamp"], str)
    if cmd == "ping": send({"id": rid, "success": True, "result": {"status": "ok", "args": args}})
    elif cmd == "echo": send({"id": rid, "success": True, "result": args})
    elif cmd == "status_error": send({"id": rid, "success": True, "result": {"status": "error", "error": "bad input"}})
    elif cmd == "fail": send({"id": rid, "success": False, "error": "it failed"})
    elif cmd == "stray":
        send({"id": 999999, "success": True, "result": "for nobody"})
        send({"id": rid, "success": True, "result": "mine"})
    elif cmd == "garbage": send({"id": rid, "result": 1})
    elif cmd == "sleep": time.sleep(args["ms"] / 1000); send({"id": rid, "success": True, "result": args["ms"]})
    elif cmd == "pid": send({"id": rid, "success": True, "result": os.getpid()})
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v0_replies_map_to_results_and_typed_errors() {
    let r = Reaper::new();
    let script = r.script("v0.py", PY_V0);
    let adapter = Generic::new("python3").arg(&script);
    let hb = snakepit::Heartbeat {
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(2),
        max_missed: 2,
    };
    let pool = r
        .builder()
        .adapter(adapter)
        .transport(SnakepitV0::new())
        .heartbeat(Some(hb))
        .size(1)
        .build()
        .await
        .expect("pool");
    assert_eq!(pool.execute("echo", json!({"a": [1, 2]})).await.expect("echo"), json!({"a": [1, 2]}));
    for (cmd, message) in [("status_error", "bad input"), ("fail", "it failed")] {
        match pool.execute(cmd, json!({})).await {
            Err(Error::Worker { error, command, .. }) => {
                assert_eq!(
                    (error.kind.as_str(), error.message.as_str(), command.as_str()),
                    ("SnakepitV0Error", message, cmd)
                );
            }
            other => panic!("{cmd}: unexpected {other:?}"),
        }
    }
    assert_eq!(pool.execute("stray", json!({})).await.expect("stray"), json!("mine"));
    // Heartbeats are `ping` commands.
    pool.wait_stats(|s| s.heartbeats >= 2, Duration::from_secs(10)).await.expect("pongs");
    // The pid came from the process tree (a v0 worker does not say it).
    let pid = pool.execute("pid", json!({})).await.expect("pid");
    assert_eq!(pool.worker_pids(), [pid.as_u64().map(|p| p as u32)]);
    assert_eq!(pool.stats().crashes, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reply_or_a_timeout_replaces_the_v0_worker() {
    let r = Reaper::new();
    let script = r.script("v0.py", PY_V0);
    let pool = r
        .builder()
        .adapter(Generic::new("python3").arg(&script))
        .transport(SnakepitV0::new())
        .size(1)
        .build()
        .await
        .expect("pool");
    let pid = pool.execute("pid", json!({})).await.expect("pid");
    assert!(matches!(pool.execute("garbage", json!({})).await, Err(Error::Protocol { .. })));
    pool.wait_stats(|s| s.restarts == 1 && s.ready == 1, Duration::from_secs(10)).await.expect("replaced");
    let pid2 = pool.execute("pid", json!({})).await.expect("pid");
    assert_ne!(pid, pid2);
    // No cancel in v0: a timed-out call replaces its worker, whatever the cancel grace.
    let res = pool.execute_timeout("sleep", json!({"ms": 2000}), Duration::from_millis(100)).await;
    assert!(matches!(res, Err(Error::Timeout { .. })), "{res:?}");
    pool.wait_stats(|s| s.restarts == 2 && s.ready == 1, Duration::from_secs(10))
        .await
        .expect("replaced again");
    assert_ne!(pool.execute("pid", json!({})).await.expect("pid"), pid2);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_fails_the_readiness_probe_does_not_start() {
    let r = Reaper::new();
    let script = r.script("silent.py", "import sys\nsys.stdin.read()\n");
    let err = r
        .builder()
        .adapter(Generic::new("python3").arg(&script).handshake_timeout(Duration::from_millis(500)))
        .transport(SnakepitV0::new())
        .size(1)
        .build()
        .await
        .expect_err("no answer to the probe");
    assert!(matches!(err, Error::HandshakeTimeout { .. }), "{err:?}");
    r.assert_none_left(Duration::from_secs(5));
}

/// One of the re-created v0.2.1 bridges in `tests/workers/v0/`, run as the original was.
fn v0_bridge(program: &str, file: &str) -> Generic {
    Generic::new(program).arg(root().join("tests/workers/v0").join(file)).arg("--mode").arg("pool-worker")
}

/// The expected worker error of a v0 reply.
fn v0_error(r: Result<serde_json::Value, Error>) -> String {
    match r {
        Err(Error::Worker { error, .. }) if error.kind == "SnakepitV0Error" => error.message,
        other => panic!("expected a SnakepitV0Error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_python_generic_bridge_runs_unchanged() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(v0_bridge("python3", "generic_bridge.py"))
        .transport(SnakepitV0::new())
        .size(1)
        .build()
        .await
        .expect("pool");
    let ping = pool.execute("ping", json!({"x": 1})).await.expect("ping");
    assert_eq!((ping["status"].clone(), ping["bridge_type"].clone()), (json!("ok"), json!("generic")));
    assert_eq!(ping["echo"], json!({"x": 1}));
    let echo = pool.execute("echo", json!({"message": "hello"})).await.expect("echo");
    assert_eq!(echo["echoed"], json!({"message": "hello"}));
    let sum = pool.execute("compute", json!({"operation": "add", "a": 5, "b": 3})).await.expect("compute");
    assert_eq!((sum["result"].clone(), sum["inputs"].clone()), (json!(8), json!({"a": 5, "b": 3})));
    // Its failures are successful replies whose result says "status": "error".
    assert_eq!(
        v0_error(pool.execute("compute", json!({"operation": "divide", "a": 1, "b": 0})).await),
        "Division by zero"
    );
    assert_eq!(v0_error(pool.execute("nope", json!({})).await), "Unknown command: nope");
    assert_eq!(pool.stats().crashes, 0);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_node_generic_bridge_runs_unchanged() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(v0_bridge("node", "generic_bridge.js"))
        .transport(SnakepitV0::new())
        .size(1)
        .build()
        .await
        .expect("pool");
    let ping = pool.execute("ping", json!({})).await.expect("ping");
    assert_eq!(ping["bridge_type"], "generic_javascript");
    let sqrt = pool.execute("compute", json!({"operation": "sqrt", "a": 16})).await.expect("sqrt");
    assert_eq!(sqrt["result"], json!(4));
    let random =
        pool.execute("random", json!({"type": "uniform", "min": 0, "max": 100})).await.expect("random");
    let v = random["value"].as_f64().expect("value");
    assert!((0.0..100.0).contains(&v), "{v}");
    // Its failures are `success: false`.
    assert_eq!(
        v0_error(pool.execute("compute", json!({"operation": "divide", "a": 1, "b": 0})).await),
        "Division by zero"
    );
    assert_eq!(v0_error(pool.execute("nope", json!({})).await), "Unknown command: nope");
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// `Generic::protocol(Protocol::SnakepitV0)` picks the v0 transport by itself; what v0 cannot
/// do fails `build()` with `bad_request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_adapter_that_speaks_v0_gets_the_v0_transport_and_its_limits() {
    use snakepit::core::Protocol;
    let r = Reaper::new();
    let adapter = || v0_bridge("python3", "generic_bridge.py").protocol(Protocol::SnakepitV0);
    let pool = r.builder().adapter(adapter()).size(1).build().await.expect("pool");
    let sum =
        pool.execute("compute", json!({"operation": "multiply", "a": 10, "b": 5})).await.expect("compute");
    assert_eq!(sum["result"], json!(50));
    pool.shutdown().await;
    let refused = [
        r.builder().adapter(adapter()).transport(snakepit::StdioTransport::new()).size(1).build().await.err(),
        r.builder()
            .adapter(adapter())
            .profile(snakepit::Zygote(snakepit::ProcessProfile))
            .size(1)
            .build()
            .await
            .err(),
        r.builder().adapter(adapter()).pipeline_depth(2).size(1).build().await.err(),
        r.builder().adapter(adapter()).profile(snakepit::ThreadProfile::new(4)).size(1).build().await.err(),
    ];
    for e in refused {
        assert!(matches!(e, Some(Error::BadRequest(_))), "{e:?}");
    }
    r.assert_none_left(Duration::from_secs(5));
}
