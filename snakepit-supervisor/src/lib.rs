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
//! It also owns the pool's *slots* ([`Slot`]): the state machine that keeps a live worker in
//! each one — restart with [`RestartBackoff`] and an intensity limit, heartbeats, recycling by
//! request count, age or memory (drain-then-replace) — talking to the pool only through the
//! small [`SlotManager`] trait. [`ProcessLauncher`] is the [`snakepit_core::Launcher`] that
//! starts workers as processes (cold, or forked from a [`Zygote`]).

#![deny(unsafe_code)]

#[cfg(target_os = "macos")]
compile_error!("snakepit-supervisor supports only Linux: it needs PR_SET_PDEATHSIG, pidfd and PR_SET_CHILD_SUBREAPER; macOS is not supported yet");
#[cfg(target_os = "windows")]
compile_error!("snakepit-supervisor supports only Linux: it needs PR_SET_PDEATHSIG, pidfd and PR_SET_CHILD_SUBREAPER; Windows is not supported yet");
#[cfg(not(any(target_os = "linux", target_os = "macos", target_os = "windows")))]
compile_error!("snakepit-supervisor supports only Linux: it needs PR_SET_PDEATHSIG, pidfd and PR_SET_CHILD_SUBREAPER; this target OS is not supported yet");

mod backoff;
mod member;
mod memory;
mod pidfd;
mod process;
mod protocol_fds;
pub mod registry;
mod shepherd;
mod slot;
mod spawner;
mod stderr;
mod zygote;

pub use backoff::RestartBackoff;
pub use member::{Member, SessionCall};
pub use memory::tree_rss;
pub use process::{start_worker, StartOptions, Worker};
pub use slot::{Heartbeat, RecycleReason, Slot, SlotConfig, SlotEvent, SlotManager, SlotState};
pub use spawner::ProcessLauncher;
pub use zygote::Zygote;

/// Entry points for the fuzz targets (`fuzz/`) and their corpus replay test; not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::zygote::{fuzz_zygote_packets, ZYGOTE_C, ZYGOTE_K};
}

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
        #[source]
        source: nix::Error,
    },
}

/// How a supervisor error reaches callers: as the [`snakepit_core::Error`] every snakepit crate
/// returns (and `snakepit::Error` re-exports), with the OS error kept as its source.
impl From<Error> for snakepit_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Signal { pgid, source } => snakepit_core::Error::Signal { pgid, source: source.into() },
        }
    }
}

#[doc(no_inline)]
pub use snakepit_core::{Adapter, Transport};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_errors_convert_to_core_errors_with_their_cause() {
        let e: snakepit_core::Error = Error::Signal { pgid: 42, source: nix::Error::ESRCH }.into();
        assert_eq!(e.kind(), "signal");
        assert!(e.to_string().contains("process group 42"), "{e}");
        let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(io.and_then(std::io::Error::raw_os_error), Some(nix::libc::ESRCH));
    }
}
