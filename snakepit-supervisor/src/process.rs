//! Spawning, watching and stopping one worker process.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use snakepit_core::{
    Adapter, Connection, Error, ExitInfo, Hello, Ready, SpawnContext, Transport, WorkerId, WorkerIo,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::watch;

const TAIL_LINES: usize = 40;
const TAIL_BYTES: usize = 8 * 1024;
/// How long to wait for a dead worker's stderr to drain before reporting its tail.
const STDERR_DRAIN: Duration = Duration::from_millis(300);

/// Everything [`start_worker`] needs besides the adapter and the transport.
#[derive(Clone)]
#[non_exhaustive]
pub struct StartOptions {
    /// The worker to start.
    pub worker: WorkerId,
    /// The pool's run id (exported as `SNAKEPIT_RUN_ID`).
    pub run_id: String,
    /// Extra environment set on top of the adapter's.
    pub env: Vec<(OsString, OsString)>,
    /// Largest frame body (sent in `hello`).
    pub max_frame: usize,
    /// Fault injection: wait this long before the handshake (inside the handshake timeout).
    pub handshake_delay: Option<Duration>,
    /// Answers the worker's calls to the host.
    pub host: Option<Arc<dyn snakepit_core::HostHandler>>,
    /// How many calls the host may send at once (told to the worker in `hello`).
    pub max_in_flight: usize,
}

impl std::fmt::Debug for StartOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartOptions")
            .field("worker", &self.worker)
            .field("run_id", &self.run_id)
            .field("max_frame", &self.max_frame)
            .field("host", &self.host.is_some())
            .finish_non_exhaustive()
    }
}

impl StartOptions {
    /// Options for `worker` in run `run_id`.
    pub fn new(worker: WorkerId, run_id: impl Into<String>, max_frame: usize) -> Self {
        StartOptions {
            worker,
            run_id: run_id.into(),
            env: Vec::new(),
            max_frame,
            handshake_delay: None,
            host: None,
            max_in_flight: 1,
        }
    }

    /// Fault injection: delays the handshake by `d` (it still counts against the timeout).
    pub fn with_handshake_delay(mut self, d: Option<Duration>) -> Self {
        self.handshake_delay = d;
        self
    }

    /// Sets how many calls the host may send at once.
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Sets the handler of the worker's calls to the host.
    pub fn with_host(mut self, host: Option<Arc<dyn snakepit_core::HostHandler>>) -> Self {
        self.host = host;
        self
    }

    /// Adds environment variables.
    pub fn with_env(mut self, env: Vec<(OsString, OsString)>) -> Self {
        self.env = env;
        self
    }
}

/// The last lines a worker wrote to stderr.
#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > TAIL_LINES || (self.bytes > TAIL_BYTES && self.lines.len() > 1) {
            if let Some(l) = self.lines.pop_front() {
                self.bytes -= l.len();
            }
        }
    }

    fn text(&self) -> String {
        let mut s = String::with_capacity(self.bytes + self.lines.len());
        for l in &self.lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}

/// Shared between the worker handle, its stderr pump and its monitor.
#[derive(Debug)]
struct Shared {
    id: WorkerId,
    /// The shepherd's pid, which is also the worker's process group id.
    pid: u32,
    tail: Mutex<Tail>,
    exit: watch::Sender<Option<ExitInfo>>,
    stderr_done: watch::Sender<bool>,
    /// The host's end of the shepherd's lifeline; dropping it kills the worker's subtree.
    lifeline: Mutex<Option<OwnedFd>>,
    /// A pidfd for the shepherd: tells whether it has exited without reaping it.
    pidfd: Option<OwnedFd>,
}

