//! # snakepit-adapters
//!
//! Ready-made [`Adapter`](snakepit_core::Adapter)s:
//!
//! * [`Python`]: runs a worker script or module through the `snakepit_bridge` bootstrap, which
//!   this crate ships (embedded, written out to a cache directory on first use);
//! * [`Generic`]: any program that speaks protocol v1 on its stdin/stdout itself.

#![forbid(unsafe_code)]

mod generic;
#[cfg(feature = "python")]
mod python;

pub use generic::Generic;
#[cfg(feature = "python")]
pub use python::{bridge_dir, Python};

/// Errors of this crate (surfaced to callers as [`snakepit_core::Error::Spawn`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bridge sources could not be written out.
    #[error("cannot install the snakepit_bridge sources: {0}")]
    Bridge(#[source] std::io::Error),
}
