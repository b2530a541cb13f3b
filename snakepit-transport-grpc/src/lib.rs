//! # snakepit-transport-grpc
//!
//! The gRPC transport: calls travel as gRPC (tonic client, HTTP/2) to a `snakepit.v1.Worker`
//! server the worker runs on a Unix socket in a private 0700 directory the host creates; the
//! worker's stdio pipe stays the *control channel* — the same `hello`/`ready` handshake as the
//! stdio transport (the host sends the socket path and a per-worker token in `hello`, the worker
//! announces its address in `ready`), heartbeats, `shutdown`, and crash detection: when the
//! worker dies its pipe closes at once, so a dead worker is seen at once, not at the next call.
//!
//! The protocol is generated at build time from `proto/snakepit/v1/snakepit.proto` with
//! protox (no `protoc` needed).
//!
//! Built only on the plug-in surfaces a transport outside this workspace would use:
//! `snakepit-core` ([`InFlight`] for `idle`/`answered`) and the stdio crate's
//! [`control`] channel (which runs the core handshake).

#![deny(unsafe_code)]

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use snakepit_core::{
    CloseReason, Codec, Connection, Error, Hello, InFlight, Payload, Ready, Request, RequestId, Transport,
    WorkerError, WorkerId, WorkerIo, DEFAULT_MAX_FRAME,
};
use snakepit_transport_stdio::control::{self, Breaker, ControlChannel};
use snakepit_transport_stdio::{DEFAULT_FRAME_TIMEOUT, MAX_HOST_CALLS};
use tonic::transport::{Channel, Endpoint};

/// The `snakepit.v1` protocol, generated from `proto/snakepit/v1/snakepit.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod proto {
    tonic::include_proto!("snakepit.v1");
}

use proto::host_server::{Host, HostServer};
use proto::worker_client::WorkerClient;

mod host;
#[cfg(test)]
use host::token_matches;
use host::HostService;

/// The metadata key that carries the per-worker token.
pub const TOKEN_HEADER: &str = "x-snakepit-token";

/// A gRPC channel to a server on the Unix socket at `path` (HTTP/2 over a `UnixStream`).
pub async fn unix_channel(
    path: impl Into<PathBuf>,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    Endpoint::from_static("http://worker.local")
        .connect_timeout(connect_timeout)
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
}

/// The gRPC transport. `Grpc::default()` uses a private directory under the user's runtime
/// dir (or `/tmp`) for the sockets.
#[derive(Debug, Clone)]
pub struct Grpc {
    socket_root: Option<PathBuf>,
    max_frame: usize,
    connect_timeout: Duration,
}

impl Default for Grpc {
    fn default() -> Self {
        Grpc { socket_root: None, max_frame: DEFAULT_MAX_FRAME, connect_timeout: Duration::from_secs(10) }
    }
}

impl Grpc {
    /// Puts the workers' socket directories under `dir` (keep it short: a socket path holds
    /// at most 107 bytes).
    pub fn socket_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.socket_root = Some(dir.into());
        self
    }

    /// The largest message either side sends.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }
}

/// A private directory for one worker's socket, removed when dropped.
#[derive(Debug)]
struct SocketDir(PathBuf);

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates a private (0700) directory for one worker's sockets under `root` (default:
/// [`default_root`]). A caller's `root` is created (0700) if missing and must be a real
/// directory owned by root or the effective uid and not writable by others unless sticky; it is
/// never `chmod`ed. On failure, says which path failed.
fn make_private_dir(root: Option<&Path>) -> Result<SocketDir, (PathBuf, std::io::Error)> {
    let base = match root {
        Some(r) => {
            if std::fs::symlink_metadata(r).is_err() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(r)
                    .map_err(|e| (r.to_path_buf(), e))?;
            }
            snakepit_fs::check_parent_dir(r).map_err(|e| (e.path.clone(), e.into()))?
        }
        None => default_root()?,
    };
    let name = random_hex(8).map_err(|e| (base.clone(), e))?;
    let dir = snakepit_fs::create_private_dir(&base.join(format!("g{name}")))
        .map_err(|e| (e.path.clone(), e.into()))?;
    Ok(SocketDir(dir))
}

