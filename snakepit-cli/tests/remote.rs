//! Remote worker hosts with real parts: `snakepit agent` processes (real python3 workers
//! behind them) reached over TCP with mutual TLS from a front-end pool in this process, with
//! certificates generated at test time. Traffic goes only to 127.0.0.0/8, or to addresses in
//! network namespaces the test creates (`netns_*` tests, one at a time; where namespaces are
//! unavailable the agent sits behind a test-owned relay on 127.0.0.x instead).

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snakepit::remote::Resolve;
use snakepit::{ClientTls, Pool, RemoteOptions};

mod common;
use common::remote::{AgentProc, Certs, Netns, Relay};
use common::{snakepit, Guard};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const START: Duration = Duration::from_secs(60);

/// `snakepit agent` serving `size` showcase workers on `listen`, its run files in the scratch
/// directory.
fn agent(g: &Guard, certs: &Certs, size: usize, listen: &str) -> AgentProc {
    let mut c = snakepit(&g.0);
    c.env("SNAKEPIT_RUN_DIR", g.1.path().join("runs"))
        .arg("agent")
        .args(["--listen", listen, "--module", "snakepit_bridge.showcase", "--size", &size.to_string()])
        .args(certs.agent_args());
    AgentProc::start(c, START)
}

fn agent_args(certs: &Certs, size: usize, listen: &str) -> Vec<OsString> {
    let mut a: Vec<OsString> = ["--listen", listen, "--module", "snakepit_bridge.showcase", "--size"]
        .iter()
        .map(OsString::from)
        .collect();
    a.push(size.to_string().into());
    a.extend(certs.agent_args());
    a
}

fn tls(certs: &Certs) -> ClientTls {
    ClientTls::new(certs.ca(), certs.client_cert(), certs.client_key())
}

