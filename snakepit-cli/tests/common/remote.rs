//! What the remote-worker tests share: certificates made at test time ([`Certs`]), a running
//! `snakepit agent` ([`AgentProc`]), a network namespace standing in for another host
//! ([`Netns`]), and a TCP relay that can stop forwarding without closing anything ([`Relay`]),
//! the fallback where namespaces cannot be made.
//!
//! A partition is simulated so that packets vanish and nothing is refused: a namespace's link
//! goes down with the host side's neighbour entry pinned (no ARP failure, so no "no route to
//! host"), and a paused relay keeps every socket open and moves no byte.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::procs;

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// Certificates for mutual TLS, made with rcgen when the test starts and written as PEM files
/// into one directory:
///
/// | file | what |
/// |---|---|
/// | `ca.pem` | the CA both sides trust |
/// | `agent.pem`, `agent-key.pem` | the agent's server certificate (by the CA; `ServerAuth`; IP SANs for the given addresses, DNS SAN `localhost`) |
/// | `client.pem`, `client-key.pem` | the front end's client certificate (by the CA; `ClientAuth`; CN `front-end`) |
/// | `wrong-ca.pem` | another CA, which nobody is told to trust |
/// | `wrong-client.pem`, `wrong-client-key.pem` | a client certificate by the other CA |
/// | `expired-client.pem`, `expired-client-key.pem` | a client certificate by the right CA, valid 2020-01-01 to 2021-01-01 only |
///
/// Private keys are written with mode 0600.
#[derive(Debug, Clone)]
pub(crate) struct Certs {
    dir: PathBuf,
}

