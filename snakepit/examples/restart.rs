//! Time to replace a crashed worker: from the crash reply to the slot being ready again.
//!
//! `cargo run --release -p snakepit --example restart [ROUNDS] [zygote]`

use std::time::{Duration, Instant};

use snakepit::{Pool, ProcessProfile, Python, Zygote};

#[tokio::main]
async fn main() -> Result<(), snakepit::Error> {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let zygote = std::env::args().nth(2).is_some_and(|a| a == "zygote");
    let builder = Pool::builder().adapter(Python::showcase());
    let builder = if zygote { builder.profile(Zygote(ProcessProfile)) } else { builder };
    let pool = builder
        .size(1)
        .restart_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .restart_limit(10_000, Duration::from_secs(60))
        .build()
        .await?;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let _ = pool.execute("crash", serde_json::json!({"code": 1})).await;
        let t = Instant::now();
        let want = pool.stats().restarts + 1;
        if pool.wait_stats(|s| s.restarts >= want && s.ready == 1, Duration::from_secs(10)).await.is_err() {
            eprintln!("the worker did not come back");
            break;
        }
        times.push(t.elapsed());
    }
    times.sort();
    if !times.is_empty() {
        println!(
            "{} crash→ready replacements{}: median {:?}, max {:?} (backoff 1 ms)",
            times.len(),
            if zygote { " (zygote)" } else { "" },
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
    pool.shutdown().await;
    Ok(())
}