/// The default socket root: `$XDG_RUNTIME_DIR/snakepit`, else `$TMPDIR/snakepit-<euid>`,
/// created 0700 if missing. One that fails `snakepit_fs::check_private_dir` (another user's,
/// a symlink, open to others) is not used: a fresh `mkdtemp` directory under `$TMPDIR` is,
/// with one warning, and is kept for this process's later workers.
fn default_root() -> Result<PathBuf, (PathBuf, std::io::Error)> {
    static FALLBACK: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut fallback = FALLBACK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = fallback.as_ref().and_then(|f| snakepit_fs::check_private_dir(f).ok()) {
        return Ok(f);
    }
    let preferred = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("snakepit"),
        None => std::env::temp_dir().join(format!("snakepit-{}", snakepit_fs::euid())),
    };
    match snakepit_fs::ensure_private_dir(&preferred) {
        Ok(p) => Ok(p),
        Err(refused) => {
            let fresh = snakepit_fs::private_tempdir(&std::env::temp_dir(), "snakepit-grpc-")
                .map_err(|e| (e.path.clone(), e.into()))?;
            tracing::warn!(
                "gRPC socket root: {refused}; using the fresh private directory {} instead",
                fresh.display()
            );
            *fallback = Some(fresh.clone());
            Ok(fresh)
        }
    }
}

/// The longest socket path this transport uses: `sockaddr_un.sun_path` holds 107 bytes and a
/// NUL on Linux (103 on macOS); 100 leaves a margin.
const MAX_SOCKET_PATH: usize = 100;

/// `n` random bytes from the OS's CSPRNG, in hex.
fn random_hex(n: usize) -> std::io::Result<String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(std::io::Error::from)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A per-worker token: 256 bits from the OS's CSPRNG.
fn token() -> std::io::Result<String> {
    random_hex(32)
}

/// Compares a presented token with the expected one in constant time (for equal lengths; the
/// length of a token is no secret).

#[async_trait]
impl Transport for Grpc {
    async fn connect(&self, io: WorkerIo, hello: Hello) -> Result<(Arc<dyn Connection>, Ready), Error> {
        let worker = io.worker;
        let protocol = |detail: String| Error::Protocol { worker, detail, source: None };
        let setup = |reason: String, source: std::io::Error| Error::TransportSetup {
            worker,
            transport: "grpc",
            reason,
            source,
        };
        let dir = make_private_dir(self.socket_root.as_deref()).map_err(|(path, e)| {
            setup(format!("cannot create the private socket directory {}", path.display()), e)
        })?;
        let socket = dir.0.join("w.sock");
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(setup(
                format!("socket path {} is too long; choose a shorter socket_root", socket.display()),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{len} bytes, over the {MAX_SOCKET_PATH} this transport allows for a Unix socket"
                    ),
                ),
            ));
        }
        let token = token().map_err(|e| setup("cannot draw a token from the OS random source".into(), e))?;
        // The host's own `Host` service for this worker, on a socket next to the worker's.
        let host_socket = dir.0.join("h.sock");
        let listener = tokio::net::UnixListener::bind(&host_socket)
            .map_err(|e| setup(format!("cannot listen on the host socket {}", host_socket.display()), e))?;
        let breaker = Arc::new(OnceLock::new());
        let segments = Arc::new(AtomicBool::new(false));
        let service = HostService {
            worker,
            token: token.clone(),
            handler: hello.host.clone(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            breaker: breaker.clone(),
            segments: segments.clone(),
        };
        let (stop_host, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let served = tonic::transport::Server::builder()
                .add_service(HostServer::new(service))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(%worker, "host service stopped: {e}");
            }
        });
        // Busy-polling is a stdio feature: calls here do not travel on the control pipe.
        // Binary segments travel in the messages' `segments` fields. Calls run concurrently
        // on the worker's threads: no pipelining.
        let hello = hello.with_segments(true).with_pipeline_depth(1);
        let hello = hello.with_busy_poll(std::time::Duration::ZERO).with_transport(serde_json::json!({
            "kind": "grpc",
            "socket": socket.to_string_lossy(),
            "host_socket": host_socket.to_string_lossy(),
            "token": token,
        }));
        let (control, ready) = control::connect(io, hello, DEFAULT_FRAME_TIMEOUT).await?;
        let _ = breaker.set(control.breaker());
        segments.store(ready.segments, Ordering::Release);
        let Some(address) = ready.address.clone() else {
            return Err(protocol("the worker did not announce a gRPC address in `ready`".into()));
        };
        if address != format!("unix:{}", socket.display()) {
            return Err(protocol(format!("the worker announced {address}, not the socket it was given")));
        }
        let channel = unix_channel(&socket, self.connect_timeout).await.map_err(|e| Error::Protocol {
            worker,
            detail: format!("cannot connect to the worker's gRPC socket {}", socket.display()),
            source: Some(Box::new(e)),
        })?;
        let client = WorkerClient::new(channel)
            .max_decoding_message_size(self.max_frame)
            .max_encoding_message_size(self.max_frame);
        let conn = GrpcConnection {
            worker,
            control,
            client,
            token,
            max_frame: self.max_frame,
            segments: ready.segments,
            next_id: AtomicU64::new(1),
            inflight: InFlight::new(),
            _stop_host: stop_host,
            _dir: dir,
        };
        Ok((Arc::new(conn) as Arc<dyn Connection>, ready))
    }

    fn max_frame(&self) -> usize {
        self.max_frame
    }
}

