//! The zygote start mode: one warm process that imported the worker's code once and forks a
//! fresh worker per request.
//!
//! ```text
//! host ──lifeline──▶ shepherd ─▶ zygote (subreaper; SOCK_SEQPACKET control socket at fd 0)
//!   │                              ├─ worker 0.0 (own group, PDEATHSIG, subreaper)
//!   └── pipes (sent with SCM_RIGHTS) ─┘ ...
//! ```
//!
//! The host creates each worker's three pipes, sends the worker's ends to the zygote with the
//! `fork` request, and then treats the pipes exactly like a cold worker's stdio: the same
//! transport, the same handshake, the same [`Worker`]. What differs is who can reap it: only
//! the zygote (its parent), so the zygote reports every worker's exit status on the control
//! socket, and the host kills a forked worker through a pidfd it opened and verified (the
//! worker's parent is the zygote, whose parent is its shepherd, our child) rather than a
//! lifeline. The zygote itself runs under a shepherd like any worker, so the host dying (even
//! by SIGKILL) still takes the zygote and every worker down. The zygote protocol is in
//! `docs/protocol.md`.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};
use serde::Deserialize;
use snakepit_core::{Adapter, Error, ExitInfo, SpawnContext, Transport, WorkerId, WorkerIo};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch};

use crate::process::{self, LogTarget, Proc, Shared, StartOptions, Worker};

/// The largest control packet the zygote sends (its messages are tiny).
const MAX_PACKET: usize = 64 * 1024;

/// What a `fork` request is answered with: the new worker's pid and its exit report.
type ForkReply = Result<(u32, oneshot::Receiver<ExitInfo>), String>;

#[derive(Default)]
struct Table {
    /// Fork requests waiting for their answer, by worker key.
    forks: HashMap<String, oneshot::Sender<ForkReply>>,
    /// Live forked workers waiting for their exit status, by pid.
    exits: HashMap<u32, oneshot::Sender<ExitInfo>>,
    /// False once the control socket is gone: no fork can be answered any more.
    open: bool,
}

impl Table {
    /// Routes one message from the zygote: a fork's answer to its waiting start, an exit report
    /// to its worker; anything else is ignored.
    fn apply(&mut self, msg: Msg) {
        match (msg.op.as_str(), msg.pid) {
            ("forked", Some(pid)) => {
                let (tx, rx) = oneshot::channel();
                self.exits.insert(pid, tx);
                if let Some(w) = msg.worker.and_then(|w| self.forks.remove(&w)) {
                    let _ = w.send(Ok((pid, rx)));
                }
                // An abandoned start: the worker sees EOF on its input and exits by itself.
            }
            ("exited", Some(pid)) => {
                let info = match (msg.code, msg.signal) {
                    (_, Some(s)) => ExitInfo::Signal(s),
                    (Some(c), None) => ExitInfo::Code(c),
                    _ => ExitInfo::Unknown,
                };
                if let Some(tx) = self.exits.remove(&pid) {
                    let _ = tx.send(info);
                }
            }
            ("fork_failed", _) => {
                if let Some(w) = msg.worker.and_then(|w| self.forks.remove(&w)) {
                    let _ = w.send(Err(msg.error.unwrap_or_else(|| "unknown reason".into())));
                }
            }
            (op, _) => tracing::debug!(op, "ignoring an unknown zygote message"),
        }
    }
}

/// A message from the zygote.
#[derive(Deserialize)]
struct Msg {
    op: String,
    #[serde(default)]
    worker: Option<String>,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    code: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(default)]
    error: Option<String>,
}

impl Msg {
    /// Parses one control packet.
    fn decode(packet: &[u8]) -> Result<Msg, serde_json::Error> {
        serde_json::from_slice(packet)
    }
}

/// The allocation bound of [`fuzz_zygote_packets`] per input byte.
#[doc(hidden)]
pub const ZYGOTE_K: usize = 16;

/// The constant part of [`fuzz_zygote_packets`]' allocation bound.
#[doc(hidden)]
pub const ZYGOTE_C: usize = 128 * 1024;

