//! The remote rows: calls through `snakepit agent` processes on loopback (this binary's own
//! `agent` subcommand, plaintext: `--insecure-plaintext`), beside the local stdio pool.
//!
//! * `remote 1 worker seq 64 B (agent on loopback)`: the same echo as `stdio 1 worker seq
//!   64 B`, through one agent with one stdio worker: the difference of the two p50s is what the
//!   remote hop adds.
//! * `remote N agents, sleep 20 ms, 16 callers`: calls/s of a sleep-bound tool with one agent,
//!   then two, of 4 workers each: throughput scales with the agents.

use super::*;

/// One agent process, killed on drop (its workers' shepherds then kill them).
pub(super) struct AgentProc {
    child: std::process::Child,
    url: String,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Workers per agent in the throughput rows.
pub(super) const AGENT_WORKERS: usize = 4;

/// The names of the rows, for `--only`.
pub(super) fn rows(agents: usize) -> String {
    format!("remote {agents} agent{}, sleep 20 ms, 16 callers", if agents == 1 { "" } else { "s" })
}

/// The hop row's name.
pub(super) const SEQ: &str = "remote 1 worker seq 64 B (agent on loopback)";

/// Starts `snakepit agent` with `size` showcase workers on a free loopback port.
#[allow(clippy::disallowed_methods)] // the bench's agents: this binary, which supervises its own workers
pub(super) fn agent(python: &str, size: usize) -> Option<AgentProc> {
    use std::io::BufRead;
    let exe = std::env::current_exe().ok()?;
    let child = Command::new(exe)
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
            "--module",
            "snakepit_bridge.showcase",
        ])
        .args(["--size", &size.to_string(), "--python", python])
        .env("SNAKEPIT_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: no remote rows (cannot start an agent: {e})");
            return None;
        }
    };
    let stdout = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok);
        let _ = tx.send(first);
        for _ in lines {} // keep draining
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).ok().flatten();
    let addr = line.as_deref().and_then(|l| l.strip_prefix("snakepit agent listening on "));
    match addr {
        Some(a) => Some(AgentProc { url: format!("http://{}", a.trim()), child }),
        None => {
            eprintln!("bench: no remote rows (the agent did not start: {line:?})");
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

/// A front-end pool on `agents`.
pub(super) async fn front(agents: &[&AgentProc]) -> Option<Arc<Pool>> {
    let urls: Vec<String> = agents.iter().map(|a| a.url.clone()).collect();
    let built = Pool::builder()
        .heartbeat(None)
        .remote_options(snakepit::RemoteOptions::new(urls).insecure_plaintext(true))
        .build()
        .await;
    match built {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            eprintln!("bench: no remote rows: {e}");
            None
        }
    }
}

/// What the remote rows need: a one-worker agent and its front end, two throughput agents and
/// a front end on one and on both.
pub(super) struct Pools {
    pub(super) seq: Option<Arc<Pool>>,
    pub(super) one: Option<Arc<Pool>>,
    pub(super) two: Option<Arc<Pool>>,
    /// Last: dropped after the pools on them.
    _agents: Vec<AgentProc>,
}

pub(super) async fn pools(python: &str, seq: bool, scale: bool) -> Option<Pools> {
    let mut agents = Vec::new();
    let mut out = Pools { seq: None, one: None, two: None, _agents: Vec::new() };
    if seq {
        let a = agent(python, 1)?;
        out.seq = front(&[&a]).await;
        agents.push(a);
    }
    if scale {
        let (a, b) = (agent(python, AGENT_WORKERS)?, agent(python, AGENT_WORKERS)?);
        out.one = front(&[&a]).await;
        out.two = front(&[&a, &b]).await;
        agents.push(a);
        agents.push(b);
    }
    out._agents = agents;
    Some(out)
}

/// `calls` calls of a 20 ms sleep from 16 callers: calls per second.
pub(super) async fn sleep_rate(pool: &Arc<Pool>, calls: u64) -> Sample {
    callers_run(pool, "sleep", Payload::from(json!({"ms": 20})), calls, 16).await
}
