//! Metrics and stats with real python3 workers: the Prometheus endpoint scraped over real HTTP,
//! its counters moving with the calls, and the `PoolStats` totals by error kind.
//!
//! Each test runs in its own process (nextest), so each installs its own global recorder.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::{CallOptions, Error, Payload, Python};
use snakepit_tests::Reaper;

/// `GET path` over a plain TCP connection: (status line, body).
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric != name || !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return None;
        }
        value.parse().ok()
    })
}

/// Scrapes until `cond` holds on the text (the sampled gauges move once a second), for at most
/// 10 s; returns the text that matched.
async fn scrape_until(addr: SocketAddr, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) =
            tokio::task::spawn_blocking(move || http_get(addr, "/metrics")).await.expect("join");
        assert!(status.contains("200"), "{status}");
        if cond(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "the metrics never matched:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_endpoint_serves_the_pools_metrics_and_they_move() {
    let r = Reaper::new();
    let addr = snakepit::metrics::install_prometheus("127.0.0.1:0".parse().expect("addr")).expect("install");
    assert_ne!(addr.port(), 0, "port 0 binds a free port");
    // A second exporter is refused, not a panic.
    let again = snakepit::metrics::install_prometheus("127.0.0.1:0".parse().expect("addr"));
    assert!(matches!(again, Err(Error::BadRequest(_))), "{again:?}");
    let pool = r.builder().adapter(Python::showcase()).size(2).name("scrape").build().await.expect("pool");

    for i in 0..3 {
        assert_eq!(pool.execute("add", json!({"a": i, "b": 1})).await.expect("add"), json!(i + 1));
    }
    let e = pool.execute("fail", json!({"message": "no"})).await.expect_err("fail raises");
    assert_eq!(e.kind(), "worker");
    let e = pool.execute("no_such_tool", json!({})).await.expect_err("unknown");
    assert_eq!(e.kind(), "unknown_command");
    let mut stream = pool.execute_stream("count", json!({"n": 4})).await.expect("stream");
    let mut items = 0;
    while let Some(item) = stream.next_json().await {
        item.expect("item");
        items += 1;
    }
    assert_eq!(items, 4);
    pool.create_session("s1", json!(null)).await.expect("session");
    let told = pool
        .execute_in_session_with(
            "s1",
            "ask_host",
            Payload::from(json!({"name": "nope"})),
            CallOptions::default(),
        )
        .await;
    assert!(told.is_ok(), "{told:?}");

    let text = scrape_until(addr, |t| {
        sample(t, "snakepit_workers", &[("pool", "scrape"), ("state", "idle")]) == Some(2.0)
            && sample(t, "snakepit_sessions", &[("pool", "scrape")]) == Some(1.0)
    })
    .await;
    let calls = |t: &str, command: &str, outcome: &str| {
        sample(t, "snakepit_calls_total", &[("pool", "scrape"), ("command", command), ("outcome", outcome)])
    };
    assert_eq!(calls(&text, "add", "ok"), Some(3.0), "{text}");
    assert_eq!(calls(&text, "fail", "worker"), Some(1.0), "{text}");
    assert_eq!(calls(&text, "_unknown", "unknown_command"), Some(1.0), "{text}");
    assert_eq!(calls(&text, "count", "ok"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "snakepit_stream_chunks_total", &[("pool", "scrape")]), Some(4.0), "{text}");
    assert_eq!(
        sample(&text, "snakepit_host_calls_total", &[("pool", "scrape"), ("outcome", "error")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "snakepit_call_duration_seconds_count", &[("pool", "scrape"), ("command", "add")]),
        Some(3.0),
        "{text}"
    );
    assert!(
        text.contains("snakepit_call_duration_seconds_bucket{pool=\"scrape\",command=\"add\",le=\"0.0001\"}")
    );
    assert_eq!(sample(&text, "snakepit_queue_depth", &[("pool", "scrape")]), Some(0.0));
    let rss = sample(&text, "snakepit_worker_tree_rss_bytes", &[("pool", "scrape"), ("worker", "0")]);
    assert!(rss.is_some_and(|b| b > 1e6), "a python worker holds megabytes: {rss:?}");
    assert!(text.contains("# HELP snakepit_calls_total"), "described");

    // The counters move with more calls.
    for _ in 0..5 {
        pool.execute("add", json!({"a": 1, "b": 1})).await.expect("add");
    }
    let text = scrape_until(addr, |t| calls(t, "add", "ok") == Some(8.0)).await;
    assert_eq!(calls(&text, "add", "ok"), Some(8.0), "{text}");

    // Three calls on two workers: one waits for a worker, and is the queue-wait histogram's
    // only sample (calls served at once are not samples).
    let pool = std::sync::Arc::new(pool);
    let sleeps: Vec<_> = (0..3)
        .map(|_| {
            let p = pool.clone();
            tokio::spawn(async move { p.execute("sleep", json!({"ms": 300})).await })
        })
        .collect();
    for s in sleeps {
        s.await.expect("join").expect("sleep");
    }
    let text = scrape_until(addr, |t| {
        sample(t, "snakepit_queue_wait_seconds_count", &[("pool", "scrape")]) == Some(1.0)
    })
    .await;
    let waited = sample(&text, "snakepit_queue_wait_seconds_sum", &[("pool", "scrape")]);
    assert!(waited.is_some_and(|s| s > 0.1), "{waited:?}");

    // A crash: its outcome, then a restart.
    let e = pool.execute("crash", json!({})).await.expect_err("crash");
    assert_eq!(e.kind(), "worker_crashed");
    pool.wait_stats(|s| s.restarts == 1 && s.ready == 2, Duration::from_secs(20)).await.expect("restarted");
    let text = scrape_until(addr, |t| {
        sample(t, "snakepit_worker_restarts_total", &[("pool", "scrape")]) == Some(1.0)
    })
    .await;
    assert_eq!(calls(&text, "crash", "worker_crashed"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "snakepit_worker_restarts_total", &[("pool", "scrape")]), Some(1.0), "{text}");

    // Anything else than /metrics is a 404.
    let (status, _) = tokio::task::spawn_blocking(move || http_get(addr, "/")).await.expect("join");
    assert!(status.contains("404"), "{status}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_failures_by_kind_queue_timeouts_and_saturation() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(Python::showcase())
        .size(1)
        .max_queue(1)
        .queue_timeout(Duration::from_millis(300))
        .build()
        .await
        .expect("pool");
    let pool = std::sync::Arc::new(pool);
    // One call holds the only worker; one waits in the queue (and times out); the next is
    // refused at once.
    let p = pool.clone();
    let busy = tokio::spawn(async move { p.execute("sleep", json!({"ms": 1500})).await });
    pool.wait_stats(|s| s.busy == 1, Duration::from_secs(10)).await.expect("busy");
    let p = pool.clone();
    let queued = tokio::spawn(async move { p.execute("add", json!({"a": 1, "b": 2})).await });
    pool.wait_stats(|s| s.queued == 1, Duration::from_secs(10)).await.expect("queued");
    let e = pool.execute("add", json!({"a": 1, "b": 2})).await.expect_err("saturated");
    assert_eq!(e.kind(), "pool_saturated");
    let e = queued.await.expect("join").expect_err("queue timeout");
    assert_eq!(e.kind(), "queue_timeout");
    busy.await.expect("join").expect("sleep");
    pool.execute("fail", json!({})).await.expect_err("fail");
    let s = pool.stats();
    assert_eq!((s.queue_timeouts, s.saturated), (1, 1), "{s:?}");
    assert_eq!(s.errors.get("worker"), Some(&1), "{s:?}");
    assert_eq!(s.errors.values().sum::<u64>(), s.calls_failed, "{s:?}");
    assert_eq!(s.calls_ok, 1);
    pool.shutdown().await;
}
