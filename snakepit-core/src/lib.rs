//! # snakepit-core
//!
//! The shared vocabulary of snakepit: what a request, a payload, a worker and an error are, and
//! the small traits the other crates implement:
//!
//! * [`Adapter`]: what program a worker runs and how (program, args, env, cwd, handshake timeout,
//!   per-command validation and timeouts);
//! * [`WorkerProfile`]: how many requests one worker serves at once and how it is started;
//! * [`Transport`] / [`Connection`]: how the host talks to a started worker;
//! * [`Launcher`] / [`WorkerHandle`]: how a worker comes to life and how the pool watches and
//!   stops it (the supervisor's process launcher, or an adapter's own in-process one).
//!
//! This crate has no process, socket or runtime code: it only names things. The wire messages of
//! protocol v1 live in [`wire`] so that every transport and every worker SDK agree on them.
//!
//! For transport authors (see [`Transport`]): [`handshake`] encodes `hello` and checks the
//! worker's answer, [`InFlight`] tracks the calls a connection has in flight, and [`Ready::new`]
//! builds a handshake answer by hand.

#![forbid(unsafe_code)]

mod adapter;
mod error;
pub mod handshake;
mod inflight;
mod launch;
mod payload;
mod profile;
mod reply;
mod segment_serde;
mod session;
mod transport;
pub mod wire;

pub use adapter::{Adapter, Protocol, ProtocolIo, SpawnContext, SpawnSpec};
pub use error::{Error, ExitInfo, Result, WorkerError};
pub use inflight::{InFlight, InFlightGuard};
pub use launch::ShmOptions;
pub use launch::{Launcher, StartOptions, WorkerHandle};
pub use payload::{Codec, Payload};
pub use profile::{ProcessProfile, StartMode, ThreadProfile, WorkerProfile, Zygote};
pub use reply::{ReplyFuture, ReplySlot, SlotOwner};
pub use session::{
    MetadataUpdate, SessionOptions, SessionRecord, SessionStats, SessionStore, VarType, Variable,
};
/// The shared-memory arena crate ([`ShmOffer::arena`]).
pub use snakepit_shm as shm;
pub use transport::{
    CloseReason, Connection, Hello, HostCall, HostHandler, Ready, Request, RequestId, ShmOffer, ToolInfo,
    Transport, WorkerId, WorkerIo,
};

/// The wire protocol versions this build of the host speaks, newest first.
pub const PROTOCOL_VERSIONS: &[u32] = &[1];

/// The default largest frame body either side accepts: 64 MiB.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;
