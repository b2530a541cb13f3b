//! What metrics cost per call: N sequential calls on one worker, on a current-thread runtime,
//! with or without a Prometheus recorder installed. Prints the allocations per call (a counting
//! allocator); `cargo xtask callgrind` runs it under `valgrind --tool=callgrind` to count the
//! instructions per call.
//!
//! ```text
//! cargo run --release --example metrics_cost --features prometheus -- [--metrics] [--calls N]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;
use snakepit::{Pool, Python};

/// Counts allocations (the host's only: the worker is another process).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The measured loop: `cargo xtask callgrind` counts only what runs inside this function
/// (`--toggle-collect`), so start-up and the recorder's clock calibration stay out of the count.
#[inline(never)]
fn measured_calls(rt: &tokio::runtime::Runtime, pool: &Pool, calls: u64) -> Result<(), snakepit::Error> {
    rt.block_on(async {
        let args = json!({"a": 1, "b": 2});
        for _ in 0..calls {
            pool.execute("add", args.clone()).await?;
        }
        Ok(())
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let metrics = args.iter().any(|a| a == "--metrics");
    let calls: u64 = match args.iter().position(|a| a == "--calls") {
        Some(i) => args.get(i + 1).ok_or("--calls N")?.parse()?,
        None => 2000,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let pool = rt.block_on(async {
        if metrics {
            // The exporter a service would install, without its HTTP listener.
            let recorder = snakepit::metrics::prometheus_builder().build_recorder();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
        }
        // No heartbeats in the way of the count: only calls.
        let pool = Pool::builder()
            .adapter(Python::showcase())
            .size(1)
            .heartbeat(None)
            .run_registry(false)
            .build()
            .await?;
        for _ in 0..200 {
            pool.execute("add", json!({"a": 1, "b": 2})).await?;
        }
        Ok::<_, Box<dyn std::error::Error>>(pool)
    })?;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    measured_calls(&rt, &pool, calls)?;
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    println!(
        "metrics={} calls={calls} allocations/call={:.2}",
        if metrics { "on" } else { "off" },
        (after - before) as f64 / calls as f64
    );
    rt.block_on(pool.shutdown());
    Ok(())
}
