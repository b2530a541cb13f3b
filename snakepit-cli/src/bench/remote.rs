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

/// The same hop with mutual TLS.
pub(super) const SEQ_TLS: &str = "remote 1 worker seq 64 B, TLS (agent on loopback)";

/// A CA, the agent's certificate (for 127.0.0.1) and a client certificate, made now, in `dir`:
/// `(ca, agent cert, agent key, client cert, client key)`.
fn certs(dir: &std::path::Path) -> Result<[PathBuf; 5], rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |sans: Vec<SanType>, usage| -> Result<(String, String), rcgen::Error> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        Ok((p.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
    };
    let ip = SanType::IpAddress(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let (agent, agent_key) = leaf(vec![ip], ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client, client_key) = leaf(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?;
    let files = ["ca.pem", "agent.pem", "agent-key.pem", "client.pem", "client-key.pem"].map(|n| dir.join(n));
    for (path, text) in files.iter().zip([ca_pem, agent, agent_key, client, client_key]) {
        std::fs::write(path, text).map_err(|e| rcgen::Error::PemError(e.to_string()))?;
    }
    Ok(files)
}

/// Starts `snakepit agent` with `size` showcase workers on a free loopback port (plaintext, or
/// with mutual TLS from `tls`' files).
#[allow(clippy::disallowed_methods)] // the bench's agents: this binary, which supervises its own workers
pub(super) fn agent(python: &str, size: usize, tls: Option<&[PathBuf; 5]>) -> Option<AgentProc> {
    use std::io::BufRead;
    let exe = std::env::current_exe().ok()?;
    let mut cmd = Command::new(exe);
    cmd.args(["agent", "--listen", "127.0.0.1:0", "--module", "snakepit_bridge.showcase"]);
    match tls {
        Some([ca, cert, key, _, _]) => {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key).arg("--tls-client-ca").arg(ca);
        }
        None => {
            cmd.arg("--insecure-plaintext");
        }
    }
    let child = cmd
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
        Some(a) => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            Some(AgentProc { url: format!("{scheme}://{}", a.trim()), child })
        }
        None => {
            eprintln!("bench: no remote rows (the agent did not start: {line:?})");
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

/// A front-end pool on `agents` (with this client certificate for TLS agents).
pub(super) async fn front(agents: &[&AgentProc], tls: Option<&[PathBuf; 5]>) -> Option<Arc<Pool>> {
    let urls: Vec<String> = agents.iter().map(|a| a.url.clone()).collect();
    let mut opts = snakepit::RemoteOptions::new(urls).insecure_plaintext(true);
    if let Some([ca, _, _, cert, key]) = tls {
        opts = opts.tls(snakepit::ClientTls::new(ca, cert, key));
    }
    let built = Pool::builder().heartbeat(None).remote_options(opts).build().await;
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
    pub(super) seq_tls: Option<Arc<Pool>>,
    pub(super) one: Option<Arc<Pool>>,
    pub(super) two: Option<Arc<Pool>>,
    /// Last: dropped after the pools on them.
    _agents: Vec<AgentProc>,
    _certs: Option<tempfile::TempDir>,
}

pub(super) async fn pools(python: &str, seq: bool, seq_tls: bool, scale: bool) -> Option<Pools> {
    let mut agents = Vec::new();
    let mut out = Pools { seq: None, seq_tls: None, one: None, two: None, _agents: Vec::new(), _certs: None };
    if seq {
        let a = agent(python, 1, None)?;
        out.seq = front(&[&a], None).await;
        agents.push(a);
    }
    if seq_tls {
        let dir = tempfile::tempdir().ok()?;
        match certs(dir.path()) {
            Ok(files) => {
                if let Some(a) = agent(python, 1, Some(&files)) {
                    out.seq_tls = front(&[&a], Some(&files)).await;
                    agents.push(a);
                }
            }
            Err(e) => eprintln!("bench: no TLS row (cannot make certificates: {e})"),
        }
        out._certs = Some(dir);
    }
    if scale {
        let (a, b) = (agent(python, AGENT_WORKERS, None)?, agent(python, AGENT_WORKERS, None)?);
        out.one = front(&[&a], None).await;
        out.two = front(&[&a, &b], None).await;
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
