//! # snakepit
//!
//! Supervised pools of external worker processes — Python first — called from Rust like local
//! async functions. No interpreter is embedded: a crash in a worker is a typed error in the host,
//! never a crash of the host.
//!
//! ```no_run
//! use snakepit::{Pool, Python};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), snakepit::Error> {
//! let pool = Pool::builder().adapter(Python::script("worker.py")).size(4).build().await?;
//! let sum = pool.execute("add", json!({"a": 1, "b": 2})).await?;
//! assert_eq!(sum, json!(3));
//! let n: i64 = pool.execute_as("add", &json!({"a": 40, "b": 2})).await?;
//! pool.shutdown().await;
//! # let _ = n; Ok(()) }
//! ```
//!
//! A worker in any language that speaks the protocol itself (`docs/protocol.md`) runs through
//! [`Generic`]: the program, its arguments and environment, and how long its start may take.
//!
//! ```no_run
//! use std::time::Duration;
//! use snakepit::{Generic, Pool};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), snakepit::Error> {
//! let worker = Generic::new("perl")
//!     .arg("worker.pl")
//!     .env("PERL5LIB", "lib")
//!     .config(json!({"greeting": "hello"})) // sent in `hello.config`
//!     .handshake_timeout(Duration::from_secs(10));
//! let pool = Pool::builder().adapter(worker).size(2).build().await?;
//! let sum = pool.execute("add", json!({"a": 1, "b": 2})).await?;
//! # let _ = sum; pool.shutdown().await; Ok(()) }
//! ```
//!
//! The pool starts its workers concurrently and returns once all are ready; calls wait in a
//! bounded FIFO queue for a free worker; a worker that crashes, hangs past a call's timeout or
//! breaks the protocol is replaced (with backoff) while its caller gets a precise [`Error`].
//!
//! Crates behind this facade: [`core`] (vocabulary and traits), [`supervisor`] (processes),
//! [`adapters`] (Python, Node, generic), and the transports (`stdio`, `grpc`).

#![forbid(unsafe_code)]

#[cfg(feature = "remote")]
pub mod agent;
#[cfg(feature = "chaos")]
pub mod chaos;
#[cfg(feature = "config")]
pub mod config;
mod host;
pub mod metrics;
mod pool;
mod session;

/// Reference-counted bytes (the `bytes` crate), as binary payloads travel: [`Pool::execute_bytes`], [`Payload::from_bytes`].
pub use bytes::Bytes;
#[cfg(feature = "config")]
pub use config::{PoolConfig, Pools, PoolsConfig};
pub use pool::{
    Affinity, Autoscale, CallOptions, CallStream, DropPolicy, Pool, PoolBuilder, PoolStats, RehydrateHook,
    DEFAULT_PIPELINE_DEPTH, MAX_PIPELINE_DEPTH,
};
pub use session::{Globals, Session};
/// Shared-memory arenas: [`shm::counters`] tells how many segments took the arena or fell back
/// to the pipe.
pub use snakepit_core::shm;
pub use snakepit_core::{
    ProcessProfile, ProtocolIo, SessionOptions, SessionRecord, SessionStats, SessionStore, StartMode,
    ThreadProfile, VarType, WorkerProfile, Zygote,
};
pub use snakepit_session::MemoryStore;
#[cfg(feature = "redis")]
pub use snakepit_session::RedisStore;

pub use snakepit_adapters as adapters;
pub use snakepit_adapters::Generic;
#[cfg(feature = "node")]
pub use snakepit_adapters::Node;
#[cfg(feature = "python")]
pub use snakepit_adapters::Python;
pub use snakepit_core as core;
pub use snakepit_core::{Adapter, Error, ExitInfo, Payload, Result, WorkerError, WorkerId};
#[cfg(feature = "remote")]
pub use snakepit_remote as remote;
#[cfg(feature = "remote")]
pub use snakepit_remote::{ClientTls, Remote, RemoteOptions, ServerTls};
pub use snakepit_supervisor as supervisor;
pub use snakepit_supervisor::{Heartbeat, SlotState};
#[cfg(feature = "grpc")]
pub use snakepit_transport_grpc as grpc;
#[cfg(feature = "grpc")]
pub use snakepit_transport_grpc::Grpc;
#[cfg(feature = "stdio")]
pub use snakepit_transport_stdio as stdio;
#[cfg(feature = "stdio")]
pub use snakepit_transport_stdio::{SnakepitV0, StdioTransport};
