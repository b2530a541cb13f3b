//! Model-based test of the pool with real python3 workers: random sequences of operations are
//! run against the pool and against a simple model of what must happen; after every step the
//! pool's outcomes and counters must match the model and the pool must settle back to full
//! strength with nothing busy or queued.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use snakepit::{Error, Python};
use snakepit_tests::Reaper;

#[derive(Debug, Clone)]
enum Op {
    Add(i32),
    Raise,
    Crash,
    Unknown,
    TimeoutThenCancel,
    Burst(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..1000i32).prop_map(Op::Add),
        2 => Just(Op::Raise),
        1 => Just(Op::Crash),
        1 => Just(Op::Unknown),
        1 => Just(Op::TimeoutThenCancel),
        2 => (2..12usize).prop_map(Op::Burst),
    ]
}

#[derive(Debug, Default)]
struct Model {
    ok: u64,
    failed: u64,
    crashes: u64,
}

const SIZE: usize = 2;

async fn run_case(ops: Vec<Op>) {
    let r = Reaper::new();
    let pool = Arc::new(
        r.builder()
            .adapter(Python::showcase())
            .size(SIZE)
            .restart_limit(1000, Duration::from_secs(60))
            .cancel_grace(Duration::from_secs(10))
            .build()
            .await
            .expect("pool"),
    );
    let mut m = Model::default();
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Add(i) => {
                assert_eq!(pool.execute("add", json!({"a": i, "b": 1})).await.expect("add"), json!(i + 1));
                m.ok += 1;
            }
            Op::Raise => {
                let r = pool.execute("fail", json!({"type": "ValueError"})).await;
                assert!(matches!(r, Err(Error::Worker { .. })), "{r:?}");
                m.failed += 1;
            }
            Op::Crash => {
                let r = pool.execute("crash", json!({"code": 2})).await;
                assert!(matches!(r, Err(Error::WorkerCrashed { .. })), "{r:?}");
                m.failed += 1;
                m.crashes += 1;
            }
            Op::Unknown => {
                let r = pool.execute("no_such_tool", json!(null)).await;
                assert!(matches!(r, Err(Error::UnknownCommand { .. })), "{r:?}");
                m.failed += 1;
            }
            Op::TimeoutThenCancel => {
                let r = pool.execute_timeout("sleep", json!({"ms": 10_000}), Duration::from_millis(30)).await;
                assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
                m.failed += 1;
            }
            Op::Burst(n) => {
                let mut tasks = Vec::new();
                for k in 0..*n as i64 {
                    let p = pool.clone();
                    tasks.push(tokio::spawn(
                        async move { (k, p.execute("add", json!({"a": k, "b": k})).await) },
                    ));
                }
                for t in tasks {
                    let (k, r) = t.await.expect("join");
                    assert_eq!(r.expect("burst add"), json!(2 * k));
                }
                m.ok += *n as u64;
            }
        }
        let settled = pool
            .wait_stats(
                |s| {
                    s.ready == SIZE
                        && s.idle == SIZE
                        && s.busy == 0
                        && s.queued == 0
                        && s.restarts == m.crashes
                },
                Duration::from_secs(15),
            )
            .await;
        let s = settled.unwrap_or_else(|s| panic!("step {step} ({op:?}) did not settle: {s:?}, model {m:?}"));
        assert_eq!((s.calls_ok, s.calls_failed), (m.ok, m.failed), "step {step} ({op:?})");
        assert!(!s.degraded && !s.circuit_open);
    }
    pool.shutdown().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_its_model(ops in proptest::collection::vec(op(), 1..14)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        rt.block_on(run_case(ops));
    }
}
