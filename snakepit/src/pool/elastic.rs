//! Pools that change under load: [`Pool::resize`] (more or fewer slots) and [`Pool::reload`]
//! (a rolling replacement of every worker, with another adapter or the same one).
//!
//! Both keep capacity and fail no call: a new worker is ready before anything is taken away,
//! and a worker leaves only after its calls finished (the slot's recycling path,
//! [`Slot::replace`] / [`Slot::remove`]). Resizes and reloads are serialised.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use snakepit_core::{Adapter, Error, Launcher};
use snakepit_supervisor::{Member, Slot};
use tokio::sync::watch;

use super::manager::Manager;
use super::{Inner, Pool, WorkerSource};

/// Attempts per slot at starting its replacement during a reload, after the first slot's
/// succeeded (a transient failure is retried; a lasting one ends the reload).
const RELOAD_ATTEMPTS: usize = 3;

impl Inner {
    /// Installs started workers in their slots and starts the slots' tasks (each with its own
    /// stop signal, in the pool's `snakepit.slot` span).
    pub(crate) fn run_slots(self: &Arc<Self>, mut workers: Vec<Arc<Member>>) {
        // Tasks are kept by slot index.
        workers.sort_by_key(|w| w.id().slot);
        let mgr = Arc::new(Manager(self.clone()));
        let slot_cfg = Arc::new(self.cfg.slot.clone());
        let slots = self.slots();
        let mut tasks = self.slot_tasks.lock().unwrap_or_else(|p| p.into_inner());
        for w in workers {
            let Some(slot) = slots.get(w.id().slot).cloned() else {
                w.kill();
                continue;
            };
            slot.install(&*mgr, &w);
            let span = tracing::info_span!("snakepit.slot", pool = &*self.metrics.pool, slot = slot.index());
            let (stop, stopped) = watch::channel(*self.shutdown.borrow());
            let run = slot.run(mgr.clone(), slot_cfg.clone(), w, stopped);
            let task = tokio::spawn(tracing::Instrument::instrument(run, span));
            tasks.push((stop, task));
        }
    }

    fn closed(&self) -> bool {
        *self.shutdown.borrow()
    }
}

impl Pool {
    /// Changes the number of workers to `n`, while the pool serves.
    ///
    /// Growing starts the new workers concurrently and returns once they all serve (if one
    /// fails to start, the others are stopped and the error returned: the pool is as it was).
    /// Shrinking takes the last slots' workers out of circulation at once, lets their running
    /// calls finish (no call fails; queued calls go to the other workers), then stops them.
    /// Sessions pinned to a removed worker follow the affinity rules: `Hint` calls move to
    /// another worker, `Strict` ones get `SessionLost` unless a rehydrate hook is set.
    /// `resize(0)` is `BadRequest`; after [`shutdown`](Pool::shutdown), `ShuttingDown`.
    pub async fn resize(&self, n: usize) -> Result<(), Error> {
        self.inner.resize(n).await
    }
}

impl Inner {
    /// [`Pool::resize`] (the autoscaler calls it too).
    pub(crate) async fn resize(self: &Arc<Self>, n: usize) -> Result<(), Error> {
        if n == 0 {
            return Err(Error::BadRequest("resize(0): a pool has at least one worker".into()));
        }
        let _admin = self.admin.lock().await;
        if self.closed() {
            return Err(Error::ShuttingDown);
        }
        let now = self.size();
        if n > now {
            self.grow(now, n).await?;
        } else if n < now {
            self.shrink(n).await;
        }
        self.counters.bump();
        Ok(())
    }

