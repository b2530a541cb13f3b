//! Worker → host calls: host tools registered on the pool, and session variables.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use futures::future::BoxFuture;
use snakepit_core::{Error, HostCall, HostHandler, Payload, RequestId, SessionStore, WorkerError, WorkerId};

/// A host tool: JSON in, JSON out; or payloads (JSON with binary segments) in and out.
#[derive(Clone)]
pub(crate) enum HostTool {
    Json(
        Arc<dyn Fn(serde_json::Value) -> BoxFuture<'static, Result<serde_json::Value, Error>> + Send + Sync>,
    ),
    Payload(Arc<dyn Fn(Payload) -> BoxFuture<'static, Result<Payload, Error>> + Send + Sync>),
}

/// A call's own handler of its host calls (see [`PoolHost::forward`]).
#[derive(Clone)]
pub(crate) struct Forward(pub(crate) Arc<dyn HostHandler>);

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Forward(..)")
    }
}

/// The pool's answer to its workers' `host_call`s.
pub(crate) struct PoolHost {
    /// Calls whose host calls go elsewhere, by (worker, request id): an agent's calls, whose
    /// host calls (tools, session and global variables) belong to the front end that made them.
    forwards: Mutex<HashMap<(WorkerId, RequestId), Arc<dyn HostHandler>>>,
    /// The pool serves as an agent: every host call belongs to a front end, and one that is
    /// not forwarded (no request id, or its call already over) is refused rather than answered
    /// from this pool's own store.
    agent: std::sync::atomic::AtomicBool,
    tools: RwLock<HashMap<String, HostTool>>,
    store: Arc<dyn SessionStore>,
    /// The session of each session call in flight, by (worker, request id).
    sessions: Mutex<HashMap<(WorkerId, RequestId), String>>,
    /// `snakepit_host_calls_total`.
    calls: Arc<crate::pool::HostCallMetrics>,
}

fn werr(kind: &str, message: impl Into<String>) -> WorkerError {
    WorkerError { kind: kind.into(), message: message.into(), traceback: None }
}

fn from_error(e: Error) -> WorkerError {
    match e {
        Error::Worker { error, .. } => error,
        e => werr(e.kind(), e.to_string()),
    }
}

impl PoolHost {
    pub(crate) fn new(store: Arc<dyn SessionStore>, calls: Arc<crate::pool::HostCallMetrics>) -> Self {
        PoolHost {
            forwards: Mutex::new(HashMap::new()),
            agent: std::sync::atomic::AtomicBool::new(false),
            tools: RwLock::new(HashMap::new()),
            store,
            sessions: Mutex::new(HashMap::new()),
            calls,
        }
    }

    pub(crate) fn register<F, Fut>(&self, name: &str, f: F)
    where
        F: Fn(serde_json::Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, Error>> + Send + 'static,
    {
        let tool = HostTool::Json(Arc::new(move |v| Box::pin(f(v))));
        self.tools.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned(), tool);
    }

    pub(crate) fn register_payload<F, Fut>(&self, name: &str, f: F)
    where
        F: Fn(Payload) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Payload, Error>> + Send + 'static,
    {
        let tool = HostTool::Payload(Arc::new(move |p| Box::pin(f(p))));
        self.tools.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned(), tool);
    }

    /// Records that `request` on `worker` runs in `session` until the guard drops.
    pub(crate) fn enter(
        self: &Arc<Self>,
        worker: WorkerId,
        request: RequestId,
        session: &str,
    ) -> SessionScope {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert((worker, request), session.to_owned());
        SessionScope { host: self.clone(), key: (worker, request) }
    }

    /// Marks the pool as an agent's (see `agent`).
    #[cfg(feature = "remote")]
    pub(crate) fn serve_as_agent(&self) {
        self.agent.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends the host calls of `request` on `worker` to `to` until the guard drops.
    pub(crate) fn forward(
        self: &Arc<Self>,
        worker: WorkerId,
        request: RequestId,
        to: &Forward,
    ) -> ForwardScope {
        self.forwards.lock().unwrap_or_else(|p| p.into_inner()).insert((worker, request), to.0.clone());
        ForwardScope { host: self.clone(), key: (worker, request) }
    }

    fn session_of(&self, call: &HostCall) -> Result<String, WorkerError> {
        let key = call.request.map(|r| (call.worker, r));
        key.and_then(|k| self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(&k).cloned())
            .ok_or_else(|| werr("NoSession", "this call does not run in a session"))
    }

    async fn session_op(&self, call: HostCall) -> Result<serde_json::Value, WorkerError> {
        let sid = self.session_of(&call)?;
        let args: serde_json::Value = call.args.decode().map_err(|e| werr("BadRequest", e.to_string()))?;
        let name =
            args.get("name").and_then(|n| n.as_str()).ok_or_else(|| werr("BadRequest", "missing `name`"))?;
        let store = &self.store;
        let r = match call.name.as_str() {
            "session.get" => store.get_var(&sid, name).await.map(|v| v.unwrap_or(serde_json::Value::Null)),
            "session.set" => {
                let value = args.get("value").cloned().unwrap_or(serde_json::Value::Null);
                store.set_var(&sid, name, value, None).await.map(|()| serde_json::Value::Null)
            }
            "session.delete" => store.delete_var(&sid, name).await.map(serde_json::Value::Bool),
            other => return Err(werr("UnknownHostTool", format!("no session operation `{other}`"))),
        };
        r.map_err(from_error)
    }
}