async fn front(certs: &Certs, urls: &[String]) -> Pool {
    Pool::builder().remote(urls.to_vec()).tls(tls(certs)).build().await.expect("the front end starts")
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_calls_streams_host_calls_sessions_and_deadlines_over_mutual_tls() {
    let g = Guard::new();
    let certs = Certs::new(g.1.path(), &[LOOPBACK]);
    let a = agent(&g, &certs, 2, "127.0.0.1:0");
    let pool = front(&certs, &[a.url()]).await;
    assert_eq!(pool.stats().size, 2, "one remote worker per agent worker");
    assert!(pool.tools().iter().any(|t| t == "add"), "{:?}", pool.tools());

    assert_eq!(pool.execute("add", json!({"a": 2, "b": 3})).await.expect("add"), json!(5));
    // Binary segments cross the hop untouched.
    let echoed =
        pool.execute_bytes("echo", snakepit::Bytes::from_static(b"\x00\x01raw")).await.expect("bytes");
    assert_eq!(&echoed[..], b"\x00\x01raw");
    // Past gRPC's 4 MiB default: the agent link carries what a local frame may.
    let big = snakepit::Bytes::from(vec![7u8; 12 << 20]);
    assert_eq!(pool.execute_bytes("echo", big.clone()).await.expect("12 MiB"), big);
    // A stream, item by item.
    let mut s = pool.execute_stream("count", json!({"n": 3})).await.expect("stream");
    let mut items = Vec::new();
    while let Some(item) = s.next_json().await {
        items.push(item.expect("item"));
    }
    assert_eq!(items.len(), 3, "{items:?}");
    // The tool's exception is a typed worker error with its type.
    let e = pool.execute("fail", json!({"type": "KeyError", "message": "nope"})).await.expect_err("raises");
    assert_eq!(e.kind(), "worker", "{e}");
    assert_eq!(e.to_json()["type"], "KeyError");
    // A host tool of the front end answers the remote worker's host call.
    pool.register_host_tool("double", |v| async move { Ok(json!(v.as_i64().unwrap_or(0) * 2)) });
    let r = pool.execute("ask_host", json!({"name": "double", "args": 21})).await.expect("host call");
    assert_eq!(r, json!({"ok": 42}));
    // Session variables live in the front end's store.
    let session = pool.create_session("s1", Value::Null).await.expect("session");
    let got = session.execute("remember", json!({"name": "x", "value": [1, 2]})).await.expect("remember");
    assert_eq!(got, json!([1, 2]));
    assert_eq!(
        session.get("x").await.expect("get"),
        Some(json!([1, 2])),
        "the variable is in the front end's store"
    );
    assert_eq!(session.execute("recall", json!({"name": "x"})).await.expect("recall"), json!([1, 2]));
    // Dropping a stream midway cancels the generator on the agent's worker (its `finally`
    // runs; the agent is on this machine, so its file is seen here).
    let marker = g.1.path().join("stream-closed");
    let mut s = pool.execute_stream("count", json!({"n": 1_000_000, "path": marker})).await.expect("stream");
    assert!(s.next_json().await.expect("an item").is_ok());
    drop(s);
    let m = marker.clone();
    until("the generator's finally on the agent", Duration::from_secs(10), move || m.exists()).await;
    // A deadline propagates: the call fails at its own deadline, the agent cancels it.
    let t = Instant::now();
    let e = pool
        .execute_timeout("sleep", json!({"ms": 10_000}), Duration::from_millis(300))
        .await
        .expect_err("times out");
    assert_eq!(e.kind(), "timeout", "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // The workers are still there for more calls after the cancel.
    for i in 0..10 {
        assert_eq!(pool.execute("add", json!({"a": i, "b": 1})).await.expect("add"), json!(i + 1));
    }
    pool.shutdown().await;
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_nobody_reads_do_not_starve_the_agent_connection() {
    let g = Guard::new();
    let certs = Certs::new(g.1.path(), &[LOOPBACK]);
    let a = agent(&g, &certs, 4, "127.0.0.1:0");
    let pool = front(&certs, &[a.url()]).await;
    // Three streams of 256 KiB items, opened and then not read: 3 × 32 items × 256 KiB, past the
    // connection's HTTP/2 window, were their data left unread on it.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = pool.execute_stream("count", json!({"n": 64, "size": 256 << 10})).await.expect("stream");
        assert!(s.next_json().await.expect("a first item").is_ok());
        stalled.push(s);
    }
    // Longer than the status silence that marks an agent lost (5 s): the fourth worker still
    // answers, and the agent is not lost.
    let end = Instant::now() + Duration::from_secs(6);
    while Instant::now() < end {
        let r = pool.execute_timeout("add", json!({"a": 1, "b": 1}), Duration::from_secs(3)).await;
        assert_eq!(r.expect("the connection still serves"), json!(2));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The stalled streams then deliver every item.
    for mut s in stalled {
        let mut n = 1;
        while let Some(item) = s.next_json().await {
            item.expect("item");
            n += 1;
        }
        assert_eq!(n, 64);
    }
    pool.shutdown().await;
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_wrong_missing_and_expired_client_certificates() {
    let g = Guard::new();
    let certs = Certs::new(g.1.path(), &[LOOPBACK]);
    let log = g.1.path().join("agent.log");
    let a = {
        let mut c = snakepit(&g.0);
        c.env("SNAKEPIT_RUN_DIR", g.1.path().join("runs"))
            .arg("agent")
            .args(agent_args(&certs, 1, "127.0.0.1:0"))
            .stderr(std::fs::File::create(&log).expect("log"));
        AgentProc::start(c, START)
    };
    for (what, cert, key) in [
        ("wrong CA", certs.wrong_client_cert(), certs.wrong_client_key()),
        ("expired", certs.expired_client_cert(), certs.expired_client_key()),
    ] {
        let e = Pool::builder()
            .remote([a.url()])
            .tls(ClientTls::new(certs.ca(), cert, key))
            .build()
            .await
            .expect_err(what);
        assert_eq!(e.kind(), "transport_setup", "{what}: {e}");
        assert!(e.to_string().contains(&a.url()), "{what}: the error names the agent: {e}");
    }
    // A front end that does not trust the agent's CA refuses it, naming it.
    let e = Pool::builder()
        .remote([a.url()])
        .tls(ClientTls::new(certs.wrong_ca(), certs.client_cert(), certs.client_key()))
        .build()
        .await
        .expect_err("untrusted agent");
    assert_eq!(e.kind(), "transport_setup", "{e}");
    // No client certificate at all: the handshake fails.
    assert!(no_client_certificate_is_refused(&certs, a.addr()).await);
    // The refusals cost the agent nothing: a good client is served.
    let pool = front(&certs, &[a.url()]).await;
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 1})).await.expect("add"), json!(2));
    pool.shutdown().await;
    // Each refused handshake is one WARN line on the agent, naming the peer.
    let text = std::fs::read_to_string(&log).expect("log");
    let refused: Vec<&str> = text.lines().filter(|l| l.contains("refused a client")).collect();
    assert!(refused.len() >= 4, "{text}");
    assert!(refused.iter().all(|l| l.contains("WARN") && l.contains("127.0.0.1")), "{text}");
}