    async fn grow(self: &Arc<Self>, now: usize, n: usize) -> Result<(), Error> {
        let inner = self;
        // A slot that comes back after a shrink goes on with its generations.
        let fresh: Vec<Arc<Slot>> = {
            let gens = inner.retired_generations.lock().unwrap_or_else(|p| p.into_inner());
            (now..n).map(|i| Arc::new(Slot::starting_at(i, gens.get(&i).copied().unwrap_or(0)))).collect()
        };
        let started = futures::future::join_all(fresh.iter().map(|s| inner.start_member(s.next_id()))).await;
        let mut workers = Vec::with_capacity(started.len());
        let mut failed = None;
        for r in started {
            match r {
                Ok(w) => workers.push(w),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if failed.is_some() || inner.closed() {
            for w in &workers {
                w.kill();
            }
            return Err(failed.unwrap_or(Error::ShuttingDown));
        }
        inner.resize_pinned(n);
        {
            let mut slots = inner.slots.write().unwrap_or_else(|p| p.into_inner());
            let mut all = Vec::clone(&slots);
            all.extend(fresh);
            *slots = Arc::new(all);
        }
        inner.size.store(n, Ordering::Release);
        inner.run_slots(workers);
        tracing::info!(target: "snakepit::worker", event = "resized", pool = &*inner.metrics.pool, from = now, to = n, "pool grown");
        Ok(())
    }

    async fn shrink(self: &Arc<Self>, n: usize) {
        let inner = self;
        let now = inner.size();
        // Out of the routing first (a strict session call for them is `SessionLost` now), then
        // their tasks stopped, then their workers drained and stopped.
        let removed: Vec<Arc<Slot>> = {
            let mut slots = inner.slots.write().unwrap_or_else(|p| p.into_inner());
            let mut all = Vec::clone(&slots);
            let removed = all.split_off(n);
            *slots = Arc::new(all);
            removed
        };
        {
            let mut gens = inner.retired_generations.lock().unwrap_or_else(|p| p.into_inner());
            for s in &removed {
                gens.insert(s.index(), s.next_generation());
            }
        }
        inner.size.store(n, Ordering::Release);
        let tasks: Vec<_> = {
            let mut tasks = inner.slot_tasks.lock().unwrap_or_else(|p| p.into_inner());
            let split = n.min(tasks.len());
            tasks.split_off(split)
        };
        for (stop, task) in tasks {
            stop.send_replace(true);
            let _ = task.await;
        }
        let mgr = Manager(inner.clone());
        let (drain, grace) = (inner.cfg.slot.drain_timeout, inner.cfg.slot.shutdown_grace);
        futures::future::join_all(removed.iter().map(|s| s.remove(&mgr, drain, grace))).await;
        inner.resize_pinned(n);
        tracing::info!(target: "snakepit::worker", event = "resized", pool = &*inner.metrics.pool, from = now, to = n, "pool shrunk");
    }
}

impl Pool {
    /// Replaces every worker with one running `adapter` (new code, another model, another
    /// interpreter...), slot by slot, while the pool serves: each new worker is ready before
    /// the one it replaces stops taking calls, and that one finishes its calls first, so no
    /// call fails and capacity never drops (the original Snakepit's "switch the adapter at
    /// run time").
    ///
    /// The first new worker is the test: if it cannot start, `reload` returns that error and
    /// nothing changed. From then on, restarts after a crash start the new adapter's workers,
    /// and the command catalog is the new workers'. A later slot whose new worker fails
    /// three times ends the reload with that error, the slots not yet replaced
    /// still running the old adapter's workers. The transport, the start mode and every pool
    /// setting stay as built.
    pub async fn reload(&self, adapter: impl Adapter) -> Result<(), Error> {
        self.reload_shared(Arc::new(adapter)).await
    }

    /// [`reload`](Pool::reload) with an adapter already shared (e.g. from
    /// `PoolConfig::adapter`).
    pub async fn reload_shared(&self, adapter: Arc<dyn Adapter>) -> Result<(), Error> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        if inner.closed() {
            return Err(Error::ShuttingDown);
        }
        let launcher: Arc<dyn Launcher> = match (adapter.launcher(), &inner.template) {
            (Some(l), _) => l,
            (None, Some(t)) => {
                super::builder::check_protocol(adapter.protocol(), t.transport().protocol(), &inner.cfg)?;
                Arc::new(t.for_adapter(adapter.clone()))
            }
            (None, None) => {
                return Err(Error::BadRequest(
                    "this pool's adapter supplied its own launcher; reload it with another such adapter"
                        .into(),
                ))
            }
        };
        let slots = inner.slots();
        let name = adapter.name();
        tracing::info!(pool = &*inner.metrics.pool, adapter = %name, workers = slots.len(), "reloading");
        for (i, slot) in slots.iter().enumerate() {
            if inner.closed() {
                return Err(Error::ShuttingDown);
            }
            let mut attempt = 0;
            let next = loop {
                attempt += 1;
                match inner.start_member_with(&*launcher, slot.next_id()).await {
                    Ok(w) => break w,
                    // The first worker is the test of the new adapter: nothing changed yet.
                    Err(e) if i == 0 => {
                        launcher.abort();
                        return Err(e);
                    }
                    Err(e) if attempt >= RELOAD_ATTEMPTS => {
                        tracing::error!(pool = &*inner.metrics.pool, slot = i, "reload stopped: {e}");
                        return Err(e);
                    }
                    Err(e) => tracing::warn!(slot = i, attempt, "reload: a new worker failed to start: {e}"),
                }
            };
            if i == 0 {
                // From now on, restarts start the new adapter's workers and admission checks
                // against it; the catalog is the new workers'.
                let old = std::mem::replace(
                    &mut *inner.source.write().unwrap_or_else(|p| p.into_inner()),
                    Arc::new(WorkerSource { adapter: adapter.clone(), launcher: launcher.clone() }),
                );
                inner.retired_launchers.lock().unwrap_or_else(|p| p.into_inner()).push(old.launcher.clone());
                inner.relearn_tools(next.ready());
            }
            if !slot.replace(next).await && inner.closed() {
                // The pool is shutting down (the new worker was killed): stop here.
                return Err(Error::ShuttingDown);
            }
        }
        tracing::info!(pool = &*inner.metrics.pool, adapter = %name, "reloaded");
        Ok(())
    }

    /// Replaces every worker with a fresh one running the same adapter, the way
    /// [`reload`](Pool::reload) does (`snakepit serve` on SIGHUP without `--config`).
    pub async fn rolling_restart(&self) -> Result<(), Error> {
        let adapter = self.inner.source().adapter.clone();
        self.reload_shared(adapter).await
    }
}