/// Entry point for the fuzz target `zygote_control` and its corpus replay test; not an API.
///
/// `bytes` is a sequence of control packets as the zygote would send them on its
/// `SOCK_SEQPACKET` socket, each written here as a 2-byte big-endian length and that many bytes
/// (a length past the end takes what is left; a packet is cut at the host's 64 KiB receive
/// buffer, as the socket would). Each is parsed and routed exactly as the host's reader does,
/// against a table with fork requests pending for workers `0.0` to `0.3`; the first malformed
/// packet stops it (the host then stops the zygote) with its typed error.
///
/// Allocation bound: peak live heap `<= ZYGOTE_K * N + ZYGOTE_C` for `N` input bytes (each
/// packet's message and table entry is within a small multiple of its own bytes; the constant is
/// the 64 KiB receive buffer and the table). Returns how many packets were routed.
#[doc(hidden)]
pub fn fuzz_zygote_packets(bytes: &[u8]) -> Result<usize, serde_json::Error> {
    let mut table = Table { open: true, ..Table::default() };
    let mut waiting = Vec::new();
    for slot in 0..4 {
        let (tx, rx) = oneshot::channel();
        table.forks.insert(key(WorkerId { slot, generation: 0 }), tx);
        waiting.push(rx);
    }
    let mut buf = vec![0u8; MAX_PACKET];
    let mut rest = bytes;
    let mut routed = 0;
    while let [hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (packet, next) = tail.split_at(len);
        rest = next;
        // The socket cuts a packet at the receive buffer's size.
        let n = packet.len().min(MAX_PACKET);
        buf[..n].copy_from_slice(&packet[..n]);
        table.apply(Msg::decode(&buf[..n])?);
        routed += 1;
    }
    for mut rx in waiting {
        if let Ok(Ok((_pid, mut exit))) = rx.try_recv() {
            let _ = exit.try_recv();
        }
    }
    Ok(routed)
}

/// A running zygote. Dropping it kills the zygote and, with it, every worker it forked.
pub struct Zygote {
    shared: Arc<Shared>,
    /// The zygote process's own pid (its parent is the shepherd, `shared.pid`).
    pid: u32,
    sock: Arc<AsyncFd<OwnedFd>>,
    table: Arc<Mutex<Table>>,
    closed: watch::Receiver<bool>,
    reader: tokio::task::JoinHandle<()>,
    /// Set when the host stops the zygote on purpose (its exit is then no news).
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Zygote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zygote").field("pid", &self.pid).finish_non_exhaustive()
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        self.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        self.reader.abort();
        self.shared.kill();
    }
}

/// A spawn failure with no OS error behind it.
fn spawn_error(worker: WorkerId, program: &str, reason: impl Into<String>) -> Error {
    Error::Spawn { worker, program: program.to_owned(), reason: reason.into(), source: None }
}

/// A spawn failure caused by an OS error (`nix::Error` converts into one, errno and all).
fn spawn_io_error(
    worker: WorkerId,
    program: &str,
    reason: impl Into<String>,
    source: impl Into<std::io::Error>,
) -> Error {
    Error::Spawn { worker, program: program.to_owned(), reason: reason.into(), source: Some(source.into()) }
}

fn lock(t: &Mutex<Table>) -> MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key a fork request and its answer share.
fn key(w: WorkerId) -> String {
    format!("{}.{}", w.slot, w.generation)
}

/// Receives one packet (cancel-safe).
async fn recv(sock: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    sock.async_io(Interest::READABLE, |fd| {
        socket::recv(fd.as_raw_fd(), buf, MsgFlags::empty()).map_err(std::io::Error::from)
    })
    .await
}

