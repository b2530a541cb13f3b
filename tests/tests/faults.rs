//! Fault injection with real python3 workers: crashes, garbage on the protocol, oversized and
//! stalled frames, start-up failures, version refusal. Each ends with no process left behind.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use snakepit::{Error, ExitInfo, Python, StdioTransport};
use snakepit_tests::{Reaper, ADD_SCRIPT};

#[tokio::test]
async fn kill_9_mid_request_is_worker_crashed_at_once_and_the_slot_restarts() {
    let r = Reaper::new();
    let pool =
        std::sync::Arc::new(r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool"));
    let pid = pool.execute("pid", json!(null)).await.expect("pid").as_i64().expect("int") as i32;
    let p = pool.clone();
    let call = tokio::spawn(async move {
        p.execute_timeout("sleep", json!({"ms": 60_000}), Duration::from_secs(60)).await
    });
    pool.wait_stats(|s| s.busy == 1, Duration::from_secs(10)).await.expect("busy");
    let t = Instant::now();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    match call.await.expect("join") {
        Err(Error::WorkerCrashed { exit, command, .. }) => {
            assert_eq!(exit, ExitInfo::Signal(9));
            assert_eq!(command.as_deref(), Some("sleep"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "crash noticed after {:?}", t.elapsed());
    let new_pid = pool.execute("pid", json!(null)).await.expect("served again after restart");
    assert_ne!(new_pid, json!(pid));
    assert_eq!(pool.stats().restarts, 1);
    pool.shutdown().await;
}

#[tokio::test]
async fn crash_reports_exit_code_and_stderr_tail() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    match pool.execute("crash", json!({"code": 7})).await {
        Err(Error::WorkerCrashed { exit, stderr_tail, .. }) => {
            assert_eq!(exit, ExitInfo::Code(7));
            assert!(stderr_tail.contains("crashing with exit code 7"), "{stderr_tail}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 1})).await.expect("served again"), json!(2));
    pool.shutdown().await;
}

#[tokio::test]
async fn a_worker_that_exits_0_on_its_own_is_restarted() {
    let r = Reaper::new();
    let script = r.script(
        "quitter.py",
        r#"
import os, sys
from snakepit_bridge import tool

@tool
def quit_later():
    sys.stdout.flush()
    os._exit(0)

@tool
def ok():
    return "ok"
"#,
    );
    let pool = r.builder().adapter(Python::script(&script)).size(1).build().await.expect("pool");
    match pool.execute("quit_later", json!(null)).await {
        Err(Error::WorkerCrashed { exit, .. }) => assert_eq!(exit, ExitInfo::Code(0)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(pool.execute("ok", json!(null)).await.expect("restarted"), json!("ok"));
    pool.shutdown().await;
}

async fn garbage_case(kind: &str, transport: StdioTransport) -> String {
    let r = Reaper::new();
    let pool =
        r.builder().adapter(Python::showcase()).transport(transport).size(1).build().await.expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    let detail = match pool.execute("garbage", json!({"kind": kind})).await {
        Err(Error::Protocol { detail, .. }) => detail,
        other => panic!("{kind}: unexpected {other:?}"),
    };
    // The worker is replaced and the pool serves again.
    let new_pid = pool.execute("pid", json!(null)).await.expect("served again");
    assert_ne!(new_pid, pid, "{kind}: the broken worker must be replaced");
    pool.shutdown().await;
    detail
}

#[tokio::test]
async fn garbage_text_on_the_protocol_is_a_protocol_error() {
    garbage_case("text", StdioTransport::new()).await;
}

#[tokio::test]
async fn a_frame_that_is_not_json_is_a_protocol_error() {
    garbage_case("json", StdioTransport::new()).await;
}

#[tokio::test]
async fn an_oversized_inbound_frame_is_a_protocol_error() {
    let detail = garbage_case("oversize", StdioTransport::new()).await;
    assert!(detail.contains("announces 1073741824 bytes"), "{detail}");
}

#[tokio::test]
async fn a_stalled_frame_is_a_protocol_error() {
    let detail =
        garbage_case("partial", StdioTransport::new().frame_timeout(Duration::from_millis(300))).await;
    // The length its own header announced (100), not the body's first bytes read as a header
    // ("0123" = 808530483).
    assert!(detail.contains("header announced 100 bytes"), "{detail}");
}

#[tokio::test]
async fn oversized_request_fails_before_writing_and_the_worker_stays() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(Python::showcase())
        .transport(StdioTransport::new().max_frame(4096))
        .size(1)
        .build()
        .await
        .expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid");
    match pool.execute("echo", json!({"blob": "x".repeat(10_000)})).await {
        Err(Error::FrameTooLarge { max: 4096, size }) => assert!(size > 10_000),
        other => panic!("unexpected {other:?}"),
    }
    // A reply over the limit is refused by the worker itself, which also stays.
    match pool.execute("big", json!({"bytes": 10_000})).await {
        Err(Error::Worker { error, .. }) => assert_eq!(error.kind, "FrameTooLarge"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(pool.execute("pid", json!(null)).await.expect("pid"), pid);
    pool.shutdown().await;
}

#[tokio::test]
async fn silent_worker_fails_startup_with_handshake_timeout_and_stderr_tail() {
    let r = Reaper::new();
    let script = r.script(
        "silent.py",
        r#"
import sys, threading
sys.stderr.write("loading a huge model...\n")
sys.stderr.flush()
threading.Event().wait()  # never becomes ready
"#,
    );
    let t = Instant::now();
    let err = r
        .builder()
        .adapter(Python::script(&script).handshake_timeout(Duration::from_millis(2500)))
        .size(2)
        .build()
        .await
        .expect_err("must time out");
    match err {
        Error::HandshakeTimeout { worker, stderr_tail, after } => {
            assert_eq!(after, Duration::from_millis(2500));
            assert!(stderr_tail.contains("loading a huge model"), "{stderr_tail}");
            assert!(err_string_names_worker(&worker.to_string()));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    r.assert_none_left(Duration::from_secs(5));
}

fn err_string_names_worker(s: &str) -> bool {
    s.starts_with("worker ")
}

#[tokio::test]
async fn import_error_fails_startup_fast_with_the_traceback() {
    let r = Reaper::new();
    let script = r.script("broken.py", "import definitely_not_a_module_xyz\n");
    let t = Instant::now();
    let err = r
        .builder()
        .adapter(Python::script(&script).handshake_timeout(Duration::from_secs(60)))
        .size(3)
        .build()
        .await
        .expect_err("must fail");
    match err {
        Error::StartupFailed { exit, stderr_tail, .. } => {
            assert_eq!(exit, ExitInfo::Code(1));
            assert!(stderr_tail.contains("ModuleNotFoundError"), "{stderr_tail}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Far below the 60 s handshake timeout.
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn missing_interpreter_is_a_spawn_error() {
    let r = Reaper::new();
    let err = r
        .builder()
        .adapter(Python::showcase().interpreter("/nonexistent/python3"))
        .size(2)
        .build()
        .await
        .expect_err("must fail");
    match err {
        Error::Spawn { program, reason, .. } => {
            assert_eq!(program, "/nonexistent/python3");
            assert!(reason.contains("installed"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_worker_offering_only_unknown_versions_is_refused() {
    let r = Reaper::new();
    let err = r
        .builder()
        .adapter(Python::showcase().env("SNAKEPIT_BRIDGE_VERSIONS", "99"))
        .size(1)
        .build()
        .await
        .expect_err("must fail");
    match err {
        Error::VersionMismatch { offered, reason, .. } => {
            assert_eq!(offered, [1]);
            assert!(reason.contains("99"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    r.assert_none_left(Duration::from_secs(5));
}

#[test]
#[allow(clippy::disallowed_methods)] // runs the bridge by hand, without a host
fn the_bridge_exits_by_itself_on_stdin_eof() {
    let r = Reaper::new();
    let script = r.script("w.py", ADD_SCRIPT);
    let bridge = snakepit::adapters::bridge_dir().expect("bridge");
    let mut child = std::process::Command::new("python3")
        .args(["-m", "snakepit_bridge", "--script"])
        .arg(&script)
        .env("PYTHONPATH", bridge)
        .env(snakepit_tests::procs::MARKER_VAR, &r.marker)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let hello = br#"{"t":"hello","versions":[1],"max_frame":65536,"config":null}"#;
    stdin.write_all(&(hello.len() as u32).to_be_bytes()).expect("write");
    stdin.write_all(hello).expect("write");
    stdin.flush().expect("flush");
    let mut h = [0u8; 4];
    stdout.read_exact(&mut h).expect("ready header");
    let mut body = vec![0; u32::from_be_bytes(h) as usize];
    stdout.read_exact(&mut body).expect("ready body");
    let ready: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(ready["t"], "ready");
    assert_eq!(ready["pid"], child.id());
    drop(stdin);
    let pid = child.id() as i32;
    assert!(
        snakepit_tests::procs::wait_exit(pid, Instant::now() + Duration::from_secs(10)),
        "the bridge did not exit on stdin EOF"
    );
    assert!(child.wait().expect("wait").success());
}

#[tokio::test]
async fn a_dead_worker_takes_its_grandchildren_with_it_even_setsid_ones() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    let in_group =
        pool.execute("grandchild", json!({"setsid": false})).await.expect("spawn").as_i64().expect("pid");
    let escaped =
        pool.execute("grandchild", json!({"setsid": true})).await.expect("spawn").as_i64().expect("pid");
    assert!(matches!(pool.execute("crash", json!({"code": 1})).await, Err(Error::WorkerCrashed { .. })));
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in [in_group, escaped] {
        assert!(
            snakepit_tests::procs::wait_exit(pid as i32, deadline),
            "grandchild {pid} survived its worker"
        );
    }
    // The slot's new worker, and its grandchildren, go away with the pool.
    pool.execute("grandchild", json!({"setsid": true})).await.expect("spawn");
    drop(pool);
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_poison_request_is_quarantined_after_crashing_n_workers() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).quarantine(2).build().await.expect("pool");
    for _ in 0..2 {
        pool.wait_stats(|s| s.ready == 1, Duration::from_secs(10)).await.expect("ready");
        let res = pool.execute("crash", json!({"code": 9})).await;
        assert!(matches!(res, Err(Error::WorkerCrashed { .. })), "{res:?}");
    }
    match pool.execute("crash", json!({"code": 9})).await {
        Err(Error::Quarantined { command, crashes }) => assert_eq!((command.as_str(), crashes), ("crash", 2)),
        other => panic!("unexpected {other:?}"),
    }
    // Other requests, even to the same command with other arguments, still run.
    pool.wait_stats(|s| s.ready == 1, Duration::from_secs(10)).await.expect("ready");
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 2})).await.expect("add"), json!(3));
    assert_eq!(pool.stats().restarts, 2);
    pool.shutdown().await;
}

#[tokio::test]
async fn killing_the_shepherd_takes_the_worker_down_via_pdeathsig() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    let pid = pool.execute("pid", json!(null)).await.expect("pid").as_i64().expect("int") as i32;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let ppid: i32 =
        stat.rsplit_once(')').expect("stat").1.split_whitespace().nth(1).expect("ppid").parse().expect("int");
    assert_ne!(ppid as u32, std::process::id(), "the worker's parent is its shepherd, not the host");
    kill(Pid::from_raw(ppid), Signal::SIGKILL).expect("kill the shepherd");
    assert!(
        snakepit_tests::procs::wait_exit(pid, Instant::now() + Duration::from_secs(5)),
        "PDEATHSIG did not fire"
    );
    // The pool notices and serves again.
    pool.wait_stats(|s| s.restarts == 1 && s.ready == 1, Duration::from_secs(10)).await.expect("restarted");
    assert_ne!(pool.execute("pid", json!(null)).await.expect("pid"), json!(pid));
    pool.shutdown().await;
}

/// A process of this test holding `mib` MiB resident, killed and reaped when dropped; waits
/// (bounded) until its memory is resident.
struct Decoy(std::process::Child);

impl Decoy {
    #[allow(clippy::disallowed_methods)] // a bystander process for the test
    fn spawn(r: &Reaper, mib: u64) -> Decoy {
        let code = format!("import sys\nb = b'x' * ({mib} << 20)\nsys.stdin.read()\n");
        let child = std::process::Command::new("python3")
            .args(["-c", &code])
            .env(snakepit_tests::procs::MARKER_VAR, &r.marker)
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn decoy");
        let d = Decoy(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while snakepit::supervisor::tree_rss(d.0.id()).unwrap_or(0) < mib << 20 {
            assert!(Instant::now() < deadline, "the decoy never held {mib} MiB");
            std::thread::sleep(Duration::from_millis(5));
        }
        d
    }
}

impl Drop for Decoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A worker whose `ready` names another process (a 96 MiB python of this test) is known by the
/// pid the host verified, not by its claim: `pid()` is not the claimed one, and `memory()`
/// measures the worker's own subtree, not the claimed process's.
#[tokio::test]
async fn a_worker_claiming_another_processs_pid_is_not_taken_at_its_word() {
    use snakepit::core::WorkerHandle;
    let r = Reaper::new();
    let decoy = Decoy::spawn(&r, 96);
    let decoy_pid = decoy.0.id();
    let script = r.script(
        "liar.py",
        &format!(
            "import os\n_real = os.getpid\nos.getpid = lambda: {decoy_pid}\n\
             from snakepit_bridge import tool, serve\n\n\
             @tool\ndef real_pid():\n    return _real()\n\n\
             if __name__ == '__main__':\n    serve()\n"
        ),
    );
    let adapter = Python::script(&script);
    let opts = snakepit::supervisor::StartOptions::new(
        snakepit::WorkerId { slot: 0, generation: 0 },
        "liar-run",
        snakepit::core::DEFAULT_MAX_FRAME,
    )
    .with_env(vec![(snakepit_tests::procs::MARKER_VAR.into(), r.marker.clone().into())]);
    let w =
        snakepit::supervisor::start_worker(&adapter, &StdioTransport::default(), opts).await.expect("worker");
    assert_eq!(w.ready().pid, decoy_pid, "the worker did not lie as planned");
    assert_ne!(WorkerHandle::pid(&w), Some(decoy_pid), "the claimed pid was trusted");
    let memory = WorkerHandle::memory(&w).expect("the worker's memory");
    assert!(memory < 64 << 20, "measured {memory} bytes: the claimed process's, not the worker's");
    assert!(memory > 0);
    // The pool reports no pid it did not verify either.
    let pool = r.builder().adapter(adapter).size(1).build().await.expect("pool");
    assert!(!pool.worker_pids().contains(&Some(decoy_pid)), "{:?}", pool.worker_pids());
    pool.shutdown().await;
    w.shutdown(Duration::from_secs(5)).await;
    drop(decoy);
}