impl Shared {
    fn tail(&self) -> String {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).text()
    }

    /// Whether the shepherd has exited (it may not be reaped yet).
    fn has_exited(&self) -> bool {
        if self.exit.borrow().is_some() {
            return true;
        }
        let Some(fd) = &self.pidfd else { return false };
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) > 0 }
    }

    /// Sends `sig` to the worker's process group (the shepherd ignores the catchable ones).
    fn signal_group(&self, sig: Signal) {
        // While the shepherd has not exited it leads the group, so its id cannot be reused.
        if self.has_exited() {
            return;
        }
        let pgid = Pid::from_raw(self.pid as i32);
        if let Err(e) = killpg(pgid, sig) {
            if e != nix::errno::Errno::ESRCH {
                tracing::warn!(worker = %self.id, "{}", crate::Error::Signal { pgid: self.pid as i32, source: e });
            }
        }
    }

    /// Kills the worker and everything it started: closing the lifeline makes the shepherd
    /// SIGKILL its whole subtree. No pid is signalled, so pid reuse cannot misdirect it.
    fn kill(&self) {
        self.lifeline.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    async fn wait_stderr(&self) {
        let mut rx = self.stderr_done.subscribe();
        let _ = tokio::time::timeout(STDERR_DRAIN, rx.wait_for(|d| *d)).await;
    }
}

/// A started, handshaken worker: its connection and its process.
///
/// Dropping it kills the worker's whole process group; the monitor task reaps it.
pub struct Worker {
    shared: Arc<Shared>,
    conn: Arc<dyn Connection>,
    ready: Ready,
    started: Instant,
    /// A pidfd for the worker process itself (verified to be the shepherd's child), used to
    /// deliver the cancel signal without ever hitting a reused pid.
    worker_pidfd: Option<OwnedFd>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.shared.id)
            .field("pid", &self.shared.pid)
            .finish_non_exhaustive()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.kill();
    }
}

fn exit_info(status: ExitStatus) -> ExitInfo {
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitInfo::Code(c),
        (None, Some(s)) => ExitInfo::Signal(s),
        _ => ExitInfo::Unknown,
    }
}

impl Worker {
    /// The worker's id.
    pub fn id(&self) -> WorkerId {
        self.shared.id
    }

    /// The worker process's id (as it reported it in `ready`).
    pub fn pid(&self) -> u32 {
        self.ready.pid
    }

    /// The worker's shepherd's process id, which is also the worker's process group id.
    pub fn shepherd_pid(&self) -> u32 {
        self.shared.pid
    }

    /// What the worker announced in its handshake.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// The live connection.
    pub fn connection(&self) -> &Arc<dyn Connection> {
        &self.conn
    }

    /// When the worker became ready.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// How the process ended, if it has.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.shared.exit.borrow()
    }

    /// The last lines the worker wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.shared.tail()
    }

    /// Waits until the process has ended and been reaped (and its stderr drained, briefly).
    pub async fn exited(&self) -> ExitInfo {
        let mut rx = self.shared.exit.subscribe();
        let info = match rx.wait_for(|e| e.is_some()).await {
            Ok(e) => e.unwrap_or(ExitInfo::Unknown),
            Err(_) => ExitInfo::Unknown,
        };
        self.shared.wait_stderr().await;
        info
    }

    /// Cancels call `id`: sends the protocol `cancel`, then the worker's cancel signal if it
    /// asked for one in `ready` (it interrupts a tool even inside a blocking system call).
    pub fn cancel(&self, id: snakepit_core::RequestId) {
        self.conn.cancel(id);
        if let (Some(sig), Some(fd)) = (self.ready.cancel_signal, &self.worker_pidfd) {
            // SAFETY: pidfd_send_signal on a pidfd we own; a dead process yields ESRCH.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    sig,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            if r != 0 {
                tracing::debug!(worker = %self.id(), "cancel signal not delivered: {}", std::io::Error::last_os_error());
            }
        }
    }

    /// Kills the worker and its whole subtree (grandchildren included) at once.
    pub fn kill(&self) {
        self.shared.kill();
    }

    /// Stops the worker gracefully: `shutdown` and stdin closed, then after `grace` SIGTERM to
    /// its group, then after `grace` again SIGKILL. Returns how it ended.
    pub async fn shutdown(&self, grace: Duration) -> ExitInfo {
        if let Some(e) = self.exit_info() {
            return e;
        }
        self.conn.shutdown().await;
        if let Ok(e) = tokio::time::timeout(grace, self.exited()).await {
            return e;
        }
        tracing::debug!(worker = %self.id(), "did not exit after stdin closed; SIGTERM");
        self.shared.signal_group(Signal::SIGTERM);
        if let Ok(e) = tokio::time::timeout(grace, self.exited()).await {
            return e;
        }
        tracing::warn!(worker = %self.id(), "ignored SIGTERM for {grace:?}; killing it");
        self.kill();
        self.exited().await
    }
}

