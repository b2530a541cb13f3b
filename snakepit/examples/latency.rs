//! Sequential round-trip latency of a trivial call through a 1-worker pool.
//!
//! `cargo run --release -p snakepit --example latency --features grpc -- [CALLS] [stdio|grpc]
//! [BUSY_POLL_US]` (gRPC uses the repository's `.venv/bin/python`: run `cargo xtask setup` first;
//! BUSY_POLL_US sets `PoolBuilder::busy_poll`).

use std::time::{Duration, Instant};

use snakepit::{Pool, Python};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), snakepit::Error> {
    let calls: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let grpc = std::env::args().nth(2).is_some_and(|t| t == "grpc");
    let busy: u64 = std::env::args().nth(3).and_then(|a| a.parse().ok()).unwrap_or(0);
    let b = Pool::builder().size(1).busy_poll(Duration::from_micros(busy));
    let pool = if grpc {
        b.adapter(Python::showcase().interpreter(".venv/bin/python"))
            .transport(snakepit::Grpc::default())
            .build()
            .await?
    } else {
        b.adapter(Python::showcase()).build().await?
    };
    let args = serde_json::json!({"a": 1, "b": 2});
    for _ in 0..1000 {
        pool.execute("add", args.clone()).await?;
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(calls);
    let start = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        pool.execute("add", args.clone()).await?;
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{} (busy-poll {busy} µs) — {calls} sequential `add` calls: p50 {:?}, p99 {:?}, {:.0} calls/s",
        if grpc { "grpc" } else { "stdio" },
        q(0.5),
        q(0.99),
        calls as f64 / total.as_secs_f64()
    );
    pool.shutdown().await;
    Ok(())
}