/// A TLS client without a certificate: the agent must end the session before any HTTP/2.
async fn no_client_certificate_is_refused(certs: &Certs, addr: SocketAddr) -> bool {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(certs.ca()).expect("ca") {
        roots.add(c.expect("pem")).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let Ok(mut tls) = connector.connect(name, tcp).await else { return true };
    // TLS 1.3: the client finishes first; the refusal arrives as an alert on the first read.
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await, Ok(Err(_)) | Ok(Ok(0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_call_fails_its_calls_with_agent_lost_and_the_pool_goes_on_with_the_other() {
    let g = Guard::new();
    let certs = Certs::new(g.1.path(), &[LOOPBACK]);
    let mut a = agent(&g, &certs, 2, "127.0.0.1:0");
    let b = agent(&g, &certs, 2, "127.0.0.1:0");
    let pool = front(&certs, &[a.url(), b.url()]).await;
    assert_eq!(pool.stats().size, 4);
    // Strict sessions, each pinned to the worker its first call ran on; keep one on agent a.
    let on_a: Vec<bool> = pool
        .worker_handshakes()
        .iter()
        .map(|r| r.as_ref().is_some_and(|r| r.bridge.contains(&a.url())))
        .collect();
    assert_eq!(on_a.iter().filter(|x| **x).count(), 2, "two remote workers on each agent: {on_a:?}");
    let strict = snakepit::CallOptions::default().with_affinity(snakepit::Affinity::Strict);
    let mut pinned_on_a = None;
    for i in 0..16 {
        let id = format!("s{i}");
        let s = pool.create_session(&id, Value::Null).await.expect("session");
        s.execute_with("ping", snakepit::Payload::from(Value::Null), strict.clone()).await.expect("ping");
        let worker = s.record().await.expect("record").worker.expect("pinned");
        if on_a[worker.slot] {
            pinned_on_a = Some(s);
            break;
        }
    }
    let pinned_on_a = pinned_on_a.expect("a session pinned to agent a's worker");
    // Four long calls: two on each agent (each remote worker holds one).
    let started = g.1.path().join("started");
    std::fs::create_dir_all(&started).expect("dir");
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let pool = pool.clone();
            let mark = started.join(i.to_string());
            tokio::spawn(async move {
                let args = json!({"ms": 4000, "path": "/dev/null", "started": mark});
                let r = pool.execute("sleep_then_touch", args).await;
                (r, Instant::now())
            })
        })
        .collect();
    let marks = started.clone();
    until("four calls running", Duration::from_secs(20), move || {
        std::fs::read_dir(&marks).map_or(0, |d| d.count()) == 4
    })
    .await;
    let killed = Instant::now();
    a.kill();
    let (mut ok, mut lost, mut other) = (0, 0, Vec::new());
    for c in calls {
        let (r, at) = c.await.expect("join");
        match r {
            Ok(_) => ok += 1,
            Err(e) if e.kind() == "agent_lost" => {
                lost += 1;
                assert!(e.to_string().contains(&a.url()), "names the agent: {e}");
                // At once: long before the 4 s the call would have taken.
                let after = at.duration_since(killed);
                assert!(after < Duration::from_secs(2), "agent_lost {after:?} after the kill");
            }
            Err(e) => other.push(e.to_string()),
        }
    }
    eprintln!("agent kill: calls ok {ok}, agent_lost {lost}, other {other:?}");
    assert_eq!((ok, lost), (2, 2), "{other:?}");
    assert!(other.is_empty(), "{other:?}");
    // The strict session pinned to agent a's worker lost it (no rehydrate hook).
    let e = pinned_on_a
        .execute_with("ping", snakepit::Payload::from(Value::Null), strict)
        .await
        .expect_err("its worker is gone");
    assert_eq!(e.kind(), "session_lost", "{e}");
    // The pool goes on with the other agent.
    for i in 0..20 {
        assert_eq!(pool.execute("add", json!({"a": i, "b": 2})).await.expect("served by b"), json!(i + 2));
    }
    pool.shutdown().await;
    drop(b);
}

/// Where a partitionable agent runs: in its own network namespace, or behind a relay.
enum Place {
    Netns(Netns),
    Relay(Relay),
}

impl Place {
    fn partition(&self) {
        match self {
            Place::Netns(n) => n.partition(),
            Place::Relay(r) => r.pause(),
        }
    }
    fn heal(&self) {
        match self {
            Place::Netns(n) => n.heal(),
            Place::Relay(r) => r.resume(),
        }
    }
}

/// Whether agents go into network namespaces (else behind relays on 127.0.0.x);
/// `SNAKEPIT_TEST_NO_NETNS=1` takes the relay path even where namespaces work.
fn use_netns() -> bool {
    std::env::var_os("SNAKEPIT_TEST_NO_NETNS").is_none() && Netns::available()
}

/// The address agent `n` is reached at: its namespace's, or its relay's.
fn place_ip(n: u8) -> IpAddr {
    if use_netns() {
        IpAddr::V4(Ipv4Addr::new(10, 213, (std::process::id() % 250) as u8, 4 * n + 2))
    } else {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + n))
    }
}

