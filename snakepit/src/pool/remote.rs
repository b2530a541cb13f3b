//! A pool whose workers are on remote agents (feature `remote`): the builder's side of
//! [`Remote`](snakepit_remote::Remote), and the task that grows the pool when agents come.

use std::sync::{Arc, Weak};
use std::time::Duration;

use snakepit_core::Error;
use snakepit_remote::{ClientTls, Remote, RemoteOptions};
use tokio::sync::watch;

use super::{Inner, PoolBuilder};

impl PoolBuilder {
    /// Workers on remote agents (`snakepit agent`) at these URLs (`https://host:port`; a DNS
    /// name may stand for several agents, resolved again periodically). Replaces the adapter.
    /// Unless [`size`](PoolBuilder::size) is set, the pool has as many workers as the agents
    /// reachable at `build` (and grows when more come). Set TLS with [`tls`](PoolBuilder::tls),
    /// the rest with [`remote_options`](PoolBuilder::remote_options).
    ///
    /// `build` fails with `transport_setup` naming an agent that refused this front end's TLS
    /// (or whose certificate this front end refused), or when no agent can be reached.
    pub fn remote<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut opts = self.remote.take().unwrap_or_else(|| RemoteOptions::new(Vec::<String>::new()));
        opts.agents = urls.into_iter().map(Into::into).collect();
        self.remote = Some(opts);
        self
    }

    /// Mutual TLS with the agents: their CA, this front end's certificate and key (PEM files).
    pub fn tls(mut self, tls: ClientTls) -> Self {
        let opts = self.remote.take().unwrap_or_else(|| RemoteOptions::new(Vec::<String>::new()));
        self.remote = Some(opts.tls(tls));
        self
    }

    /// All the remote settings at once (agents, TLS, keepalive, resolver...).
    pub fn remote_options(mut self, opts: RemoteOptions) -> Self {
        self.remote = Some(opts);
        self
    }
}

/// Connects to the agents and makes the builder's pool theirs: the adapter, the size (unless
/// set), and a retry of calls an agent refused before running them (it drains).
pub(crate) async fn prepare(opts: RemoteOptions, b: &mut PoolBuilder) -> Result<Remote, Error> {
    let slot = &b.cfg.slot;
    if slot.max_requests.is_some() || slot.max_age.is_some() || slot.max_memory.is_some() {
        // A recycled worker's replacement starts first, and an agent has no room for it.
        return Err(Error::BadRequest(
            "a remote pool does not recycle its workers (max_requests, max_age, max_memory): set them on the agents".into(),
        ));
    }
    let remote = Remote::new(opts)?;
    let capacity = remote.connect().await?;
    if !b.cfg.size_set {
        b.cfg.size = capacity.max(1);
    }
    b.cfg.retry_not_started = true;
    b.adapter = Some(Arc::new(remote.clone()));
    Ok(remote)
}

/// Grows the pool when the agents have more workers than it (an agent came, or grew), unless
/// the size was set or an autoscaler decides it. Never shrinks it: a lost agent's slots wait, restarting with
/// backoff, for it (or another) to come back.
pub(crate) async fn follow(pool: Weak<Inner>, remote: Remote, mut shutdown: watch::Receiver<bool>) {
    let mut changes = remote.changes();
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // Let a burst of changes (several agents at once) settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(inner) = pool.upgrade() else { return };
        if inner.cfg.autoscale.is_some() || inner.cfg.size_set {
            // The size is someone else's decision: the autoscaler's, or the program's.
            return;
        }
        let capacity = remote.capacity();
        let size = inner.size();
        if capacity > size {
            tracing::info!(
                pool = &*inner.metrics.pool,
                from = size,
                to = capacity,
                "agents have more workers; growing the pool"
            );
            if let Err(e) = inner.resize(capacity).await {
                tracing::warn!(pool = &*inner.metrics.pool, "cannot grow to the agents' workers: {e}");
            }
        }
    }
}
