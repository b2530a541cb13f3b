//! An adapter for any program that speaks protocol v1 itself.

use std::path::PathBuf;

use snakepit_core::{Adapter, Error, Protocol, ProtocolIo, SpawnContext, SpawnSpec};

use crate::common::{common_adapter_methods, common_builders, Common};

/// Runs `program args...` as a worker; the program must speak protocol v1 on stdin/stdout, or
/// on fds 3 and 4 with [`protocol_io`](Self::protocol_io) (see `docs/protocol.md` §1).
#[derive(Debug, Clone)]
pub struct Generic {
    program: PathBuf,
    common: Common,
    protocol_io: ProtocolIo,
    protocol: Protocol,
}

impl Generic {
    /// A worker running `program` (a path, or a name looked up on `PATH`).
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Generic {
            program: program.into(),
            common: Common::default(),
            protocol_io: ProtocolIo::Stdio,
            protocol: Protocol::V1,
        }
    }

    common_builders!();

    /// The protocol the program speaks: v1 (the default), or [`Protocol::SnakepitV0`] for a
    /// bridge script of the original Snakepit. With `SnakepitV0` and no transport set, the
    /// pool uses the `SnakepitV0` transport; another transport, the zygote start mode or
    /// pipelining then fail `build()` with `bad_request`.
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Where the worker speaks the protocol: its stdin/stdout (the default), or fds 3 and 4
    /// ([`ProtocolIo::Fds`]: its stdout then goes to its stderr, so nothing it prints can
    /// reach the protocol).
    pub fn protocol_io(mut self, io: ProtocolIo) -> Self {
        self.protocol_io = io;
        self
    }
}

impl Adapter for Generic {
    fn name(&self) -> String {
        format!("generic:{}", self.program.display())
    }

    fn spawn_spec(&self, _ctx: &SpawnContext) -> Result<SpawnSpec, Error> {
        let c = &self.common;
        let mut spec = SpawnSpec::new(&self.program).protocol_io(self.protocol_io);
        spec.args = c.args.clone();
        spec.env = c.env.clone();
        spec.env_clear = c.env_clear;
        spec.env_allow = c.env_allow.clone();
        spec.cwd = c.cwd.clone();
        Ok(spec)
    }

    common_adapter_methods!();

    fn protocol(&self) -> Protocol {
        self.protocol
    }
}
