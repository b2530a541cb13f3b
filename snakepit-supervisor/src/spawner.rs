//! [`ProcessLauncher`]: the supervisor's [`Launcher`], which starts workers as processes, cold or
//! forked from a zygote, and keeps the run registry's list of live workers.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use snakepit_core::{Adapter, Error, Launcher, StartMode, StartOptions, Transport, WorkerHandle};

use crate::registry::RunFile;
use crate::{start_worker, Worker, Zygote};

/// Starts workers as processes: each under its own shepherd ([`start_worker`]) or, in
/// [`StartMode::Zygote`], forked from one warm zygote that it starts on first use and again
/// after it dies (concurrent starts share one). Records every live worker in the pool's run
/// file, when it has one, until the worker is reaped.
pub struct ProcessLauncher {
    adapter: Arc<dyn Adapter>,
    transport: Arc<dyn Transport>,
    mode: StartMode,
    run_file: Option<Arc<RunFile>>,
    zygote: tokio::sync::Mutex<Option<Arc<Zygote>>>,
}

impl std::fmt::Debug for ProcessLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessLauncher")
            .field("adapter", &self.adapter.name())
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl ProcessLauncher {
    /// A launcher of `adapter`'s program, handshaking through `transport`.
    pub fn new(adapter: Arc<dyn Adapter>, transport: Arc<dyn Transport>, mode: StartMode) -> Self {
        ProcessLauncher { adapter, transport, mode, run_file: None, zygote: tokio::sync::Mutex::new(None) }
    }

    /// Records live workers in `run_file` (see [`crate::registry`]).
    pub fn with_run_file(mut self, run_file: Option<RunFile>) -> Self {
        self.run_file = run_file.map(Arc::new);
        self
    }

    /// A launcher of another adapter's workers, the same way as this one: the same transport,
    /// start mode and run file (a pool's rolling reload). Its zygote, if any, is its own.
    pub fn for_adapter(&self, adapter: Arc<dyn Adapter>) -> ProcessLauncher {
        ProcessLauncher {
            adapter,
            transport: self.transport.clone(),
            mode: self.mode,
            run_file: self.run_file.clone(),
            zygote: tokio::sync::Mutex::new(None),
        }
    }

    /// The transport workers are started with.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// The live zygote, started (again) if there is none: concurrent starts share one.
    async fn zygote(&self, opts: &StartOptions) -> Result<Arc<Zygote>, Error> {
        let mut z = self.zygote.lock().await;
        if let Some(live) = z.as_ref().filter(|z| !z.is_closed()) {
            return Ok(live.clone());
        }
        if z.take().is_some() {
            tracing::warn!("the zygote is gone; starting a new one");
        }
        let fresh = Arc::new(Zygote::start(&*self.adapter, opts).await?);
        *z = Some(fresh.clone());
        Ok(fresh)
    }

    /// Keeps `w`'s verified processes (and its connection's private directory) in the run file
    /// until it is reaped.
    fn register(&self, w: &Worker) {
        let Some(file) = &self.run_file else { return };
        let procs = w.verified_processes();
        for &(pid, start) in &procs {
            file.add_worker(pid, start);
        }
        let dir = w.connection().private_dir().map(std::path::Path::to_path_buf);
        if let Some(d) = &dir {
            file.add_dir(d);
        }
        let mut exit = w.exit_watch();
        // Weak: the run file goes away with the launcher (the pool), not with the last watcher.
        let file = Arc::downgrade(file);
        tokio::spawn(async move {
            let _ = exit.wait_for(|e| e.is_some()).await;
            if let Some(file) = file.upgrade() {
                for (pid, start) in procs {
                    file.remove_worker(pid, start);
                }
                if let Some(d) = &dir {
                    file.remove_dir(d);
                }
            }
        });
    }
}

impl Drop for ProcessLauncher {
    fn drop(&mut self) {
        // The pool is gone: its run file goes now, even if a worker's exit watcher still holds
        // it for a moment (the process may exit before that watcher runs again).
        if let Some(f) = &self.run_file {
            f.close();
        }
    }
}

#[async_trait]
impl Launcher for ProcessLauncher {
    async fn launch(&self, opts: StartOptions) -> Result<Box<dyn WorkerHandle>, Error> {
        let w = match self.mode {
            StartMode::Zygote => {
                let zygote = self.zygote(&opts).await?;
                zygote.start_worker(&*self.adapter, &*self.transport, opts).await?
            }
            _ => start_worker(&*self.adapter, &*self.transport, opts).await?,
        };
        self.register(&w);
        Ok(Box::new(w))
    }

    async fn shutdown(&self, grace: Duration) {
        if let Some(z) = self.zygote.lock().await.take() {
            z.shutdown(grace).await;
        }
    }

    fn abort(&self) {
        // Dropping the zygote kills it and anything it forked. If a start holds the lock right
        // now, the zygote dies when that start's future and this launcher are dropped.
        if let Ok(mut z) = self.zygote.try_lock() {
            z.take();
        }
    }
}