/// Certificates whose agent certificate names agents `ns` wherever they are reached.
fn certs_for(g: &Guard, ns: &[u8]) -> Certs {
    let mut ips: Vec<IpAddr> = ns.iter().map(|n| place_ip(*n)).collect();
    ips.push(LOOPBACK);
    Certs::new(g.1.path(), &ips)
}

/// Agent `n`, reachable at a URL that can be partitioned: in its own namespace when namespaces
/// are available, else on loopback behind a relay on 127.0.0.(10 + n).
async fn partitionable(g: &Guard, certs: &Certs, n: u8, size: usize) -> (AgentProc, Place, String) {
    if use_netns() {
        let ns = Netns::new(n);
        assert_eq!(ns.agent_ip(), place_ip(n));
        let listen = SocketAddr::new(ns.agent_ip(), 7443).to_string();
        let a = AgentProc::start_in(&ns, &g.0, agent_args(certs, size, &listen), START);
        let url = format!("https://{}", a.addr());
        (a, Place::Netns(ns), url)
    } else {
        let IpAddr::V4(relay_ip) = place_ip(n) else { unreachable!("v4") };
        let a = agent(g, certs, size, "127.0.0.1:0");
        let relay = Relay::start(relay_ip, a.addr()).await;
        let url = format!("https://{}", relay.addr());
        (a, Place::Relay(relay), url)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_a_partitioned_agent_fails_its_calls_within_the_keepalive_timeout_never_a_hang() {
    let g = Guard::new();
    let certs = certs_for(&g, &[1]);
    let (a, place, url) = partitionable(&g, &certs, 1, 2).await;
    let pool = front(&certs, std::slice::from_ref(&url)).await;
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 2})).await.expect("add"), json!(3));
    let long = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.execute("sleep", json!({"ms": 60_000})).await })
    };
    let short = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let r = pool.execute_timeout("sleep", json!({"ms": 60_000}), Duration::from_millis(1500)).await;
            (r, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await; // both calls are on the wire
    let cut = Instant::now();
    place.partition();
    let (r, at) = short.await.expect("join");
    let e = r.expect_err("the short call ends at its deadline");
    assert_eq!(e.kind(), "timeout", "{e}");
    assert!(
        at.duration_since(cut) < Duration::from_secs(3),
        "at its own deadline: {:?}",
        at.duration_since(cut)
    );
    let e = tokio::time::timeout(Duration::from_secs(20), long).await.expect("never a hang").expect("join");
    let took = cut.elapsed();
    let e = e.expect_err("the long call fails");
    eprintln!(
        "partition ({}): long call failed after {took:?} with {}",
        if use_netns() { "netns" } else { "relay" },
        e.kind()
    );
    assert_eq!(e.kind(), "agent_lost", "{e}");
    assert!(took < Duration::from_secs(8), "within the keepalive timeout (5 s) plus slack: {took:?}");
    // Healed, the agent is found again (backoff up to 5 s) and serves.
    place.heal();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match pool.execute_timeout("add", json!({"a": 2, "b": 2}), Duration::from_secs(5)).await {
            Ok(v) => {
                assert_eq!(v, json!(4));
                break;
            }
            Err(e) => assert!(Instant::now() < end, "the agent did not come back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pool.shutdown().await;
    drop(a);
    drop(place);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_two_agents_one_drained_with_sigterm_under_load_no_call_fails() {
    let g = Guard::new();
    let certs = certs_for(&g, &[2, 3]);
    let (mut a, place_a, url_a) = partitionable(&g, &certs, 2, 2).await;
    let (b, place_b, url_b) = partitionable(&g, &certs, 3, 2).await;
    let pool = front(&certs, &[url_a, url_b]).await;
    assert_eq!(pool.stats().size, 4);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let ok = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..6)
        .map(|_| {
            let (pool, stop, failed, ok) = (pool.clone(), stop.clone(), failed.clone(), ok.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match pool.execute("sleep", json!({"ms": 50})).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failed.lock().expect("lock").push(e.to_string());
                            0
                        }
                    };
                }
            })
        })
        .collect();
    let ok_at = ok.clone();
    until("load running", Duration::from_secs(20), move || ok_at.load(Ordering::Relaxed) > 40).await;
    let before = ok.load(Ordering::Relaxed);
    a.sigterm();
    let status = tokio::task::spawn_blocking(move || {
        let s = a.wait_exit(Duration::from_secs(30));
        (a, s)
    });
    let (a, status) = status.await.expect("join");
    let status = status.expect("the drained agent exits within its grace");
    assert!(status.success(), "exit 0 after draining: {status:?}");
    // The load goes on with the other agent.
    let ok_now = ok.clone();
    let target = ok.load(Ordering::Relaxed) + 40;
    until("load on the other agent", Duration::from_secs(20), move || {
        ok_now.load(Ordering::Relaxed) > target
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.expect("join");
    }
    let failed = failed.lock().expect("lock").clone();
    eprintln!(
        "drain under load: calls ok {} ({} before SIGTERM), failed {}",
        ok.load(Ordering::Relaxed),
        before,
        failed.len()
    );
    assert!(failed.is_empty(), "no call fails while an agent drains: {failed:?}");
    pool.shutdown().await;
    drop((a, b, place_a, place_b));
}

