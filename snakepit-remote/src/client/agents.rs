//! The agents behind the configured URLs: resolution, one connection task per agent, and the
//! choice of an agent for a new remote worker.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use snakepit_core::{Error, Ready, StartOptions, ToolInfo, WorkerHandle};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use super::worker::RemoteWorker;
use super::RemoteOptions;
use crate::proto::agent_client::AgentClient;
use crate::proto::{AgentStatus, StatusRequest};
use crate::AgentUrl;

/// The most workers one agent is taken to have, whatever it says.
const MAX_AGENT_WORKERS: usize = 4096;

/// Where a live agent stands, as its workers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LiveState {
    Up,
    /// It stopped taking calls (or left the DNS answer): its workers leave gracefully.
    Draining,
    /// Its connection broke: its workers are gone and their calls fail with `agent_lost`.
    Lost,
}

/// One connection to one agent, from its first status to its loss.
pub(crate) struct Live {
    pub(crate) client: AgentClient<Channel>,
    /// Remote workers bound to this connection by this front end (a new connection to the same
    /// agent starts from 0: the workers of a lost one are gone, even if not dropped yet).
    pub(crate) bound: AtomicUsize,
    status: Mutex<AgentStatus>,
    pub(crate) state: watch::Sender<LiveState>,
}

impl Live {
    pub(crate) fn state(&self) -> LiveState {
        *self.state.borrow()
    }

    fn workers(&self) -> usize {
        // What an agent says is input from the network: no more than MAX_AGENT_WORKERS.
        (self.status.lock().unwrap_or_else(|p| p.into_inner()).workers as usize).min(MAX_AGENT_WORKERS)
    }

    /// Idle workers minus queued calls, as the agent last said (all front ends' load).
    fn spare(&self) -> i64 {
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        i64::from(s.free) - i64::from(s.queued)
    }

    fn tools(&self) -> Vec<ToolInfo> {
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.tools
            .iter()
            .map(|t| {
                let info = if t.stream { ToolInfo::stream(&t.name) } else { ToolInfo::new(&t.name) };
                info.with_doc((!t.doc.is_empty()).then(|| t.doc.clone()))
            })
            .collect()
    }

    fn bridge(&self) -> String {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).bridge.clone()
    }

    /// Resolves once the connection is lost.
    pub(crate) async fn lost(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| *s == LiveState::Lost).await;
    }

    /// Resolves once the agent drains (never for one lost without draining first: its workers
    /// exit instead).
    pub(crate) async fn leaving(&self) {
        let mut rx = self.state.subscribe();
        if rx.wait_for(|s| *s == LiveState::Draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Clone)]
enum Link {
    Connecting,
    Down { reason: Arc<str>, refused: bool },
    Up(Arc<Live>),
}

/// One agent: a URL resolved to one address.
pub(crate) struct Host {
    /// How it is named in errors and logs: the URL, plus the address when the URL's host is a
    /// name.
    pub(crate) name: Arc<str>,
    url: AgentUrl,
    addr: SocketAddr,
    link: watch::Sender<Link>,
    /// Attempts to reach it that ended (either way).
    tries: AtomicU64,
    gone: watch::Sender<bool>,
}

pub(crate) struct Agents {
    pub(crate) opts: RemoteOptions,
    urls: Vec<AgentUrl>,
    tls: Option<Arc<rustls::ClientConfig>>,
    hosts: Mutex<Vec<Arc<Host>>>,
    resolve_errors: Mutex<Vec<String>>,
    resolved: AtomicBool,
    changed: Arc<watch::Sender<u64>>,
    tasks: Mutex<Option<tokio::task::JoinSet<()>>>,
    me: Weak<Agents>,
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.close();
    }
}

fn bump(changed: &watch::Sender<u64>) {
    changed.send_modify(|n| *n += 1);
}