impl Zygote {
    /// Starts the adapter's zygote and waits until it has imported the worker code (within the
    /// adapter's handshake timeout). `opts.worker` is the worker whose start needs the zygote;
    /// start-up errors are reported for it.
    pub async fn start(adapter: &dyn Adapter, opts: &StartOptions) -> Result<Zygote, Error> {
        let worker = opts.worker;
        let ctx = SpawnContext::new(worker, opts.run_id.clone());
        let spec = adapter.zygote_spec(&ctx)?.ok_or_else(|| {
            spawn_error(worker, &adapter.name(), "this adapter has no zygote start mode (StartMode::Zygote)")
        })?;
        let program = spec.program.display().to_string();
        let (host_end, zygote_end) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|e| spawn_io_error(worker, &program, "cannot create the control socket", e))?;
        // O_NONBLOCK lives on the open file description; the zygote gets a blocking one.
        nix::fcntl::fcntl(&zygote_end, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()))
            .map_err(|e| spawn_io_error(worker, &program, "cannot set up the control socket", e))?;
        let (shared, mut child) = process::spawn_shepherded(
            &spec,
            opts,
            Stdio::from(zygote_end),
            Stdio::null(),
            LogTarget::Zygote,
            None,
            None,
        )?;
        let kill_on_fail = KillOnDrop(Some(shared.clone()));
        let sock = Arc::new(
            process::async_fd(host_end)
                .map_err(|e| spawn_io_error(worker, &program, "cannot watch the control socket", e))?,
        );
        let timeout = adapter.handshake_timeout();
        let mut buf = vec![0u8; MAX_PACKET];
        let ready = tokio::select! {
            r = tokio::time::timeout(timeout, recv(&sock, &mut buf)) => r,
            status = child.wait() => {
                let info = status.map(process::exit_info).unwrap_or(ExitInfo::Unknown);
                shared.set_exit(info);
                shared.wait_stderr().await;
                return Err(Error::StartupFailed { worker, exit: info, stderr_tail: shared.tail() });
            }
        };
        let fail = |shared: &Arc<Shared>, e: Error| {
            shared.kill();
            e
        };
        let n = match ready {
            Err(_) => {
                shared.kill();
                let _ = child.wait().await;
                shared.wait_stderr().await;
                return Err(Error::HandshakeTimeout { worker, after: timeout, stderr_tail: shared.tail() });
            }
            Ok(Err(e)) => return Err(fail(&shared, spawn_io_error(worker, &program, "control socket", e))),
            Ok(Ok(0)) => {
                let info = child.wait().await.map(process::exit_info).unwrap_or(ExitInfo::Unknown);
                shared.set_exit(info);
                shared.wait_stderr().await;
                return Err(Error::StartupFailed { worker, exit: info, stderr_tail: shared.tail() });
            }
            Ok(Ok(n)) => n,
        };
        let msg = Msg::decode(&buf[..n]).map_err(|e| {
            fail(
                &shared,
                Error::Protocol {
                    worker,
                    detail: "zygote: bad ready message".into(),
                    source: Some(Box::new(e)),
                },
            )
        })?;
        let pid = match (msg.op.as_str(), msg.pid) {
            ("ready", Some(pid)) if process::parent_of(pid) == Some(shared.pid) => pid,
            _ => {
                return Err(fail(
                    &shared,
                    Error::Protocol {
                        worker,
                        detail: format!("zygote: expected ready with its pid, got {:?}", msg.op),
                        source: None,
                    },
                ))
            }
        };
        tracing::debug!(pid, "zygote ready");
        let table = Arc::new(Mutex::new(Table { open: true, ..Table::default() }));
        let (closed_tx, closed) = watch::channel(false);
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = tokio::spawn(read_loop(
            sock.clone(),
            table.clone(),
            shared.clone(),
            child,
            closed_tx,
            buf,
            stopping.clone(),
        ));
        drop(kill_on_fail.disarm());
        Ok(Zygote { shared, pid, sock, table, closed, reader, stopping })
    }

    /// Whether the zygote is gone (or its control socket broke): start a new one.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// The zygote process's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last lines the zygote wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.shared.tail()
    }

    /// Forks a worker from the zygote and performs its handshake through `transport`, exactly
    /// as [`crate::start_worker`] does for a cold one.
    pub async fn start_worker(
        &self,
        adapter: &dyn Adapter,
        transport: &dyn Transport,
        opts: StartOptions,
    ) -> Result<Worker, Error> {
        let worker = opts.worker;
        let program = "zygote";
        let pipe = |what: &str| {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| spawn_io_error(worker, program, format!("cannot create the {what} pipe"), e))
        };
        let (in_r, in_w) = pipe("stdin")?;
        let (out_r, out_w) = pipe("stdout")?;
        let (err_r, err_w) = pipe("stderr")?;
        let k = key(worker);
        let (tx, rx) = oneshot::channel();
        {
            let mut t = lock(&self.table);
            if !t.open {
                return Err(spawn_error(worker, program, "the zygote is gone"));
            }
            t.forks.insert(k.clone(), tx);
        }
        let _forget = Forget { table: &self.table, key: &k };
        let mut env: HashMap<String, String> = opts
            .env
            .iter()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
            .collect();
        env.insert("SNAKEPIT_WORKER_ID".into(), worker.to_string());
        let body = serde_json::json!({"op": "fork", "worker": k, "env": env}).to_string();
        // The shared-memory arena, if any, goes along as a fourth descriptor.
        let arena = process::new_arena(&opts, transport);
        let mut fds = vec![in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
        fds.extend(arena.as_ref().map(|a| a.fd().as_raw_fd()));
        self.sock
            .async_io(Interest::WRITABLE, |fd| {
                socket::sendmsg::<UnixAddr>(
                    fd.as_raw_fd(),
                    &[IoSlice::new(body.as_bytes())],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            })
            .await
            .map_err(|e| spawn_io_error(worker, program, "cannot reach the zygote", e))?;
        // The zygote holds its own copies now; ours must go so EOFs are seen.
        drop((in_r, out_w, err_w));
        let (pid, exit) = match tokio::time::timeout(adapter.handshake_timeout(), rx).await {
            Ok(Ok(Ok(r))) => r,
            Ok(Ok(Err(reason))) => {
                return Err(spawn_error(worker, program, format!("fork failed: {reason}")))
            }
            Ok(Err(_)) => {
                return Err(spawn_error(
                    worker,
                    program,
                    format!("the zygote died; its last words:\n{}", self.shared.tail()),
                ))
            }
            Err(_) => {
                return Err(Error::HandshakeTimeout {
                    worker,
                    after: adapter.handshake_timeout(),
                    stderr_tail: self.shared.tail(),
                })
            }
        };
        // Checked before and after opening: the pidfd then pins the zygote's child for good.
        let Some(pidfd) = process::child_pidfd(pid, self.pid) else {
            return Err(Error::StartupFailed { worker, exit: ExitInfo::Unknown, stderr_tail: String::new() });
        };
        let watch_fd = pidfd.try_clone().ok().and_then(|fd| process::async_fd(fd).ok());
        let shared = Shared::new(worker, LogTarget::Worker, pid, None, Some(pidfd));
        let io_err = |e: std::io::Error| {
            shared.kill();
            spawn_io_error(worker, program, "cannot watch the worker's pipes", e)
        };
        let stderr = pipe::Receiver::from_owned_fd(err_r).map_err(io_err)?;
        let input = pipe::Sender::from_owned_fd(in_w).map_err(io_err)?;
        let output = pipe::Receiver::from_owned_fd(out_r).map_err(io_err)?;
        process::spawn_stderr_pump(stderr, shared.clone());
        let io = WorkerIo { worker, input: Box::new(input), output: Box::new(output) };
        let proc = Proc::Forked { exit, pidfd: watch_fd, done: None };
        // The forked worker finds the arena where the zygote received it, not at our number.
        let shm = process::shm_offer(arena, -1, &opts);
        process::handshake(shared, proc, io, adapter, transport, &opts, shm).await
    }

    /// Stops the zygote: asks it to exit, and kills it after `grace`. Its workers die with it,
    /// so stop them first.
    pub async fn shutdown(&self, grace: Duration) {
        self.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        let body = br#"{"op":"shutdown"}"#;
        let _ = self
            .sock
            .async_io(Interest::WRITABLE, |fd| {
                socket::send(fd.as_fd().as_raw_fd(), body, MsgFlags::MSG_NOSIGNAL)
                    .map_err(std::io::Error::from)
            })
            .await;
        let mut exit = self.shared.exit_watch();
        if tokio::time::timeout(grace, exit.wait_for(|e| e.is_some())).await.is_err() {
            self.shared.kill();
            let _ = exit.wait_for(|e| e.is_some()).await;
        }
    }
}

