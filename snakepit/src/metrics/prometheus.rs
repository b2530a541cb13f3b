//! The Prometheus exporter (feature `prometheus`): a recorder with snakepit's buckets and a
//! small HTTP endpoint that serves `GET /metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use snakepit_core::Error;

use super::{CALL_DURATION_SECONDS, DURATION_BUCKETS, QUEUE_WAIT_SECONDS};

/// Scrapes served at once; more connections wait to be accepted.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A Prometheus builder with snakepit's histogram buckets ([`DURATION_BUCKETS`]) set, for a
/// setup of your own (another listener, a push gateway, global labels...).
pub fn prometheus_builder() -> PrometheusBuilder {
    let mut b = PrometheusBuilder::new();
    for name in [CALL_DURATION_SECONDS, QUEUE_WAIT_SECONDS] {
        b = match b.set_buckets_for_metric(Matcher::Full(name.into()), DURATION_BUCKETS) {
            Ok(b) => b,
            // Only an empty bucket list is refused, and ours is not empty.
            Err(_) => unreachable!("DURATION_BUCKETS is not empty"),
        };
    }
    b
}

/// Installs a Prometheus recorder as the process's global `metrics` recorder and serves it on
/// `addr` at `GET /metrics`. Returns the address bound (port 0 binds a free port). Call it
/// inside a tokio runtime, before building the pools it should see.
///
/// Errors: `Unavailable` if `addr` cannot be bound (in use, not local...), `BadRequest` if no
/// tokio runtime is running or another recorder is installed already.
pub fn install_prometheus(addr: SocketAddr) -> Result<SocketAddr, Error> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|_| Error::BadRequest("install_prometheus needs a running tokio runtime".into()))?;
    let bind_err = |e: std::io::Error| Error::Unavailable(format!("metrics endpoint {addr}: {e}"));
    let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let local = std_listener.local_addr().map_err(bind_err)?;
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?
    };
    let handle = install_prometheus_recorder()?;
    rt.spawn(serve(listener, handle));
    Ok(local)
}

/// Installs a Prometheus recorder as the process's global `metrics` recorder, without an
/// HTTP endpoint: serve [`PrometheusHandle::render`] from your own (an axum route, say). Call
/// it inside a tokio runtime (it keeps an upkeep task), before building the pools it should
/// see. `BadRequest` without a runtime or if another recorder is installed.
pub fn install_prometheus_recorder() -> Result<PrometheusHandle, Error> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|_| Error::BadRequest("install_prometheus_recorder needs a running tokio runtime".into()))?;
    let recorder = prometheus_builder().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|_| Error::BadRequest("a metrics recorder is installed already".into()))?;
    super::describe();
    let upkeep = handle.clone();
    rt.spawn(async move {
        // Drains the histograms' samples into their buckets between scrapes.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Accepts scrapers, at most [`MAX_CONNECTIONS`] at once.
async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: wait a little rather than spin.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(answer(&req, &handle)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("metrics endpoint: connection ended: {e}");
            }
            drop(permit);
        });
    }
}

fn answer<B>(req: &Request<B>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", handle.render())
        }
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET /metrics\n".to_owned()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: metrics are at /metrics\n".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}
