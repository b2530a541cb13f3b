//! [`FakeWorker`]: the builder of a fake worker kind, its [`Adapter`] and its [`Launcher`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream, StreamExt};
use serde_json::Value;
use snakepit_core::{
    Adapter, Connection, Error, ExitInfo, Launcher, Payload, Ready, StartOptions, ToolInfo, WorkerError,
    WorkerHandle,
};

use crate::connection::{FakeConnection, FakeHandle, Link};
use crate::control::FakeControl;

type CallFn = Arc<dyn Fn(Value) -> BoxFuture<'static, Result<Value, WorkerError>> + Send + Sync>;
type StreamFn = Arc<dyn Fn(Value) -> BoxStream<'static, Result<Value, WorkerError>> + Send + Sync>;
type PayloadFn = Arc<dyn Fn(Payload) -> BoxFuture<'static, Result<Payload, WorkerError>> + Send + Sync>;

/// What a fake tool does.
#[derive(Clone)]
pub(crate) enum Tool {
    Call(CallFn),
    Payload(PayloadFn),
    Stream(StreamFn),
    Fail(WorkerError),
    Crash,
}

impl std::fmt::Debug for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tool::Call(_) => "Call",
            Tool::Payload(_) => "Payload",
            Tool::Stream(_) => "Stream",
            Tool::Fail(_) => "Fail",
            Tool::Crash => "Crash",
        })
    }
}

/// The tools and timings of a fake worker kind.
#[derive(Debug, Default, Clone)]
pub(crate) struct Spec {
    pub(crate) tools: HashMap<String, Tool>,
    pub(crate) delays: HashMap<String, Duration>,
    startup: Duration,
}

/// An exception as a tool raises it: `raise("ValueError", "bad input")`.
pub fn raise(kind: &str, message: impl Into<String>) -> WorkerError {
    WorkerError { kind: kind.into(), message: message.into(), traceback: None }
}

/// An in-process worker kind for tests: register tools, then give it to
/// `Pool::builder().adapter(..)` (see the [crate docs](crate)).
///
/// Each worker the pool starts is a fresh set of tokio tasks sharing this kind's tools. A tool
/// that panics answers with a worker error of type `panic` and the worker lives on; a tool set
/// up with [`crash_on`](FakeWorker::crash_on) ends its worker as a SIGKILL would end a process.
#[derive(Debug, Clone, Default)]
pub struct FakeWorker {
    spec: Spec,
    control: FakeControl,
}

impl FakeWorker {
    /// A worker kind with no tools.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a tool: `f` gets the call's JSON arguments and answers with a JSON result or
    /// an exception (see [`raise`]).
    pub fn tool<F, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, WorkerError>> + Send + 'static,
    {
        let f: CallFn = Arc::new(move |args| Box::pin(f(args)));
        self.spec.tools.insert(name.to_owned(), Tool::Call(f));
        self
    }

    /// Registers a tool on whole [`Payload`]s: JSON with binary segments (what
    /// `Pool::execute_bytes` sends and expects back, e.g. `Payload::from_bytes(..)`). A tool
    /// registered with [`tool`](FakeWorker::tool) sees only the JSON, with its `{"$seg": i}`
    /// references.
    pub fn payload_tool<F, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: Fn(Payload) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Payload, WorkerError>> + Send + 'static,
    {
        let f: PayloadFn = Arc::new(move |args| Box::pin(f(args)));
        self.spec.tools.insert(name.to_owned(), Tool::Payload(f));
        self
    }

    /// Registers a streaming tool (a generator): `f` gets the arguments and returns the items.
    /// An error item ends the stream.
    pub fn stream_tool<F, S>(mut self, name: &str, f: F) -> Self
    where
        F: Fn(Value) -> S + Send + Sync + 'static,
        S: Stream<Item = Result<Value, WorkerError>> + Send + 'static,
    {
        let f: StreamFn = Arc::new(move |args| f(args).boxed());
        self.spec.tools.insert(name.to_owned(), Tool::Stream(f));
        self
    }

