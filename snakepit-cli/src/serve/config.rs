//! `serve --config FILE [--pool NAME]`: the pool a configuration file describes (with its
//! `SNAKEPIT_CFG_*` variables), the command line's options over it. An option with a default
//! value overrides the file only when it is given on the command line ([`Explicit`]).

use std::path::Path;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::ArgMatches;
use snakepit::config::{ConfigFile, PoolConfig, TransportKind as CfgTransport};
use snakepit::core::Protocol;
use snakepit::PoolBuilder;

use super::{max_frame, Plan, ServeArgs};
use crate::worker::{is_node_script, repo_node_modules, repo_venv_python, ProtocolKind};
use crate::TransportKind;

/// Which of `serve`'s options with default values were given on the command line.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Explicit {
    transport: bool,
    pipeline_depth: bool,
    protocol: bool,
    max_queue: bool,
}

impl Explicit {
    /// Read from `serve`'s matches.
    pub(crate) fn of(m: Option<&ArgMatches>) -> Explicit {
        let given = |id: &str| m.and_then(|m| m.value_source(id)) == Some(ValueSource::CommandLine);
        Explicit {
            transport: given("transport"),
            pipeline_depth: given("pipeline_depth"),
            protocol: given("protocol"),
            max_queue: given("max_queue"),
        }
    }
}

/// The pool of `file` (pool `--pool`), the options over it; an `Err` is a usage error (the
/// file's own errors read `FILE:LINE: key 'x.y': reason`).
pub(super) fn plan(a: &ServeArgs, explicit: &Explicit, file: &Path) -> Result<Plan, String> {
    let mut cfg = load(a, explicit, file)?;
    // A remote pool without `size` takes its agents' workers (known once it starts).
    let size_known = cfg.size.is_some();
    let size = cfg.size.unwrap_or(0);
    // As without a file: the pool's queue takes every request `serve` admits.
    let admitted = cfg.max_queue.saturating_add(size);
    // (Unknown size: room for a remote pool's workers, whatever the agents have.)
    cfg.max_queue = if size_known { admitted } else { admitted + 4096 };
    let kind = match cfg.transport {
        CfgTransport::Grpc => TransportKind::Grpc,
        _ => TransportKind::Stdio,
    };
    let builder = PoolBuilder::from_config(&cfg).map_err(|e| e.to_string())?;
    // `--shutdown-grace-ms` is what running requests get after SIGTERM, with a file or
    // without; the file's `shutdown_grace` is each step of stopping a worker.
    let grace = Duration::from_millis(a.shutdown_grace_ms);
    Ok(Plan { builder, admitted, max_frame: max_frame(kind), grace, size_known })
}

/// The configuration of the pool `serve` runs: the file's pool (`--pool`), its variables, the
/// options over them, validated, with its size settled (SIGHUP reads it again).
pub(super) fn load(a: &ServeArgs, explicit: &Explicit, file: &Path) -> Result<PoolConfig, String> {
    let f = ConfigFile::read(file).map_err(|e| e.to_string())?;
    let names = f.pool_names();
    let pool = match (&a.pool, names.is_empty()) {
        (None, true) => None,
        (Some(p), false) if names.contains(p) => Some(p.as_str()),
        (None, false) => {
            return Err(format!(
                "{} describes several pools ({}): choose one with --pool NAME",
                file.display(),
                names.join(", ")
            ))
        }
        (Some(p), false) => {
            return Err(format!("{}: no pool `{p}`; it describes: {}", file.display(), names.join(", ")))
        }
        (Some(_), true) => None,
    };
    let mut cfg = f.pool(pool).map_err(|e| e.to_string())?;
    if let (Some(p), true) = (&a.pool, names.is_empty()) {
        let own = cfg.name.as_deref().unwrap_or("default");
        if p != own {
            return Err(format!(
                "{}: no pool `{p}`; it describes one pool, `{own}` (no [pools] tables)",
                file.display()
            ));
        }
    }
    apply(a, explicit, &mut cfg)?;
    f.check(pool, &cfg).map_err(|e| e.to_string())?;
    if !cfg.remote.is_remote() {
        let size =
            cfg.size.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())).max(1);
        cfg.size = Some(size);
    }
    Ok(cfg)
}

/// The command line's options over the file's settings, and the CLI's conveniences (the
/// repository's `.venv` python for gRPC, its `node_modules` for Node) where the file names no
/// interpreter.
fn apply(a: &ServeArgs, explicit: &Explicit, cfg: &mut PoolConfig) -> Result<(), String> {
    let w = &mut cfg.worker;
    if a.worker.script.is_some() || a.worker.module.is_some() || a.worker.command.is_some() {
        // A source on the command line replaces the file's, and what was tied to it.
        w.clear_source();
        w.script = a.worker.script.clone();
        w.module = a.worker.module.clone();
        w.command = match &a.worker.command {
            Some(line) => Some(crate::worker::split_command(line)?),
            None => None,
        };
    }
    let t = &a.transport;
    if explicit.transport {
        cfg.transport = match t.transport {
            TransportKind::Stdio => CfgTransport::Stdio,
            TransportKind::Grpc => CfgTransport::Grpc,
        };
    }
    if explicit.pipeline_depth {
        cfg.pipeline_depth = usize::from(t.pipeline_depth);
    }
    if explicit.protocol {
        w.protocol = match t.protocol {
            ProtocolKind::V1 => Protocol::V1,
            ProtocolKind::SnakepitV0 => Protocol::SnakepitV0,
        };
    }
    if !t.tools.is_empty() {
        w.tools = t.tools.clone();
    }
    if t.zygote {
        w.zygote = true;
    }
    let node = w.script.as_deref().is_some_and(is_node_script);
    let python = !node && (w.script.is_some() || w.module.is_some());
    if python {
        if let Some(p) = &t.python {
            w.interpreter = Some(p.clone());
        } else if w.interpreter.is_none() && cfg.transport == CfgTransport::Grpc {
            w.interpreter = repo_venv_python();
        }
    }
    if node {
        if let Some(n) = &t.node {
            w.interpreter = Some(n.clone());
        }
        w.node_path.extend(repo_node_modules());
    }
    if let Some(n) = a.size {
        cfg.size = Some(n);
    }
    if let Some(i) = &a.instance {
        cfg.instance = Some(i.clone());
    }
    if let Some(ms) = a.default_timeout_ms {
        cfg.default_timeout = Some(Duration::from_millis(ms));
    }
    if let Some(ms) = a.max_call_time_ms {
        cfg.max_call_time = Some(Duration::from_millis(ms));
    }
    if explicit.max_queue {
        cfg.max_queue = a.max_queue;
    }
    if a.create_sessions_on_use {
        cfg.sessions.create_on_use = true;
    }
    if let Some(url) = &a.session_store {
        cfg.sessions.store = Some(url.clone());
    }
    Ok(())
}
