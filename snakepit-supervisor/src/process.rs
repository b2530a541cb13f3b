//! Spawning, watching and stopping one worker process.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use snakepit_core::shm::Arena;
pub use snakepit_core::StartOptions;
use snakepit_core::{
    Adapter, Connection, Error, ExitInfo, Hello, ProtocolIo, Ready, RequestId, ShmOffer, SpawnContext,
    SpawnSpec, Transport, WorkerHandle, WorkerId, WorkerIo,
};
use tokio::io::unix::AsyncFd;

pub(crate) use crate::pidfd::{async_fd, pidfd_exited, pidfd_open, pidfd_send_signal, pinned_start_time};
use crate::protocol_fds;
pub(crate) use crate::stderr::{spawn_stderr_pump, Tail};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// How long to wait for a dead worker's stderr to drain before reporting its tail.
const STDERR_DRAIN: Duration = Duration::from_millis(300);
/// How long to wait for the frames a worker wrote before it exited during the handshake.
const EXIT_FRAMES: Duration = Duration::from_millis(500);

/// Shared between the worker handle, its stderr pump and its monitor.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) id: WorkerId,
    /// `tracing` target of the process's stderr lines.
    pub(crate) log_target: LogTarget,
    /// The process group id: the shepherd's pid for a cold worker (it leads the group), the
    /// worker's own pid for a forked one.
    pub(crate) pid: u32,
    pub(crate) tail: Mutex<Tail>,
    exit: watch::Sender<Option<ExitInfo>>,
    pub(crate) stderr_done: watch::Sender<bool>,
    /// How a kill is delivered.
    killer: Killer,
    /// A pidfd for the group leader (shepherd or forked worker): tells whether it has exited
    /// without reaping it.
    pub(crate) pidfd: Option<OwnedFd>,
}

/// Where a process's stderr lines go.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LogTarget {
    Worker,
    Zygote,
}

/// How a worker is killed without ever signalling a pid that could have been reused.
#[derive(Debug)]
enum Killer {
    /// The host's end of the shepherd's lifeline; dropping it makes the shepherd kill the
    /// worker's whole subtree.
    Lifeline(Mutex<Option<OwnedFd>>),
    /// SIGKILL through the worker's pidfd (a forked worker, child of the zygote; its zygote
    /// kills what it leaves behind).
    Pidfd,
}

