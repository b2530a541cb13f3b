//! The pool as its slots see it: [`SlotManager`] for the pool's shared state.

use std::future::Future;
use std::sync::Arc;
#[cfg(feature = "chaos")]
use std::time::Duration;

use snakepit_core::{Error, WorkerId};
use snakepit_supervisor::{Member, SlotEvent, SlotManager};

use super::Inner;

/// What the slots of a pool talk to (a newtype, so that the slot tasks hold the pool's state
/// behind an `Arc` and can check workers in).
pub(crate) struct Manager(pub(crate) Arc<Inner>);

impl Inner {
    /// Starts a worker through the launcher and wraps it with the slot's limits.
    pub(crate) async fn start_member(&self, id: WorkerId) -> Result<Arc<Member>, Error> {
        let pool = &*self.metrics.pool;
        tracing::debug!(target: "snakepit::worker", event = "started", pool, worker = %id, "starting a worker");
        let launcher = self.source().launcher.clone();
        self.start_member_with(&*launcher, id).await
    }

    /// Starts a worker through `launcher` (the pool's, or a reload's new one).
    pub(crate) async fn start_member_with(
        &self,
        launcher: &dyn snakepit_core::Launcher,
        id: WorkerId,
    ) -> Result<Arc<Member>, Error> {
        let pool = &*self.metrics.pool;
        let t0 = std::time::Instant::now();
        let handle = launcher.launch(self.start_opts.for_worker(id)).await?;
        let startup_ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            target: "snakepit::worker",
            event = "ready",
            pool,
            worker = %id,
            pid = handle.pid(),
            startup_ms,
            "worker ready"
        );
        self.learn_tools(handle.ready());
        Ok(Arc::new(Member::new(handle, &self.cfg.slot)))
    }
}

impl SlotManager for Manager {
    fn start(&self, id: WorkerId) -> impl Future<Output = Result<Arc<Member>, Error>> + Send {
        self.0.start_member(id)
    }

    fn admit(&self, member: &Arc<Member>) {
        self.0.checkin(member.clone());
    }

    fn dismiss(&self, member: &Arc<Member>) {
        self.0.remove_idle(member.id());
        self.0.fail_pinned(member.id().slot);
        self.0.counters.bump();
    }

    fn hold(&self, member: &Arc<Member>) -> bool {
        self.0.take_idle(member.id()).is_some()
    }

    fn event(&self, _slot: usize, event: SlotEvent<'_>) {
        let inner = &self.0;
        let c = &inner.counters;
        match event {
            SlotEvent::State(s)
                if s.is_failing() || inner.circuit_was_open.load(std::sync::atomic::Ordering::Acquire) =>
            {
                inner.check_circuit()
            }
            SlotEvent::Started { restart: true, worker } => {
                tracing::info!(target: "snakepit::worker", event = "restarted", worker = %worker, "worker restarted");
                inner.metrics.restarted();
                c.add(&c.restarts);
            }
            SlotEvent::Exited { .. } => c.add(&c.crashes),
            SlotEvent::Recycled { reason, .. } => {
                inner.metrics.recycled(reason);
                c.add(&c.recycled);
            }
            SlotEvent::Unresponsive { .. } => c.add(&c.unresponsive),
            SlotEvent::HeartbeatAnswered { .. } => c.add(&c.heartbeats),
            SlotEvent::StartFailed { error, .. } => {
                *inner.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
            }
            _ => c.bump(),
        }
    }

    #[cfg(feature = "chaos")]
    fn ping<'a>(&'a self, member: &'a Member) -> impl Future<Output = Result<Duration, Error>> + Send + 'a {
        let dropped = self.0.cfg.chaos.as_ref().is_some_and(|c| c.take_heartbeat_drop());
        async move {
            if dropped {
                Err(Error::Unavailable("heartbeat dropped by chaos".into()))
            } else {
                member.connection().ping().await
            }
        }
    }
}
