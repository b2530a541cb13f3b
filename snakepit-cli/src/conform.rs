//! `snakepit conform`: the conformance kit, run against any worker (`docs/conformance.md`).
//!
//! Every behaviour starts its own pool of the worker through the real supervisor and
//! transport, checks one thing, and stops the pool. A behaviour that needs a tool (or a
//! capability) the worker does not announce is skipped; the core ones must pass.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use snakepit::core::Ready;
use snakepit::{Pool, PoolBuilder};

use crate::worker::{Source, TransportArgs, TransportKind, WorkerArgs};

mod cases;

/// How long one behaviour may take before it fails as hung.
const CASE_BOUND: Duration = Duration::from_secs(40);

/// Options of `snakepit conform`.
#[derive(Args)]
pub(crate) struct ConformArgs {
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    transport: TransportArgs,
    /// How long a worker may take to start (until its `ready`), in milliseconds.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    handshake_timeout_ms: u64,
    /// Run only these behaviours (comma-separated names).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    only: Vec<String>,
}

/// How one behaviour went.
#[derive(Debug)]
pub(crate) enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

/// What the behaviours share: how to build a pool of the worker under test, and what its
/// first handshake announced.
pub(crate) struct Kit {
    source: Source,
    transport: TransportArgs,
    /// Scratch space: marker files and gRPC socket directories.
    dir: tempfile::TempDir,
    /// The first worker's `ready` (once the handshake behaviour passed).
    pub(crate) ready: Option<Ready>,
}

impl Kit {
    /// A builder for a pool of one worker under test.
    pub(crate) fn builder(&self) -> PoolBuilder {
        let b =
            Pool::builder().size(1).restart_backoff(Duration::from_millis(10), Duration::from_millis(200));
        let b = match self.transport.apply(b, self.source.clone()) {
            Ok(b) => b,
            // `run` applied the same options once already.
            Err(m) => unreachable!("options checked at start: {m}"),
        };
        match self.transport.transport {
            TransportKind::Grpc => {
                b.transport(snakepit::Grpc::default().socket_root(self.dir.path().join("s")))
            }
            TransportKind::Stdio => b,
        }
    }

    /// The same with a frame limit of `max` bytes.
    pub(crate) fn builder_max_frame(&self, max: usize) -> PoolBuilder {
        let b = self.builder();
        match self.transport.transport {
            TransportKind::Grpc => {
                b.transport(snakepit::Grpc::default().socket_root(self.dir.path().join("s")).max_frame(max))
            }
            TransportKind::Stdio => b.transport(snakepit::StdioTransport::new().max_frame(max)),
        }
    }

    /// Builds a pool, or fails the behaviour with the error.
    pub(crate) async fn pool(&self, b: PoolBuilder) -> Result<Pool, Outcome> {
        b.build().await.map_err(|e| Outcome::Fail(format!("the pool did not start: {e}")))
    }

    /// Whether the worker offers `tool`.
    pub(crate) fn has(&self, tool: &str) -> bool {
        self.ready.as_ref().is_some_and(|r| r.tools.iter().any(|t| t.name == tool))
    }

    /// `Err(Skip)` unless the worker offers every one of `tools`.
    pub(crate) fn needs(&self, tools: &[&str]) -> Result<(), Outcome> {
        match tools.iter().find(|t| !self.has(t)) {
            Some(t) => Err(Outcome::Skip(format!("needs tool {t}"))),
            None => Ok(()),
        }
    }

    /// A path in the kit's scratch directory.
    pub(crate) fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
}

impl Source {
    fn with_handshake_timeout(self, t: Duration) -> Source {
        match self {
            Source::Python(a) => Source::Python(a.handshake_timeout(t)),
            Source::Node(a) => Source::Node(a.handshake_timeout(t)),
            Source::Command(a) => Source::Command(a.handshake_timeout(t)),
        }
    }
}

pub(crate) async fn run(a: ConformArgs) -> ExitCode {
    let source = match a.worker.source() {
        Ok(s) => s.with_handshake_timeout(Duration::from_millis(a.handshake_timeout_ms)),
        Err(m) => {
            eprintln!("snakepit conform: {m}");
            return ExitCode::from(2);
        }
    };
    if let Some(bad) = a.only.iter().find(|o| *o != "handshake" && !cases::ALL.iter().any(|(n, _, _)| n == o))
    {
        eprintln!("snakepit conform: --only: no behaviour named {bad:?} (see docs/conformance.md)");
        return ExitCode::from(2);
    }
    if let Err(m) = a.transport.apply(Pool::builder(), source.clone()) {
        eprintln!("snakepit conform: {m}");
        return ExitCode::from(2);
    }
    let dir = match tempfile::Builder::new().prefix("snakepit-conform-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("snakepit conform: cannot make a scratch directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut tally = Tally::default();
    // The handshake comes first: without it nothing else can run.
    let mut kit = Kit { source, transport: a.transport, dir, ready: None };
    match tokio::time::timeout(
        CASE_BOUND + Duration::from_millis(a.handshake_timeout_ms),
        cases::handshake(&kit),
    )
    .await
    {
        Ok(Ok(ready)) => {
            tally.record("handshake", true, Outcome::Pass);
            kit.ready = Some(ready);
        }
        Ok(Err(m)) => {
            tally.record("handshake", true, Outcome::Fail(m));
            return tally.finish();
        }
        Err(_) => {
            tally.record("handshake", true, Outcome::Fail("no answer in time".into()));
            return tally.finish();
        }
    }
    for (name, core, case) in cases::ALL {
        if !a.only.is_empty() && !a.only.iter().any(|o| o == name) {
            continue;
        }
        let outcome = match tokio::time::timeout(CASE_BOUND, case(&kit)).await {
            Ok(o) => o,
            Err(_) => Outcome::Fail(format!("did not finish within {} s", CASE_BOUND.as_secs())),
        };
        tally.record(name, *core, outcome);
    }
    tally.finish()
}

/// The running count, printed as it goes.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    skipped: usize,
    /// A core behaviour did not pass.
    core_missed: bool,
}

impl Tally {
    fn record(&mut self, name: &str, core: bool, o: Outcome) {
        match o {
            Outcome::Pass => {
                self.passed += 1;
                println!("PASS {name}");
            }
            Outcome::Fail(why) => {
                self.failed += 1;
                self.core_missed |= core;
                println!("FAIL {name}: {why}");
            }
            Outcome::Skip(why) => {
                self.skipped += 1;
                self.core_missed |= core;
                println!("SKIP {name}: {why}");
            }
        }
    }

    /// Prints the summary line; the exit status is 0 only without a failure and with every
    /// core behaviour run passed (skipping a core one counts against it).
    fn finish(&self) -> ExitCode {
        let skipped = if self.skipped > 0 { format!(", {} skipped", self.skipped) } else { String::new() };
        println!("{} passed, {} failed{skipped}", self.passed, self.failed);
        if self.failed == 0 && !self.core_missed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}