impl Agents {
    pub(crate) fn new(
        opts: RemoteOptions,
        urls: Vec<AgentUrl>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Agents {
            opts,
            urls,
            tls,
            hosts: Mutex::new(Vec::new()),
            resolve_errors: Mutex::new(Vec::new()),
            resolved: AtomicBool::new(false),
            changed: Arc::new(watch::channel(0).0),
            tasks: Mutex::new(None),
            me: me.clone(),
        })
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.urls.iter().map(|u| u.url.clone()).collect()
    }

    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn hosts(&self) -> Vec<Arc<Host>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.hosts()
            .iter()
            .map(|h| match &*h.link.borrow() {
                Link::Up(live) if live.state() == LiveState::Up => live.workers(),
                _ => 0,
            })
            .sum()
    }

    pub(crate) fn describe(&self) -> Vec<(String, String)> {
        self.hosts()
            .iter()
            .map(|h| {
                let state = match &*h.link.borrow() {
                    Link::Connecting => "connecting".to_owned(),
                    Link::Down { reason, .. } => format!("down: {reason}"),
                    Link::Up(live) => match live.state() {
                        LiveState::Up => format!(
                            "up: {} workers, {} bound here",
                            live.workers(),
                            live.bound.load(Ordering::Relaxed)
                        ),
                        LiveState::Draining => "draining".to_owned(),
                        LiveState::Lost => "lost".to_owned(),
                    },
                };
                (h.name.to_string(), state)
            })
            .collect()
    }

    pub(crate) fn close(&self) {
        if let Some(mut tasks) = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).take() {
            tasks.abort_all();
            tasks.detach_all();
        }
        for h in self.hosts() {
            h.gone.send_replace(true);
            if let Link::Up(live) = &*h.link.borrow() {
                live.state.send_replace(LiveState::Lost);
            }
        }
    }

    /// Starts the resolver (which starts one task per agent), once.
    fn start(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks.is_some() {
            return;
        }
        let mut set = tokio::task::JoinSet::new();
        set.spawn(resolve_loop(self.me.clone()));
        *tasks = Some(set);
    }

    fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(set) = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            set.spawn(fut);
        }
    }

    pub(crate) async fn connect(&self) -> Result<usize, Error> {
        self.start();
        let mut changes = self.changed.subscribe();
        let limit = self.opts.connect_timeout * 2 + Duration::from_secs(1);
        let settled = async {
            loop {
                let hosts = self.hosts();
                if self.resolved.load(Ordering::Acquire)
                    && hosts.iter().all(|h| h.tries.load(Ordering::Acquire) > 0)
                {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(limit, settled).await;
        let setup = |reason: String| Error::TransportSetup {
            worker: snakepit_core::WorkerId { slot: 0, generation: 0 },
            transport: "remote",
            source: std::io::Error::new(std::io::ErrorKind::NotConnected, "no agent"),
            reason,
        };
        let mut down = Vec::new();
        for h in self.hosts() {
            match &*h.link.borrow() {
                Link::Down { reason, refused: true } => {
                    return Err(setup(format!("agent {} refused the TLS handshake: {reason}", h.name)));
                }
                Link::Down { reason, .. } => down.push(format!("{}: {reason}", h.name)),
                Link::Connecting => down.push(format!("{}: no answer yet", h.name)),
                Link::Up(_) => {}
            }
        }
        down.extend(self.resolve_errors.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        let capacity = self.capacity();
        if capacity == 0 {
            let what = if down.is_empty() { "no agent has a worker".to_owned() } else { down.join("; ") };
            return Err(setup(format!("no agent reachable ({what})")));
        }
        for d in down {
            tracing::warn!("agent not reachable yet (retrying in the background): {d}");
        }
        Ok(capacity)
    }

    pub(crate) async fn launch(&self, opts: StartOptions) -> Result<Box<dyn WorkerHandle>, Error> {
        let chosen = {
            // Under the hosts' lock, so that two starts cannot both take an agent's last worker.
            let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            let best = hosts
                .iter()
                .filter_map(|h| match &*h.link.borrow() {
                    Link::Up(live) if live.state() == LiveState::Up => {
                        let bound = live.bound.load(Ordering::Acquire);
                        let free = live.workers().saturating_sub(bound);
                        (free > 0).then(|| (h.clone(), live.clone(), free, bound))
                    }
                    _ => None,
                })
                // Most workers not bound here; then what the agent itself says it has free
                // (other front ends' load); then fewest bound here.
                .max_by_key(|(_, live, free, bound)| (*free, live.spare(), std::cmp::Reverse(*bound)));
            if let Some((_, live, _, _)) = &best {
                live.bound.fetch_add(1, Ordering::AcqRel);
            }
            best
        };
        let Some((host, live, _, _)) = chosen else {
            let states: Vec<String> = self.describe().into_iter().map(|(n, s)| format!("{n}: {s}")).collect();
            let reason = format!("no agent has a worker free for this front end ({})", states.join("; "));
            return Err(Error::TransportSetup {
                worker: opts.worker,
                transport: "remote",
                source: std::io::Error::new(std::io::ErrorKind::NotConnected, "no capacity"),
                reason,
            });
        };
        let ready = Ready::new(1, 0).with_tools(live.tools()).with_bridge(format!(
            "remote {} / {}",
            host.name,
            live.bridge()
        ));
        Ok(Box::new(RemoteWorker::new(opts, host, live, ready)))
    }
}

/// Resolves the URLs (again every `resolve_every` while some are names) and keeps one task per
/// address.
async fn resolve_loop(agents: Weak<Agents>) {
    loop {
        let Some(me) = agents.upgrade() else { return };
        let mut want: Vec<(AgentUrl, SocketAddr)> = Vec::new();
        let mut errors = Vec::new();
        for url in &me.urls {
            match me.opts.resolver.resolve(&url.host, url.port).await {
                Ok(addrs) if !addrs.is_empty() => want.extend(addrs.into_iter().map(|a| (url.clone(), a))),
                r => {
                    let why = r.err().map_or_else(|| "no address".to_owned(), |e| e.to_string());
                    errors.push(format!("{}: cannot resolve {}: {why}", url.url, url.host));
                    // A failed lookup keeps the agents it found before.
                    for h in me.hosts().iter().filter(|h| h.url == *url) {
                        want.push((url.clone(), h.addr));
                    }
                }
            }
        }
        me.reconcile(want);
        *me.resolve_errors.lock().unwrap_or_else(|p| p.into_inner()) = errors;
        me.resolved.store(true, Ordering::Release);
        bump(&me.changed);
        let names = me.urls.iter().any(|u| u.host.parse::<std::net::IpAddr>().is_err());
        let every = me.opts.resolve_every;
        drop(me);
        if !names {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

impl Agents {
    fn reconcile(&self, want: Vec<(AgentUrl, SocketAddr)>) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts.retain(|h| {
            let keep = want.iter().any(|(u, a)| *u == h.url && *a == h.addr);
            if !keep {
                tracing::info!(agent = %h.name, "agent left the DNS answer; its workers leave");
                h.gone.send_replace(true);
            }
            keep
        });
        for (url, addr) in want {
            if hosts.iter().any(|h| h.url == url && h.addr == addr) {
                continue;
            }
            let name: Arc<str> = if url.host.parse::<std::net::IpAddr>().is_ok() {
                url.url.as_str().into()
            } else {
                format!("{} ({addr})", url.url).into()
            };
            let host = Arc::new(Host {
                name,
                url,
                addr,
                link: watch::channel(Link::Connecting).0,
                tries: AtomicU64::new(0),
                gone: watch::channel(false).0,
            });
            hosts.push(host.clone());
            self.spawn(run_host(self.opts.clone(), self.tls.clone(), host, self.changed.clone()));
        }
    }
}

struct Failure {
    reason: String,
    refused: bool,
}

/// The whole chain of an error, one cause after another.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn failure(what: &str, e: &(dyn std::error::Error + 'static)) -> Failure {
    let reason = format!("{what}: {}", chain(e));
    Failure { reason, refused: tls_refusal(e) }
}

/// Whether a rustls error is in the chain: a TLS refusal either way (a bad or missing client
/// certificate, an agent certificate this front end does not trust) — a misconfiguration, not
/// an outage. (A connection closed mid-handshake is an I/O error, not this.)
fn tls_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        if let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if inner.is::<rustls::Error>() {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

async fn establish(
    opts: &RemoteOptions,
    tls: &Option<Arc<rustls::ClientConfig>>,
    host: &Host,
) -> Result<(Arc<Live>, tonic::Streaming<AgentStatus>), Failure> {
    let timeout = opts.connect_timeout;
    let endpoint = Endpoint::from_shared(format!("http://{}", host.addr))
        .map_err(|e| failure("bad address", &e))?
        .http2_keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.keepalive_timeout)
        .keep_alive_while_idle(true)
        .connect_timeout(timeout);
    if host.url.plaintext && !host.addr.ip().is_loopback() {
        // `http://localhost` that resolved elsewhere: plaintext stays on loopback.
        let reason = format!(
            "{} resolved to {}, not a loopback address (plaintext is for loopback only)",
            host.url, host.addr
        );
        return Err(Failure { reason, refused: true });
    }
    let connector = Connector {
        addr: host.addr,
        // An `http://` URL is plaintext even when TLS is set for the others.
        tls: if host.url.plaintext { None } else { tls.clone().map(tokio_rustls::TlsConnector::from) },
        server_name: host.url.host.clone(),
        timeout,
    };
    let timed_out = || Failure { reason: format!("no answer within {timeout:?}"), refused: false };
    let channel = tokio::time::timeout(timeout, endpoint.connect_with_connector(connector))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| failure("cannot connect", &e))?;
    let mut client = AgentClient::new(channel)
        .max_decoding_message_size(crate::MAX_MESSAGE)
        .max_encoding_message_size(crate::MAX_MESSAGE);
    let mut status = tokio::time::timeout(timeout, client.status(StatusRequest {}))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| failure("status refused", &e))?
        .into_inner();
    let first = match tokio::time::timeout(timeout, status.message()).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(e)) => return Err(failure("status failed", &e)),
        Ok(Ok(None)) => {
            return Err(Failure { reason: "the agent closed its status stream".into(), refused: false })
        }
        Ok(Ok(Some(s))) => s,
    };
    let state = if first.draining { LiveState::Draining } else { LiveState::Up };
    let live = Arc::new(Live {
        client,
        bound: AtomicUsize::new(0),
        status: Mutex::new(first),
        state: watch::channel(state).0,
    });
    Ok((live, status))
}