fn spawn_stderr_pump(stderr: ChildStderr, shared: Arc<Shared>) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr);
        let mut buf = Vec::with_capacity(256);
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']);
                    tracing::info!(target: "snakepit::worker", worker = %shared.id, "{line}");
                    shared.tail.lock().unwrap_or_else(|p| p.into_inner()).push(line.to_owned());
                }
            }
        }
        let _ = shared.stderr_done.send_replace(true);
    });
}

/// Watches the process until it exits, killing it if its connection breaks first.
fn spawn_monitor(mut child: Child, conn: Arc<dyn Connection>, shared: Arc<Shared>) {
    tokio::spawn(async move {
        let status = tokio::select! {
            s = child.wait() => s,
            reason = conn.closed() => {
                // Output closed or the protocol broke: the process is of no further use.
                tracing::debug!(worker = %shared.id, ?reason, "connection closed; making sure the process is gone");
                if !matches!(reason, snakepit_core::CloseReason::Eof) {
                    shared.kill();
                }
                match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        shared.kill();
                        child.wait().await
                    }
                }
            }
        };
        let info = match status {
            Ok(s) => exit_info(s),
            Err(e) => {
                tracing::warn!(worker = %shared.id, "cannot wait for the worker: {e}");
                ExitInfo::Unknown
            }
        };
        // The shepherd has already taken down whatever the worker left behind.
        tracing::debug!(worker = %shared.id, "exited: {info}");
        let _ = shared.exit.send_replace(Some(info));
    });
}

