//! Which workers a subcommand runs (`--script`, `--module`, `--command`) and over which
//! transport, shared by `serve`, `call`, `conform` and `demo`.

use std::path::{Path, PathBuf};

use clap::Args;
use snakepit::{Generic, Node, PoolBuilder, Python};

/// The worker source: exactly one of these.
#[derive(Args, Clone, Debug)]
#[group(required = true, multiple = false)]
pub(crate) struct WorkerArgs {
    /// A worker script: `.js`, `.mjs` or `.cjs` runs on Node (the `snakepit-bridge` package),
    /// anything else on Python (`snakepit_bridge`).
    #[arg(long)]
    pub(crate) script: Option<PathBuf>,
    /// An importable Python worker module (e.g. snakepit_bridge.showcase).
    #[arg(long)]
    pub(crate) module: Option<String>,
    /// Any program that speaks protocol v1 on its stdin/stdout itself, as "CMD ARGS": split with
    /// POSIX shell word rules (quotes and backslashes; no shell, no globbing or variables), CMD
    /// looked up on PATH.
    #[arg(long = "command", id = "worker_command", value_name = "CMD ARGS")]
    pub(crate) command: Option<String>,
}

/// Which transport the workers speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TransportKind {
    /// Framed stdio (no dependencies).
    Stdio,
    /// gRPC over a Unix socket (Python workers need grpcio, Node workers @grpc/grpc-js:
    /// `cargo xtask setup`).
    Grpc,
}

/// Which protocol the workers speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ProtocolKind {
    /// snakepit's protocol v1 (docs/protocol.md).
    V1,
    /// The original Elixir Snakepit's stdio envelope (`--command` workers only, stdio, no
    /// streams, no cancel: a timed-out call replaces the worker).
    #[value(name = "snakepit-v0")]
    SnakepitV0,
}

/// Transport and interpreter options shared by the subcommands.
#[derive(Args, Clone, Debug)]
pub(crate) struct TransportArgs {
    /// The transport.
    #[arg(long, value_enum, default_value = "stdio")]
    pub(crate) transport: TransportKind,
    /// The Python interpreter (default: $SNAKEPIT_PYTHON, or for gRPC the repository's
    /// .venv/bin/python when it exists, else python3).
    #[arg(long)]
    pub(crate) python: Option<PathBuf>,
    /// The Node interpreter (default: $SNAKEPIT_NODE, else node). Node workers find the gRPC
    /// packages in $SNAKEPIT_NODE_PATH or in ./snakepit-adapters/node/node_modules (`cargo
    /// xtask setup` runs `npm ci` there).
    #[arg(long)]
    pub(crate) node: Option<PathBuf>,
    /// Fork the workers from a warm zygote that imported the worker code once (Python only).
    #[arg(long)]
    pub(crate) zygote: bool,
    /// Calls one busy worker may hold, run in the order sent (pipelining; 1: none). A crash
    /// then fails the calls queued behind the running one with `not_started`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub(crate) pipeline_depth: u16,
    /// The workers' protocol: `v1`, or `snakepit-v0` for bridge scripts of the original
    /// Snakepit (with `--command`).
    #[arg(long, value_enum, default_value = "v1")]
    pub(crate) protocol: ProtocolKind,
    /// With `--protocol snakepit-v0`: the worker's commands (comma-separated); others are
    /// refused host-side with `unknown_command`. Without it every command is sent.
    #[arg(long, value_delimiter = ',', value_name = "A,B,C")]
    pub(crate) tools: Vec<String>,
}

/// A resolved worker source.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// A Python script or module.
    Python(Python),
    /// A Node script.
    Node(Node),
    /// A program that speaks the protocol itself.
    Command(Generic),
}

impl Source {
    /// What the workers are, for messages (`Python`, `Node`, `perl`).
    pub(crate) fn language(&self) -> String {
        match self {
            Source::Python(_) => "Python".into(),
            Source::Node(_) => "Node".into(),
            Source::Command(g) => snakepit::Adapter::name(g),
        }
    }
}

/// Whether `path` names a Node script.
pub(crate) fn is_node_script(path: &Path) -> bool {
    snakepit::config::is_node_script(path)
}

/// Splits `--command`'s value with POSIX shell word rules (as the configuration's `command`).
pub(crate) fn split_command(line: &str) -> Result<Vec<String>, String> {
    snakepit::config::split_command(line).map_err(|e| format!("--command {e}"))
}

/// The repository's `.venv` python (grpcio), for gRPC workers that name no interpreter, unless
/// `$SNAKEPIT_PYTHON` names one.
pub(crate) fn repo_venv_python() -> Option<PathBuf> {
    let venv = PathBuf::from(".venv/bin/python");
    (std::env::var_os("SNAKEPIT_PYTHON").is_none() && venv.exists()).then_some(venv)
}

/// The repository's `npm ci` tree (the gRPC packages) for Node workers' `NODE_PATH`, as
/// `.venv` is for Python.
pub(crate) fn repo_node_modules() -> Option<PathBuf> {
    std::path::absolute("snakepit-adapters/node/node_modules").ok().filter(|t| t.is_dir())
}