/// Keeps one agent's connection: connect (backoff from 100 ms to `reconnect_max`), follow its
/// status, mark it lost when the status stream breaks or stays silent past the keepalive
/// timeout, and start again — until the agent leaves the DNS answer or the pool closes.
async fn run_host(
    opts: RemoteOptions,
    tls: Option<Arc<rustls::ClientConfig>>,
    host: Arc<Host>,
    changed: Arc<watch::Sender<u64>>,
) {
    let mut gone = host.gone.subscribe();
    let min = Duration::from_millis(100);
    let mut delay = min;
    let mut last_reason = String::new();
    loop {
        if *gone.borrow() {
            return;
        }
        let attempt = tokio::select! {
            r = establish(&opts, &tls, &host) => r,
            _ = gone.wait_for(|g| *g) => return,
        };
        match attempt {
            Ok((live, mut status)) => {
                host.link.send_replace(Link::Up(live.clone()));
                host.tries.fetch_add(1, Ordering::AcqRel);
                bump(&changed);
                tracing::info!(agent = %host.name, workers = live.workers(), "agent connected");
                delay = min;
                last_reason.clear();
                let silence = opts.keepalive_interval + opts.keepalive_timeout;
                let reason = loop {
                    let next = tokio::select! {
                        m = tokio::time::timeout(silence, status.message()) => m,
                        _ = gone.wait_for(|g| *g) => {
                            // Left the DNS answer (or the pool closes): its workers leave
                            // gracefully; the connection stays for their calls in flight.
                            live.state.send_replace(LiveState::Draining);
                            bump(&changed);
                            return;
                        }
                    };
                    match next {
                        Ok(Ok(Some(s))) => {
                            let before = (live.workers(), live.state());
                            let draining = s.draining;
                            *live.status.lock().unwrap_or_else(|p| p.into_inner()) = s;
                            if draining && live.state() == LiveState::Up {
                                tracing::info!(agent = %host.name, "agent drains; its workers leave");
                                live.state.send_replace(LiveState::Draining);
                            }
                            if (live.workers(), live.state()) != before {
                                bump(&changed);
                            }
                        }
                        Ok(Ok(None)) => break "the agent closed its status stream".to_owned(),
                        Ok(Err(e)) => break failure("connection broke", &e).reason,
                        Err(_) => break format!("no status within {silence:?}"),
                    }
                };
                let was = live.state.send_replace(LiveState::Lost);
                if was == LiveState::Draining {
                    tracing::info!(agent = %host.name, "drained agent closed");
                } else {
                    tracing::warn!(agent = %host.name, "agent lost: {reason}");
                }
                host.link.send_replace(Link::Down { reason: reason.into(), refused: false });
                bump(&changed);
            }
            Err(f) => {
                if f.reason != last_reason {
                    tracing::warn!(agent = %host.name, "cannot reach agent: {}", f.reason);
                    last_reason = f.reason.clone();
                }
                host.link.send_replace(Link::Down { reason: f.reason.into(), refused: f.refused });
                host.tries.fetch_add(1, Ordering::AcqRel);
                bump(&changed);
            }
        }
        let jitter = Duration::from_millis(u64::from(std::process::id() % 50));
        tokio::select! {
            _ = tokio::time::sleep(delay + jitter) => {}
            _ = gone.wait_for(|g| *g) => return,
        }
        delay = (delay * 2).min(opts.reconnect_max.max(min));
    }
}

/// Opens the TCP connection (and the TLS session) to one agent for tonic.
#[derive(Clone)]
struct Connector {
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    server_name: String,
    timeout: Duration,
}

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<ClientIo>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::time::timeout(this.timeout, TcpStream::connect(this.addr))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TCP connect timed out"))??;
            let _ = tcp.set_nodelay(true);
            let io = match this.tls {
                None => ClientIo::Plain(tcp),
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::try_from(this.server_name.clone())
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    let s = tokio::time::timeout(this.timeout, tls.connect(name, tcp)).await.map_err(
                        |_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"),
                    )??;
                    ClientIo::Tls(Box::new(s))
                }
            };
            Ok(hyper_util::rt::TokioIo::new(io))
        })
    }
}

/// A connection to an agent: plain TCP (loopback) or TLS.
type ClientIo = crate::io::MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;