/// A CA: its certificate in PEM and what signs with it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A self-signed CA called `name`.
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA certificate params");
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2200, 1, 1);
        let key = KeyPair::generate().expect("generate the CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA certificate");
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A leaf certificate signed by this CA; returns (certificate PEM, key PEM).
    fn sign(&self, params: &CertificateParams) -> (String, String) {
        let key = KeyPair::generate().expect("generate a leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign a leaf certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// A distinguished name with only a common name.
fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Leaf parameters: `common_name`, `sans`, one extended key usage, valid 2000 to 2200.
fn leaf(common_name: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf certificate params");
    params.distinguished_name = dn(common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2200, 1, 1);
    params
}

/// Writes `text` to a new file `path` with permissions `mode`.
fn write_file(path: &Path, text: &str, mode: u32) {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(text.as_bytes()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

impl Certs {
    /// Makes every certificate and writes it into `dir` (which must exist). The agent's
    /// certificate names each of `agent_ips` (and `localhost`), so a client reaching it at any
    /// of them (directly, through a [`Relay`], or in a [`Netns`]) can verify it.
    pub(crate) fn new(dir: &Path, agent_ips: &[IpAddr]) -> Certs {
        let ca = Ca::new("snakepit test CA");
        let wrong_ca = Ca::new("snakepit wrong CA");
        let certs = Certs { dir: dir.to_path_buf() };

        write_file(&certs.ca(), &ca.pem, 0o644);
        write_file(&certs.wrong_ca(), &wrong_ca.pem, 0o644);

        let mut sans = vec![SanType::DnsName("localhost".try_into().expect("localhost is a DNS name"))];
        sans.extend(agent_ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let (cert, key) = ca.sign(&leaf("snakepit agent", sans, ExtendedKeyUsagePurpose::ServerAuth));
        write_file(&certs.agent_cert(), &cert, 0o644);
        write_file(&certs.agent_key(), &key, 0o600);

        let client = leaf("front-end", Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
        let (cert, key) = ca.sign(&client);
        write_file(&certs.client_cert(), &cert, 0o644);
        write_file(&certs.client_key(), &key, 0o600);

        let (cert, key) = wrong_ca.sign(&client);
        write_file(&certs.wrong_client_cert(), &cert, 0o644);
        write_file(&certs.wrong_client_key(), &key, 0o600);

        let mut expired = client;
        expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let (cert, key) = ca.sign(&expired);
        write_file(&certs.expired_client_cert(), &cert, 0o644);
        write_file(&certs.expired_client_key(), &key, 0o600);

        certs
    }

    /// The directory the files are in.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ca.pem`: the CA both sides trust.
    pub(crate) fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `agent.pem`: the agent's server certificate.
    pub(crate) fn agent_cert(&self) -> PathBuf {
        self.dir.join("agent.pem")
    }

    /// `agent-key.pem`: the agent's private key.
    pub(crate) fn agent_key(&self) -> PathBuf {
        self.dir.join("agent-key.pem")
    }

    /// `client.pem`: the front end's client certificate (CN `front-end`).
    pub(crate) fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    /// `client-key.pem`: the front end's private key.
    pub(crate) fn client_key(&self) -> PathBuf {
        self.dir.join("client-key.pem")
    }

    /// `wrong-client.pem`: a client certificate signed by the untrusted CA.
    pub(crate) fn wrong_client_cert(&self) -> PathBuf {
        self.dir.join("wrong-client.pem")
    }

    /// `wrong-client-key.pem`: the key of [`wrong_client_cert`](Self::wrong_client_cert).
    pub(crate) fn wrong_client_key(&self) -> PathBuf {
        self.dir.join("wrong-client-key.pem")
    }

    /// `expired-client.pem`: a client certificate by the trusted CA that expired in 2021.
    pub(crate) fn expired_client_cert(&self) -> PathBuf {
        self.dir.join("expired-client.pem")
    }

    /// `expired-client-key.pem`: the key of [`expired_client_cert`](Self::expired_client_cert).
    pub(crate) fn expired_client_key(&self) -> PathBuf {
        self.dir.join("expired-client-key.pem")
    }

    /// `wrong-ca.pem`: the CA nobody trusts (it signed the wrong client).
    pub(crate) fn wrong_ca(&self) -> PathBuf {
        self.dir.join("wrong-ca.pem")
    }

    /// The agent's TLS arguments:
    /// `--tls-cert agent.pem --tls-key agent-key.pem --tls-client-ca ca.pem`.
    pub(crate) fn agent_args(&self) -> Vec<OsString> {
        vec![
            "--tls-cert".into(),
            self.agent_cert().into(),
            "--tls-key".into(),
            self.agent_key().into(),
            "--tls-client-ca".into(),
            self.ca().into(),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// The agent process
// ---------------------------------------------------------------------------------------------

/// What the agent prints as its first stdout line, followed by the address it listens on.
pub(crate) const LISTENING: &str = "snakepit agent listening on ";

/// The binary under test, chosen as [`super::snakepit`] chooses it.
fn snakepit_bin() -> OsString {
    std::env::var_os("SNAKEPIT_CLI_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_snakepit").into())
}

/// A running `snakepit agent`: started, its listening address read from its first stdout line,
/// the rest of its stdout drained (and kept) by a thread. Dropping it SIGKILLs and reaps the
/// process if it is still there.
#[derive(Debug)]
pub(crate) struct AgentProc {
    child: Child,
    addr: SocketAddr,
    /// Set once the process has been reaped; a pid is signalled only before that.
    status: Option<ExitStatus>,
    /// Every stdout line after the first.
    stdout: Arc<Mutex<Vec<String>>>,
}

impl AgentProc {
    /// Starts `cmd` (a prepared `snakepit agent …` command) with stdout piped (stderr as the caller set it,
    /// inherited by default), and waits up to `timeout` for its first stdout line, which must be
    /// `snakepit agent listening on ADDR`. Panics otherwise (with what was read and, if the
    /// process died, its exit status), leaving no process behind.
    pub(crate) fn start(mut cmd: Command, timeout: Duration) -> AgentProc {
        cmd.stdout(Stdio::piped());
        // If the test process is killed (a nextest timeout), its agents go with it (and their
        // workers with them, through their shepherds). The signal follows the spawning
        // *thread*: start agents from the test's body, not from a task or `spawn_blocking`.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let out = child.stdout.take().expect("the agent's stdout is piped");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<std::io::Result<String>>();
        let kept = Arc::clone(&stdout);
        std::thread::Builder::new()
            .name(format!("agent-{}-stdout", child.id()))
            .spawn(move || drain_stdout(out, tx, kept))
            .expect("spawn the agent's stdout thread");

        let first = match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let pid = child.id();
                let status = kill_and_reap(&mut child);
                panic!("the agent (pid {pid}) printed no line within {timeout:?} (killed: {status})");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(std::io::Error::other("the stdout thread ended without a line"))
            }
        };
        let line = match first {
            Ok(line) if !line.is_empty() => line,
            Ok(_) => {
                let status = exit_status_within(&mut child, Duration::from_secs(5));
                panic!("the agent closed stdout without printing its address; {status}");
            }
            Err(e) => {
                let status = kill_and_reap(&mut child);
                panic!("reading the agent's first stdout line: {e} (killed: {status})");
            }
        };
        let Some(addr) =
            line.trim_end().strip_prefix(LISTENING).and_then(|a| a.trim().parse::<SocketAddr>().ok())
        else {
            let status = kill_and_reap(&mut child);
            panic!("the agent's first stdout line is {line:?}, not `{LISTENING}ADDR` (killed: {status})");
        };
        AgentProc { child, addr, status: None, stdout }
    }

    /// `snakepit agent ARGS…` as [`super::snakepit`]`(marker)` builds it, started with
    /// [`start`](Self::start).
    pub(crate) fn start_with_args<I, S>(marker: &str, args: I, timeout: Duration) -> AgentProc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = super::snakepit(marker);
        cmd.arg("agent").args(args);
        AgentProc::start(cmd, timeout)
    }

    /// `snakepit agent ARGS…` inside `netns` (`ip netns exec NAME BIN agent ARGS…`, which execs,
    /// so the pid is the agent's), with `marker` on it and warnings only on stderr, started with
    /// [`start`](Self::start).
    #[allow(clippy::disallowed_methods)] // runs the CLI binary under test inside a namespace
    pub(crate) fn start_in<I, S>(netns: &Netns, marker: &str, args: I, timeout: Duration) -> AgentProc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns.name()])
            .arg(snakepit_bin())
            .arg("agent")
            .args(args)
            .env(procs::MARKER_VAR, marker)
            .env("SNAKEPIT_LOG", "warn");
        AgentProc::start(cmd, timeout)
    }

    /// The address the agent said it listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The agent's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `https://ADDR`.
    pub(crate) fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `http://ADDR` (plain text: what a TLS agent must refuse).
    pub(crate) fn plain_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every stdout line the agent printed after the first, so far.
    pub(crate) fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Sends `signal` (e.g. SIGSTOP / SIGCONT to make the agent hang and come back). Does
    /// nothing once the process has been reaped (its pid may belong to another by then).
    pub(crate) fn signal(&self, signal: Signal) {
        if self.status.is_some() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, signal)
            .unwrap_or_else(|e| panic!("send {signal} to the agent (pid {pid}): {e}"));
    }

    /// Sends SIGTERM (a graceful stop); see [`wait_exit`](Self::wait_exit).
    pub(crate) fn sigterm(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// SIGKILLs the agent (if it has not been reaped yet) and reaps it.
    pub(crate) fn kill(&mut self) {
        if self.status.is_none() {
            self.status = Some(match self.child.try_wait() {
                Ok(Some(s)) => s,
                _ => {
                    let _ = self.child.kill();
                    self.child.wait().expect("reap the killed agent")
                }
            });
        }
    }

    /// Waits up to `timeout` for the agent to exit; its status, or `None` if it is still
    /// running.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = poll_exit(&mut self.child, timeout);
        }
        self.status
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The agent's stdout thread: sends the first line (`""` at EOF) on `first`, then keeps
/// every further line in `kept` until EOF, so the agent never blocks on a full pipe.
fn drain_stdout(
    out: std::process::ChildStdout,
    first: mpsc::Sender<std::io::Result<String>>,
    kept: Arc<Mutex<Vec<String>>>,
) {
    let mut reader = BufReader::new(out);
    let mut buf = Vec::new();
    let r = reader.read_until(b'\n', &mut buf).map(|_| String::from_utf8_lossy(&buf).into_owned());
    let failed = r.is_err();
    let _ = first.send(r);
    if failed {
        return;
    }
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_owned();
                kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
            }
        }
    }
}

