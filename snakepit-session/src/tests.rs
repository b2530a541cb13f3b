use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;

use super::*;

#[tokio::test(start_paused = true)]
async fn ttl_is_refreshed_on_use_and_expired_sessions_vanish() {
    let s = MemoryStore::new(Duration::from_secs(10), 10);
    s.create("a", json!({"user": 1})).await.expect("create");
    tokio::time::advance(Duration::from_secs(8)).await;
    assert!(s.get("a").await.expect("get").is_some(), "used before expiry: refreshed");
    tokio::time::advance(Duration::from_secs(8)).await;
    assert!(s.get("a").await.expect("get").is_some());
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(s.get("a").await.expect("get").is_none());
    assert_eq!(s.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_removes_expired_sessions() {
    let s = MemoryStore::new(Duration::from_secs(5), 100);
    for i in 0..50 {
        s.create(&format!("s{i}"), json!(null)).await.expect("create");
    }
    let sweeper = s.spawn_sweeper(Duration::from_secs(1));
    // Virtual time, one second at a time, letting the sweeper run each due tick.
    for _ in 0..7 {
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    tokio::task::yield_now().await;
    assert_eq!(s.len(), 0);
    drop(s);
    tokio::time::advance(Duration::from_secs(2)).await;
    sweeper.await.expect("the sweeper stops once the store is gone");
}

#[tokio::test]
async fn quota_and_types() {
    let s = MemoryStore::new(Duration::from_secs(60), 2);
    s.create("a", json!(null)).await.expect("a");
    s.create("b", json!(null)).await.expect("b");
    s.create("a", json!(null)).await.expect("re-creating an existing id is not a new session");
    assert!(matches!(s.create("c", json!(null)).await, Err(Error::SessionQuotaExceeded { max: 2 })));
    assert!(s.close("a").await.expect("close"));
    s.create("c", json!(null)).await.expect("room again");
    s.set_var("c", "temp", json!(0.5), Some(VarType::Float { min: Some(0.0), max: Some(1.0) }))
        .await
        .expect("set");
    let e = s.set_var("c", "temp", json!(3.0), None).await;
    assert!(matches!(e, Err(Error::InvalidVariable { .. })), "{e:?}");
    let e = s.set_var("c", "temp", json!("hot"), None).await;
    assert!(matches!(e, Err(Error::InvalidVariable { .. })), "{e:?}");
    assert_eq!(s.get_var("c", "temp").await.expect("get"), Some(json!(0.5)));
    assert!(matches!(s.set_var("zz", "x", json!(1), None).await, Err(Error::SessionNotFound { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_creators_of_one_id_get_one_session() {
    let s = MemoryStore::new(Duration::from_secs(60), 1000);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.create("same", json!({"creator": i})).await }));
    }
    let mut creators = std::collections::HashSet::new();
    for t in tasks {
        let rec = t.await.expect("join").expect("create");
        creators.insert(rec.metadata.to_string());
    }
    assert_eq!(creators.len(), 1, "everyone sees the one record created first");
    assert_eq!(s.len(), 1);
}

#[derive(Debug, Clone)]
enum Op {
    Create(u8),
    Get(u8),
    Set(u8, u8, i64),
    Delete(u8, u8),
    Close(u8),
    Advance(u8),
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..6u8).prop_map(Op::Create),
        (0..6u8).prop_map(Op::Get),
        (0..6u8, 0..3u8, -5..5i64).prop_map(|(a, b, c)| Op::Set(a, b, c)),
        (0..6u8, 0..3u8).prop_map(|(a, b)| Op::Delete(a, b)),
        (0..6u8).prop_map(Op::Close),
        (0..12u8).prop_map(Op::Advance),
        Just(Op::Sweep),
    ]
}

/// The reference: a plain map of session -> (last use, variables), with the same TTL and quota.
#[derive(Default)]
struct Model {
    now: u64,
    sessions: BTreeMap<u8, (u64, BTreeMap<u8, i64>)>,
}

const TTL: u64 = 10;
const MAX: usize = 4;

impl Model {
    fn live(&mut self, id: u8) -> bool {
        match self.sessions.get(&id) {
            Some((t, _)) if self.now < t + TTL => true,
            Some(_) => {
                self.sessions.remove(&id);
                false
            }
            None => false,
        }
    }
    fn count(&self) -> usize {
        self.sessions.len()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn memory_store_matches_the_reference(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("rt");
        rt.block_on(async {
            let s = MemoryStore::new(Duration::from_secs(TTL), MAX);
            let mut m = Model::default();
            for op in ops {
                match op {
                    Op::Create(id) => {
                        let r = s.create(&id.to_string(), json!(null)).await;
                        let live = m.live(id);
                        let now = m.now;
                        m.sessions.retain(|_, (t, _)| now < *t + TTL);
                        if live {
                            let vars = m.sessions.get(&id).map(|(_, v)| v.clone()).unwrap_or_default();
                            m.sessions.insert(id, (m.now, vars));
                            prop_assert!(r.is_ok());
                        } else if m.count() >= MAX {
                            prop_assert!(matches!(r, Err(Error::SessionQuotaExceeded { .. })), "{r:?}");
                        } else {
                            prop_assert!(r.is_ok(), "{r:?}");
                            m.sessions.insert(id, (m.now, BTreeMap::new()));
                        }
                    }
                    Op::Get(id) => {
                        let got = s.get(&id.to_string()).await.expect("get");
                        let live = m.live(id);
                        prop_assert_eq!(got.is_some(), live);
                        if live {
                            let (t, _) = m.sessions.get_mut(&id).expect("live");
                            *t = m.now;
                        }
                    }
                    Op::Set(id, name, v) => {
                        let r = s.set_var(&id.to_string(), &name.to_string(), json!(v), None).await;
                        let live = m.live(id);
                        prop_assert_eq!(r.is_ok(), live);
                        if live {
                            let (t, vars) = m.sessions.get_mut(&id).expect("live");
                            *t = m.now;
                            vars.insert(name, v);
                        }
                    }
                    Op::Delete(id, name) => {
                        let r = s.delete_var(&id.to_string(), &name.to_string()).await;
                        let live = m.live(id);
                        prop_assert_eq!(r.is_ok(), live);
                        if live {
                            let (t, vars) = m.sessions.get_mut(&id).expect("live");
                            *t = m.now;
                            prop_assert_eq!(r.expect("ok"), vars.remove(&name).is_some());
                        }
                    }
                    Op::Close(id) => {
                        let r = s.close(&id.to_string()).await.expect("close");
                        let live = m.live(id);
                        m.sessions.remove(&id);
                        prop_assert_eq!(r, live);
                    }
                    Op::Advance(secs) => {
                        tokio::time::advance(Duration::from_secs(secs as u64)).await;
                        m.now += secs as u64;
                    }
                    Op::Sweep => {
                        s.sweep();
                        let now = m.now;
                        m.sessions.retain(|_, (t, _)| now < *t + TTL);
                        prop_assert_eq!(s.len(), m.count());
                    }
                }
                // Every variable the model holds is in the store.
                for (id, (_, vars)) in m.sessions.clone() {
                    if !m.live(id) { continue; }
                    for (name, v) in vars {
                        // Reading refreshes the TTL in both.
                        let got = s.get_var(&id.to_string(), &name.to_string()).await.expect("live");
                        prop_assert_eq!(got, Some(json!(v)));
                        if let Some((t, _)) = m.sessions.get_mut(&id) { *t = m.now; }
                    }
                }
            }
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_may_have_its_own_ttl() {
    let s = MemoryStore::new(Duration::from_secs(100), 10);
    s.create_with("short", json!(null), SessionOptions::default().with_ttl(Duration::from_secs(5)))
        .await
        .expect("create");
    s.create("long", json!(null)).await.expect("create");
    // An existing session keeps its options.
    s.create_with("short", json!(null), SessionOptions::default().with_ttl(Duration::from_secs(500)))
        .await
        .expect("again");
    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(s.get("short").await.expect("get").is_some(), "refreshed on use, by its own ttl");
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(s.get("short").await.expect("get").is_none());
    assert!(s.get("long").await.expect("get").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_updates_are_read_modify_write_and_stats_count() {
    let s = MemoryStore::new(Duration::from_secs(100), 2);
    s.create("a", json!({"n": 0})).await.expect("create");
    // 50 concurrent increments on two threads: none is lost.
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let st = s.clone();
            tokio::spawn(async move {
                st.update_metadata(
                    "a",
                    Box::new(|m: &mut serde_json::Value| m["n"] = json!(m["n"].as_i64().unwrap_or(0) + 1)),
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("update");
    }
    assert_eq!(s.get("a").await.expect("get").expect("live").metadata, json!({"n": 50}));
    assert!(matches!(
        s.update_metadata("nope", Box::new(|_: &mut serde_json::Value| {})).await,
        Err(Error::SessionNotFound { .. })
    ));
    s.create("b", json!(null)).await.expect("create");
    assert!(matches!(s.create("c", json!(null)).await, Err(Error::SessionQuotaExceeded { .. })));
    let st = s.stats().await.expect("stats");
    assert_eq!((st.live, st.created, st.expired, st.quota_refusals), (2, 2, 0, 1));
}
