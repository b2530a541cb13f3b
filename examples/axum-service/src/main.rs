//! `snakepit-example-axum --listen 127.0.0.1:0 [--script worker.py] [--size N]`: the web service
//! of this package's library on a pool of Python workers (the bridge's showcase tools without
//! `--script`). Prints `listening on http://ADDR` on stdout once it serves; on SIGTERM or
//! SIGINT it stops accepting, lets open requests finish (up to `--shutdown-grace-ms`), then
//! drains and stops the pool.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use snakepit::{Pool, Python};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// The service's options.
#[derive(Parser)]
struct Args {
    /// Where to listen (port 0: a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A Python worker script (default: the bridge's showcase tools).
    #[arg(long)]
    script: Option<PathBuf>,
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    size: usize,
    /// On SIGTERM/SIGINT, how long open requests (and SSE streams) may take to finish.
    #[arg(long, default_value_t = 10_000)]
    shutdown_grace_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SNAKEPIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snakepit-example-axum: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (stop_tx, stop) = watch::channel(false);
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop_tx.send_replace(true);
    });
    // The recorder first: the pool takes its metric handles when it starts.
    let metrics = snakepit::metrics::install_prometheus_recorder()?;
    let adapter = match &args.script {
        Some(s) => Python::script(s),
        None => Python::showcase(),
    };
    let pool = Pool::builder()
        .adapter(adapter)
        .size(args.size)
        .name("web")
        .create_sessions_on_use(true)
        .build()
        .await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = axum::serve(listener, snakepit_example_axum::app(pool.clone(), Some(metrics)))
        .with_graceful_shutdown(stopped(stop.clone()));
    let grace = Duration::from_millis(args.shutdown_grace_ms);
    tokio::select! {
        r = server => r?,
        () = async { stopped(stop).await; tokio::time::sleep(grace).await } => {
            tracing::warn!("requests still open after the shutdown grace; closing them");
        }
    }
    pool.shutdown().await;
    Ok(())
}