/// Polls `child` for up to `timeout`; its exit status if it exited.
fn poll_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("try_wait on the agent (pid {}): {e}", child.id()),
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

/// SIGKILLs and reaps `child`; its exit status, described.
fn kill_and_reap(child: &mut Child) -> String {
    let _ = child.kill();
    match child.wait() {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}

/// The exit status of a `child` that should be exiting, described; SIGKILLed if it has not
/// exited within `timeout`.
fn exit_status_within(child: &mut Child, timeout: Duration) -> String {
    match poll_exit(child, timeout) {
        Some(s) => format!("it exited ({s})"),
        None => format!("it was still running after {timeout:?} (killed: {})", kill_and_reap(child)),
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------------------

/// A network namespace standing in for another host: `sp-<pid>-<n>`, joined to the root
/// namespace by a veth pair (`spv<pid%10000>h<n>` on the host, `spv<pid%10000>n<n>` inside) on
/// `10.213.<pid%250>.<4n>/30` (host `.4n+1`, namespace `.4n+2`); `lo` up inside; no default
/// route, nothing routed anywhere else. Dropping it deletes the namespace and the pair, also
/// when the test fails.
///
/// The host side's neighbour entry for the namespace address is permanent, so that when the
/// link is down ([`partition`](Self::partition)) packets vanish instead of an ARP failure
/// turning into "no route to host".
///
/// Within one test process, two live `Netns` with the same `n` cannot exist: a second
/// [`new`](Self::new) waits (up to two minutes) for the first to be dropped. Across processes
/// the nextest group `netns` runs the `netns_*` tests one at a time.
#[derive(Debug)]
pub(crate) struct Netns {
    name: String,
    n: u8,
    host_if: String,
    ns_if: String,
    host_ip: Ipv4Addr,
    agent_ip: Ipv4Addr,
}

/// The `n`s of this process's live namespaces.
static NETNS_IN_USE: (Mutex<BTreeSet<u8>>, Condvar) = (Mutex::new(BTreeSet::new()), Condvar::new());

/// Runs `ip ARGS…`; its output (status, stdout, stderr), or `None` if it could not be run.
#[allow(clippy::disallowed_methods)] // `ip`: a system tool that sets up the test's network
fn run_ip(args: &[&str]) -> Option<std::process::Output> {
    Command::new("ip").args(args).stdin(Stdio::null()).output().ok()
}

/// Runs `ip ARGS…`; whether it succeeded. Never panics.
fn ip_quiet(args: &[&str]) -> bool {
    run_ip(args).is_some_and(|o| o.status.success())
}

/// Runs `ip ARGS…`; panics with its stderr unless it succeeded.
fn ip_checked(args: &[&str]) {
    match run_ip(args) {
        Some(o) if o.status.success() => {}
        Some(o) => panic!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        None => panic!("`ip {}` could not be run (is iproute2 installed?)", args.join(" ")),
    }
}

impl Netns {
    /// Whether namespaces can be made here: running as root, and a probe namespace (with a
    /// veth pair moved into it) can be added and deleted. Asked once per process.
    pub(crate) fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("network namespaces unavailable: not running as root");
                return false;
            }
            let pid = std::process::id();
            let name = format!("sp-{pid}-probe");
            let (a, b) = (format!("spv{}pa", pid % 10000), format!("spv{}pb", pid % 10000));
            ip_quiet(&["link", "del", &a]);
            ip_quiet(&["netns", "del", &name]);
            if !ip_quiet(&["netns", "add", &name]) {
                eprintln!("network namespaces unavailable: `ip netns add` failed");
                return false;
            }
            let veth = ip_quiet(&["link", "add", &a, "type", "veth", "peer", "name", &b])
                && ip_quiet(&["link", "set", "dev", &b, "netns", &name]);
            ip_quiet(&["link", "del", &a]);
            let deleted = ip_quiet(&["netns", "del", &name]);
            if !veth {
                eprintln!("network namespaces unavailable: a veth pair cannot be made");
            } else if !deleted {
                eprintln!("network namespaces unavailable: `ip netns del` failed");
            }
            veth && deleted
        })
    }

    /// Namespace number `n` (0 to 63) of this process, set up as described on [`Netns`];
    /// leftovers of the same names are deleted first. Panics (with `ip`'s stderr) if any step
    /// fails, after undoing what was done.
    pub(crate) fn new(n: u8) -> Netns {
        assert!(n <= 63, "Netns::new({n}): n must be at most 63 (4n+2 must fit in an octet)");
        {
            let (lock, freed) = &NETNS_IN_USE;
            let used = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (mut used, waited) = freed
                .wait_timeout_while(used, Duration::from_secs(120), |u| u.contains(&n))
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            assert!(
                !waited.timed_out() || !used.contains(&n),
                "Netns {n} of this process is still in use after two minutes"
            );
            used.insert(n);
        }
        let pid = std::process::id();
        let subnet = (pid % 250) as u8;
        // From here on, Drop undoes whatever was done, also if a step panics.
        let ns = Netns {
            name: format!("sp-{pid}-{n}"),
            n,
            host_if: format!("spv{}h{n}", pid % 10000),
            ns_if: format!("spv{}n{n}", pid % 10000),
            host_ip: Ipv4Addr::new(10, 213, subnet, 4 * n + 1),
            agent_ip: Ipv4Addr::new(10, 213, subnet, 4 * n + 2),
        };
        ns.remove();
        sweep_stale();
        // An interface left by a killed run of a process with the same pid % 250 may still
        // hold this subnet: it is nobody's now (ours were just removed).
        if let Some(o) = run_ip(&[
            "-o",
            "-4",
            "addr",
            "show",
            "to",
            &format!("{}/30", Ipv4Addr::new(10, 213, subnet, 4 * n)),
        ]) {
            let text = String::from_utf8_lossy(&o.stdout);
            let devs = text.lines().filter_map(|l| l.split_whitespace().nth(1));
            // Only the tests' own veths (`spv…`): never an interface of the machine's network.
            for dev in devs.map(|d| d.trim_end_matches(':')).filter(|d| d.starts_with("spv")) {
                let dev = dev.split('@').next().unwrap_or(dev);
                let _ = ip_quiet(&["link", "del", "dev", dev]);
            }
        }

        let ns_mac = format!("02:73:70:{subnet:02x}:{n:02x}:02");
        let host_cidr = format!("{}/30", ns.host_ip);
        let agent_cidr = format!("{}/30", ns.agent_ip);
        let agent_ip = ns.agent_ip.to_string();
        let (name, host_if, ns_if) = (ns.name.as_str(), ns.host_if.as_str(), ns.ns_if.as_str());
        ip_checked(&["netns", "add", name]);
        ip_checked(&["link", "add", host_if, "type", "veth", "peer", "name", ns_if]);
        ip_checked(&["link", "set", "dev", ns_if, "address", &ns_mac]);
        ip_checked(&["link", "set", "dev", ns_if, "netns", name]);
        ip_checked(&["addr", "add", &host_cidr, "dev", host_if]);
        ip_checked(&["link", "set", "dev", host_if, "up"]);
        ip_checked(&["neigh", "replace", &agent_ip, "lladdr", &ns_mac, "dev", host_if, "nud", "permanent"]);
        ip_checked(&["-n", name, "addr", "add", &agent_cidr, "dev", ns_if]);
        ip_checked(&["-n", name, "link", "set", "dev", ns_if, "up"]);
        ip_checked(&["-n", name, "link", "set", "dev", "lo", "up"]);
        ns
    }

    /// The namespace's name (for `ip netns exec`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The namespace side's address: where an agent inside is reached.
    pub(crate) fn agent_ip(&self) -> IpAddr {
        IpAddr::V4(self.agent_ip)
    }

    /// The host side's address (in the root namespace).
    pub(crate) fn host_ip(&self) -> IpAddr {
        IpAddr::V4(self.host_ip)
    }

    /// The veth end inside the namespace.
    pub(crate) fn ns_if(&self) -> &str {
        &self.ns_if
    }

    /// The veth end in the root namespace.
    pub(crate) fn host_if(&self) -> &str {
        &self.host_if
    }

    /// Cuts the namespace off: its veth end goes down, so packets either way vanish (nothing is
    /// refused or reset; connections stay open and time out on their own).
    pub(crate) fn partition(&self) {
        ip_checked(&["-n", &self.name, "link", "set", "dev", &self.ns_if, "down"]);
    }

    /// Undoes [`partition`](Self::partition): the veth end comes up again (with its address and
    /// route).
    pub(crate) fn heal(&self) {
        ip_checked(&["-n", &self.name, "link", "set", "dev", &self.ns_if, "up"]);
    }

    /// Deletes the pair and the namespace, ignoring failures (they may not exist).
    fn remove(&self) {
        // Deleting the host end destroys the pair at once; deleting the namespace alone would
        // leave the host end until the kernel gets round to the namespace.
        ip_quiet(&["link", "del", &self.host_if]);
        ip_quiet(&["netns", "del", &self.name]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
        let (lock, freed) = &NETNS_IN_USE;
        lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.n);
        freed.notify_all();
    }
}