    /// Registers a tool that always raises `kind: message`.
    pub fn fail_on(mut self, name: &str, kind: &str, message: &str) -> Self {
        self.spec.tools.insert(name.to_owned(), Tool::Fail(raise(kind, message)));
        self
    }

    /// Registers a tool whose call kills its worker (as SIGKILL would: the call fails with
    /// `WorkerCrashed` and the slot restarts the worker with backoff).
    pub fn crash_on(mut self, name: &str) -> Self {
        self.spec.tools.insert(name.to_owned(), Tool::Crash);
        self
    }

    /// Makes tool `name` take `d` before it runs (registering it, answering `null`, if it is
    /// not registered yet).
    pub fn delay(mut self, name: &str, d: Duration) -> Self {
        self.spec.delays.insert(name.to_owned(), d);
        self.spec.tools.entry(name.to_owned()).or_insert_with(|| {
            let f: CallFn = Arc::new(|_| Box::pin(async { Ok(Value::Null) }));
            Tool::Call(f)
        });
        self
    }

    /// Makes every worker take `d` to start (its handshake).
    pub fn startup(mut self, d: Duration) -> Self {
        self.spec.startup = d;
        self
    }

    /// A handle on the workers of this kind (knobs and counters), usable after the worker kind
    /// was given to a builder.
    pub fn control(&self) -> FakeControl {
        self.control.clone()
    }

    fn ready(&self, max_in_flight: usize, pipeline_depth: usize) -> Ready {
        let mut tools: Vec<ToolInfo> = self
            .spec
            .tools
            .iter()
            .map(|(name, t)| match t {
                Tool::Stream(_) => ToolInfo::stream(name.as_str()),
                _ => ToolInfo::new(name.as_str()),
            })
            .collect();
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        Ready::new(1, 0)
            .with_tools(tools)
            .with_max_in_flight(max_in_flight)
            .with_pipeline_depth(if max_in_flight == 1 { pipeline_depth } else { 1 })
            .with_bridge(format!("snakepit-testing/{}", env!("CARGO_PKG_VERSION")))
            .with_segments(true)
    }
}

impl Adapter for FakeWorker {
    fn name(&self) -> String {
        "fake".into()
    }

    fn launcher(&self) -> Option<Arc<dyn Launcher>> {
        Some(Arc::new(FakeLauncher { kind: self.clone(), spec: Arc::new(self.spec.clone()) }))
    }
}

/// Starts fake workers.
#[derive(Debug)]
struct FakeLauncher {
    kind: FakeWorker,
    spec: Arc<Spec>,
}

#[async_trait]
impl Launcher for FakeLauncher {
    async fn launch(&self, opts: StartOptions) -> Result<Box<dyn WorkerHandle>, Error> {
        let control = &self.kind.control;
        if !self.spec.startup.is_zero() {
            tokio::time::sleep(self.spec.startup).await;
        }
        let failed =
            control.state.fail_starts.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failed.is_ok() {
            return Err(Error::StartupFailed {
                worker: opts.worker,
                exit: ExitInfo::Code(1),
                stderr_tail: "fake: start-up failure requested by FakeControl::fail_starts".into(),
            });
        }
        // A fake worker answers pings whatever its calls do.
        let ready = self.kind.ready(opts.max_in_flight, opts.pipeline_depth).with_busy_ping(opts.busy_ping);
        let link = Link::new(opts.worker, self.spec.clone(), control.clone(), ready.pipeline_depth > 1);
        control.state.links.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&link));
        control.state.starts.fetch_add(1, Ordering::SeqCst);
        let conn: Arc<dyn Connection> = Arc::new(FakeConnection(link.clone()));
        Ok(Box::new(FakeHandle { link, conn, ready, started: Instant::now() }))
    }
}
