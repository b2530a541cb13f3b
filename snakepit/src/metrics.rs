//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: the pool records, the
//! exporter you install decides where they go (Prometheus, StatsD, OpenTelemetry...).
//!
//! Every metric carries a `pool` label (the pool's [name](crate::PoolBuilder::name)):
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | [`CALLS_TOTAL`] | counter | `command`, `outcome` | calls and streams that ended: `outcome` is `ok` or the error's [kind](crate::Error::kind); a command the workers do not have counts as `command="_unknown"` |
//! | [`CALL_DURATION_SECONDS`] | histogram | `command` | admission to answer (queue wait included) |
//! | [`QUEUE_WAIT_SECONDS`] | histogram | | how long calls that found no free worker waited for one (calls served at once are not samples: `calls_total` minus this count is how many were) |
//! | [`QUEUE_DEPTH`] | gauge | | calls waiting for a worker (sampled) |
//! | [`WORKERS`] | gauge | `state` | workers by state: `idle`, `busy`, `starting`, `backoff`, `failing`, `failed` (sampled) |
//! | [`WORKER_RESTARTS_TOTAL`] | counter | | workers restarted after a crash |
//! | [`WORKER_RECYCLES_TOTAL`] | counter | `trigger` | workers recycled: `requests`, `age` or `memory` |
//! | [`WORKER_TREE_RSS_BYTES`] | gauge | `worker` | resident memory of each slot's worker and its children (sampled; `worker` is the slot number) |
//! | [`SESSIONS`] | gauge | | live sessions in the pool's store (sampled) |
//! | [`HOST_CALLS_TOTAL`] | counter | `outcome` | worker → host calls: `ok` or `error` |
//! | [`STREAM_CHUNKS_TOTAL`] | counter | | items delivered by streamed calls |
//! | [`POOL_SIZE`] | gauge | | the pool's number of workers (slots) now: it changes with `resize` and the autoscaler (sampled) |
//! | [`AUTOSCALE_TOTAL`] | counter | `direction` | the autoscaler's resizes: `up` or `down` |
//!
//! Gauges marked "sampled" are read every second by a task of the pool. The histograms use
//! explicit buckets ([`DURATION_BUCKETS`]): [`prometheus_builder`] sets them for you.
//!
//! **Install the exporter before building the pool.** A pool takes its metric handles when it
//! starts (so that a call costs a few atomic additions, never a lookup or an allocation); a pool
//! started before any exporter was installed records nothing.
//!
//! ```no_run
//! # #[cfg(feature = "prometheus")]
//! # async fn f() -> Result<(), snakepit::Error> {
//! let addr = snakepit::metrics::install_prometheus("127.0.0.1:9464".parse().expect("addr"))?;
//! println!("metrics: http://{addr}/metrics");
//! let pool = snakepit::Pool::builder().adapter(snakepit::Python::showcase()).name("models").build().await?;
//! # let _ = pool; Ok(()) }
//! ```

/// `snakepit_calls_total{pool, command, outcome}`: calls (and streams) that ended.
pub const CALLS_TOTAL: &str = "snakepit_calls_total";
/// `snakepit_call_duration_seconds{pool, command}`: admission to answer.
pub const CALL_DURATION_SECONDS: &str = "snakepit_call_duration_seconds";
/// `snakepit_queue_wait_seconds{pool}`: how long calls that found no free worker waited.
pub const QUEUE_WAIT_SECONDS: &str = "snakepit_queue_wait_seconds";
/// `snakepit_queue_depth{pool}`: calls waiting for a worker.
pub const QUEUE_DEPTH: &str = "snakepit_queue_depth";
/// `snakepit_workers{pool, state}`: workers by state.
pub const WORKERS: &str = "snakepit_workers";
/// `snakepit_worker_restarts_total{pool}`: workers restarted after a crash.
pub const WORKER_RESTARTS_TOTAL: &str = "snakepit_worker_restarts_total";
/// `snakepit_worker_recycles_total{pool, trigger}`: workers recycled.
pub const WORKER_RECYCLES_TOTAL: &str = "snakepit_worker_recycles_total";
/// `snakepit_worker_tree_rss_bytes{pool, worker}`: resident memory of a worker's process tree.
pub const WORKER_TREE_RSS_BYTES: &str = "snakepit_worker_tree_rss_bytes";
/// `snakepit_sessions{pool}`: live sessions.
pub const SESSIONS: &str = "snakepit_sessions";
/// `snakepit_host_calls_total{pool, outcome}`: worker → host calls.
pub const HOST_CALLS_TOTAL: &str = "snakepit_host_calls_total";
/// `snakepit_stream_chunks_total{pool}`: items delivered by streamed calls.
pub const STREAM_CHUNKS_TOTAL: &str = "snakepit_stream_chunks_total";

/// `snakepit_pool_size{pool}`: workers (slots) now.
pub const POOL_SIZE: &str = "snakepit_pool_size";
/// `snakepit_autoscale_total{pool, direction}`: the autoscaler's resizes.
pub const AUTOSCALE_TOTAL: &str = "snakepit_autoscale_total";

/// The buckets (seconds) of the two histograms: 100 µs to 5 min.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
];

/// Describes every metric (help text and unit) to the installed recorder. Exporters that show
/// help text call for it once; [`install_prometheus`] does.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        CALLS_TOTAL,
        "Calls and streams that ended, by command and outcome (ok or error kind)."
    );
    describe_histogram!(CALL_DURATION_SECONDS, Unit::Seconds, "Call duration, admission to answer.");
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Time calls that found no free worker waited for one."
    );
    describe_gauge!(QUEUE_DEPTH, "Calls waiting for a worker.");
    describe_gauge!(WORKERS, "Workers by state.");
    describe_counter!(WORKER_RESTARTS_TOTAL, "Workers restarted after a crash.");
    describe_counter!(WORKER_RECYCLES_TOTAL, "Workers recycled, by trigger.");
    describe_gauge!(WORKER_TREE_RSS_BYTES, Unit::Bytes, "Resident memory of a worker's process tree.");
    describe_gauge!(SESSIONS, "Live sessions.");
    describe_counter!(HOST_CALLS_TOTAL, "Worker to host calls, by outcome.");
    describe_counter!(STREAM_CHUNKS_TOTAL, "Items delivered by streamed calls.");
    describe_gauge!(POOL_SIZE, "Workers (slots) in the pool now.");
    describe_counter!(AUTOSCALE_TOTAL, "Resizes by the autoscaler, by direction.");
}

#[cfg(feature = "prometheus")]
mod prometheus;
#[cfg(feature = "prometheus")]
pub use self::prometheus::{install_prometheus, install_prometheus_recorder, prometheus_builder};
/// The Prometheus exporter crate (feature `prometheus`), for a setup of your own from
/// [`prometheus_builder`].
#[cfg(feature = "prometheus")]
pub use metrics_exporter_prometheus as exporter;