impl PoolHost {
    /// `global.get {name}`, `global.set {name, value}`, `global.delete {name}`: the store's
    /// global variables, from any call (no session needed).
    async fn global_op(&self, call: HostCall) -> Result<serde_json::Value, WorkerError> {
        let args: serde_json::Value = call.args.decode().map_err(|e| werr("BadRequest", e.to_string()))?;
        let name =
            args.get("name").and_then(|n| n.as_str()).ok_or_else(|| werr("BadRequest", "missing `name`"))?;
        let store = &self.store;
        let r = match call.name.as_str() {
            "global.get" => store.get_global(name).await.map(|v| v.unwrap_or(serde_json::Value::Null)),
            "global.set" => {
                let value = args.get("value").cloned().unwrap_or(serde_json::Value::Null);
                store.set_global(name, value).await.map(|()| serde_json::Value::Null)
            }
            "global.delete" => store.delete_global(name).await.map(serde_json::Value::Bool),
            other => return Err(werr("UnknownHostTool", format!("no global operation `{other}`"))),
        };
        r.map_err(from_error)
    }
}

/// Forgets a session call's session when dropped.
pub(crate) struct SessionScope {
    host: Arc<PoolHost>,
    key: (WorkerId, RequestId),
}

impl Drop for SessionScope {
    fn drop(&mut self) {
        self.host.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// Stops forwarding a call's host calls when dropped.
pub(crate) struct ForwardScope {
    host: Arc<PoolHost>,
    key: (WorkerId, RequestId),
}

impl Drop for ForwardScope {
    fn drop(&mut self) {
        self.host.forwards.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

#[async_trait]
impl HostHandler for PoolHost {
    async fn host_call(&self, call: HostCall) -> Result<Payload, WorkerError> {
        let to = call.request.and_then(|r| {
            self.forwards.lock().unwrap_or_else(|p| p.into_inner()).get(&(call.worker, r)).cloned()
        });
        let r = match to {
            Some(to) => to.host_call(call).await,
            None if self.agent.load(std::sync::atomic::Ordering::Relaxed) => Err(werr(
                "HostUnavailable",
                "this call's front end no longer waits for it (a host call of an agent's worker goes to the front end that made the call)",
            )),
            None => self.answer(call).await,
        };
        self.calls.count(r.as_ref().err().map(|_| "error"));
        r
    }
}

impl PoolHost {
    async fn answer(&self, call: HostCall) -> Result<Payload, WorkerError> {
        if call.name.starts_with("session.") {
            return self.session_op(call).await.map(Payload::from);
        }
        if call.name.starts_with("global.") {
            return self.global_op(call).await.map(Payload::from);
        }
        let tool = self.tools.read().unwrap_or_else(|p| p.into_inner()).get(&call.name).cloned();
        let Some(tool) = tool else {
            return Err(werr("UnknownHostTool", format!("the host has no tool `{}`", call.name)));
        };
        match tool {
            HostTool::Json(tool) => {
                let args: serde_json::Value =
                    call.args.decode().map_err(|e| werr("BadRequest", e.to_string()))?;
                tool(args).await.map(Payload::from).map_err(from_error)
            }
            HostTool::Payload(tool) => tool(call.args).await.map_err(from_error),
        }
    }
}