/// Spawns a worker for `adapter`, performs the handshake through `transport` within the
/// adapter's handshake timeout, and returns it ready for calls.
///
/// Fails fast, leaving no process behind: [`Error::Spawn`] when the program cannot be started,
/// [`Error::StartupFailed`] when it exits before `ready` (import errors), and
/// [`Error::HandshakeTimeout`] when it stays silent.
pub async fn start_worker(
    adapter: &dyn Adapter,
    transport: &dyn Transport,
    opts: StartOptions,
) -> Result<Worker, Error> {
    let worker = opts.worker;
    let spec = adapter.spawn_spec(&SpawnContext::new(worker, opts.run_id.clone()))?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The lifeline, not kill_on_drop, stops the worker: a SIGKILL to the shepherd would
        // leave no one to clean up the worker's descendants.
        .kill_on_drop(false)
        .process_group(0);
    for k in &spec.env_remove {
        cmd.env_remove(k);
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
    cmd.env("SNAKEPIT_RUN_ID", &opts.run_id).env("SNAKEPIT_WORKER_ID", worker.to_string());
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    let (lifeline_rd, lifeline_wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Spawn {
            worker,
            program: spec.program.display().to_string(),
            reason: format!("cannot create the lifeline pipe: {e}"),
        })?;
    let lifeline_fd = lifeline_rd.as_raw_fd();
    // SAFETY: getpid has no preconditions.
    let host = unsafe { libc::getpid() };
    // SAFETY: the hook runs in the forked child before exec and only makes async-signal-safe
    // system calls (see `shepherd`).
    unsafe {
        cmd.pre_exec(move || crate::shepherd::fork_shepherd(lifeline_fd, host));
    }
    let mut child = cmd.spawn().map_err(|e| Error::Spawn {
        worker,
        program: spec.program.display().to_string(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => format!("{e} (is the interpreter installed and on PATH?)"),
            _ => e.to_string(),
        },
    })?;
    drop(lifeline_rd);
    let pid = child.id().unwrap_or(0);
    let (exit, _) = watch::channel(None);
    let (stderr_done, _) = watch::channel(false);
    // SAFETY: pidfd_open on our own unreaped child: it cannot have been reused.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a fresh descriptor we own.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) });
    let shared = Arc::new(Shared {
        id: worker,
        pid,
        tail: Mutex::new(Tail::default()),
        exit,
        stderr_done,
        lifeline: Mutex::new(Some(lifeline_wr)),
        pidfd,
    });
    if let Some(stderr) = child.stderr.take() {
        spawn_stderr_pump(stderr, shared.clone());
    } else {
        let _ = shared.stderr_done.send_replace(true);
    }
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        // Cannot happen with piped stdio; treat it as a spawn failure anyway.
        shared.kill();
        let _ = child.wait().await;
        return Err(Error::Spawn {
            worker,
            program: spec.program.display().to_string(),
            reason: "no stdio pipes".into(),
        });
    };
    // If this future is dropped before the worker is handed out, the worker must die with it.
    let mut guard = KillOnDrop(Some(shared.clone()));
    let io = WorkerIo { worker, input: Box::new(stdin), output: Box::new(stdout) };
    let hello = Hello::new(worker, opts.max_frame, adapter.worker_config())
        .with_host(opts.host.clone())
        .with_max_in_flight(opts.max_in_flight);
    let timeout = adapter.handshake_timeout();
    let delay = opts.handshake_delay;
    let connect = async move {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        transport.connect(io, hello).await
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, connect) => match r {
            Ok(r) => Handshake::Done(r),
            Err(_) => Handshake::TimedOut,
        },
        status = child.wait() => Handshake::Exited(status),
    };
    let fail = |shared: &Arc<Shared>| shared.kill();
    match outcome {
        Handshake::Done(Ok((conn, ready))) => {
            tracing::debug!(worker = %worker, pid, bridge = %ready.bridge, "ready");
            spawn_monitor(child, conn.clone(), shared.clone());
            guard.0 = None;
            let worker_pidfd = ready.cancel_signal.and_then(|_| child_pidfd(ready.pid, pid));
            Ok(Worker { shared, conn, ready, started: Instant::now(), worker_pidfd })
        }
        Handshake::Done(Err(e)) => {
            // EOF during the handshake means the process is exiting: report how it ended.
            let info = if matches!(e, Error::Disconnected { .. }) {
                match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                    Ok(Ok(s)) => Some(exit_info(s)),
                    _ => None,
                }
            } else {
                None
            };
            fail(&shared);
            let _ = child.wait().await;
            let _ = shared.exit.send_replace(Some(info.unwrap_or(ExitInfo::Unknown)));
            shared.wait_stderr().await;
            match (e, info) {
                (Error::Disconnected { .. }, exit) => Err(Error::StartupFailed {
                    worker,
                    exit: exit.unwrap_or(ExitInfo::Unknown),
                    stderr_tail: shared.tail(),
                }),
                (e, _) => Err(e),
            }
        }
        Handshake::TimedOut => {
            fail(&shared);
            let _ = child.wait().await;
            let _ = shared.exit.send_replace(Some(ExitInfo::Signal(Signal::SIGKILL as i32)));
            shared.wait_stderr().await;
            Err(Error::HandshakeTimeout { worker, after: timeout, stderr_tail: shared.tail() })
        }
        Handshake::Exited(status) => {
            let info = status.map(exit_info).unwrap_or(ExitInfo::Unknown);
            let _ = shared.exit.send_replace(Some(info));
            shared.wait_stderr().await;
            Err(Error::StartupFailed { worker, exit: info, stderr_tail: shared.tail() })
        }
    }
}

/// The parent pid of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A pidfd for `pid` if it is a child of `parent` (a worker claims its pid in `ready`; we only
/// trust it once the process tree confirms it).
fn child_pidfd(pid: u32, parent: u32) -> Option<OwnedFd> {
    if parent_of(pid)? != parent {
        return None;
    }
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // Re-check after opening: the pidfd now pins the identity we verified.
    (parent_of(pid)? == parent).then_some(fd)
}

/// Kills the worker when dropped (a start-up that was abandoned half-way).
struct KillOnDrop(Option<Arc<Shared>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.kill();
        }
    }
}

enum Handshake {
    Done(Result<(Arc<dyn Connection>, Ready), Error>),
    TimedOut,
    Exited(std::io::Result<ExitStatus>),
}