/// Splits `--command`'s value with POSIX shell word rules into a [`Generic`] adapter.
pub(crate) fn generic_from_command(line: &str) -> Result<Generic, String> {
    let mut words = split_command(line)?.into_iter();
    let program = words.next().ok_or("--command is empty")?;
    Ok(words.fold(Generic::new(program), Generic::arg))
}

impl WorkerArgs {
    /// The adapter these options name.
    pub(crate) fn source(&self) -> Result<Source, String> {
        match (&self.script, &self.module, &self.command) {
            (Some(s), _, _) if is_node_script(s) => Ok(Source::Node(Node::script(s))),
            (Some(s), _, _) => Ok(Source::Python(Python::script(s))),
            (None, Some(m), _) => Ok(Source::Python(Python::module(m))),
            (None, None, Some(c)) => generic_from_command(c).map(Source::Command),
            (None, None, None) => Ok(Source::Python(Python::showcase())),
        }
    }
}

impl TransportArgs {
    /// Applies the options to a builder with the workers of `source`; an `Err` is a usage
    /// error (the CLI exits 2 with it).
    pub(crate) fn apply(&self, b: PoolBuilder, source: Source) -> Result<PoolBuilder, String> {
        if self.protocol == ProtocolKind::SnakepitV0 {
            return self.apply_v0(b, source);
        }
        if !self.tools.is_empty() {
            return Err("--tools is for --protocol snakepit-v0 (v1 workers list their tools)".into());
        }
        let b = match source {
            Source::Python(adapter) => {
                let adapter = match (&self.python, self.transport) {
                    (Some(p), _) => adapter.interpreter(p),
                    (None, TransportKind::Grpc) => match repo_venv_python() {
                        Some(venv) => adapter.interpreter(venv),
                        None => adapter,
                    },
                    _ => adapter,
                };
                let b = b.adapter(adapter);
                if self.zygote {
                    b.profile(snakepit::Zygote(snakepit::ProcessProfile))
                } else {
                    b
                }
            }
            Source::Node(_) | Source::Command(_) if self.zygote => {
                let what =
                    if matches!(source, Source::Node(_)) { "Node workers" } else { "--command workers" };
                return Err(format!("zygote start mode is not supported for {what}"));
            }
            Source::Node(adapter) => {
                let adapter = match repo_node_modules() {
                    Some(t) => adapter.node_path(t),
                    None => adapter,
                };
                match &self.node {
                    Some(p) => b.adapter(adapter.interpreter(p)),
                    None => b.adapter(adapter),
                }
            }
            Source::Command(adapter) => b.adapter(adapter),
        };
        let b = b.pipeline_depth(usize::from(self.pipeline_depth));
        Ok(match self.transport {
            TransportKind::Stdio => b,
            TransportKind::Grpc => b.transport(snakepit::Grpc::default()),
        })
    }
}

impl TransportArgs {
    /// `--protocol snakepit-v0`: a `--command` worker on the v0 transport; what v0 cannot do is
    /// refused.
    fn apply_v0(&self, b: PoolBuilder, source: Source) -> Result<PoolBuilder, String> {
        let Source::Command(adapter) = source else {
            return Err(
                "--protocol snakepit-v0 runs a bridge script given with --command \"CMD ARGS\"".into()
            );
        };
        if self.transport == TransportKind::Grpc {
            return Err("--protocol snakepit-v0 runs on stdio only (not --transport grpc)".into());
        }
        if self.zygote {
            return Err("zygote start mode is not supported for snakepit-v0 workers".into());
        }
        if self.pipeline_depth > 1 {
            return Err("snakepit-v0 workers run one call at a time (no --pipeline-depth)".into());
        }
        let transport = if self.tools.is_empty() {
            snakepit::SnakepitV0::new()
        } else {
            snakepit::SnakepitV0::new().tools(self.tools.iter().cloned())
        };
        Ok(b.adapter(adapter).transport(transport))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_split_with_shell_word_rules() {
        let g = generic_from_command(r#"perl -e 'print "a b"' "x y" z\ w"#).expect("split");
        let name = snakepit::Adapter::name(&g);
        assert_eq!(name, "generic:perl");
        let spec = snakepit::Adapter::spawn_spec(
            &g,
            &snakepit::core::SpawnContext::new(snakepit::WorkerId { slot: 0, generation: 0 }, "r"),
        )
        .expect("spec");
        let args: Vec<_> = spec.args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["-e", r#"print "a b""#, "x y", "z w"]);
        assert!(generic_from_command("perl 'open").is_err());
        assert!(generic_from_command("  ").is_err());
    }

    #[test]
    fn node_scripts_are_told_by_their_extension() {
        assert!(is_node_script(Path::new("w.js")) && is_node_script(Path::new("a/w.mjs")));
        assert!(is_node_script(Path::new("w.cjs")) && !is_node_script(Path::new("w.py")));
        assert!(!is_node_script(Path::new("js")));
    }
}
