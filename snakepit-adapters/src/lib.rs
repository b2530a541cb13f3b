//! # snakepit-adapters
//!
//! Ready-made [`Adapter`](snakepit_core::Adapter)s:
//!
//! * [`Python`]: runs a worker script or module through the `snakepit_bridge` bootstrap, which
//!   this crate ships (embedded, written out to a cache directory on first use);
//! * `Node` (feature `node`): runs a Node.js worker script through the `snakepit-bridge` npm
//!   package, which this crate ships the same way;
//! * [`Generic`]: any program that speaks protocol v1 on its stdin/stdout itself.

#![forbid(unsafe_code)]

#[cfg(any(feature = "python", feature = "node"))]
mod cache;
mod common;
mod generic;
#[cfg(feature = "node")]
mod node;
#[cfg(feature = "python")]
mod python;

pub use generic::Generic;
#[cfg(feature = "node")]
pub use node::{node_bridge_dir, Node};
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
