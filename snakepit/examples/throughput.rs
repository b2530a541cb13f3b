//! Session create+route rate and streaming chunk throughput.
//!
//! `cargo run --release -p snakepit --example throughput`

use std::time::Instant;

use futures::StreamExt;
use serde_json::json;
use snakepit::{Pool, Python};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), snakepit::Error> {
    let pool = Pool::builder().adapter(Python::showcase()).size(1).build().await?;
    // Sessions: create one, route one call to its worker.
    let n = 5000;
    let t = Instant::now();
    for i in 0..n {
        let id = format!("s{i}");
        pool.create_session(&id, json!(null)).await?;
        pool.execute_in_session(&id, "ping", json!(null)).await?;
    }
    let dt = t.elapsed();
    println!("{n} session create + routed call: {:.0}/s ({:?} each)", n as f64 / dt.as_secs_f64(), dt / n);
    let t = Instant::now();
    for i in 0..n {
        pool.create_session(&format!("x{i}"), json!(null)).await?;
    }
    let dt = t.elapsed();
    println!("{n} session creates alone: {:.0}/s", n as f64 / dt.as_secs_f64());
    // Streaming: small chunks and 64 KiB chunks.
    for (chunks, size) in [(100_000u64, 0usize), (5_000, 65_536)] {
        let t = Instant::now();
        let mut s = pool.execute_stream("count", json!({"n": chunks, "size": size})).await?;
        let mut got = 0u64;
        let mut bytes = 0usize;
        while let Some(item) = s.next().await {
            bytes += item?.len();
            got += 1;
        }
        let dt = t.elapsed();
        println!(
            "stream of {got} chunks of ~{} B: {:.0} chunks/s, {:.1} MiB/s",
            bytes / got.max(1) as usize,
            got as f64 / dt.as_secs_f64(),
            bytes as f64 / 1048576.0 / dt.as_secs_f64()
        );
    }
    pool.shutdown().await;
    Ok(())
}
