//! Sessions in a real `redis-server` (started by the test on a Unix socket in a temporary
//! directory): the store on its own, two front ends sharing sessions with real python3
//! workers, and Redis going away and coming back under session calls.

use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::core::SessionStore;
use snakepit::{Affinity, CallOptions, Error, Payload, Python, RedisStore, VarType};
use snakepit_tests::redis::{available, RedisServer};
use snakepit_tests::Reaper;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_keeps_sessions_variables_globals_within_quota_and_expiry() {
    if !available() {
        return;
    }
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url())
        .await
        .expect("connect")
        .ttl(Duration::from_millis(400))
        .max_sessions(2);
    let a = store.create("a", json!({"user": "ada"})).await.expect("create");
    assert_eq!(a.metadata, json!({"user": "ada"}));
    store.create("b", json!(null)).await.expect("create");
    // Creating an existing id returns it, and does not count against the quota.
    assert_eq!(store.create("a", json!("other")).await.expect("again").metadata, json!({"user": "ada"}));
    let e = store.create("c", json!(null)).await.expect_err("quota");
    assert_eq!(e.kind(), "session_quota_exceeded");

    store
        .set_var("a", "n", json!(3), Some(VarType::Int { min: Some(0), max: Some(10) }))
        .await
        .expect("typed");
    let e = store.set_var("a", "n", json!(11), None).await.expect_err("out of range");
    assert_eq!(e.kind(), "invalid_variable");
    assert_eq!(store.get_var("a", "n").await.expect("get"), Some(json!(3)));
    assert!(store.delete_var("a", "n").await.expect("delete"));
    assert!(!store.delete_var("a", "n").await.expect("delete again"));
    let rec = store.update_metadata("a", Box::new(|m| m["plan"] = json!("pro"))).await.expect("update");
    assert_eq!(rec.metadata, json!({"user": "ada", "plan": "pro"}));

    store.set_global("model", json!("v2")).await.expect("global");
    assert_eq!(store.get_global("model").await.expect("global"), Some(json!("v2")));
    assert_eq!(store.list().await.expect("list"), ["a", "b"]);
    let s = store.stats().await.expect("stats");
    assert_eq!((s.live, s.created, s.quota_refusals), (2, 2, 1), "{s:?}");

    // Expiry is Redis's: untouched sessions go, and room comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.list().await.expect("list").is_empty() {
        assert!(Instant::now() < deadline, "sessions never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.get("a").await.expect("get"), None);
    store.create("c", json!(null)).await.expect("room again");
    assert!(store.close("c").await.expect("close"));
    assert!(!store.close("c").await.expect("close again"));
    assert!(store.stats().await.expect("stats").expired >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_front_ends_share_sessions_and_each_runs_them_on_its_own_workers() {
    if !available() {
        return;
    }
    // The guard first, so it drops last (after the Redis server, a child of this test).
    let r = Reaper::new();
    let redis = RedisServer::start();
    let front = || r.builder().adapter(Python::showcase()).size(1).session_store_url(redis.url()).build();
    let (a, b) = tokio::try_join!(front(), front()).expect("two front ends");
    a.create_session("s", json!({"user": "ada"})).await.expect("create through A");
    let remember = Payload::from(json!({"name": "colour", "value": "teal"}));
    a.execute_in_session_with("s", "remember", remember, CallOptions::default())
        .await
        .expect("A's worker sets");
    // B reads the session, and its worker sees what A's worker set.
    let rec = b.session("s").await.expect("B sees it").record().await.expect("record");
    assert_eq!(rec.metadata, json!({"user": "ada"}));
    let got = b.execute_in_session("s", "recall", json!({"name": "colour"})).await.expect("B's worker reads");
    assert_eq!(got, json!("teal"));
    // The session now runs on B's worker: A's strict call finds it lost, a hint call moves it.
    let pid_b = b.execute_in_session("s", "pid", json!(null)).await.expect("pid");
    assert_eq!(Some(pid_b.as_i64().unwrap_or(0) as u32), b.worker_pids()[0]);
    let strict = CallOptions::default().with_affinity(Affinity::Strict);
    let e = a.execute_in_session_with("s", "pid", Payload::null(), strict).await.expect_err("strict on A");
    assert_eq!(e.kind(), "session_lost", "{e}");
    let hint = CallOptions::default().with_affinity(Affinity::Hint);
    let pid_a: i64 = a
        .execute_in_session_with("s", "pid", Payload::null(), hint)
        .await
        .expect("hint")
        .decode()
        .expect("pid");
    assert_eq!(Some(pid_a as u32), a.worker_pids()[0]);
    // Globals are shared too.
    a.globals().set("threshold", json!(0.5)).await.expect("global through A");
    assert_eq!(b.globals().get("threshold").await.expect("through B"), Some(json!(0.5)));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_fails_session_calls_fast_and_they_recover_when_it_returns() {
    if !available() {
        return;
    }
    let r = Reaper::new();
    let mut redis = RedisServer::start();
    let pool = r
        .builder()
        .adapter(Python::showcase())
        .size(1)
        .session_store_url(redis.url())
        .build()
        .await
        .expect("pool");
    pool.create_session("s", json!(null)).await.expect("create");
    pool.execute_in_session("s", "ping", json!(null)).await.expect("before");

    redis.stop();
    let t = Instant::now();
    let e = pool.execute_in_session("s", "ping", json!(null)).await.expect_err("Redis is gone");
    assert_eq!(e.kind(), "session_store", "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "a session call waited {:?}", t.elapsed());
    assert!(matches!(e, Error::SessionStore { .. }));
    // Calls outside sessions do not notice.
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 1})).await.expect("plain call"), json!(2));

    // Redis comes back (empty: no persistence): the same pool uses it again.
    redis.restart();
    let (mut ok, mut typed, mut lost) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match pool.create_session("s", json!(null)).await {
            Ok(_) => break,
            Err(e) if e.kind() == "session_store" => typed += 1,
            Err(_) => lost += 1,
        }
        assert!(Instant::now() < deadline, "the store never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..20 {
        match pool.execute_in_session("s", "ping", json!(null)).await {
            Ok(_) => ok += 1,
            Err(e) if ["session_store", "session_not_found"].contains(&e.kind()) => typed += 1,
            Err(_) => lost += 1,
        }
    }
    println!("redis restart: calls ok {ok}, typed errors {typed}, lost {lost}");
    assert_eq!((ok, lost), (20, 0));

    // A Redis that hangs (SIGSTOP) without closing anything: session calls fail within the
    // store's deadline, and work again once it answers (a new connection replaces the mute one).
    redis.freeze(true);
    for _ in 0..2 {
        let t = Instant::now();
        let e = pool.execute_in_session("s", "ping", json!(null)).await.expect_err("Redis hangs");
        assert_eq!(e.kind(), "session_store", "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "a session call waited {:?}", t.elapsed());
    }
    assert_eq!(pool.execute("add", json!({"a": 2, "b": 2})).await.expect("plain call"), json!(4));
    redis.freeze(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.execute_in_session("s", "ping", json!(null)).await.is_err() {
        assert!(Instant::now() < deadline, "session calls never recovered after the hang");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pool.shutdown().await;
}