// ---------------------------------------------------------------------------------------------
// The relay
// ---------------------------------------------------------------------------------------------

/// A TCP relay owned by the test, listening on `LISTEN_IP:0` and forwarding each connection to
/// a target: the partition where namespaces are unavailable. [`pause`](Self::pause) stops
/// every byte (and every FIN) in both directions on all connections, current and future, while
/// every socket stays open and new connections are still accepted (and not yet connected on
/// to the target); [`resume`](Self::resume) lets them flow again.
///
/// Its tasks run on the tokio runtime that [`start`](Self::start) is called on; dropping the
/// relay aborts them, which closes every socket.
#[derive(Debug)]
pub(crate) struct Relay {
    addr: SocketAddr,
    paused: watch::Sender<bool>,
    accepted: Arc<AtomicUsize>,
    /// The accept task; it owns the connections' tasks, which go when it goes.
    tasks: JoinSet<()>,
}

impl Relay {
    /// Binds `listen_ip:0` and starts relaying to `target`. Must be called within a tokio
    /// runtime.
    pub(crate) async fn start(listen_ip: Ipv4Addr, target: SocketAddr) -> Relay {
        let listener = TcpListener::bind(SocketAddr::from((listen_ip, 0)))
            .await
            .unwrap_or_else(|e| panic!("bind the relay on {listen_ip}:0: {e}"));
        let addr = listener.local_addr().expect("the relay's local address");
        let (paused, rx) = watch::channel(false);
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, target, rx, Arc::clone(&accepted)));
        Relay { addr, paused, accepted, tasks }
    }

    /// The address clients connect to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops moving bytes, both ways, on every connection (without closing any).
    pub(crate) fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Moves bytes again.
    pub(crate) fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Whether the relay is paused.
    pub(crate) fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// How many connections the relay has accepted so far.
    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Accepts connections and relays each in a task of its own; those tasks are in a `JoinSet`