/// Reads the zygote's messages until its socket closes, routing fork answers and exit reports;
/// then reaps the zygote.
async fn read_loop(
    sock: Arc<AsyncFd<OwnedFd>>,
    table: Arc<Mutex<Table>>,
    shared: Arc<Shared>,
    mut child: tokio::process::Child,
    closed: watch::Sender<bool>,
    mut buf: Vec<u8>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    loop {
        let n = tokio::select! {
            r = recv(&sock, &mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("zygote control socket: {e}");
                    break;
                }
            },
            _ = child.wait() => break,
        };
        let msg = match Msg::decode(&buf[..n]) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("zygote sent a malformed message ({e}); stopping it");
                break;
            }
        };
        lock(&table).apply(msg);
    }
    {
        let mut t = lock(&table);
        t.open = false;
        t.forks.clear();
        t.exits.clear();
    }
    let _ = closed.send_replace(true);
    // Whatever ended the loop, the zygote is of no further use.
    shared.kill();
    let info = child.wait().await.map(process::exit_info).unwrap_or(ExitInfo::Unknown);
    if stopping.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::debug!("zygote stopped: {info}");
    } else {
        tracing::warn!("zygote exited unexpectedly: {info}");
    }
    shared.set_exit(info);
}

/// Removes a pending fork request when its start is over (answered or abandoned).
struct Forget<'a> {
    table: &'a Mutex<Table>,
    key: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.table).forks.remove(self.key);
    }
}

/// Kills the zygote when a start-up is abandoned half-way.
struct KillOnDrop(Option<Arc<Shared>>);

impl KillOnDrop {
    fn disarm(mut self) -> Self {
        self.0 = None;
        self
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.kill();
        }
    }
}