/// A live gRPC connection to one worker (plus its stdio control channel).
pub struct GrpcConnection {
    worker: WorkerId,
    control: ControlChannel,
    client: WorkerClient<Channel>,
    token: String,
    max_frame: usize,
    /// Whether the worker announced binary segments.
    segments: bool,
    next_id: AtomicU64,
    /// Calls sent over gRPC and not yet answered (for `idle` / `answered`).
    inflight: InFlight,
    /// Dropping it stops this worker's `Host` service.
    _stop_host: tokio::sync::oneshot::Sender<()>,
    _dir: SocketDir,
}

impl std::fmt::Debug for GrpcConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcConnection").field("worker", &self.worker).finish_non_exhaustive()
    }
}

fn worker_error(e: proto::WorkerError) -> WorkerError {
    WorkerError {
        kind: e.r#type,
        message: e.message,
        traceback: (!e.traceback.is_empty()).then_some(e.traceback),
    }
}

/// Checks that bytes the worker sent as a JSON payload are JSON: as on stdio, anything else is
/// a protocol violation that breaks the connection (the worker is replaced).
fn json_payload(breaker: &Breaker, worker: WorkerId, bytes: Vec<u8>, what: &str) -> Result<Payload, Error> {
    match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
        Ok(_) => Ok(Payload::from_trusted(Codec::Json, bytes)),
        Err(e) => {
            let detail = format!("{what} is not valid JSON: {e}");
            breaker.protocol_error(detail.clone());
            Err(Error::Protocol { worker, detail, source: None })
        }
    }
}

impl GrpcConnection {
    fn request<T>(&self, msg: T, deadline: Option<Instant>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = self.token.parse() {
            r.metadata_mut().insert(TOKEN_HEADER, v);
        }
        if let Some(d) = deadline {
            // Propagated as the gRPC deadline, with a margin: the caller's own timer is the one
            // that reports `Timeout` (and starts the cancel ladder); this one only makes sure
            // the worker side gives up too.
            r.set_timeout(d.saturating_duration_since(Instant::now()) + Duration::from_secs(1));
        }
        r
    }

    fn call_request(&self, req: &Request, id: u64) -> Result<proto::CallRequest, Error> {
        if req.args.has_segments() && !self.segments {
            return Err(Error::BadRequest(format!(
                "arguments of `{}` carry binary segments, and this worker does not accept them (its `ready` \
                 did not announce `segments`)",
                req.command
            )));
        }
        let args = req.args.bytes();
        if !req.args.is_trusted() {
            serde_json::from_slice::<serde::de::IgnoredAny>(args).map_err(|e| {
                Error::BadRequest(format!("arguments of `{}` are not valid JSON: {e}", req.command))
            })?;
        }
        let size = req.args.total_len();
        if size > self.max_frame {
            return Err(Error::FrameTooLarge { size, max: self.max_frame });
        }
        Ok(proto::CallRequest {
            id,
            command: req.command.to_string(),
            args: args.to_vec(),
            segments: req.args.segments().iter().map(|b| b.to_vec()).collect(),
            session: req.session.clone().unwrap_or_default(),
            timeout_ms: req
                .deadline
                .map_or(0, |d| d.saturating_duration_since(Instant::now()).as_millis() as u64),
        })
    }

