//! # snakepit-supervisor
//!
//! Owns worker processes. [`start_worker`] spawns one from an [`Adapter`]'s spec, hands its
//! pipes to a [`Transport`] for the handshake and returns a [`Worker`]: the live connection plus
//! the process, watched by a monitor task that records how it ended. The supervisor never parses
//! a payload.
//!
//! Every worker:
//! * runs in its own process group, so stopping it also stops its children;
//! * has `PR_SET_PDEATHSIG(SIGKILL)` armed before `exec` (with a `getppid()` re-check), so it dies
//!   with the thread that spawned it;
//! * is killed and reaped when its [`Worker`] is dropped;
//! * has its stderr forwarded to `tracing` (target `snakepit::worker`) with its id, keeping the
//!   last lines for error reports.
//!
//! [`RestartBackoff`] gives the delays between restarts of a slot.

mod backoff;
mod process;

pub use backoff::RestartBackoff;
pub use process::{start_worker, StartOptions, Worker};

/// Errors of the supervisor's own operations (spawn and handshake failures are
/// [`snakepit_core::Error`]s, as callers see them).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A signal could not be delivered.
    #[error("cannot signal process group {pgid}: {source}")]
    Signal {
        /// The process group.
        pgid: i32,
        /// The OS error.
        source: nix::Error,
    },
}

#[doc(no_inline)]
pub use snakepit_core::{Adapter, Transport};
