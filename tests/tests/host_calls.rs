//! Worker → host calls with real python3 workers: host tools, failing host tools, session
//! variables from the worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::json;
use snakepit::{Error, Python};
use snakepit_tests::Reaper;

#[tokio::test]
async fn a_tool_calls_host_tools_and_gets_results_or_typed_errors() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    pool.register_host_tool("lookup", move |args| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::Relaxed);
            Ok(json!({"user": args["id"], "plan": "pro"}))
        }
    });
    pool.register_host_tool("broken", |_| async { Err(Error::BadRequest("no such user".into())) });
    let r1 = pool.execute("ask_host", json!({"name": "lookup", "args": {"id": 7}})).await.expect("call");
    assert_eq!(r1, json!({"ok": {"user": 7, "plan": "pro"}}));
    let r2 = pool.execute("ask_host", json!({"name": "broken"})).await.expect("call");
    assert_eq!(r2["error"], "bad_request");
    assert!(r2["message"].as_str().expect("msg").contains("no such user"));
    let r3 = pool.execute("ask_host", json!({"name": "nope"})).await.expect("call");
    assert_eq!(r3["error"], "UnknownHostTool");
    assert_eq!(hits.load(Ordering::Relaxed), 1);
    // A host tool that itself fails, left unhandled in the tool: the call fails typed.
    let script = r.script(
        "w.py",
        r#"
from snakepit_bridge import tool

@tool
def strict(ctx):
    return ctx.call_host("broken")
"#,
    );
    let pool2 = r.builder().adapter(Python::script(&script)).size(1).build().await.expect("pool2");
    pool2.register_host_tool("broken", |_| async { Err(Error::BadRequest("nope".into())) });
    match pool2.execute("strict", json!(null)).await {
        Err(Error::Worker { error, .. }) => assert_eq!(error.kind, "bad_request"),
        other => panic!("unexpected {other:?}"),
    }
    pool.shutdown().await;
    pool2.shutdown().await;
}

#[tokio::test]
async fn session_variables_are_reachable_from_the_worker() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(2).build().await.expect("pool");
    let s = pool.create_session("chat-1", json!(null)).await.expect("session");
    s.set("model", json!("small")).await.expect("set");
    assert_eq!(s.execute("recall", json!({"name": "model"})).await.expect("recall"), json!("small"));
    assert_eq!(
        s.execute("remember", json!({"name": "turns", "value": 3})).await.expect("remember"),
        json!(3)
    );
    assert_eq!(s.get("turns").await.expect("get"), Some(json!(3)));
    // Outside a session there is no session.
    assert_eq!(pool.execute("recall", json!({"name": "model"})).await.expect("recall"), json!(null));
    // Host calls from many concurrent session calls do not deadlock.
    let mut tasks = Vec::new();
    let pool = Arc::new(pool);
    for i in 0..20 {
        let p = pool.clone();
        tasks.push(tokio::spawn(async move {
            let sid = format!("s{i}");
            p.create_session(&sid, json!(null)).await.expect("create");
            p.execute_in_session(&sid, "remember", json!({"name": "i", "value": i})).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.expect("join").expect("remember"), json!(i));
    }
    pool.shutdown().await;
}

/// A cancelled request's host calls end with it: a slow host tool behind many timed-out calls
/// never adds up to the 64 outstanding host calls a worker may have (the 65th would be a
/// protocol violation and cost the worker).
#[tokio::test]
async fn host_calls_of_cancelled_requests_do_not_count_against_the_limit() {
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).build().await.expect("pool");
    pool.register_host_tool("slow", |_| async {
        tokio::time::sleep(std::time::Duration::from_secs(600)).await; // the workload: never answers in time
        Ok(json!(null))
    });
    let timeout = std::time::Duration::from_millis(100);
    for i in 0..80 {
        let e =
            pool.execute_timeout("ask_host", json!({"name": "slow"}), timeout).await.expect_err("too slow");
        assert_eq!(e.kind(), "timeout", "call {i}: {e}");
    }
    let s = pool.stats();
    assert_eq!((s.crashes, s.restarts), (0, 0), "the worker was never replaced: {s:?}");
    assert_eq!(
        pool.execute("ask_host", json!({"name": "nope"})).await.expect("serves")["error"],
        "UnknownHostTool"
    );
    pool.shutdown().await;
}