impl Shared {
    pub(crate) fn new(
        id: WorkerId,
        log_target: LogTarget,
        pid: u32,
        lifeline: Option<OwnedFd>,
        pidfd: Option<OwnedFd>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            id,
            log_target,
            pid,
            tail: Mutex::new(Tail::default()),
            exit: watch::channel(None).0,
            stderr_done: watch::channel(false).0,
            killer: match lifeline {
                Some(fd) => Killer::Lifeline(Mutex::new(Some(fd))),
                None => Killer::Pidfd,
            },
            pidfd,
        })
    }

    pub(crate) fn tail(&self) -> String {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).text()
    }

    /// Whether the shepherd has exited (it may not be reaped yet).
    pub(crate) fn has_exited(&self) -> bool {
        if self.exit.borrow().is_some() {
            return true;
        }
        self.pidfd.as_ref().is_some_and(pidfd_exited)
    }

    /// Whether the group leader is a shepherd (a cold worker), not the worker itself.
    fn shepherded(&self) -> bool {
        matches!(self.killer, Killer::Lifeline(_))
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
    pub(crate) fn kill(&self) {
        match &self.killer {
            Killer::Lifeline(l) => drop(l.lock().unwrap_or_else(|p| p.into_inner()).take()),
            Killer::Pidfd => {
                if let Some(fd) = &self.pidfd {
                    // A pidfd names one process for good: an exited one yields ESRCH.
                    let _ = pidfd_send_signal(fd, libc::SIGKILL);
                }
            }
        }
    }

    pub(crate) fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit.subscribe()
    }

    pub(crate) fn set_exit(&self, info: ExitInfo) {
        let _ = self.exit.send_replace(Some(info));
    }

    pub(crate) async fn wait_stderr(&self) {
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
    /// The pid the worker claimed in `ready`, if the host verified it (`worker_pidfd` names it).
    verified_pid: Option<u32>,
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

pub(crate) fn exit_info(status: ExitStatus) -> ExitInfo {
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

    /// The worker process's id, if the host verified the pid the worker reported in `ready`
    /// (a child of its shepherd, or the forked process the zygote reported and the host
    /// checked). `None` when the claim did not check out: a worker names no other process.
    pub fn pid(&self) -> Option<u32> {
        self.verified_pid
    }

    /// The processes this worker is known by, each as (pid, start time), as far as the host
    /// verified them: the group leader (a cold worker's shepherd, the host's own child; a forked
    /// worker, checked as the zygote's child through a pidfd) and the worker process when its
    /// claimed pid checked out. Each start time is read while a pidfd says that process lives.
    pub(crate) fn verified_processes(&self) -> Vec<(u32, u64)> {
        let mut out = Vec::with_capacity(2);
        if let Some(fd) = &self.shared.pidfd {
            if let Some(start) = pinned_start_time(self.shared.pid, fd) {
                out.push((self.shared.pid, start));
            }
        }
        if let (Some(pid), Some(fd)) = (self.verified_pid, &self.worker_pidfd) {
            if pid != self.shared.pid {
                if let Some(start) = pinned_start_time(pid, fd) {
                    out.push((pid, start));
                }
            }
        }
        out
    }

    /// Resident memory of the worker's whole subtree, found from the process the host knows
    /// (its shepherd, whose own pages are left out, or the forked worker), never from the pid
    /// the worker claimed.
    pub fn memory(&self) -> Option<u64> {
        let shepherded = self.shared.shepherded();
        let rss = crate::memory::subtree_rss(self.shared.pid, shepherded)?;
        // Read while the leader is unreaped (checked after): its pid named it throughout.
        (!self.shared.has_exited()).then_some(rss)
    }

    /// The worker's process group id: its shepherd's pid for a cold worker, its own pid for one
    /// forked from a zygote.
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

    /// Resolves (to `Some`) once the process has been reaped; holds no reference to the worker.
    pub(crate) fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.shared.exit_watch()
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

    /// Cancels call `id`: sends the protocol `cancel`, then [`interrupt`](Self::interrupt)s it.
    pub fn cancel(&self, id: RequestId) {
        self.conn.cancel(id);
        self.interrupt(id);
    }

    /// Sends the worker's cancel signal, if it asked for one in `ready` (it interrupts a tool
    /// even inside a blocking system call), when call `id` is the one it runs. A pipelined
    /// worker's signal depends on the call's position ([`Ready::cancel_signal_for`]): if the
    /// worker has just moved on to the next call, it ignores a signal meant for the last one.
    pub fn interrupt(&self, id: RequestId) {
        let Some(position) = self.conn.running(id) else { return };
        if let (Some(sig), Some(fd)) = (self.ready.cancel_signal_for(position), &self.worker_pidfd) {
            if let Err(e) = pidfd_send_signal(fd, sig) {
                tracing::debug!(worker = %self.id(), "cancel signal not delivered: {e}");
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

#[async_trait::async_trait]
impl WorkerHandle for Worker {
    fn id(&self) -> WorkerId {
        Worker::id(self)
    }

    fn connection(&self) -> &Arc<dyn Connection> {
        &self.conn
    }

    fn ready(&self) -> &Ready {
        &self.ready
    }

    fn started(&self) -> Instant {
        self.started
    }

    fn exit_info(&self) -> Option<ExitInfo> {
        Worker::exit_info(self)
    }

    async fn exited(&self) -> ExitInfo {
        Worker::exited(self).await
    }

    fn kill(&self) {
        Worker::kill(self);
    }

    async fn shutdown(&self, grace: Duration) -> ExitInfo {
        Worker::shutdown(self, grace).await
    }

    fn cancel(&self, id: RequestId) {
        Worker::cancel(self, id);
    }

    fn interrupt(&self, id: RequestId) {
        Worker::interrupt(self, id);
    }

    fn stderr_tail(&self) -> String {
        Worker::stderr_tail(self)
    }

    fn pid(&self) -> Option<u32> {
        Worker::pid(self)
    }

    fn memory(&self) -> Option<u64> {
        Worker::memory(self)
    }
}

/// How the host learns that a worker process ended.
pub(crate) enum Proc {
    /// The shepherd, a direct child of the host.
    Child(Child),
    /// A worker forked by a zygote: only the zygote can reap it, and it reports the status.
    Forked {
        /// The zygote's report (dropped without one if the zygote dies first).
        exit: tokio::sync::oneshot::Receiver<ExitInfo>,
        /// Readable once the process has exited.
        pidfd: Option<AsyncFd<OwnedFd>>,
        /// The status, once known (so `wait` may be called again).
        done: Option<ExitInfo>,
    },
}

impl Proc {
    /// Waits until the process has ended; cancel-safe.
    pub(crate) async fn wait(&mut self) -> ExitInfo {
        match self {
            Proc::Child(c) => match c.wait().await {
                Ok(s) => exit_info(s),
                Err(e) => {
                    tracing::warn!("cannot wait for the worker: {e}");
                    ExitInfo::Unknown
                }
            },
            Proc::Forked { exit, pidfd, done } => {
                if let Some(d) = done {
                    return *d;
                }
                let info = match exit.await {
                    Ok(info) => info,
                    Err(_) => {
                        // The zygote died before reporting: its workers die with it (PDEATHSIG).
                        if let Some(fd) = pidfd {
                            let _ = fd.readable().await;
                        }
                        ExitInfo::Unknown
                    }
                };
                *done = Some(info);
                info
            }
        }
    }

    /// A pidfd for the worker process that reported `worker_pid` in `ready`, if it really is
    /// ours: for a cold worker, a child of the shepherd `pgid`; for a forked one, itself.
    fn worker_pidfd(&self, worker_pid: u32, pgid: u32) -> Option<OwnedFd> {
        match self {
            Proc::Child(_) => child_pidfd(worker_pid, pgid),
            Proc::Forked { pidfd, .. } => {
                (worker_pid == pgid).then(|| pidfd.as_ref().and_then(|fd| fd.get_ref().try_clone().ok()))?
            }
        }
    }
}

/// Watches the process until it exits, killing it if its connection breaks first.
fn spawn_monitor(mut proc: Proc, conn: Arc<dyn Connection>, shared: Arc<Shared>) {
    tokio::spawn(async move {
        let info = tokio::select! {
            s = proc.wait() => s,
            reason = conn.closed() => {
                // Output closed or the protocol broke: the process is of no further use.
                tracing::debug!(worker = %shared.id, ?reason, "connection closed; making sure the process is gone");
                if !matches!(reason, snakepit_core::CloseReason::Eof) {
                    shared.kill();
                }
                match tokio::time::timeout(Duration::from_secs(2), proc.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        shared.kill();
                        proc.wait().await
                    }
                }
            }
        };
        // The shepherd (or the zygote) has already taken down whatever the worker left behind.
        tracing::debug!(worker = %shared.id, "exited: {info}");
        shared.set_exit(info);
    });
}

/// The shared-memory arena for a worker, when its options ask for one and its transport uses
/// it. An arena that cannot be made is logged and left out: segments then take the pipe.
pub(crate) fn new_arena(opts: &StartOptions, transport: &dyn Transport) -> Option<Arc<Arena>> {
    if !opts.shm.enabled() || !transport.shared_memory() {
        return None;
    }
    match Arena::create(opts.shm.size) {
        Ok(a) => Some(Arc::new(a)),
        Err(e) => {
            tracing::warn!(worker = %opts.worker, "{e}; large segments will take the pipe");
            None
        }
    }
}

/// The offer of `arena` to a worker that finds it at descriptor `fd`.
pub(crate) fn shm_offer(arena: Option<Arc<Arena>>, fd: i32, opts: &StartOptions) -> Option<ShmOffer> {
    arena.map(|a| ShmOffer::new(a, fd, opts.shm.threshold))
}

/// Spawns a process for `spec` under its own shepherd (see the `shepherd` module), with the
/// given stdin and stdout and a piped stderr. The returned [`Shared`] owns the lifeline.
/// `inherit` is a close-on-exec descriptor the worker (not its shepherd) keeps across `exec`,
/// at the same number. `protocol`: the worker's ends of the protocol pipes, put at fds 3 and 4
/// in the worker (see `protocol_fds`); stdout then goes to the stderr pipe.
#[allow(unsafe_code)] // pre_exec: the shepherd runs between fork and exec
#[allow(clippy::disallowed_methods)] // the spawner: the one place that starts worker processes
pub(crate) fn spawn_shepherded(
    spec: &SpawnSpec,
    opts: &StartOptions,
    stdin: Stdio,
    stdout: Stdio,
    log_target: LogTarget,
    inherit: Option<std::os::fd::RawFd>,
    protocol: Option<(std::os::fd::RawFd, std::os::fd::RawFd)>,
) -> Result<(Arc<Shared>, Child), Error> {
    let worker = opts.worker;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        // The lifeline, not kill_on_drop, stops the worker: a SIGKILL to the shepherd would
        // leave no one to clean up the worker's descendants.
        .kill_on_drop(false)
        .process_group(0);
    if spec.env_clear {
        // Only PATH and the allowed variables come from the host.
        cmd.env_clear();
        for k in
            std::iter::once(std::ffi::OsStr::new("PATH")).chain(spec.env_allow.iter().map(|k| k.as_os_str()))
        {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
    }
    for k in &spec.env_remove {
        cmd.env_remove(k);
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
    cmd.env("SNAKEPIT_RUN_ID", &opts.run_id).env("SNAKEPIT_WORKER_ID", worker.to_string());
    if protocol.is_some() {
        cmd.env(protocol_fds::ENV.0, protocol_fds::ENV.1);
    } else {
        // Inherited from a host that is itself a worker on protocol fds: not this worker's.
        cmd.env_remove(protocol_fds::ENV.0);
    }
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    let (lifeline_rd, lifeline_wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Spawn {
            worker,
            program: spec.program.display().to_string(),
            reason: "cannot create the lifeline pipe".into(),
            source: Some(e.into()),
        })?;
    let lifeline_fd = lifeline_rd.as_raw_fd();
    // SAFETY: getpid has no preconditions.
    let host = unsafe { libc::getpid() };
    // SAFETY: the hook runs in the forked child before exec and only makes async-signal-safe
    // system calls (see `shepherd`; `fcntl` on a descriptor the child holds).
    unsafe {
        cmd.pre_exec(move || {
            crate::shepherd::fork_shepherd(lifeline_fd, host)?;
            // Only the worker gets here (the shepherd closed everything but its lifeline).
            if let Some(fds) = protocol {
                protocol_fds::install(fds)?;
            }
            if let Some(fd) = inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| Error::Spawn {
        worker,
        program: spec.program.display().to_string(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => "cannot execute it (is the interpreter installed and on PATH?)",
            _ => "cannot execute it",
        }
        .into(),
        source: Some(e),
    })?;
    drop(lifeline_rd);
    let pid = child.id().unwrap_or(0);
    // pidfd_open on our own unreaped child: it cannot have been reused.
    let shared = Shared::new(worker, log_target, pid, Some(lifeline_wr), pidfd_open(pid));
    match child.stderr.take() {
        Some(stderr) => spawn_stderr_pump(stderr, shared.clone()),
        None => drop(shared.stderr_done.send_replace(true)),
    }
    Ok((shared, child))
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
    let arena = new_arena(&opts, transport);
    if spec.protocol_io == ProtocolIo::Fds {
        return start_on_fds(adapter, transport, opts, &spec, arena).await;
    }
    let fd = arena.as_ref().map(|a| a.fd().as_raw_fd());
    let (shared, mut child) =
        spawn_shepherded(&spec, &opts, Stdio::piped(), Stdio::piped(), LogTarget::Worker, fd, None)?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        // Cannot happen with piped stdio; treat it as a spawn failure anyway.
        shared.kill();
        let _ = child.wait().await;
        return Err(Error::Spawn {
            worker,
            program: spec.program.display().to_string(),
            reason: "no stdio pipes".into(),
            source: None,
        });
    };
    let io = WorkerIo { worker, input: Box::new(stdin), output: Box::new(stdout) };
    let shm = shm_offer(arena, fd.unwrap_or(-1), &opts);
    handshake(shared, Proc::Child(child), io, adapter, transport, &opts, shm).await
}

/// [`start_worker`] for a worker that speaks the protocol on fds 3 and 4
/// ([`ProtocolIo::Fds`]).
async fn start_on_fds(
    adapter: &dyn Adapter,
    transport: &dyn Transport,
    opts: StartOptions,
    spec: &SpawnSpec,
    arena: Option<Arc<Arena>>,
) -> Result<Worker, Error> {
    let worker = opts.worker;
    let program = spec.program.display().to_string();
    let setup = |e| protocol_fds::setup_error(worker, &program, e);
    let mut pipes = protocol_fds::ProtocolPipes::new().map_err(setup)?;
    // The arena keeps its number across exec: it must not be one of the two the pipes take.
    let arena_fd = match &arena {
        Some(a) => Some(pipes.above(a.fd().try_clone_to_owned().map_err(setup)?).map_err(setup)?),
        None => None,
    };
    let fd = arena_fd.as_ref().map(|f| f.as_raw_fd());
    let (shared, child) = spawn_shepherded(
        spec,
        &opts,
        Stdio::null(),
        Stdio::null(),
        LogTarget::Worker,
        fd,
        Some(pipes.worker_fds()),
    )?;
    drop(arena_fd);
    let io = match pipes.into_io(worker) {
        Ok(io) => io,
        Err(e) => {
            shared.kill();
            let mut proc = Proc::Child(child);
            proc.wait().await;
            return Err(setup(e));
        }
    };
    let shm = shm_offer(arena, fd.unwrap_or(-1), &opts);
    handshake(shared, Proc::Child(child), io, adapter, transport, &opts, shm).await
}

/// Performs the handshake on a started process and hands out the [`Worker`]; on failure the
/// process is killed and reaped and the error says how it ended.
pub(crate) async fn handshake(
    shared: Arc<Shared>,
    mut proc: Proc,
    io: WorkerIo,
    adapter: &dyn Adapter,
    transport: &dyn Transport,
    opts: &StartOptions,
    shm: Option<ShmOffer>,
) -> Result<Worker, Error> {
    let worker = opts.worker;
    let pid = shared.pid;
    // If this future is dropped before the worker is handed out, the worker must die with it.
    let mut guard = KillOnDrop(Some(shared.clone()));
    let mut hello = Hello::new(worker, opts.max_frame, adapter.worker_config())
        .with_host(opts.host.clone())
        .with_max_in_flight(opts.max_in_flight)
        .with_pipeline_depth(opts.pipeline_depth)
        .with_busy_ping(opts.busy_ping)
        .with_busy_poll(opts.busy_poll)
        .with_shm(shm);
    if let Some(v) = &opts.offer_versions {
        hello.versions.clone_from(v);
    }
    let timeout = adapter.handshake_timeout();
    let delay = opts.handshake_delay;
    let connect = async move {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        transport.connect(io, hello).await
    };
    let connect = tokio::time::timeout(timeout, connect);
    tokio::pin!(connect);
    let outcome = tokio::select! {
        r = &mut connect => match r {
            Ok(r) => Handshake::Done(r),
            Err(_) => Handshake::TimedOut,
        },
        info = proc.wait() => {
            // The exit can be seen before the last frames it wrote (a `refuse`, say: a zygote
            // reports its worker's exit on another channel). Those frames end in EOF at once now.
            match tokio::time::timeout(EXIT_FRAMES, &mut connect).await {
                Ok(Ok(Err(e))) if !matches!(e, Error::Disconnected { .. }) => Handshake::Done(Err(e)),
                _ => Handshake::Exited(info),
            }
        }
    };
    match outcome {
        Handshake::Done(Ok((conn, mut ready))) => {
            tracing::debug!(worker = %worker, pid, bridge = %ready.bridge, "ready");
            // A worker whose protocol has no pid (snakepit-v0) says 0: a cold worker is then
            // its shepherd's only child.
            if ready.pid == 0 && matches!(proc, Proc::Child(_)) {
                ready.pid = only_child(pid).unwrap_or(0);
            }
            // The pid in `ready` is the worker's word only: trusted once the process tree
            // confirms it, through a pidfd that then pins it.
            let worker_pidfd = proc.worker_pidfd(ready.pid, pid);
            let verified_pid = worker_pidfd.as_ref().map(|_| ready.pid);
            if verified_pid.is_none() {
                tracing::warn!(
                    worker = %worker,
                    claimed = ready.pid,
                    "the pid in the worker's `ready` is not its process; not trusting it"
                );
            }
            spawn_monitor(proc, conn.clone(), shared.clone());
            guard.0 = None;
            Ok(Worker { shared, conn, ready, started: Instant::now(), worker_pidfd, verified_pid })
        }
        Handshake::Done(Err(e)) => {
            // EOF during the handshake means the process is exiting: report how it ended.
            let info = if matches!(e, Error::Disconnected { .. }) {
                tokio::time::timeout(Duration::from_secs(2), proc.wait()).await.ok()
            } else {
                None
            };
            shared.kill();
            proc.wait().await;
            shared.set_exit(info.unwrap_or(ExitInfo::Unknown));
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
            shared.kill();
            proc.wait().await;
            shared.set_exit(ExitInfo::Signal(Signal::SIGKILL as i32));
            shared.wait_stderr().await;
            Err(Error::HandshakeTimeout { worker, after: timeout, stderr_tail: shared.tail() })
        }
        Handshake::Exited(info) => {
            shared.set_exit(info);
            shared.wait_stderr().await;
            Err(Error::StartupFailed { worker, exit: info, stderr_tail: shared.tail() })
        }
    }
}

/// The only child of `pid` (from `/proc/<pid>/task/<pid>/children`), if it has exactly one.
fn only_child(pid: u32) -> Option<u32> {
    let list = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    let mut kids = list.split_whitespace().filter_map(|p| p.parse::<u32>().ok());
    match (kids.next(), kids.next()) {
        (Some(k), None) => Some(k),
        _ => None,
    }
}

/// The parent pid of `pid`, from `/proc/<pid>/stat`.
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A pidfd for `pid` if it is a child of `parent` (a worker claims its pid in `ready`; we only
/// trust it once the process tree confirms it).
pub(crate) fn child_pidfd(pid: u32, parent: u32) -> Option<OwnedFd> {
    if parent_of(pid)? != parent {
        return None;
    }
    let fd = pidfd_open(pid)?;
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
    Exited(ExitInfo),
}
