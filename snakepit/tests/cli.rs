//! The `snakepit` binary: `serve`, `call` and `demo`, with real python3 workers.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../../tests/src/procs.rs"]
#[allow(dead_code)]
mod procs;

struct Guard(String);

impl Drop for Guard {
    fn drop(&mut self) {
        let left = procs::wait_none_left(&self.0, Duration::from_secs(5));
        procs::kill_marked(&self.0);
        if !left.is_empty() && !std::thread::panicking() {
            panic!("processes left behind: {left:?}");
        }
    }
}

fn snakepit(marker: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_snakepit"));
    c.env(procs::MARKER_VAR, marker).env("SNAKEPIT_LOG", "warn");
    c
}

#[test]
fn serve_answers_each_line_and_exits_0_on_eof() {
    let g = Guard(procs::new_marker());
    let mut child = snakepit(&g.0)
        .args(["serve", "--module", "snakepit_bridge.showcase", "--size", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let requests = [
        r#"{"id":1,"command":"add","args":{"a":1,"b":2},"timeout_ms":5000}"#,
        r#"{"id":"two","command":"fail","args":{"type":"ValueError","message":"nope"}}"#,
        r#"{"id":[3],"command":"nope"}"#,
        r#"this is not json"#,
        r#"{"id":5,"args":{}}"#,
        r#"{"id":6,"command":"sleep","args":{"ms":5000},"timeout_ms":100}"#,
        r#"{"id":7,"command":"crash","args":{"code":4}}"#,
        r#"{"id":8,"command":"echo","args":{"x":[1,2,3]}}"#,
    ];
    for r in requests {
        writeln!(stdin, "{r}").expect("write");
    }
    drop(stdin);
    let mut replies = std::collections::HashMap::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("line");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply line {line:?}: {e}"));
        replies.insert(v["id"].to_string(), v);
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    assert_eq!(replies.len(), 8, "{replies:?}");
    assert_eq!(replies["1"]["ok"], json!(3));
    let e = &replies["\"two\""]["error"];
    assert_eq!((e["kind"].as_str(), e["type"].as_str()), (Some("worker"), Some("ValueError")));
    assert!(e["traceback"].as_str().expect("traceback").contains("Traceback"));
    assert_eq!(replies["[3]"]["error"]["kind"], "unknown_command");
    assert_eq!(replies["null"]["error"]["kind"], "bad_request");
    assert_eq!(replies["5"]["error"]["kind"], "bad_request");
    assert_eq!(replies["6"]["error"]["kind"], "timeout");
    let c = &replies["7"]["error"];
    assert_eq!(c["kind"], "worker_crashed");
    assert_eq!(c["exit"], json!({"code": 4}));
    assert!(c["stderr_tail"].as_str().expect("tail").contains("exit code 4"));
    assert_eq!(replies["8"]["ok"], json!({"x": [1, 2, 3]}));
}

#[test]
fn serve_shuts_down_gracefully_on_sigterm() {
    let g = Guard(procs::new_marker());
    let mut child = snakepit(&g.0)
        .args(["serve", "--module", "snakepit_bridge.showcase", "--size", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, r#"{{"id":1,"command":"ping"}}"#).expect("write");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("reply");
    assert_eq!(serde_json::from_str::<Value>(&line).expect("json")["ok"], "pong");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("kill");
    let pid = child.id() as i32;
    assert!(procs::wait_exit(pid, Instant::now() + Duration::from_secs(10)), "serve ignored SIGTERM");
    assert!(child.wait().expect("wait").success());
}

#[test]
fn serve_exits_non_zero_when_the_pool_cannot_start() {
    let g = Guard(procs::new_marker());
    let dir = tempfile::tempdir().expect("tmp");
    let script = dir.path().join("broken.py");
    std::fs::write(&script, "raise SystemExit('cannot load')\n").expect("write");
    let out =
        snakepit(&g.0).args(["serve", "--script"]).arg(&script).stdin(Stdio::null()).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not start") && err.contains("cannot load"), "{err}");
}

#[test]
fn call_prints_the_result_or_the_error() {
    let g = Guard(procs::new_marker());
    let out = snakepit(&g.0)
        .args(["call", "--module", "snakepit_bridge.showcase", "add", r#"{"a":20,"b":22}"#])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let out = snakepit(&g.0)
        .args(["call", "--module", "snakepit_bridge.showcase", "fail", r#"{"type":"TypeError"}"#])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err: Value = serde_json::from_slice(&out.stderr).expect("error json on stderr");
    assert_eq!(err["type"], "TypeError");
}

#[test]
fn demo_runs_a_mixed_workload() {
    let g = Guard(procs::new_marker());
    let out = snakepit(&g.0).args(["demo", "--calls", "1200"]).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("worker_crashed") && stdout.contains("latency p99"), "{stdout}");
}

/// The host is SIGKILLed while 8 busy workers each have a grandchild (half of them `setsid()`
/// and all ignoring SIGTERM/SIGHUP): within a second nothing it started is alive.
#[test]
fn sigkilled_host_leaves_no_process_behind() {
    let g = Guard(procs::new_marker());
    let mut child = snakepit(&g.0)
        .args(["serve", "--module", "snakepit_bridge.showcase", "--size", "8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    for i in 0..8 {
        writeln!(stdin, r#"{{"id":{i},"command":"grandchild","args":{{"setsid":{}}}}}"#, i % 2 == 0)
            .expect("write");
    }
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    for _ in 0..8 {
        let mut line = String::new();
        out.read_line(&mut line).expect("reply");
        assert!(serde_json::from_str::<Value>(&line).expect("json")["ok"].is_i64(), "{line}");
    }
    for i in 0..8 {
        writeln!(stdin, r#"{{"id":{},"command":"sleep","args":{{"ms":60000}}}}"#, 100 + i).expect("write");
    }
    stdin.flush().expect("flush");
    // host + 8 shepherds + 8 workers + 8 grandchildren carry the marker.
    let before = procs::marked_pids(&g.0);
    assert!(before.len() >= 25, "{before:?}");
    child.kill().expect("SIGKILL the host");
    child.wait().expect("reap the host");
    let left = procs::wait_none_left(&g.0, Duration::from_secs(1));
    assert!(left.is_empty(), "alive 1 s after the host was SIGKILLed: {left:?}");
}
