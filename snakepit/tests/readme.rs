//! The application test shown in README.md ("Test your code without Python"), kept compiling
//! and passing here.

use std::time::Duration;

use serde_json::json;
use snakepit::Pool;
use snakepit_testing::FakeWorker;

#[tokio::test(start_paused = true)]
async fn checkout_survives_a_crashing_worker() {
    let worker = FakeWorker::new()
        .tool("price", |args| async move { Ok(json!(args["qty"].as_i64().unwrap_or(0) * 3)) })
        .fail_on("refund", "ValueError", "nothing to refund")
        .crash_on("segfault")
        .delay("slow_lookup", Duration::from_secs(2));
    let pool = Pool::builder().adapter(worker).size(2).build().await.expect("pool");

    assert_eq!(pool.execute("price", json!({"qty": 2})).await.expect("price"), json!(6));
    let refused = pool.execute("refund", json!({})).await.expect_err("raises");
    assert_eq!(refused.kind(), "worker"); // the tool raised ValueError; the worker lives on
    let crashed = pool.execute("segfault", json!({})).await.expect_err("crashes");
    assert_eq!(crashed.kind(), "worker_crashed"); // the slot restarts it with backoff
    pool.wait_stats(|s| s.restarts == 1 && s.ready == 2, Duration::from_secs(10)).await.expect("restarted");
    let late = pool.execute_timeout("slow_lookup", json!({}), Duration::from_secs(1)).await;
    assert_eq!(late.expect_err("too slow").kind(), "timeout"); // virtual time: the test takes ms
    pool.shutdown().await;
}