/// A resolver the test controls: the name stands for whatever addresses it is given.
struct Fixed(Mutex<Vec<SocketAddr>>);

#[async_trait::async_trait]
impl Resolve for Fixed {
    async fn resolve(&self, _host: &str, _port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(self.0.lock().expect("lock").clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_is_resolved_again_and_the_pool_follows_its_agents() {
    let g = Guard::new();
    let certs = Certs::new(g.1.path(), &[LOOPBACK]);
    let a = agent(&g, &certs, 1, "127.0.0.1:0");
    let b = agent(&g, &certs, 2, "127.0.0.1:0");
    let names = Arc::new(Fixed(Mutex::new(vec![a.addr()])));
    let opts = RemoteOptions::new(["https://localhost:7443"])
        .tls(tls(&certs))
        .resolver(names.clone(), Duration::from_millis(100));
    let pool = Pool::builder().remote_options(opts).build().await.expect("front end");
    assert_eq!(pool.stats().size, 1);
    // A second pod behind the name: the pool grows to its workers.
    names.0.lock().expect("lock").push(b.addr());
    let p = pool.clone();
    until("the pool grows to 3", Duration::from_secs(20), move || p.stats().size == 3).await;
    let p = pool.clone();
    until("3 workers ready", Duration::from_secs(20), move || p.stats().ready == 3).await;
    // The first pod leaves the answer: its worker leaves; calls go on.
    names.0.lock().expect("lock").retain(|s| *s != a.addr());
    let p = pool.clone();
    until("the left agent's worker leaves", Duration::from_secs(20), move || p.stats().ready == 2).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(pool.execute("pid", Value::Null).await.expect("pid").as_i64().expect("a pid"));
    }
    assert!(!seen.is_empty() && seen.len() <= 2, "served by the remaining agent's two workers: {seen:?}");
    pool.shutdown().await;
    drop((a, b));
}

#[test]
fn serve_remote_runs_requests_on_an_agent_and_refuses_plaintext_off_loopback() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let g = Guard::new();
    let certs = Certs::new(g.1.path(), &[LOOPBACK]);
    let a = agent(&g, &certs, 1, "127.0.0.1:0");
    let mut serve = snakepit(&g.0)
        .args(["serve", "--remote", &a.url()])
        .arg("--tls-ca")
        .arg(certs.ca())
        .arg("--tls-cert")
        .arg(certs.client_cert())
        .arg("--tls-key")
        .arg(certs.client_key())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("serve");
    let mut stdin = serve.stdin.take().expect("stdin");
    writeln!(stdin, r#"{{"id": 1, "command": "add", "args": {{"a": 20, "b": 22}}}}"#).expect("write");
    drop(stdin);
    let mut line = String::new();
    BufReader::new(serve.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    let v: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(v["ok"], json!(42), "{line}");
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = serve.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > end {
            let _ = serve.kill();
            let _ = serve.wait();
            panic!("serve did not exit after its input ended");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    // Plaintext: loopback only, and only when asked for.
    let out = snakepit(&g.0)
        .args([
            "agent",
            "--listen",
            "0.0.0.0:0",
            "--module",
            "snakepit_bridge.showcase",
            "--insecure-plaintext",
        ])
        .output()
        .expect("agent");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let out = snakepit(&g.0)
        .args(["serve", "--remote", "http://127.0.0.1:9"])
        .stdin(Stdio::null())
        .output()
        .expect("serve");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("insecure-plaintext"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_agent_on_loopback_reports_health_serving_then_not_serving_while_draining() {
    let g = Guard::new();
    let mut c = snakepit(&g.0);
    c.env("SNAKEPIT_RUN_DIR", g.1.path().join("runs")).args([
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--module",
        "snakepit_bridge.showcase",
        "--size",
        "1",
        "--insecure-plaintext",
        "--shutdown-grace-ms",
        "5000",
    ]);
    let mut a = AgentProc::start(c, START);
    let channel = tonic::transport::Endpoint::from_shared(a.plain_url())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = |r: tonic_health::pb::HealthCheckResponse| r.status;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let r =
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("check");
    assert_eq!(status(r.into_inner()), serving);
    // A call that runs while the agent drains: it finishes; health says NOT_SERVING meanwhile.
    let pool = Pool::builder()
        .remote_options(RemoteOptions::new([a.plain_url()]).insecure_plaintext(true))
        .build()
        .await
        .expect("front end");
    let started = g.1.path().join("started");
    let call = {
        let (pool, started) = (pool.clone(), started.clone());
        tokio::spawn(async move {
            let args = json!({"ms": 1500, "path": "/dev/null", "started": started});
            pool.execute("sleep_then_touch", args).await
        })
    };
    until("the call runs", Duration::from_secs(20), move || started.exists()).await;
    a.sigterm();
    let mut not_serving = false;
    for _ in 0..50 {
        match health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await {
            Ok(r) if status(*r.get_ref()) != serving => {
                not_serving = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(_) => break,
        }
    }
    assert!(not_serving, "health says NOT_SERVING while draining");
    assert_eq!(call.await.expect("join").expect("the running call finishes"), json!(1500));
    let exit = tokio::task::spawn_blocking(move || a.wait_exit(Duration::from_secs(20)).map(|s| s.success()));
    assert_eq!(exit.await.expect("join"), Some(true));
    pool.shutdown().await;
}

#[path = "../../tests/src/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod redis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_front_ends_share_redis_sessions_across_agents() {
    if !redis::available() {
        eprintln!("redis-server not installed: skipped (cargo xtask setup installs it)");
        return;
    }
    let g = Guard::new();
    let server = redis::RedisServer::start();
    let certs = Certs::new(g.1.path(), &[LOOPBACK]);
    let a = agent(&g, &certs, 1, "127.0.0.1:0");
    let b = agent(&g, &certs, 1, "127.0.0.1:0");
    let urls = [a.url(), b.url()];
    let front_end = || async {
        Pool::builder()
            .remote(urls.clone())
            .tls(tls(&certs))
            .session_store_url(server.url())
            .create_sessions_on_use(true)
            .build()
            .await
            .expect("front end")
    };
    let (one, two) = (front_end().await, front_end().await);
    // Front end one's call writes the variable (from whichever agent's worker runs it) into
    // Redis; front end two's call, on any agent, reads it back, and the other way round.
    let s1 = one.create_session("shared", Value::Null).await.expect("session");
    assert_eq!(s1.execute("remember", json!({"name": "k", "value": 7})).await.expect("remember"), json!(7));
    let s2 = two.session("shared").await.expect("the session is in Redis");
    for _ in 0..4 {
        assert_eq!(s2.execute("recall", json!({"name": "k"})).await.expect("recall"), json!(7));
    }
    assert_eq!(
        s2.execute("remember", json!({"name": "j", "value": "x"})).await.expect("remember"),
        json!("x")
    );
    assert_eq!(s1.get("j").await.expect("get"), Some(json!("x")));
    // Globals too.
    let r = one.execute("ask_host", json!({"name": "global.set", "args": {"name": "g", "value": 1}})).await;
    assert!(r.expect("global.set").get("ok").is_some());
    assert_eq!(two.globals().get("g").await.expect("global"), Some(json!(1)));
    one.shutdown().await;
    two.shutdown().await;
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarts_its_workers_on_sighup_and_front_ends_go_on() {
    let g = Guard::new();
    let certs = Certs::new(g.1.path(), &[LOOPBACK]);
    let a = agent(&g, &certs, 1, "127.0.0.1:0");
    let pool = front(&certs, &[a.url()]).await;
    let before = pool.execute("pid", Value::Null).await.expect("pid");
    a.signal(nix::sys::signal::Signal::SIGHUP);
    // The agent's worker is replaced (a rolling restart); the front end's calls keep working.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let now = pool.execute("pid", Value::Null).await.expect("calls go on during the restart");
        if now != before {
            break;
        }
        assert!(Instant::now() < end, "the agent's worker was not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.shutdown().await;
    drop(a);
}
