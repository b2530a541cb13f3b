//! The front end's side: [`Remote`], an adapter whose workers are one worker's worth of an
//! agent's capacity each.
//!
//! * `agents.rs`: the agents behind the configured URLs (re-resolved periodically), one task
//!   per agent keeping its HTTP/2 connection and its `Status` stream, with backoff.
//! * `worker.rs`: a remote worker (`WorkerHandle`) and its `Connection`: each call one
//!   `Agent.Call` stream.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use snakepit_core::{Adapter, Error, Launcher, StartOptions, WorkerHandle};

use crate::{AgentUrl, ClientTls, DnsResolver, Resolve};

mod agents;
mod worker;

pub(crate) use agents::Agents;

/// A remote pool's settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct RemoteOptions {
    /// The agents: `https://host:port` URLs; a DNS name may stand for several (re-resolved
    /// every [`resolve_every`](Self::resolve_every)).
    pub agents: Vec<String>,
    /// Mutual TLS (the agents' CA, this front end's certificate and key).
    pub tls: Option<ClientTls>,
    /// Allows `http://` URLs — for loopback addresses only.
    pub insecure_plaintext: bool,
    /// HTTP/2 keepalive: a ping this often on each agent connection...
    pub keepalive_interval: Duration,
    /// ... answered within this, or the agent is lost (its calls fail with `agent_lost`).
    pub keepalive_timeout: Duration,
    /// How long a TCP connection and TLS handshake may take.
    pub connect_timeout: Duration,
    /// How often DNS names are resolved again.
    pub resolve_every: Duration,
    /// The longest wait between two attempts to reach an agent (backoff from 100 ms).
    pub reconnect_max: Duration,
    /// Resolves agent host names (default: the system resolver).
    pub resolver: Arc<dyn Resolve>,
}

impl std::fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("agents", &self.agents)
            .field("tls", &self.tls)
            .field("insecure_plaintext", &self.insecure_plaintext)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .finish_non_exhaustive()
    }
}

impl RemoteOptions {
    /// Agents at `urls`; keepalive every 2 s with a 3 s timeout, 5 s to connect, DNS names
    /// resolved again every 10 s, reconnection backoff up to 5 s.
    pub fn new<I, S>(urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RemoteOptions {
            agents: urls.into_iter().map(Into::into).collect(),
            tls: None,
            insecure_plaintext: false,
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(5),
            resolve_every: Duration::from_secs(10),
            reconnect_max: Duration::from_secs(5),
            resolver: Arc::new(DnsResolver),
        }
    }

    /// Sets mutual TLS.
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Allows `http://` URLs on loopback addresses.
    pub fn insecure_plaintext(mut self, on: bool) -> Self {
        self.insecure_plaintext = on;
        self
    }

    /// Sets the HTTP/2 keepalive interval and timeout.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keepalive_interval = interval.max(Duration::from_millis(10));
        self.keepalive_timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// Sets the resolver of agent host names (and how often names are resolved again).
    pub fn resolver(mut self, resolver: Arc<dyn Resolve>, every: Duration) -> Self {
        self.resolver = resolver;
        self.resolve_every = every.max(Duration::from_millis(10));
        self
    }
}

/// A pool whose workers are on remote agents (`snakepit agent`): an
/// [`Adapter`] with its own [`Launcher`].
///
/// Each worker of the pool is one worker's worth of one agent's capacity: starting it binds it
/// to the agent with the most unbound workers (none free: the start fails and the slot retries
/// with backoff), calls on it travel on that agent's HTTP/2 connection, and
///
/// * an agent lost (its connection broke, or it stopped answering within the keepalive
///   timeout) fails its calls with `agent_lost` at once, and its workers exit, so their slots
///   restart them elsewhere; their pinned sessions get `session_lost` (unless rehydrated);
/// * an agent draining (SIGTERM) has its workers leave gracefully
///   ([`WorkerHandle::leaving`]): no new calls, the running ones finish.
///
/// Build it, [`connect`](Remote::connect) it (the facade's builder does both), and hand it to
/// a pool as its adapter.
#[derive(Clone)]
pub struct Remote {
    agents: Arc<Agents>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("agents", &self.agents.urls()).finish_non_exhaustive()
    }
}

impl Remote {
    /// Checks the settings (URLs, TLS files, plaintext only on loopback); connects nothing yet.
    pub fn new(opts: RemoteOptions) -> Result<Remote, crate::Error> {
        let urls = opts.agents.iter().map(|u| AgentUrl::parse(u)).collect::<Result<Vec<_>, _>>()?;
        if urls.is_empty() {
            return Err(crate::Error::Url { url: String::new(), reason: "no agent URL given".into() });
        }
        for u in &urls {
            if u.plaintext && !(opts.insecure_plaintext && u.is_loopback()) {
                return Err(match opts.insecure_plaintext {
                    true => crate::Error::InsecureNotLoopback { addr: u.url.clone() },
                    false => crate::Error::Url {
                        url: u.url.clone(),
                        reason: "http:// needs --insecure-plaintext (loopback only); use https://".into(),
                    },
                });
            }
        }
        let tls = match (&opts.tls, urls.iter().all(|u| u.plaintext)) {
            (Some(t), _) => Some(t.config()?),
            (None, true) => None,
            (None, false) => {
                return Err(crate::Error::Tls {
                    path: "remote.tls".into(),
                    reason: "https:// agents need the agents' CA and a client certificate and key".into(),
                })
            }
        };
        crate::tls::install_crypto_provider();
        Ok(Remote { agents: Agents::new(opts, urls, tls) })
    }

    /// Starts watching the agents and waits until each has answered or failed once. Fails if
    /// an agent refused this front end's TLS (or this front end refused the agent's), naming
    /// it, or if no agent could be reached. Returns the workers the reachable agents have.
    pub async fn connect(&self) -> Result<usize, Error> {
        self.agents.connect().await
    }

    /// Workers across the agents reachable now (not draining).
    pub fn capacity(&self) -> usize {
        self.agents.capacity()
    }

    /// Changes whenever an agent comes, goes, drains or changes size.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.agents.changes()
    }

    /// The agents known now, with their state (`up`, `draining`, `down: why`).
    pub fn agents(&self) -> Vec<(String, String)> {
        self.agents.describe()
    }

    /// Stops watching the agents (the pool calls it at shutdown through the launcher).
    pub fn close(&self) {
        self.agents.close();
    }
}

impl Adapter for Remote {
    fn name(&self) -> String {
        "remote".into()
    }

    fn launcher(&self) -> Option<Arc<dyn Launcher>> {
        Some(Arc::new(self.clone()))
    }

    fn handshake_timeout(&self) -> Duration {
        self.agents.opts.connect_timeout + Duration::from_secs(5)
    }
}

#[async_trait]
impl Launcher for Remote {
    async fn launch(&self, opts: StartOptions) -> Result<Box<dyn WorkerHandle>, Error> {
        self.agents.launch(opts).await
    }

    async fn shutdown(&self, _grace: Duration) {
        self.agents.close();
    }

    fn abort(&self) {
        self.agents.close();
    }
}
