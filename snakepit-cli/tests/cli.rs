//! The `snakepit` binary: `serve`, `call`, `demo` and `reap`, with real python3 workers.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{procs, snakepit, Guard};

impl Guard {
    fn run_dir(&self) -> std::path::PathBuf {
        self.1.path().join("runs")
    }

    fn snakepit(&self) -> Command {
        let mut c = snakepit(&self.0);
        c.env("SNAKEPIT_RUN_DIR", self.run_dir());
        c
    }

    /// `snakepit serve` on the showcase with `size` workers (and `extra` arguments), its stdin
    /// and stdout piped.
    fn serve(&self, size: &str, extra: &[&str]) -> std::process::Child {
        self.snakepit()
            .args(["serve", "--module", "snakepit_bridge.showcase", "--size", size])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn serve")
    }
}

/// The value of a `snakepit demo` summary row (`  name   value`).
fn summary_row<'a>(stdout: &'a str, name: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| l.trim_start().strip_prefix(name)).map(str::trim)
}

#[test]
fn serve_answers_each_line_and_exits_0_on_eof() {
    let g = Guard::new();
    let mut child = g.serve("2", &[]);
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
fn serve_pipelines_with_pipeline_depth_and_reports_calls_that_did_not_start() {
    let g = Guard::new();
    let mut child = g.serve("1", &["--pipeline-depth", "4"]);
    let mut stdin = child.stdin.take().expect("stdin");
    // One worker: the crash runs first, the three calls behind it wait in its pipeline.
    writeln!(stdin, r#"{{"id":0,"command":"sleep_then_crash_is_not_a_tool"}}"#).expect("write");
    writeln!(stdin, r#"{{"id":1,"command":"crash","args":{{"code":3}}}}"#).expect("write");
    for i in 2..5 {
        writeln!(stdin, r#"{{"id":{i},"command":"echo","args":{{"i":{i}}}}}"#).expect("write");
    }
    drop(stdin);
    let mut kinds = std::collections::BTreeMap::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let v: Value = serde_json::from_str(&line.expect("line")).expect("json");
        let kind = v["error"]["kind"].as_str().unwrap_or("ok").to_owned();
        kinds.insert(v["id"].as_i64().expect("id"), kind);
    }
    assert!(child.wait().expect("wait").success());
    assert_eq!(kinds[&0], "unknown_command");
    assert_eq!(kinds[&1], "worker_crashed");
    // Each queued call either never started (it was in the pipeline) or ran on the new worker.
    for i in 2..5 {
        assert!(["not_started", "ok"].contains(&kinds[&i].as_str()), "{kinds:?}");
    }
}

#[test]
fn serve_shuts_down_gracefully_on_sigterm() {
    let g = Guard::new();
    let mut child = g.serve("1", &[]);
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
    let g = Guard::new();
    let dir = tempfile::tempdir().expect("tmp");
    let script = dir.path().join("broken.py");
    std::fs::write(&script, "raise SystemExit('cannot load')\n").expect("write");
    let out =
        g.snakepit().args(["serve", "--script"]).arg(&script).stdin(Stdio::null()).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not start") && err.contains("cannot load"), "{err}");
}

#[test]
fn call_prints_the_result_or_the_error() {
    let g = Guard::new();
    let out = g
        .snakepit()
        .args(["call", "--module", "snakepit_bridge.showcase", "add", r#"{"a":20,"b":22}"#])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let out = g
        .snakepit()
        .args(["call", "--module", "snakepit_bridge.showcase", "fail", r#"{"type":"TypeError"}"#])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err: Value = serde_json::from_slice(&out.stderr).expect("error json on stderr");
    assert_eq!(err["type"], "TypeError");
}

/// `--script` ending in `.js` runs Node; `--command` runs any program speaking protocol v1
/// (here the Perl worker written from docs/protocol.md), split with shell word rules.
#[test]
fn call_runs_node_scripts_and_any_command() {
    let g = Guard::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let showcase = root.join("snakepit-adapters/node/showcase.js");
    let out = g
        .snakepit()
        .args(["call", "--script"])
        .arg(&showcase)
        .args(["add", r#"{"a":20,"b":22}"#])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let perl = root.join("tests/workers/protocol_only.pl");
    let out = g
        .snakepit()
        .args(["call", "--command", &format!("perl '{}'", perl.display()), "echo", r#"{"x":"a b"}"#])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"x":"a b"}"#);
    let out = g.snakepit().args(["call", "--script", "w.mjs", "--zygote", "ping"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not supported for Node workers"));
}

/// The original Snakepit's Ruby bridge (tests/workers/v0/bridge.rb, the seed's file unchanged)
/// through `serve --protocol snakepit-v0`; what v0 cannot do exits 2.
#[test]
fn serve_runs_the_original_snakepits_ruby_bridge_with_protocol_snakepit_v0() {
    #[allow(clippy::disallowed_methods)] // a probe of the interpreter
    let ruby = Command::new("ruby").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ruby {
        assert!(std::env::var_os("CI").is_none(), "no ruby: run `cargo xtask setup`");
        eprintln!("SKIP: no ruby");
        return;
    }
    let g = Guard::new();
    let bridge = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/workers/v0/bridge.rb");
    let command = format!("ruby -rtime '{}'", bridge.display());
    let mut child = g
        .snakepit()
        .args(["serve", "--size", "1", "--protocol", "snakepit-v0", "--command", &command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, r#"{{"id":1,"command":"ping","args":{{}}}}"#).expect("write");
    writeln!(stdin, r#"{{"id":2,"command":"process_data","args":{{"data":"snake"}}}}"#).expect("write");
    writeln!(stdin, r#"{{"id":3,"command":"nope","args":{{}}}}"#).expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("serve");
    assert!(out.status.success());
    let mut replies: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    replies.sort_by_key(|r| r["id"].as_i64());
    assert_eq!(replies[0], json!({"id": 1, "ok": {"status": "ok", "message": "pong"}}));
    assert_eq!(replies[1], json!({"id": 2, "ok": {"processed": "SNAKE", "length": 5}}));
    assert_eq!(replies[2]["error"]["kind"], "worker");
    assert_eq!(replies[2]["error"]["type"], "SnakepitV0Error");
    assert_eq!(replies[2]["error"]["message"], "Unknown command: nope");
    for extra in [&["--transport", "grpc"][..], &["--zygote"], &["--pipeline-depth", "2"]] {
        let out = g
            .snakepit()
            .args(["call", "--protocol", "snakepit-v0", "--command", &command])
            .args(extra)
            .arg("ping")
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
    }
    let out = g
        .snakepit()
        .args(["call", "--protocol", "snakepit-v0", "--module", "m", "ping"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--command"));
}

/// A request's `"session"` routes it in that session; an unknown one is `session_not_found`
/// unless `--create-sessions-on-use`.
#[test]
fn serve_runs_requests_in_their_session() {
    let g = Guard::new();
    for (flag, created) in [(None, false), (Some("--create-sessions-on-use"), true)] {
        let mut child = g.serve("1", flag.as_slice());
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, r#"{{"id":1,"command":"remember","args":{{"name":"k","value":7}},"session":"s"}}"#)
            .expect("write");
        drop(stdin);
        let out = child.wait_with_output().expect("serve");
        assert!(out.status.success());
        let reply: Value = serde_json::from_slice(&out.stdout).expect("one reply line");
        if created {
            assert_eq!(reply, json!({"id": 1, "ok": 7}));
        } else {
            assert_eq!(reply["error"]["kind"], "session_not_found", "{reply}");
        }
    }
}

#[test]
fn serve_and_call_send_b64_objects_as_bytes_and_write_bytes_back_as_b64() {
    let g = Guard::new();
    let mut child = g.serve("1", &[]);
    let mut stdin = child.stdin.take().expect("stdin");
    let requests = [
        r#"{"id":1,"command":"echo","args":{"data":{"$b64":"AAEC/w=="},"n":3}}"#,
        r#"{"id":2,"command":"echo","args":[{"$b64":""}]}"#,
        r#"{"id":3,"command":"echo","args":{"data":{"$b64":"not base64!"}}}"#,
        r#"{"id":4,"command":"echo","args":{"text":"$b64 in a string is just text"}}"#,
    ];
    for r in requests {
        writeln!(stdin, "{r}").expect("write");
    }
    drop(stdin);
    let mut replies = std::collections::HashMap::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let v: Value = serde_json::from_str(&line.expect("line")).expect("json line");
        replies.insert(v["id"].to_string(), v);
    }
    assert!(child.wait().expect("wait").success());
    assert_eq!(replies["1"]["ok"], json!({"data": {"$b64": "AAEC/w=="}, "n": 3}), "{replies:?}");
    assert_eq!(replies["2"]["ok"], json!({"$b64": ""}));
    assert_eq!(replies["3"]["error"]["kind"], "bad_request");
    assert!(replies["3"]["error"]["message"].as_str().expect("message").contains("not base64"));
    assert_eq!(replies["4"]["ok"], json!({"text": "$b64 in a string is just text"}));
    let out = g
        .snakepit()
        .args(["call", "--module", "snakepit_bridge.showcase", "echo", r#"[{"$b64":"aGk="}]"#])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"$b64":"aGk="}"#);
}

#[test]
fn demo_runs_a_mixed_workload() {
    let g = Guard::new();
    let out = g.snakepit().args(["demo", "--calls", "1200"]).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("worker_crashed") && stdout.contains("latency p99"), "{stdout}");
}

#[test]
fn demo_runs_the_mixed_workload_on_node_workers() {
    let g = Guard::new();
    let out = g.snakepit().args(["demo", "--language", "node", "--calls", "1200"]).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Node workers") && stdout.contains("worker_crashed"), "{stdout}");
    assert!(stdout.contains("wrong results                   0"), "{stdout}");
}

/// As a new user runs it (no `SNAKEPIT_LOG`): the planned crashes are in the summary, each one
/// restarted before it is printed, and no warning about them interleaves with the progress output.
#[test]
fn demo_reports_planned_crashes_and_their_restarts_without_warnings() {
    let g = Guard::new();
    let mut c = g.snakepit();
    c.env_remove("SNAKEPIT_LOG").args(["demo", "--calls", "2600"]);
    let out = c.output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(summary_row(&stdout, "worker_crashed"), Some("3"), "{stdout}");
    assert_eq!(summary_row(&stdout, "planned crashes"), Some("3"), "{stdout}");
    assert_eq!(summary_row(&stdout, "worker restarts"), Some("3"), "{stdout}");
    assert!(!stderr.contains("WARN"), "warnings on stderr:\n{stderr}");
}

/// The host is SIGKILLed while 8 busy workers each have a grandchild (half of them `setsid()`
/// and all ignoring SIGTERM/SIGHUP): within a second nothing it started is alive.
#[test]
fn sigkilled_host_leaves_no_process_behind() {
    sigkill_host_with_busy_workers(&[], 25);
}

/// The same with workers forked from a zygote: host + shepherd + zygote + 8 workers + 8
/// grandchildren.
#[test]
fn sigkilled_host_with_a_zygote_leaves_no_process_behind() {
    sigkill_host_with_busy_workers(&["--zygote"], 19);
}

fn sigkill_host_with_busy_workers(extra: &[&str], expected: usize) {
    let g = Guard::new();
    let mut child = g.serve("8", extra);
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
    // Without a zygote: host + 8 shepherds + 8 workers + 8 grandchildren carry the marker.
    let before = procs::marked_pids(&g.0);
    assert!(before.len() >= expected, "{before:?}");
    child.kill().expect("SIGKILL the host");
    child.wait().expect("reap the host");
    // Usually well under a second; the bound leaves room for a loaded machine (the chain runs
    // through the shepherds, the zygote and the workers' death signals).
    let left = procs::wait_none_left(&g.0, Duration::from_secs(3));
    assert!(left.is_empty(), "alive 3 s after the host was SIGKILLed: {left:?}");
}

/// Field 22 of /proc/<pid>/stat (start time in clock ticks), and field 4 (parent pid).
fn stat_fields(pid: u32) -> Option<(u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(19)?.parse().ok()?, f.get(1)?.parse().ok()?))
}

/// A plain long-lived process (not a shim that spawns helpers) carrying a run id.
#[allow(clippy::disallowed_methods)] // a test helper: a tagged stand-in process for the reaper to find
fn idle_process(g: &Guard, run_id: &str) -> std::process::Child {
    Command::new("sleep")
        .arg("1000")
        .env(procs::MARKER_VAR, &g.0)
        .env("SNAKEPIT_RUN_ID", run_id)
        .spawn()
        .expect("spawn")
}

#[test]
#[allow(clippy::disallowed_methods)] // runs the CLI binary under test
fn reap_kills_only_what_dead_hosts_left_behind() {
    let g = Guard::new();
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(g.run_dir())
        .expect("run dir");
    // A host that is dead: a finished child's pid.
    let mut gone = Command::new("true").spawn().expect("spawn");
    let dead_pid = gone.id();
    gone.wait().expect("wait");
    let mut leftover = idle_process(&g, "deadrun");
    let mut bystander = idle_process(&g, "liverun");
    let me = std::process::id();
    let (my_start, _) = stat_fields(me).expect("own stat");
    let write = |name: &str, v: Value| std::fs::write(g.run_dir().join(name), v.to_string()).expect("write");
    write(
        "x.deadrun.run.json",
        // PID reuse: the dead run "recorded" the bystander's pid with another start time.
        json!({"instance":"x","run_id":"deadrun","host_pid":dead_pid,"host_start":1,
               "workers":[[bystander.id(), 1]]}),
    );
    write(
        "x.liverun.run.json",
        json!({"instance":"x","run_id":"liverun","host_pid":me,"host_start":my_start,"workers":[]}),
    );
    let out = g.snakepit().args(["reap", "--dry-run"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&format!("would kill {}", leftover.id())), "{text}");
    assert!(!text.contains(&format!("would kill {}\n", bystander.id())), "{text}");
    assert!(leftover.try_wait().expect("try_wait").is_none(), "a dry run killed it");
    let out = g.snakepit().args(["reap"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    leftover.wait().expect("the leftover is killed");
    assert!(bystander.try_wait().expect("try_wait").is_none(), "a live host's process was touched: {text}");
    assert!(!g.run_dir().join("x.deadrun.run.json").exists());
    assert!(g.run_dir().join("x.liverun.run.json").exists());
    bystander.kill().expect("kill");
    bystander.wait().expect("wait");
}

fn worker_pids_of(host: u32) -> Vec<u32> {
    // host -> shepherds -> workers
    let children = |p: u32| -> Vec<u32> {
        std::fs::read_dir(format!("/proc/{p}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                    .flat_map(|s| s.split_whitespace().filter_map(|x| x.parse().ok()).collect::<Vec<u32>>())
                    .collect()
            })
            .unwrap_or_default()
    };
    children(host).into_iter().flat_map(children).collect()
}

fn start_serve(
    g: &Guard,
    size: &str,
) -> (std::process::Child, std::process::ChildStdin, BufReader<std::process::ChildStdout>) {
    let mut c = g.serve(size, &["--instance", "twin"]);
    let mut stdin = c.stdin.take().expect("stdin");
    let mut out = BufReader::new(c.stdout.take().expect("stdout"));
    // One round trip: the pool is up.
    writeln!(stdin, r#"{{"id":0,"command":"ping"}}"#).expect("write");
    let mut line = String::new();
    out.read_line(&mut line).expect("reply");
    assert!(line.contains("pong"), "{line}");
    (c, stdin, out)
}

#[test]
fn two_hosts_side_by_side_restarting_one_kills_none_of_the_others_workers() {
    let g = Guard::new();
    let (mut a, a_in, _a_out) = start_serve(&g, "2");
    let (mut b, mut b_in, mut b_out) = start_serve(&g, "2");
    let b_workers = worker_pids_of(b.id());
    assert_eq!(b_workers.len(), 2, "{b_workers:?}");
    let b_starts: Vec<_> = b_workers.iter().map(|p| stat_fields(*p).expect("alive").0).collect();
    a.kill().expect("SIGKILL host a");
    a.wait().expect("reap a");
    drop(a_in);
    // Restart host a: it reaps its own dead run, and must not touch b's workers.
    let (mut a2, a2_in, _a2_out) = start_serve(&g, "2");
    for (pid, start) in b_workers.iter().zip(&b_starts) {
        assert_eq!(stat_fields(*pid).map(|s| s.0), Some(*start), "b's worker {pid} was killed");
    }
    writeln!(b_in, r#"{{"id":1,"command":"add","args":{{"a":2,"b":3}}}}"#).expect("write");
    let mut line = String::new();
    b_out.read_line(&mut line).expect("reply");
    assert_eq!(serde_json::from_str::<Value>(&line).expect("json")["ok"], 5);
    drop(a2_in);
    drop(b_in);
    assert!(a2.wait().expect("wait").success());
    assert!(b.wait().expect("wait").success());
}

#[test]
fn serve_streams_generator_tools_line_by_line() {
    let g = Guard::new();
    let mut child = g.serve("1", &[]);
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, r#"{{"id":"g","command":"count","args":{{"n":3}}}}"#).expect("write");
    writeln!(stdin, r#"{{"id":"p","command":"add","args":{{"a":1,"b":2}},"stream":true}}"#).expect("write");
    writeln!(stdin, r#"{{"id":"f","command":"fail_after","args":{{"n":2}}}}"#).expect("write");
    drop(stdin);
    let lines: Vec<Value> = BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .map(|l| serde_json::from_str(&l.expect("line")).expect("json"))
        .collect();
    assert!(child.wait().expect("wait").success());
    let of = |id: &str| -> Vec<Value> { lines.iter().filter(|l| l["id"] == id).cloned().collect() };
    assert_eq!(
        of("g"),
        [
            json!({"id": "g", "chunk": {"i": 0}}),
            json!({"id": "g", "chunk": {"i": 1}}),
            json!({"id": "g", "chunk": {"i": 2}}),
            json!({"id": "g", "end": true})
        ]
    );
    assert_eq!(of("p"), [json!({"id": "p", "chunk": 3}), json!({"id": "p", "end": true})]);
    let f = of("f");
    assert_eq!(f.len(), 3, "{f:?}");
    assert_eq!(f[2]["error"]["type"], "ValueError");
}

#[test]
fn call_and_demo_run_over_grpc() {
    let g = Guard::new();
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(venv.exists(), "run `cargo xtask setup` (cargo xtask ci does)");
    let out = g
        .snakepit()
        .args(["call", "--module", "snakepit_bridge.showcase", "--transport", "grpc", "--python"])
        .arg(&venv)
        .args(["add", r#"{"a":40,"b":2}"#])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let out = g
        .snakepit()
        .args(["demo", "--calls", "600", "--transport", "grpc", "--python"])
        .arg(&venv)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("over Grpc") && stdout.contains("worker_crashed"), "{stdout}");
}

// ---- serve: bounded memory, its own line format, shutdown ----

/// The ceiling on `serve`'s peak RSS under every flood below.
const PEAK_LIMIT: u64 = 150 << 20;

/// The peak resident memory (`VmHWM`) of a live process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    Some(line.trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024)
}

/// Asserts `serve`'s peak RSS so far is under [`PEAK_LIMIT`] and returns it.
#[track_caller]
fn assert_peak(pid: u32, what: &str) -> u64 {
    let peak = peak_rss(pid).expect("serve is alive");
    assert!(peak < PEAK_LIMIT, "{what}: serve's peak RSS is {} MiB", peak >> 20);
    peak
}

/// Reads `stdout` line by line on a thread, so the test can wait with a bound: after `hold`,
/// as fast as it can, but pausing `pause` after every `every` lines (a slow reader).
fn read_lines(
    stdout: std::process::ChildStdout,
    hold: Duration,
    every: usize,
    pause: Duration,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        std::thread::sleep(hold);
        for (i, line) in BufReader::new(stdout).lines().enumerate() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
            if every > 0 && i % every == every - 1 {
                std::thread::sleep(pause);
            }
        }
    });
    rx
}

/// The next line, within `within`.
#[track_caller]
fn next_line(rx: &std::sync::mpsc::Receiver<String>, within: Duration) -> String {
    rx.recv_timeout(within).unwrap_or_else(|e| panic!("no reply line within {within:?}: {e}"))
}

fn json_line(line: &str) -> Value {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON value: {line:?}: {e}"));
    assert!(v.is_object(), "{line}");
    v
}

fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("kill");
}

/// Waits up to `within` for the child to exit and returns its status.
#[track_caller]
fn exit_within(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    // Waits on a pidfd (no polling), then collects the status.
    let exited = procs::wait_exit(child.id() as i32, Instant::now() + within);
    assert!(exited, "serve did not exit within {within:?}");
    child.wait().expect("wait")
}

/// CPU time (user + system, clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Item 4: one `count` stream of 4 KiB chunks with stdout unread for 10 s. Before, `serve`
/// queued every chunk (923 MB in 28 s); now its peak RSS stays under 150 MiB, the worker stops
/// (no CPU while nothing is read: the stream's credit reached it), and once stdout is read the
/// chunks resume in order, none lost, until the request's own deadline ends the stream.
#[test]
fn serve_stream_backpressure_reaches_the_worker_when_stdout_is_unread() {
    let g = Guard::new();
    let mut child = g.serve("1", &[]);
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let t0 = Instant::now();
    let req = r#"{"id":"g","command":"count","args":{"n":1000000000,"size":4096},"timeout_ms":13000}"#;
    writeln!(stdin, "{req}").expect("write");
    stdin.flush().expect("flush");
    let stdout = child.stdout.take().expect("stdout");
    let mut peak = 0;
    while t0.elapsed() < Duration::from_secs(10) {
        peak = assert_peak(pid, "a stream with stdout unread");
        std::thread::sleep(Duration::from_millis(100));
    }
    let worker = worker_pids_of(pid).into_iter().next().expect("the worker");
    let before = cpu_ticks(worker).expect("worker stat");
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(worker).expect("worker stat") - before;
    assert!(used <= 5, "the worker kept producing with nobody reading: {used} ticks in 1 s");
    eprintln!("serve peak RSS after 10 s of an unread stream: {} MiB", peak >> 20);
    let rx = read_lines(stdout, Duration::ZERO, 0, Duration::ZERO);
    let mut i = 0;
    let last = loop {
        let v = json_line(&next_line(&rx, Duration::from_secs(10)));
        if v.get("chunk").is_none() {
            break v;
        }
        assert_eq!(v["chunk"]["i"], i, "chunks in order, none lost");
        i += 1;
    };
    assert_eq!(last["error"]["kind"], "timeout", "{last}");
    assert!(i > 1000, "only {i} chunks");
    drop(stdin);
    assert!(exit_within(&mut child, Duration::from_secs(10)).success());
}

/// Item 5: 200,000 pipelined requests, stdout read slowly (nothing for 2 s, then with a pause
/// every 50 lines). Before, `serve` read stdin without bound (1.1 GB for 1 M requests) and
/// refused most with `pool_saturated`; now it reads only what the pool can take: no
/// `pool_saturated`, every id answered once, peak RSS under 150 MiB.
#[test]
fn serve_reads_no_more_than_the_pool_takes_under_a_pipelined_flood() {
    const N: usize = 200_000;
    let g = Guard::new();
    let mut child = g.serve("2", &[]);
    let pid = child.id();
    let stdin = child.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || {
        let mut w = std::io::BufWriter::new(stdin);
        for i in 0..N {
            if writeln!(w, r#"{{"id":{i},"command":"echo","args":{{"i":{i}}}}}"#).is_err() {
                return;
            }
        }
        let _ = w.flush();
    });
    let rx = read_lines(
        child.stdout.take().expect("stdout"),
        Duration::from_secs(2),
        50,
        Duration::from_millis(1),
    );
    let t0 = Instant::now();
    let mut seen = vec![false; N];
    let mut saturated = 0;
    for n in 0..N {
        let line = next_line(&rx, Duration::from_secs(20));
        let v = json_line(&line);
        if v["error"]["kind"] == "pool_saturated" {
            saturated += 1;
        }
        let id = v["id"].as_u64().and_then(|i| usize::try_from(i).ok()).filter(|&i| i < N);
        let id = id.unwrap_or_else(|| panic!("unknown id: {line}"));
        assert!(!std::mem::replace(&mut seen[id], true), "answered twice: {line}");
        assert_eq!(v["ok"]["i"], id, "{line}");
        if n % 1000 == 0 {
            assert_peak(pid, &format!("{n} replies read, {saturated} refused"));
        }
    }
    let peak = assert_peak(pid, "all replies read");
    eprintln!("serve peak RSS: {} MiB; {N} replies in {:?}", peak >> 20, t0.elapsed());
    assert_eq!(saturated, 0);
    feeder.join().expect("feeder");
    assert!(exit_within(&mut child, Duration::from_secs(10)).success());
}

/// Item 6: a 200 MiB request line. Before, `serve` buffered it whole (417 MB peak); now a line
/// longer than the frame limit + 64 KiB is answered `bad_request` (with its id when it is in the
/// line's first 64 KiB, else `null`), discarded as it is read, and the next line is served.
#[test]
fn serve_discards_an_overlong_line_without_buffering_it() {
    let g = Guard::new();
    let mut child = g.serve("1", &[]);
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let rx = read_lines(child.stdout.take().expect("stdout"), Duration::ZERO, 0, Duration::ZERO);
    let feeder = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        let mut send = |head: &[u8], mib: usize, tail: &[u8]| {
            stdin.write_all(head)?;
            for _ in 0..mib {
                stdin.write_all(&chunk)?;
            }
            stdin.write_all(tail)
        };
        send(br#"{"id":"huge","command":"echo","args":{"x":""#, 200, b"\"}}\n")?;
        send(br#"{"command":"echo","args":{"x":""#, 70, b"\"},\"id\":\"late\"}\n")?;
        stdin.write_all(b"{\"id\":\"after\",\"command\":\"ping\"}\n")?;
        stdin.flush()?;
        Ok::<_, std::io::Error>(stdin)
    });
    let replies: Vec<String> = (0..3).map(|_| next_line(&rx, Duration::from_secs(30))).collect();
    let stdin = feeder.join().expect("feeder").expect("write");
    // Every byte is consumed: the peak so far is the peak of the whole flood.
    let peak = assert_peak(pid, "a 200 MiB line and a 70 MiB line");
    eprintln!("serve peak RSS: {} MiB", peak >> 20);
    let limit = 64 * 1024 * 1024 + 64 * 1024;
    let msg = format!("request line exceeds {limit} bytes");
    let mut replies: Vec<Value> = replies.iter().map(|l| json_line(l)).collect();
    // Replies go out in completion order: the second line's refusal and the ping's answer are
    // written by tasks that finish at about the same time, in either order.
    replies[1..].sort_by_key(|r| r["id"].is_null());
    assert_eq!(
        replies,
        [
            json!({"id": "huge", "error": {"kind": "bad_request", "message": msg}}),
            json!({"id": "after", "ok": "pong"}),
            json!({"id": null, "error": {"kind": "bad_request", "message": msg}}),
        ]
    );
    drop(stdin);
    assert!(exit_within(&mut child, Duration::from_secs(10)).success());
}

/// A worker script whose results are pretty-printed JSON (newlines between tokens, legal
/// whitespace), one of them shaped to forge a reply line for another request.
const PRETTY_WORKER: &str = r#"
import json, os, time
from snakepit_bridge import _core, tool, serve

FORGE = {"forge": True}
FORGED = b'[0,\n{"id":"victim2","ok":"FORGED"},\n1]'

def pretty(msg):
    if msg == FORGE:
        return FORGED
    return json.dumps(msg, indent=2).encode()

_core._dumps = pretty

@tool
def forge():
    return FORGE

@tool
def nested():
    return {"b": [1, 2], "a": {"c": "x y\n"}}

@tool
def nested_stream(n):
    for i in range(n):
        yield {"i": i, "l": [i]}

@tool
def gate(path):
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.002)
    return "real"

if __name__ == "__main__":
    serve()
"#;

/// Item 7: a worker's JSON may contain newlines; before, `serve` spliced it into its line
/// verbatim, so one result forged `{"id":"victim2","ok":"FORGED"}` for another in-flight request
/// and a pretty-printed reply took several lines. Now every line is one compact JSON object.
#[test]
fn serve_reply_lines_cannot_be_split_or_forged_by_a_worker() {
    let g = Guard::new();
    let dir = tempfile::tempdir().expect("tmp");
    let script = dir.path().join("pretty.py");
    std::fs::write(&script, PRETTY_WORKER).expect("write");
    let gate = dir.path().join("gate");
    let mut child = g
        .snakepit()
        .args(["serve", "--size", "2", "--script"])
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let mut stdin = child.stdin.take().expect("stdin");
    let rx = read_lines(child.stdout.take().expect("stdout"), Duration::ZERO, 0, Duration::ZERO);
    writeln!(stdin, r#"{{"id":"victim2","command":"gate","args":{{"path":{}}}}}"#, json!(gate))
        .expect("write");
    writeln!(stdin, r#"{{"id":"victim1","command":"forge"}}"#).expect("write");
    let forge = next_line(&rx, Duration::from_secs(10));
    assert_eq!(forge, r#"{"id":"victim1","ok":[0,{"id":"victim2","ok":"FORGED"},1]}"#);
    std::fs::write(&gate, "").expect("open the gate");
    assert_eq!(next_line(&rx, Duration::from_secs(10)), r#"{"id":"victim2","ok":"real"}"#);
    writeln!(stdin, r#"{{"id":"p","command":"nested"}}"#).expect("write");
    assert_eq!(next_line(&rx, Duration::from_secs(10)), r#"{"id":"p","ok":{"b":[1,2],"a":{"c":"x y\n"}}}"#);
    writeln!(stdin, r#"{{"id":"s","command":"nested_stream","args":{{"n":2}}}}"#).expect("write");
    for i in 0..2 {
        assert_eq!(
            next_line(&rx, Duration::from_secs(10)),
            format!(r#"{{"id":"s","chunk":{{"i":{i},"l":[{i}]}}}}"#)
        );
    }
    assert_eq!(next_line(&rx, Duration::from_secs(10)), r#"{"id":"s","end":true}"#);
    drop(stdin);
    assert!(exit_within(&mut child, Duration::from_secs(10)).success());
    assert!(rx.recv_timeout(Duration::from_secs(1)).is_err(), "no other line");
}

/// Item 14: ids are echoed verbatim (an integer above u64 was echoed as a float), compacted;
/// a request nested deeper than serde_json's limit keeps its id, and a malformed one too (found
/// by a shallow scan; it was `null`).
#[test]
fn serve_echoes_ids_verbatim_even_in_deep_or_malformed_lines() {
    let g = Guard::new();
    let mut child = g.serve("1", &[]);
    let mut stdin = child.stdin.take().expect("stdin");
    let rx = read_lines(child.stdout.take().expect("stdout"), Duration::ZERO, 0, Duration::ZERO);
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let deeper = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let cases = [
        (
            r#"{"id":123456789012345678901234567890,"command":"ping"}"#.to_owned(),
            r#"{"id":123456789012345678901234567890,"ok":"pong"}"#.to_owned(),
        ),
        (
            r#"{"id" : {"a" : [1, 2.50]} ,"command":"ping"}"#.to_owned(),
            r#"{"id":{"a":[1,2.50]},"ok":"pong"}"#.to_owned(),
        ),
        (
            format!(r#"{{"id":"deep","command":"echo","args":{{"x":{deep}}}}}"#),
            format!(r#"{{"id":"deep","ok":{{"x":{deep}}}}}"#),
        ),
    ];
    for (req, reply) in &cases {
        writeln!(stdin, "{req}").expect("write");
        assert_eq!(&next_line(&rx, Duration::from_secs(10)), reply);
    }
    writeln!(stdin, r#"{{"pad":{deeper},"id":99999999999999999999999,"command":5}}"#).expect("write");
    let bad = next_line(&rx, Duration::from_secs(10));
    assert!(bad.starts_with(r#"{"id":99999999999999999999999,"error":{"kind":"bad_request""#), "{bad}");
    drop(stdin);
    assert!(exit_within(&mut child, Duration::from_secs(10)).success());
}

/// Waits (bounded) for a file a worker creates.
#[track_caller]
fn wait_file(path: &std::path::Path, within: Duration) {
    let until = Instant::now() + within;
    while !path.exists() {
        assert!(Instant::now() < until, "{} not created within {within:?}", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Item 10: on SIGTERM, a running call with no deadline (before: waited for ever) and one
/// queued behind it get `--shutdown-grace-ms`, then fail with `shutting_down`; `serve` stops
/// its workers and exits 0.
#[test]
fn serve_fails_hung_calls_with_shutting_down_after_the_grace_on_sigterm() {
    let g = Guard::new();
    let dir = tempfile::tempdir().expect("tmp");
    let started = dir.path().join("started");
    let mut child = g.serve("1", &["--shutdown-grace-ms", "300"]);
    let mut stdin = child.stdin.take().expect("stdin");
    let rx = read_lines(child.stdout.take().expect("stdout"), Duration::ZERO, 0, Duration::ZERO);
    // Two hung calls for the one worker: whichever request task reaches the pool first runs,
    // the other queues behind it (a quick call as the second one could win that race and be
    // answered before the signal).
    let started2 = dir.path().join("started2");
    let args = json!({"ms": 600_000, "path": dir.path().join("ended"), "started": started});
    let args2 = json!({"ms": 600_000, "path": dir.path().join("ended2"), "started": started2});
    writeln!(stdin, r#"{{"id":"hung","command":"sleep_then_touch","args":{args}}}"#).expect("write");
    writeln!(stdin, r#"{{"id":"queued","command":"sleep_then_touch","args":{args2}}}"#).expect("write");
    stdin.flush().expect("flush");
    let until = Instant::now() + Duration::from_secs(10);
    while !started.exists() && !started2.exists() {
        assert!(Instant::now() < until, "neither call started within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = exit_within(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status}");
    eprintln!("SIGTERM to exit: {:?}", t0.elapsed());
    let mut replies: Vec<(String, Value)> = rx
        .try_iter()
        .map(|l| json_line(&l))
        .map(|v| (v["id"].to_string(), v["error"]["kind"].clone()))
        .collect();
    replies.sort_by(|a, b| a.0.cmp(&b.0));
    let shutting_down = json!("shutting_down");
    assert_eq!(
        replies,
        [("\"hung\"".to_owned(), shutting_down.clone()), ("\"queued\"".to_owned(), shutting_down)]
    );
    assert!(!started.exists() || !started2.exists(), "only one of the two calls ever ran");
}

/// Item 10: a second signal (before: swallowed) kills the workers at once, even ones that
/// ignore cancellation and SIGTERM's grace, and exits 130 for SIGINT within 1 s, leaving no
/// process behind.
#[test]
fn serve_exits_at_once_on_a_second_signal_leaving_no_process() {
    let g = Guard::new();
    let dir = tempfile::tempdir().expect("tmp");
    let mut child = g
        .snakepit()
        .env("SNAKEPIT_LOG", "info")
        .args(["serve", "--module", "snakepit_bridge.showcase", "--size", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let mut stdin = child.stdin.take().expect("stdin");
    let _rx = read_lines(child.stdout.take().expect("stdout"), Duration::ZERO, 0, Duration::ZERO);
    let log = read_lines_of(child.stderr.take().expect("stderr"));
    for i in 0..2 {
        let started = dir.path().join(format!("started{i}"));
        let args = json!({"ms": 600_000, "started": started});
        writeln!(stdin, r#"{{"id":{i},"command":"stubborn_sleep","args":{args}}}"#).expect("write");
        stdin.flush().expect("flush");
        wait_file(&started, Duration::from_secs(10));
    }
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let until = Instant::now() + Duration::from_secs(10);
    while !log
        .recv_timeout(until.saturating_duration_since(Instant::now()))
        .expect("log line")
        .contains("SIGTERM")
    {}
    signal(&child, nix::sys::signal::Signal::SIGINT);
    let status = exit_within(&mut child, Duration::from_secs(1));
    assert_eq!(std::os::unix::process::ExitStatusExt::into_raw(status) >> 8, 130, "{status}");
    let left = procs::wait_none_left(&g.0, Duration::from_secs(1));
    assert!(left.is_empty(), "alive 1 s after the second signal: {left:?}");
}

fn read_lines_of(r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Item 10: at the end of stdin, `serve` drains: each call finishes or reaches its own deadline
/// (`timeout_ms`, else `--default-timeout-ms`), then it exits 0.
#[test]
fn serve_drains_on_eof_until_each_call_reaches_its_deadline() {
    let g = Guard::new();
    let mut child = g.serve("1", &["--default-timeout-ms", "500"]);
    let mut stdin = child.stdin.take().expect("stdin");
    let rx = read_lines(child.stdout.take().expect("stdout"), Duration::ZERO, 0, Duration::ZERO);
    writeln!(stdin, r#"{{"id":"default","command":"sleep","args":{{"ms":600000}}}}"#).expect("write");
    writeln!(stdin, r#"{{"id":"own","command":"sleep","args":{{"ms":600000}},"timeout_ms":200}}"#)
        .expect("write");
    writeln!(stdin, r#"{{"id":"long","command":"sleep","args":{{"ms":100}},"timeout_ms":20000}}"#)
        .expect("write");
    drop(stdin);
    let t0 = Instant::now();
    let status = exit_within(&mut child, Duration::from_secs(15));
    assert!(status.success(), "{status}");
    eprintln!("EOF to exit: {:?}", t0.elapsed());
    let replies: std::collections::HashMap<String, Value> = rx
        .try_iter()
        .map(|l| json_line(&l))
        .map(|v| (v["id"].as_str().unwrap_or("?").to_owned(), v))
        .collect();
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_eq!(replies["default"]["error"]["kind"], "timeout");
    assert_eq!(replies["own"]["error"]["kind"], "timeout");
    assert_eq!(replies["long"]["ok"], 100, "a longer own timeout is not cut by the default");
}

/// Item 10: `--max-call-time-ms` cancels a call that runs longer, whatever its own timeout; a
/// worker that ignores the cancel is replaced after the cancel grace.
#[test]
fn serve_max_call_time_cancels_long_calls_and_replaces_a_stubborn_worker() {
    let g = Guard::new();
    let mut child = g.serve("1", &["--max-call-time-ms", "300"]);
    let mut stdin = child.stdin.take().expect("stdin");
    let rx = read_lines(child.stdout.take().expect("stdout"), Duration::ZERO, 0, Duration::ZERO);
    writeln!(stdin, r#"{{"id":"pid","command":"pid"}}"#).expect("write");
    stdin.flush().expect("flush");
    let first = json_line(&next_line(&rx, Duration::from_secs(10)))["ok"].clone();
    let t0 = Instant::now();
    writeln!(
        stdin,
        r#"{{"id":"slow","command":"stubborn_sleep","args":{{"ms":600000}},"timeout_ms":600000}}"#
    )
    .expect("write");
    stdin.flush().expect("flush");
    let slow = json_line(&next_line(&rx, Duration::from_secs(10)));
    assert_eq!(slow["error"]["kind"], "timeout", "{slow}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    writeln!(stdin, r#"{{"id":"pid","command":"pid","timeout_ms":20000}}"#).expect("write");
    drop(stdin);
    let second = json_line(&next_line(&rx, Duration::from_secs(20)))["ok"].clone();
    assert!(first.is_u64() && second.is_u64() && first != second, "{first} then {second}");
    assert!(exit_within(&mut child, Duration::from_secs(10)).success());
}

/// Item 15: no ANSI colours in logs when stderr is not a terminal.
#[test]
fn logs_have_no_colours_when_stderr_is_not_a_terminal() {
    let g = Guard::new();
    let out = g
        .snakepit()
        .env("SNAKEPIT_LOG", "info")
        .args(["call", "--module", "snakepit_bridge.showcase", "ping"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("INFO"), "{err}");
    assert!(!err.contains('\u{1b}'), "escape codes in {err:?}");
}

/// Starts `serve` from `cmd` (stdin and stdout piped) and checks it answers a ping: the host,
/// its stdin and its stdout.
fn serve_answering_a_ping(
    cmd: &mut Command,
) -> (KillOnDrop, std::process::ChildStdin, BufReader<std::process::ChildStdout>) {
    let mut host = KillOnDrop(cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn serve"));
    let mut stdin = host.0.stdin.take().expect("stdin");
    let mut out = BufReader::new(host.0.stdout.take().expect("stdout"));
    writeln!(stdin, r#"{{"id":0,"command":"ping"}}"#).expect("write");
    let mut line = String::new();
    out.read_line(&mut line).expect("reply");
    assert!(line.contains("pong"), "{line}");
    (host, stdin, out)
}

/// A child that is SIGKILLed and reaped when dropped, whatever the test did.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGKILLs a `serve` host and waits (bounded) until every marked process but `keep` is gone:
/// the shepherds have killed its workers.
fn sigkill_host(g: &Guard, host: &mut std::process::Child, keep: &[u32]) {
    host.kill().expect("SIGKILL the host");
    host.wait().expect("reap the host");
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in procs::marked_pids(&g.0) {
        if !keep.contains(&(pid as u32)) {
            procs::wait_exit(pid, deadline);
        }
    }
}

/// A worker's `ready` names an unrelated process (a `sleep` of this test): after its host is
/// SIGKILLed, neither `snakepit reap` nor its dry run touches that process, because the run
/// file records only the pids the host verified.
#[test]
#[allow(clippy::disallowed_methods)] // runs the CLI binary under test and a bystander process
fn reap_never_kills_a_process_a_worker_only_claimed_to_be() {
    let g = Guard::new();
    let mut decoy = KillOnDrop(
        Command::new("sleep").arg("600").env(procs::MARKER_VAR, &g.0).spawn().expect("spawn sleep"),
    );
    let decoy_pid = decoy.0.id();
    let script = g.1.path().join("liar.py");
    std::fs::write(
        &script,
        format!(
            "import os\nos.getpid = lambda: {decoy_pid}\n\
             from snakepit_bridge import tool, serve\n\n\
             @tool\ndef ping():\n    return 'pong'\n\n\
             if __name__ == '__main__':\n    serve()\n"
        ),
    )
    .expect("script");
    let (mut host, _stdin, _out) =
        serve_answering_a_ping(g.snakepit().args(["serve", "--script"]).arg(&script).args([
            "--size",
            "1",
            "--instance",
            "liar",
        ]));
    let run_file = std::fs::read_dir(g.run_dir())
        .expect("run dir")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".run.json"))
        .expect("a run file");
    let rec: Value = serde_json::from_slice(&std::fs::read(run_file.path()).expect("read")).expect("json");
    sigkill_host(&g, &mut host.0, &[decoy_pid]);
    let out = g.snakepit().args(["reap", "--dry-run"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains(&format!("would kill {decoy_pid}\n")), "{text}\nrun file: {rec}");
    let out = g.snakepit().args(["reap"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("1 dead run(s)"), "{text}");
    assert!(!text.contains(&format!("killed {decoy_pid}\n")), "{text}\nrun file: {rec}");
    assert!(decoy.0.try_wait().expect("try_wait").is_none(), "the claimed process was killed: {text}");
}

/// A run directory that fails the ownership check (here: open to group and others) makes
/// `snakepit reap` exit 1 naming it, and kill nothing.
#[test]
fn reap_exits_1_naming_a_run_dir_it_refuses() {
    let g = Guard::new();
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o755)
        .create(g.run_dir())
        .expect("run dir");
    let out = g.snakepit().args(["reap"]).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&g.run_dir().display().to_string()) && err.contains("755"), "{err}");
}

/// A gRPC host killed by SIGKILL leaves its workers' socket directories behind; they are in
/// its run file, and `snakepit reap` removes them.
#[test]
fn reap_removes_the_socket_dirs_a_sigkilled_grpc_host_left() {
    let g = Guard::new();
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(venv.exists(), "run `cargo xtask setup` (cargo xtask ci does)");
    let xdg = g.1.path().join("xdg");
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&xdg).expect("xdg");
    let (mut host, _stdin, _out) = serve_answering_a_ping(
        g.snakepit()
            .env("XDG_RUNTIME_DIR", &xdg)
            .args(["serve", "--module", "snakepit_bridge.showcase", "--size", "2", "--transport", "grpc"])
            .arg("--python")
            .arg(&venv),
    );
    let socket_dirs = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(xdg.join("snakepit"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    assert_eq!(socket_dirs().len(), 2, "{:?}", socket_dirs());
    sigkill_host(&g, &mut host.0, &[]);
    assert_eq!(socket_dirs().len(), 2, "the dead host's socket dirs");
    let out = g.snakepit().args(["reap"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(socket_dirs().is_empty(), "left behind: {:?}\n{text}", socket_dirs());
    assert_eq!(text.matches("removed ").count(), 2, "{text}");
}

/// Item 5, the restart window: while a worker is being replaced the pool has fewer free
/// workers than `--size`, and what `serve` admitted must still fit the pool's queue.
#[test]
fn serve_never_refuses_what_it_admitted_while_a_worker_restarts() {
    const N: usize = 20;
    let g = Guard::new();
    let mut child = g.serve("1", &["--max-queue", "2"]);
    let mut stdin = child.stdin.take().expect("stdin");
    let rx = read_lines_of(child.stdout.take().expect("stdout"));
    let mut lines = String::new();
    for i in 0..N {
        // Every fifth call crashes its worker; the others queue behind the restart.
        let cmd = if i % 5 == 0 { r#""crash","args":{}"# } else { r#""echo","args":{"x":1}"# };
        lines.push_str(&format!("{{\"id\":{i},\"command\":{cmd}}}\n"));
    }
    stdin.write_all(lines.as_bytes()).expect("write");
    drop(stdin);
    let mut kinds = std::collections::BTreeMap::new();
    for _ in 0..N {
        let v = json_line(&next_line(&rx, Duration::from_secs(30)));
        let kind = v["error"]["kind"].as_str().unwrap_or("ok").to_owned();
        *kinds.entry(kind).or_insert(0) += 1;
    }
    assert_eq!(kinds.get("pool_saturated"), None, "{kinds:?}");
    assert_eq!(kinds.get("ok"), Some(&(N - N / 5)), "{kinds:?}");
    assert!(exit_within(&mut child, Duration::from_secs(20)).success());
}

/// `GET /metrics` over a plain TCP connection: the response's body.
fn scrape(addr: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

#[test]
fn serve_metrics_addr_serves_prometheus_metrics_and_a_taken_address_exits_1() {
    let g = Guard::new();
    let mut child = g
        .snakepit()
        .args(["serve", "--module", "snakepit_bridge.showcase", "--size", "1", "--instance", "served"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let (tx, errors) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = errors.recv_timeout(Duration::from_secs(30)).expect("serve prints its metrics address");
    let addr = first
        .strip_prefix("metrics: http://")
        .and_then(|r| r.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("{first:?}"))
        .to_owned();
    let mut stdin = child.stdin.take().expect("stdin");
    let replies = read_lines(child.stdout.take().expect("stdout"), Duration::ZERO, 0, Duration::ZERO);
    for (id, command) in [(1, "ping"), (2, "ping"), (3, "fail")] {
        writeln!(stdin, r#"{{"id":{id},"command":"{command}"}}"#).expect("write");
        next_line(&replies, Duration::from_secs(30));
    }
    let text = scrape(&addr);
    let has = |series: &str| text.lines().any(|l| l == series);
    assert!(has(r#"snakepit_calls_total{pool="served",command="ping",outcome="ok"} 2"#), "{text}");
    assert!(has(r#"snakepit_calls_total{pool="served",command="fail",outcome="worker"} 1"#), "{text}");
    // The address is taken now: a second `serve` on it exits 1 at start, starting no worker.
    let out = g
        .snakepit()
        .args(["serve", "--module", "snakepit_bridge.showcase", "--size", "1", "--metrics-addr", &addr])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics-addr") && err.contains(&addr), "{err}");
    drop(stdin);
    assert!(exit_within(&mut child, Duration::from_secs(20)).success());
}
