//! Request latency through the service beside a direct `pool.execute`, on the same pool:
//! N sequential `add` calls each way, p50 and p99.
//!
//! ```text
//! cargo run --release -p snakepit-example-axum --example latency -- [N]
//! ```

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::{Pool, Python};

fn percentiles(mut d: Vec<Duration>) -> (f64, f64) {
    d.sort_unstable();
    let at = |q: f64| d[((d.len() as f64 * q) as usize).min(d.len() - 1)].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).map_or(Ok(5000), |a| a.parse())?;
    let pool = Pool::builder().adapter(Python::showcase()).size(1).heartbeat(None).build().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/call/add", listener.local_addr()?);
    tokio::spawn(axum::serve(listener, snakepit_example_axum::app(pool.clone(), None)).into_future());
    let client = reqwest::Client::new();
    let args = json!({"a": 1, "b": 2});
    let (mut direct, mut http) = (Vec::with_capacity(n), Vec::with_capacity(n));
    // Warm both paths, then interleave them so machine noise hits both alike.
    for _ in 0..200 {
        pool.execute("add", args.clone()).await?;
        client.post(&url).json(&args).send().await?.error_for_status()?;
    }
    for _ in 0..n {
        let t = Instant::now();
        pool.execute("add", args.clone()).await?;
        direct.push(t.elapsed());
        let t = Instant::now();
        let r = client.post(&url).json(&args).send().await?.error_for_status()?;
        let _ = r.bytes().await?;
        http.push(t.elapsed());
    }
    let (d50, d99) = percentiles(direct);
    let (h50, h99) = percentiles(http);
    println!("{n} sequential `add` calls, 1 worker");
    println!("direct pool.execute       p50 {d50:7.1} µs  p99 {d99:7.1} µs");
    println!("POST /call/add (axum)     p50 {h50:7.1} µs  p99 {h99:7.1} µs  ({:+.1} µs at p50)", h50 - d50);
    pool.shutdown().await;
    Ok(())
}