/// owned by this future, so aborting it aborts them too.
async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    paused: watch::Receiver<bool>,
    accepted: Arc<AtomicUsize>,
) {
    let mut conns = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                conns.spawn(relay_conn(client, target, paused.clone()));
            }
            // E.g. out of descriptors: try again shortly rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
        while conns.try_join_next().is_some() {}
    }
}

/// Waits until the relay is not paused; false if the relay is gone.
async fn unpaused(paused: &mut watch::Receiver<bool>) -> bool {
    paused.wait_for(|p| !*p).await.is_ok()
}

/// One relayed connection: connects to `target` once not paused, then copies both ways.
async fn relay_conn(client: TcpStream, target: SocketAddr, mut paused: watch::Receiver<bool>) {
    if !unpaused(&mut paused).await {
        return;
    }
    let Ok(upstream) = TcpStream::connect(target).await else {
        return; // dropping the client's socket closes it: as good as refused
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    tokio::join!(
        pump(client_read, upstream_write, paused.clone()),
        pump(upstream_read, client_write, paused),
    );
}

/// Copies `from` to `to`, waiting before each read and each write (and before passing on the
/// end of the stream) while the relay is paused.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut paused: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !unpaused(&mut paused).await {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !unpaused(&mut paused).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if unpaused(&mut paused).await {
        let _ = to.shutdown().await;
    }
}

/// Deletes the `sp-<pid>-<n>` namespaces of test processes that are gone (a run killed before
/// its guards could), once per process.
fn sweep_stale() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Some(o) = run_ip(&["netns", "list"]) else { return };
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else { continue };
            let Some(pid) = name.strip_prefix("sp-").and_then(|r| r.split('-').next()) else { continue };
            if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = ip_quiet(&["netns", "del", name]);
            }
        }
    });
}
