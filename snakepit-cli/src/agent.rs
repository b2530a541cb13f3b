//! `snakepit agent`: a worker host. Runs a local supervised pool (its workers on the local
//! stdio or Unix-socket transports, with restart, recycling and no orphans) and serves it to
//! remote front ends over gRPC on TCP with mutual TLS (`snakepit.v1.Agent`, plus the standard
//! gRPC health service).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use snakepit::remote::server::{bind, AgentOptions};
use snakepit::{Pool, ServerTls};
use tokio::signal::unix::{signal, SignalKind};

use crate::{TransportArgs, WorkerArgs};

/// The `agent` subcommand's options.
#[derive(clap::Args, Clone)]
pub(crate) struct AgentArgs {
    /// Where to listen (`127.0.0.1:0`: a free port). The first stdout line is `snakepit agent
    /// listening on ADDR` once the workers are up and the listener is bound.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// A configuration file (as `serve --config`): the pool's settings and its `[worker]`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    transport: TransportArgs,
    /// Number of workers (default: the file's `size`, else the CPU count).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    size: Option<u16>,
    /// This agent's certificate chain (PEM).
    #[arg(long, value_name = "PEM", required_unless_present = "insecure_plaintext")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "PEM", required_unless_present = "insecure_plaintext")]
    tls_key: Option<PathBuf>,
    /// The CA of the front ends' client certificates (PEM): a client without a certificate
    /// from it (or with an expired one) fails the TLS handshake.
    #[arg(long, value_name = "PEM", required_unless_present = "insecure_plaintext")]
    tls_client_ca: Option<PathBuf>,
    /// Plain TCP without TLS — refused unless --listen is a loopback address.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    insecure_plaintext: bool,
    /// On SIGTERM/SIGINT: how long running calls may take to finish (no new ones are taken).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    shutdown_grace_ms: u64,
}

/// The pool the options (or the file) describe; an `Err` is a usage error.
fn builder(a: &AgentArgs) -> Result<snakepit::PoolBuilder, String> {
    let b = match &a.config {
        Some(file) => {
            let mut cfg = snakepit::PoolConfig::load(file).map_err(|e| e.to_string())?;
            if cfg.remote.is_remote() {
                return Err(format!("{}: an agent runs local workers (not [remote] agents)", file.display()));
            }
            if a.worker.script.is_some() || a.worker.module.is_some() || a.worker.command.is_some() {
                return Err(
                    "give the workers either in --config's [worker] or with --script/--module/--command"
                        .into(),
                );
            }
            if let Some(n) = a.size {
                cfg.size = Some(usize::from(n));
            }
            snakepit::PoolBuilder::from_config(&cfg).map_err(|e| e.to_string())?
        }
        None => {
            if a.worker.script.is_none() && a.worker.module.is_none() && a.worker.command.is_none() {
                return Err(
                    "name the workers with --script, --module or --command, or give --config FILE".into()
                );
            }
            let b = a.worker.source().and_then(|s| a.transport.apply(Pool::builder(), s))?;
            match a.size {
                Some(n) => b.size(usize::from(n)),
                None => b,
            }
        }
    };
    // Sessions are the front ends': a call in a session this agent has not seen pins it here.
    Ok(b.create_sessions_on_use(true))
}

pub(crate) async fn run(a: AgentArgs) -> ExitCode {
    // Installed first, so a signal during start-up already takes the graceful path.
    let (term, int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("snakepit agent: cannot install the signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tls = match (&a.tls_cert, &a.tls_key, &a.tls_client_ca) {
        (Some(c), Some(k), Some(ca)) => Some(ServerTls::new(c, k, ca)),
        _ => None,
    };
    if tls.is_none() && !a.listen.ip().is_loopback() {
        eprintln!(
            "snakepit agent: --insecure-plaintext is for loopback addresses only; {} is not one",
            a.listen
        );
        return ExitCode::from(2);
    }
    let opts =
        AgentOptions::new(a.listen, tls).with_shutdown_grace(Duration::from_millis(a.shutdown_grace_ms));
    let b = match builder(&a) {
        Ok(b) => b,
        Err(m) => {
            eprintln!("snakepit agent: {m}");
            return ExitCode::from(2);
        }
    };
    // TLS files and the address are checked before any worker starts.
    let listener = match bind(opts).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("snakepit agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let pool = match b.build().await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("snakepit agent: the pool could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "snakepit agent listening on {}", listener.local_addr());
        let _ = out.flush();
    }
    match signal(SignalKind::hangup()) {
        Ok(hup) => {
            tokio::spawn(restart_on_hangup(hup, pool.clone(), a.config.clone()));
        }
        Err(e) => tracing::warn!("cannot install the SIGHUP handler (no reloads): {e}"),
    }
    let shutdown = stop_signal(term, int);
    let served = listener.serve(Arc::new(pool.clone()), shutdown).await;
    pool.shutdown().await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snakepit agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The first SIGTERM/SIGINT drains; a second one exits at once with 128 + its number (the
/// workers' shepherds then kill them).
async fn stop_signal(mut term: tokio::signal::unix::Signal, mut int: tokio::signal::unix::Signal) {
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!("{name}: draining (no new calls; running ones finish within the grace)");
    tokio::spawn(async move {
        let (name, code) = tokio::select! {
            _ = term.recv() => ("SIGTERM", 143),
            _ = int.recv() => ("SIGINT", 130),
        };
        eprintln!("snakepit agent: second signal ({name}): exiting now");
        std::process::exit(code);
    });
}

/// On each SIGHUP: with `--config`, reads the file again and reloads the workers with its
/// `[worker]` (a rolling replacement: calls in flight finish) and resizes to its `size`; a
/// file that does not load keeps the pool, with one ERROR. Without `--config`, a rolling
/// restart of the same workers.
async fn restart_on_hangup(mut hup: tokio::signal::unix::Signal, pool: Pool, config: Option<PathBuf>) {
    while hup.recv().await.is_some() {
        let Some(file) = &config else {
            crate::serve::rolling_restart(&pool).await;
            continue;
        };
        let loaded = snakepit::PoolConfig::load(file).and_then(|c| c.adapter().map(|ad| (ad, c.size)));
        let (adapter, size) = match loaded {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("SIGHUP: {e}; the pool is kept as it is");
                continue;
            }
        };
        let size = size.unwrap_or_else(|| pool.stats().size);
        crate::serve::reload(&pool, adapter, size).await;
    }
}
