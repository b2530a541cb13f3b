//! # snakepit-testing
//!
//! [`FakeWorker`]: an in-process worker for testing code that uses a snakepit pool, and for
//! testing snakepit itself, without starting a single process.
//!
//! A `FakeWorker` is an [`Adapter`](snakepit_core::Adapter) that supplies its own
//! [`Launcher`](snakepit_core::Launcher) (the core seam for workers that are not spawned), so it
//! plugs into the ordinary builder and is supervised like a process: a tool that "crashes" ends
//! the worker and its slot restarts it with backoff; heartbeats, recycling, deadlines,
//! cancellation, sessions and streams all take the pool's real code paths.
//!
//! ```ignore
//! // (a complete, compiled and tested version: `snakepit/tests/readme.rs`)
//! use snakepit::Pool;
//! use snakepit_testing::FakeWorker;
//! use serde_json::json;
//!
//! let pool = Pool::builder()
//!     .adapter(
//!         FakeWorker::new()
//!             .tool("add", |args| async move { Ok(json!(args["a"].as_i64() + args["b"].as_i64())) })
//!             .fail_on("boom", "ValueError", "bad input")
//!             .crash_on("die"),
//!     )
//!     .size(2)
//!     .build()
//!     .await?;
//! ```
//!
//! It is written only against the public plug-in traits of `snakepit-core`
//! ([`Adapter`](snakepit_core::Adapter), [`Launcher`](snakepit_core::Launcher),
//! [`WorkerHandle`](snakepit_core::WorkerHandle), [`Connection`](snakepit_core::Connection)), so
//! it also shows what an outside worker kind has to provide. It runs on tokio tasks and timers
//! only (no pipes, no processes, no blocking threads), so tests may pause time
//! (`#[tokio::test(start_paused = true)]`). One wall-clock reading remains:
//! [`WorkerHandle::started`](snakepit_core::WorkerHandle::started) is a `std::time::Instant`, so
//! the restart backoff's reset after healthy uptime does not happen on a paused clock.
//!
//! What it does not model: host calls from tools (`ctx.call_host`), codecs other than JSON, and
//! the wire protocol itself (use the stdio transport's tests and the conformance kit for those).

#![forbid(unsafe_code)]

mod connection;
mod control;
mod worker;

pub use control::FakeControl;
pub use worker::{raise, FakeWorker};
