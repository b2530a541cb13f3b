//! # snakepit-supervisor
//!
//! Owns worker processes. [`start_worker`] spawns one from an [`Adapter`]'s spec, hands its
//! pipes to a [`Transport`] for the handshake and returns a [`Worker`]: the live connection plus
//! the process, watched by a monitor task that records how it ended. The supervisor never parses
//! a payload.
//!
//! Every worker:
//! * runs under its own *shepherd* (see the `shepherd` module): a subreaper holding a lifeline
//!   from the host that kills the worker's whole subtree — grandchildren and `setsid()`
//!   escapees included — when the host asks or when the host dies, even by SIGKILL;
//! * runs in its own process group (led by the shepherd), which receives the graceful SIGTERM;
//! * has `PR_SET_PDEATHSIG(SIGKILL)` armed before `exec` (with a `getppid()` re-check), tied to
//!   its single-threaded shepherd;
//! * is killed and reaped when its [`Worker`] is dropped; kills go through the lifeline, never
//!   through a pid that could have been reused;
//! * has its stderr forwarded to `tracing` (target `snakepit::worker`) with its id, keeping the
//!   last lines for error reports.
//!
//! [`RestartBackoff`] gives the delays between restarts of a slot.

#[cfg(target_os = "macos")]
compile_error!("snakepit-supervisor supports only Linux: it needs PR_SET_PDEATHSIG, pidfd and PR_SET_CHILD_SUBREAPER; macOS is not supported yet");
#[cfg(target_os = "windows")]
compile_error!("snakepit-supervisor supports only Linux: it needs PR_SET_PDEATHSIG, pidfd and PR_SET_CHILD_SUBREAPER; Windows is not supported yet");
#[cfg(not(any(target_os = "linux", target_os = "macos", target_os = "windows")))]
compile_error!("snakepit-supervisor supports only Linux: it needs PR_SET_PDEATHSIG, pidfd and PR_SET_CHILD_SUBREAPER; this target OS is not supported yet");

mod backoff;
mod memory;
mod process;
pub mod registry;
mod shepherd;
mod zygote;

pub use backoff::RestartBackoff;
pub use memory::tree_rss;
pub use process::{start_worker, StartOptions, Worker};
pub use zygote::Zygote;

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
