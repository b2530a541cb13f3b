//! The example service, started as a process on loopback with real python3 workers and driven
//! over plain HTTP by reqwest: calls, the error statuses, an SSE stream, a client that goes away
//! mid-stream (the generator's `finally` observed), a session, `/metrics`, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../../../tests/src/procs.rs"]
#[allow(dead_code, unreachable_pub)]
mod procs;

/// The running service; killed (and its workers checked gone) on drop.
struct Service {
    child: Child,
    base: String,
    marker: String,
}

impl Service {
    #[allow(clippy::disallowed_methods)] // runs the example binary under test
    fn start() -> Service {
        let marker = procs::new_marker();
        let mut child = Command::new(env!("CARGO_BIN_EXE_snakepit-example-axum"))
            .args(["--listen", "127.0.0.1:0", "--size", "2", "--shutdown-grace-ms", "5000"])
            .env(procs::MARKER_VAR, &marker)
            .env("SNAKEPIT_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the service");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("the service prints its address");
        let base = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).to_owned();
        Service { child, base, marker }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        assert!(
            procs::wait_exit(pid.as_raw(), Instant::now() + Duration::from_secs(20)),
            "no exit on SIGTERM"
        );
        self.child.wait().expect("wait")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let left = procs::wait_none_left(&self.marker, Duration::from_secs(5));
        procs::kill_marked(&self.marker);
        if !left.is_empty() && !std::thread::panicking() {
            panic!("processes left behind: {left:?}");
        }
    }
}

async fn post(client: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = client.post(url).json(&body).send().await.expect("POST");
    let status = r.status().as_u16();
    (status, r.json().await.expect("a JSON answer"))
}

/// The SSE events of a whole response: (event, data) pairs.
fn sse_events(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ").or_else(|| line.strip_prefix("event:")) {
                    event = Some(e.trim().to_owned());
                } else if let Some(d) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) {
                    data.push_str(d);
                }
            }
            event.map(|e| (e, data))
        })
        .collect()
}

/// Waits up to `within` for `path` to exist (polling: a file has no change notification here).
async fn appears(path: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    path.exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_calls_streams_maps_errors_keeps_sessions_and_stops_on_sigterm() {
    let mut svc = Service::start();
    let client = reqwest::Client::new();

    let (status, v) = post(&client, &svc.url("/call/add"), json!({"a": 2, "b": 3})).await;
    assert_eq!((status, v), (200, json!(5)));

    // Errors: their JSON, with the status of their kind.
    let (status, v) = post(&client, &svc.url("/call/no_such_tool"), json!({})).await;
    assert_eq!((status, v["kind"].as_str()), (404, Some("unknown_command")), "{v}");
    let (status, v) = post(&client, &svc.url("/call/fail"), json!({"message": "nope"})).await;
    assert_eq!((status, v["kind"].as_str()), (422, Some("worker")), "{v}");
    let r = client.post(svc.url("/call/add")).body("{not json").send().await.expect("POST");
    assert_eq!(r.status().as_u16(), 400);

    // A stream: its items, then the end.
    let args = serde_json::to_string(&json!({"n": 3})).expect("json");
    let r = client.get(svc.url("/stream/count")).query(&[("args", args)]).send().await.expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap_or_default().starts_with("text/event-stream"));
    let events = sse_events(&r.text().await.expect("body"));
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds, ["chunk", "chunk", "chunk", "end"], "{events:?}");
    let first: Value = serde_json::from_str(&events[0].1).expect("a JSON chunk");
    assert_eq!(first["i"], 0, "{first}");
    // An unknown generator is a plain 404, not a stream.
    let r = client.get(svc.url("/stream/no_such_tool")).send().await.expect("GET");
    assert_eq!(r.status().as_u16(), 404);

    // A client that goes away mid-stream: the generator is cancelled and its `finally` runs.
    let dir = tempfile::tempdir().expect("tempdir");
    let done = dir.path().join("finally-ran");
    let args = serde_json::to_string(&json!({"n": 10_000_000, "path": done})).expect("json");
    let mut r = client.get(svc.url("/stream/count")).query(&[("args", args)]).send().await.expect("GET");
    let chunk = r.chunk().await.expect("read").expect("a first event");
    assert!(String::from_utf8_lossy(&chunk).contains("event: chunk"), "{chunk:?}");
    assert!(!done.exists());
    drop(r);
    assert!(appears(&done, Duration::from_secs(20)).await, "the generator's finally did not run");

    // A session: a variable set through one call is read by the next.
    let sid = [("x-snakepit-session", "s-1")];
    let r = client.post(svc.url("/call/remember")).header(sid[0].0, sid[0].1);
    let r = r.json(&json!({"name": "colour", "value": "teal"})).send().await.expect("POST");
    assert_eq!(r.status().as_u16(), 200);
    let r = client.post(svc.url("/call/recall")).header(sid[0].0, sid[0].1);
    let v: Value = r.json(&json!({"name": "colour"})).send().await.expect("POST").json().await.expect("json");
    assert_eq!(v, json!("teal"));

    // Metrics, labelled with the service's pool.
    let text = client.get(svc.url("/metrics")).send().await.expect("GET").text().await.expect("text");
    assert!(
        text.lines().any(|l| l == r#"snakepit_calls_total{pool="web",command="add",outcome="ok"} 1"#),
        "{text}"
    );

    // SIGTERM: the service drains and exits 0, leaving no worker (checked on drop).
    assert!(svc.terminate().success());
}