    /// Maps a gRPC status: a dead worker (its pipe closed) is `Disconnected`, so the pool
    /// reports `WorkerCrashed`; anything else is a protocol error.
    async fn status_error(&self, command: &str, s: tonic::Status) -> Error {
        if s.code() == tonic::Code::DeadlineExceeded
            || (s.code() == tonic::Code::Cancelled && s.message().contains("Timeout"))
        {
            return Error::Timeout {
                command: command.into(),
                worker: Some(self.worker),
                after: Duration::ZERO,
            };
        }
        if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown {
            // Give the control channel a moment to notice the exit (it returns as soon as it
            // does; 2 s so that a loaded machine still reports a crash as a crash).
            let _ = tokio::time::timeout(Duration::from_secs(2), self.control.closed()).await;
        }
        match self.control.close_reason() {
            // The worker broke the protocol (here or on the pipe): its calls fail with that.
            Some(CloseReason::Protocol(detail)) => {
                return Error::Protocol { worker: self.worker, detail, source: None }
            }
            Some(_) => return Error::Disconnected { worker: self.worker },
            None => {}
        }
        Error::Protocol {
            worker: self.worker,
            detail: format!("gRPC {}: {}", s.code(), s.message()),
            source: None,
        }
    }
}

#[async_trait]
impl Connection for GrpcConnection {
    async fn call(&self, req: Request) -> Result<Payload, Error> {
        let id = req.id.map_or_else(|| self.next_id.fetch_add(1, Ordering::Relaxed), |i| i.0);
        let msg = self.call_request(&req, id)?;
        let _guard = self.inflight.enter(RequestId(id));
        let reply = match self.client.clone().execute(self.request(msg, req.deadline)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.status_error(&req.command, s).await),
        };
        let segments = reply.segments;
        match reply.outcome {
            Some(proto::call_reply::Outcome::Ok(b)) => {
                json_payload(&self.control.breaker(), self.worker, b, "the `ok` of a CallReply")
                    .map(|p| p.with_segments(segments.into_iter().map(Bytes::from).collect()))
            }
            Some(proto::call_reply::Outcome::Error(e)) => Err(Error::Worker {
                worker: self.worker,
                command: req.command.to_string(),
                error: worker_error(e),
            }),
            None => {
                Err(Error::Protocol { worker: self.worker, detail: "empty CallReply".into(), source: None })
            }
        }
    }

    async fn stream(
        &self,
        req: Request,
        _window: u32,
    ) -> Result<BoxStream<'static, Result<Payload, Error>>, Error> {
        let id = req.id.map_or_else(|| self.next_id.fetch_add(1, Ordering::Relaxed), |i| i.0);
        let msg = self.call_request(&req, id)?;
        let guard = self.inflight.enter(RequestId(id));
        let stream = match self.client.clone().stream(self.request(msg, req.deadline)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.status_error(&req.command, s).await),
        };
        let worker = self.worker;
        let command = req.command;
        let breaker = self.control.breaker();
        // HTTP/2 flow control holds a fast producer back; the guard lives as long as the stream.
        let items = stream.map(move |item| {
            let _keep = &guard;
            match item {
                Ok(proto::StreamItem { item: Some(proto::stream_item::Item::Chunk(b)), segments }) => {
                    json_payload(&breaker, worker, b, "a StreamItem chunk")
                        .map(|p| p.with_segments(segments.into_iter().map(Bytes::from).collect()))
                }
                Ok(proto::StreamItem { item: Some(proto::stream_item::Item::Error(e)), .. }) => {
                    Err(Error::Worker { worker, command: command.to_string(), error: worker_error(e) })
                }
                Ok(proto::StreamItem { item: None, .. }) => {
                    Err(Error::Protocol { worker, detail: "empty StreamItem".into(), source: None })
                }
                Err(s) => Err(Error::Protocol {
                    worker,
                    detail: format!("gRPC {}: {}", s.code(), s.message()),
                    source: None,
                }),
            }
        });
        Ok(Box::pin(items))
    }

    async fn ping(&self) -> Result<Duration, Error> {
        self.control.ping().await
    }

    async fn shutdown(&self) {
        self.control.shutdown().await;
    }

    fn closed(&self) -> BoxFuture<'static, CloseReason> {
        self.control.closed()
    }

    fn is_closed(&self) -> bool {
        self.control.is_closed()
    }

    fn new_request_id(&self) -> RequestId {
        RequestId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn cancel(&self, id: RequestId) {
        let mut client = self.client.clone();
        let req = self.request(proto::CancelRequest { id: id.0 }, None);
        tokio::spawn(async move {
            let _ = client.cancel(req).await;
        });
    }

    fn idle(&self) -> BoxFuture<'static, ()> {
        Box::pin(self.inflight.idle())
    }

    fn answered(&self, id: RequestId) -> BoxFuture<'static, ()> {
        Box::pin(self.inflight.answered(id))
    }

    fn private_dir(&self) -> Option<&Path> {
        Some(&self._dir.0)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Pipes to nobody: every failure tested here happens before the handshake.
    fn io() -> WorkerIo {
        let (host_in, _) = tokio::io::duplex(64);
        let (_, host_out) = tokio::io::duplex(64);
        WorkerIo {
            worker: WorkerId { slot: 3, generation: 1 },
            input: Box::new(host_in),
            output: Box::new(host_out),
        }
    }

    fn hello() -> Hello {
        Hello::new(WorkerId { slot: 3, generation: 1 }, 1 << 20, serde_json::Value::Null)
    }

    /// A scratch directory under the temp dir, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("snakepit-grpc-test-{name}-{:x}", fastrand::u64(..)));
            std::fs::create_dir_all(&p).expect("scratch dir");
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn setup_error(r: Result<(Arc<dyn Connection>, Ready), Error>) -> (String, std::io::ErrorKind) {
        match r {
            Err(e @ Error::TransportSetup { transport: "grpc", .. }) => {
                assert_eq!(e.kind(), "transport_setup");
                assert_eq!(e.worker(), Some(WorkerId { slot: 3, generation: 1 }));
                let io = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()).expect("io source");
                (e.to_string(), io.kind())
            }
            Err(other) => panic!("unexpected {other:?}"),
            Ok(_) => panic!("connected to nobody"),
        }
    }

    #[test]
    fn tokens_come_from_the_os_rng_whatever_the_thread_local_rng_was_seeded_with() {
        // Any code in the host can seed fastrand's thread-local generator; a token drawn from
        // it would then be predictable.
        fastrand::seed(7);
        let a = token().expect("token");
        fastrand::seed(7);
        let b = token().expect("token");
        assert_ne!(a, b, "the token is predictable from the seed");
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
    }

    #[test]
    fn a_token_matches_only_itself() {
        let t = token().expect("token");
        assert!(token_matches(&t, &t));
        assert!(!token_matches(&t[..63], &t));
        assert!(!token_matches("", &t));
        assert!(!token_matches(&format!("{t}0"), &t));
        let mut wrong = t.clone().into_bytes();
        wrong[63] = if wrong[63] == b'0' { b'1' } else { b'0' };
        assert!(!token_matches(&String::from_utf8(wrong).expect("ascii"), &t));
    }

    /// Points the default socket root at `$TMPDIR/snakepit-<euid>` (no runtime dir), with
    /// `TMPDIR` a scratch directory. Each test runs in its own process under nextest.
    fn shared_tmp_root(tmp: &Path) -> PathBuf {
        std::env::remove_var("XDG_RUNTIME_DIR");
        std::env::set_var("TMPDIR", tmp);
        tmp.join(format!("snakepit-{}", snakepit_fs::euid()))
    }

    fn mode(p: &Path) -> u32 {
        std::os::unix::fs::MetadataExt::mode(&std::fs::symlink_metadata(p).expect("stat")) & 0o7777
    }

    #[test]
    fn a_symlinked_shared_socket_root_is_neither_used_nor_chmodded() {
        let scratch = Scratch::new("symlink");
        let root = shared_tmp_root(&scratch.0);
        let theirs = scratch.0.join("theirs");
        std::fs::create_dir(&theirs).expect("mkdir");
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::os::unix::fs::symlink(&theirs, &root).expect("symlink");
        let dir = make_private_dir(None).expect("a private dir");
        assert!(!dir.0.starts_with(&root) && !dir.0.starts_with(&theirs), "{:?}", dir.0);
        assert_eq!(mode(&dir.0), 0o700);
        assert_eq!(mode(&theirs), 0o755, "chmodded a directory snakepit did not create");
        assert_eq!(std::fs::read_dir(&theirs).expect("ls").count(), 0, "created a socket dir in it");
        // Later workers use the same fallback root.
        let again = make_private_dir(None).expect("again");
        assert_eq!(again.0.parent(), dir.0.parent());
    }

    #[test]
    fn a_shared_socket_root_owned_by_another_user_is_neither_used_nor_chmodded() {
        if snakepit_fs::euid() != 0 {
            eprintln!(
                "not root: cannot plant a directory owned by another user; the symlink case covers the rest"
            );
            return;
        }
        let scratch = Scratch::new("owner");
        let root = shared_tmp_root(&scratch.0);
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        std::os::unix::fs::chown(&root, Some(65534), Some(65534)).expect("chown");
        let dir = make_private_dir(None).expect("a private dir");
        assert!(!dir.0.starts_with(&root), "{:?}", dir.0);
        assert_eq!(mode(&root), 0o777, "chmodded a directory snakepit did not create");
        assert_eq!(std::fs::read_dir(&root).expect("ls").count(), 0, "created a socket dir in it");
    }

    #[test]
    fn the_default_socket_root_prefers_the_runtime_dir() {
        let scratch = Scratch::new("runtime");
        let run = scratch.0.join("run");
        std::fs::create_dir(&run).expect("mkdir");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::env::set_var("XDG_RUNTIME_DIR", &run);
        let dir = make_private_dir(None).expect("a private dir");
        assert_eq!(dir.0.parent(), Some(run.join("snakepit").as_path()));
    }

    #[test]
    fn a_callers_socket_root_is_never_chmodded() {
        let scratch = Scratch::new("caller");
        let root = scratch.0.join("mine");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let dir = make_private_dir(Some(&root)).expect("a private dir");
        assert_eq!(mode(&root), 0o755, "chmodded the caller's directory");
        assert_eq!(mode(&dir.0), 0o700);
        // A symlink as the root is refused.
        let link = scratch.0.join("link");
        std::os::unix::fs::symlink(&root, &link).expect("symlink");
        let (path, _) = make_private_dir(Some(&link)).expect_err("a symlinked root");
        assert_eq!(path, link.canonicalize().expect("canon").parent().expect("parent").join("link"));
    }

    #[tokio::test]
    async fn a_socket_path_too_long_is_a_transport_setup_error() {
        let scratch = Scratch::new("long");
        let root = scratch.0.join("x".repeat(MAX_SOCKET_PATH));
        let r = Grpc::default().socket_root(&root).connect(io(), hello()).await;
        let (msg, kind) = setup_error(r);
        assert_eq!(kind, std::io::ErrorKind::InvalidInput);
        assert!(msg.contains("too long"), "{msg}");
        // The worker's private directory is gone again.
        assert_eq!(std::fs::read_dir(&root).expect("root").count(), 0);
    }

    #[tokio::test]
    async fn an_unusable_socket_root_is_a_transport_setup_error() {
        let scratch = Scratch::new("file");
        let file = scratch.0.join("not-a-dir");
        std::fs::write(&file, b"").expect("file");
        let r = Grpc::default().socket_root(file.join("sub")).connect(io(), hello()).await;
        let (msg, _) = setup_error(r);
        assert!(msg.contains("socket directory") && msg.contains("not-a-dir"), "{msg}");
    }
}
