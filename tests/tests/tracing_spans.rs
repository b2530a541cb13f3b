//! Tracing with real python3 workers: one `snakepit.call` span per call with its fields and
//! child spans, the `call ended` event, and the worker lifecycle events (ready with its start-up
//! time, crashed with its exit status, restarted), captured by a subscriber layer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use snakepit::{CallOptions, Payload, Python};
use snakepit_tests::Reaper;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record as Values};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A closed span or an event, as captured.
#[derive(Debug, Clone)]
struct Seen {
    span: bool,
    name: String,
    target: String,
    fields: BTreeMap<String, String>,
    parent: Option<String>,
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Seen>>>);

impl Capture {
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().expect("lock").clone()
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(f);
        }
    }

    fn on_record(&self, id: &Id, values: &Values<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(f) = span.extensions_mut().get_mut::<Fields>() {
                values.record(f);
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let fields = span.extensions().get::<Fields>().map(|f| f.0.clone()).unwrap_or_default();
        self.0.lock().expect("lock").push(Seen {
            span: true,
            name: span.name().into(),
            target: span.metadata().target().into(),
            fields,
            parent: span.parent().map(|p| p.name().into()),
        });
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        self.0.lock().expect("lock").push(Seen {
            span: false,
            name: f.0.get("message").cloned().unwrap_or_default(),
            target: event.metadata().target().into(),
            fields: f.0,
            parent: ctx.event_span(event).map(|s| s.name().into()),
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_have_spans_and_workers_report_their_lifecycle() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry()
        .with(capture.clone())
        .with(tracing_subscriber::filter::LevelFilter::DEBUG);
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this process");
    let r = Reaper::new();
    let pool = r.builder().adapter(Python::showcase()).size(1).name("traced").build().await.expect("pool");
    pool.execute("add", json!({"a": 1, "b": 2})).await.expect("add");
    pool.execute("fail", json!({})).await.expect_err("fail");
    pool.create_session("s7", json!(null)).await.expect("session");
    pool.execute_in_session_with("s7", "ping", Payload::null(), CallOptions::default()).await.expect("ping");
    pool.execute("crash", json!({})).await.expect_err("crash");
    pool.wait_stats(|s| s.restarts == 1 && s.ready == 1, Duration::from_secs(20)).await.expect("restarted");
    pool.shutdown().await;
    drop(pool);

    let seen = capture.seen();
    let calls: Vec<&Seen> = seen.iter().filter(|s| s.span && s.name == "snakepit.call").collect();
    let call = |command: &str| {
        calls.iter().find(|s| s.fields.get("command").map(String::as_str) == Some(command)).copied()
    };
    let add = call("add").expect("a span for add");
    assert_eq!(add.target, "snakepit::pool::call");
    for (k, v) in [("pool", "traced"), ("outcome", "ok"), ("attempt", "1"), ("worker", "worker 0.0")] {
        assert_eq!(add.fields.get(k).map(String::as_str), Some(v), "{k} in {add:?}");
    }
    assert_eq!(call("fail").expect("fail").fields.get("outcome").map(String::as_str), Some("worker"));
    assert_eq!(call("ping").expect("ping").fields.get("session").map(String::as_str), Some("s7"));
    let crash = call("crash").expect("crash");
    assert_eq!(crash.fields.get("outcome").map(String::as_str), Some("worker_crashed"));
    // Child spans: the wait for a worker and the round trip, under the call's span.
    for child in ["snakepit.queue_wait", "snakepit.round_trip"] {
        let n = seen.iter().filter(|s| s.span && s.name == child).count();
        assert!(n >= 4, "{child}: {n}");
        assert!(seen
            .iter()
            .filter(|s| s.span && s.name == child)
            .all(|s| s.parent.as_deref() == Some("snakepit.call")));
    }
    // One `call ended` event per call, with its duration and outcome.
    let ended: Vec<&Seen> = seen.iter().filter(|s| !s.span && s.name == "call ended").collect();
    assert_eq!(ended.len(), 4, "{ended:?}");
    assert!(ended
        .iter()
        .all(|e| e.fields.contains_key("duration_us") && e.parent.as_deref() == Some("snakepit.call")));

    // Lifecycle: ready (twice: the first worker and its replacement), crashed, restarted.
    let lifecycle = |event: &str| -> Vec<&Seen> {
        seen.iter()
            .filter(|s| {
                !s.span
                    && s.target == "snakepit::worker"
                    && s.fields.get("event").map(String::as_str) == Some(event)
            })
            .collect()
    };
    let ready = lifecycle("ready");
    assert_eq!(ready.len(), 2, "{ready:?}");
    assert!(ready
        .iter()
        .all(|e| e.fields.get("startup_ms").is_some_and(|ms| ms.parse::<f64>().is_ok_and(|v| v > 0.0))));
    assert!(ready.iter().all(|e| e.fields.get("pool").map(String::as_str) == Some("traced")));
    let crashed = lifecycle("crashed");
    assert_eq!(crashed.len(), 1, "{crashed:?}");
    assert!(
        crashed[0].fields.get("exit").is_some_and(|x| x.contains("code 1") || x.contains('1')),
        "{crashed:?}"
    );
    assert_eq!(
        crashed[0].parent.as_deref(),
        Some("snakepit.slot"),
        "lifecycle events carry the pool's slot span"
    );
    assert_eq!(lifecycle("restarted").len(), 1);
}
