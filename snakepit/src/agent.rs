//! Serving a pool to remote front ends (feature `remote`): a [`Pool`] is an agent
//! [`Backend`].
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use snakepit::remote::server::{bind, AgentOptions};
//! use snakepit::remote::ServerTls;
//!
//! let pool = snakepit::Pool::builder()
//!     .adapter(snakepit::Python::script("worker.py"))
//!     // The sessions are the front ends': one this agent has not seen yet pins it here.
//!     .create_sessions_on_use(true)
//!     .build()
//!     .await?;
//! let tls = ServerTls::new("agent.pem", "agent-key.pem", "front-ends-ca.pem");
//! let listener = bind(AgentOptions::new("0.0.0.0:7443".parse()?, Some(tls))).await?;
//! println!("snakepit agent listening on {}", listener.local_addr());
//! listener.serve(Arc::new(pool.clone()), async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! pool.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Each call a front end sends runs as a call on the pool, in the front end's session (for the
//! agent's own worker affinity), within what is left of its budget; its host calls (host
//! tools, `session.*`, `global.*`) go back to the front end, whose store holds the session's
//! variables (Redis when several front ends share them). Once it serves a front end, the pool
//! refuses host calls that no front end's call made (a late one, after its call ended): a pool
//! served as an agent is not for local calls that use host tools or session variables.

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use snakepit_core::{Error, Payload, ToolInfo};
use snakepit_remote::{Backend, BackendCall, Capacity};

use crate::{CallOptions, Pool};

fn options(call: &BackendCall) -> CallOptions {
    let mut opts = CallOptions::default().with_timeout(call.timeout);
    opts.host = Some(crate::host::Forward(call.host.clone()));
    opts
}

#[async_trait]
impl Backend for Pool {
    fn tools(&self) -> Vec<ToolInfo> {
        self.tools()
            .into_iter()
            .map(|name| if self.is_stream_tool(&name) { ToolInfo::stream(name) } else { ToolInfo::new(name) })
            .collect()
    }

    fn bridge(&self) -> String {
        self.worker_handshakes().into_iter().flatten().map(|r| r.bridge).next().unwrap_or_default()
    }

    fn capacity(&self) -> Capacity {
        let s = self.stats();
        Capacity::new(s.size, s.idle, s.queued)
    }

    async fn call(&self, call: BackendCall) -> Result<Payload, Error> {
        self.serve_as_agent();
        let opts = options(&call);
        Pool::call(self, call.session.as_deref(), &call.command, call.args, opts).await
    }

    async fn stream(&self, call: BackendCall) -> Result<BoxStream<'static, Result<Payload, Error>>, Error> {
        self.serve_as_agent();
        let opts = options(&call);
        let s = self.stream_call(call.session.as_deref(), &call.command, call.args, opts).await?;
        Ok(s.boxed())
    }
}
