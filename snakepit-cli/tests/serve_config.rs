//! `snakepit serve --config FILE [--pool NAME]` with real python3 workers: the file's worker
//! and settings, `SNAKEPIT_CFG_*` over the file and flags over both, errors as
//! `FILE:LINE: key 'x.y': reason` (exit 2), and the choice of a pool in a multi-pool file.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod common;
use common::{snakepit, Guard};

impl Guard {
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.1.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    /// `snakepit serve` with `args`, in the scratch directory.
    fn serve(&self, args: &[&str]) -> Command {
        let mut c = snakepit(&self.0);
        c.env("SNAKEPIT_RUN_DIR", self.1.path().join("runs"))
            .current_dir(self.1.path())
            .arg("serve")
            .args(args);
        c
    }

    /// Runs `serve` on `lines`, returning its replies by id and its output.
    fn run(&self, mut c: Command, lines: &[String]) -> (Vec<Value>, Output) {
        let mut child =
            c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
        let mut stdin = child.stdin.take().expect("stdin");
        for l in lines {
            writeln!(stdin, "{l}").expect("write");
        }
        drop(stdin);
        let stdout = child.stdout.take().expect("stdout");
        let replies = BufReader::new(stdout)
            .lines()
            .map(|l| serde_json::from_str(&l.expect("line")).expect("a JSON reply"))
            .collect();
        let out = child.wait_with_output().expect("wait");
        (replies, out)
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A worker whose `who` tool sleeps, then names its process: `n` concurrent calls reach
/// `min(n, size)` workers.
const WHO: &str = r#"
import os, time
from snakepit_bridge import tool, serve

@tool
def who(ms: float) -> int:
    time.sleep(ms / 1000)
    return os.getpid()

@tool
def var(name: str):
    return os.environ.get(name)

serve()
"#;

/// How many workers answered 6 concurrent 700 ms calls.
fn workers(g: &Guard, c: Command) -> usize {
    let lines: Vec<String> =
        (0..6).map(|i| format!(r#"{{"id":{i},"command":"who","args":{{"ms":700}}}}"#)).collect();
    let (replies, out) = g.run(c, &lines);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(replies.len(), 6, "{replies:?}");
    replies.iter().map(|r| r["ok"].as_i64().expect("a pid")).collect::<BTreeSet<_>>().len()
}

fn config(g: &Guard, text: &str) -> PathBuf {
    g.file("who.py", WHO);
    g.file("snakepit.toml", text)
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[test]
fn serve_config_runs_the_files_worker_with_its_settings() {
    let g = Guard::new();
    let cfg = config(
        &g,
        "size = 2\nqueue_timeout = \"10s\"\n[worker]\nscript = \"who.py\"\nenv = { GREETING = \"hi\" }\n[heartbeat]\ninterval = \"1s\"\n",
    );
    let (replies, out) = g.run(
        g.serve(&["--config", arg(&cfg)]),
        &[r#"{"id":1,"command":"var","args":{"name":"GREETING"}}"#.into()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(replies[0]["ok"], "hi", "{replies:?}");
    assert_eq!(workers(&g, g.serve(&["--config", arg(&cfg)])), 2);
}

#[test]
fn serve_config_env_beats_the_file_and_a_flag_beats_env() {
    let g = Guard::new();
    let cfg = config(&g, "size = 1\n[worker]\nscript = \"who.py\"\n");
    let mut c = g.serve(&["--config", arg(&cfg)]);
    c.env("SNAKEPIT_CFG_SIZE", "2").env("SNAKEPIT_CFG_NO_SUCH_KEY", "1");
    assert_eq!(workers(&g, c), 2, "SNAKEPIT_CFG_SIZE beats the file");
    let mut c = g.serve(&["--config", arg(&cfg), "--size", "3"]);
    c.env("SNAKEPIT_CFG_SIZE", "2");
    assert_eq!(workers(&g, c), 3, "--size beats SNAKEPIT_CFG_SIZE");
}

#[test]
fn serve_config_with_an_invalid_file_exits_2_naming_its_line_and_key() {
    let g = Guard::new();
    let cfg = config(&g, "size = 1\n[worker]\nscript = \"who.py\"\n[heartbeat]\ninterval = \"often\"\n");
    let (replies, out) = g.run(g.serve(&["--config", arg(&cfg)]), &[]);
    assert!(replies.is_empty());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let want = format!(
        "snakepit serve: {}:5: key 'heartbeat.interval': invalid value string \"often\", expected a duration",
        cfg.display()
    );
    assert_eq!(stderr(&out).trim_end(), want);
    // A variable's error names the variable.
    let cfg = config(&g, "size = 1\n[worker]\nscript = \"who.py\"\n");
    let mut c = g.serve(&["--config", arg(&cfg)]);
    c.env("SNAKEPIT_CFG_PIPELINE_DEPTH", "99");
    let (_, out) = g.run(c, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out).trim_end(),
        "snakepit serve: SNAKEPIT_CFG_PIPELINE_DEPTH: key 'pipeline_depth': must be 1 to 16 (got 99)"
    );
}

#[test]
fn serve_config_with_several_pools_serves_the_one_named_by_pool() {
    let g = Guard::new();
    let cfg = config(
        &g,
        "size = 1\n[worker]\nscript = \"who.py\"\n[pools.a]\nworker.env = { WHICH = \"a\" }\n[pools.b]\nworker.env = { WHICH = \"b\" }\n",
    );
    let (_, out) = g.run(g.serve(&["--config", arg(&cfg)]), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("describes several pools (a, b): choose one with --pool NAME"),
        "{}",
        stderr(&out)
    );
    let (_, out) = g.run(g.serve(&["--config", arg(&cfg), "--pool", "c"]), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no pool `c`; it describes: a, b"), "{}", stderr(&out));
    let ask = [r#"{"id":1,"command":"var","args":{"name":"WHICH"}}"#.to_string()];
    let (replies, out) = g.run(g.serve(&["--config", arg(&cfg), "--pool", "b"]), &ask);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(replies[0]["ok"], "b", "{replies:?}");
}

#[test]
fn serve_without_a_worker_or_a_config_is_a_usage_error() {
    let g = Guard::new();
    let (_, out) = g.run(g.serve(&[]), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--script, --module or --command, or give --config FILE"),
        "{}",
        stderr(&out)
    );
}

/// Lines of a child's pipe, read on a thread, so the test waits on each with a bound.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line containing `text`, within 30 s.
#[track_caller]
fn wait_for(rx: &std::sync::mpsc::Receiver<String>, text: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(text) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {text:?}: {e}"),
        }
    }
}

#[test]
fn serve_reloads_the_config_file_on_sighup_and_keeps_the_pool_when_it_is_invalid() {
    let g = Guard::new();
    let cfg = config(&g, "size = 1\n[worker]\nscript = \"who.py\"\n");
    let mut c = g.serve(&["--config", arg(&cfg)]);
    c.env("SNAKEPIT_LOG", "info");
    let mut child =
        c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let replies = lines_of(child.stdout.take().expect("stdout"));
    let log = lines_of(child.stderr.take().expect("stderr"));
    let mut ask = |id: u32| -> Value {
        writeln!(stdin, r#"{{"id":{id},"command":"var","args":{{"name":"GREETING"}}}}"#).expect("write");
        let line = replies.recv_timeout(std::time::Duration::from_secs(30)).expect("a reply");
        serde_json::from_str::<Value>(&line).expect("json")["ok"].clone()
    };
    assert_eq!(ask(1), Value::Null);
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP")
    };
    // New settings for the workers, and one more of them.
    std::fs::write(&cfg, "size = 2\n[worker]\nscript = \"who.py\"\nenv = { GREETING = \"hi\" }\n")
        .expect("write");
    hup();
    wait_for(&log, "SIGHUP: reloaded");
    assert_eq!(ask(2), Value::from("hi"));
    // A file that does not validate: one ERROR naming the key, and the pool as it was.
    std::fs::write(&cfg, "size = 0\n[worker]\nscript = \"who.py\"\n").expect("write");
    hup();
    let error = wait_for(&log, "SIGHUP:");
    assert!(error.contains("ERROR") && error.contains("key 'size'") && error.contains("kept"), "{error}");
    assert_eq!(ask(3), Value::from("hi"));
    drop(stdin);
    assert!(child.wait().expect("wait").success());
}

#[path = "../../tests/src/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod redis;

#[test]
fn two_serve_processes_share_sessions_through_redis() {
    if !redis::available() {
        return;
    }
    let g = Guard::new();
    let server = redis::RedisServer::start();
    let url = server.url();
    let args = [
        "--module",
        "snakepit_bridge.showcase",
        "--size",
        "1",
        "--create-sessions-on-use",
        "--session-store",
        &url,
    ];
    let set = r#"{"id":1,"command":"remember","session":"s","args":{"name":"k","value":7}}"#.to_string();
    let (replies, out) = g.run(g.serve(&args), &[set]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(replies[0]["ok"], 7, "{replies:?}");
    // Another `serve` process on the same Redis reads what the first one's worker wrote.
    let get = r#"{"id":2,"command":"recall","session":"s","args":{"name":"k"}}"#.to_string();
    let (replies, out) = g.run(g.serve(&args), &[get]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(replies[0]["ok"], 7, "{replies:?}");
}
