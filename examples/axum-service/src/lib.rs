//! A web service built on a snakepit [`Pool`]: the pool lives in the axum state as it is (a
//! `Pool` is a cheap `Clone` handle), every route is a few lines over it.
//!
//! * `POST /call/{tool}`: the JSON body is the tool's arguments, the JSON answer its result;
//!   an error is [`Error::to_json`] with the status of [`status_of`].
//! * `GET /stream/{tool}?args=<url-encoded JSON>`: Server-Sent Events, `event: chunk` with
//!   `data: <json>` per item, then `event: end`, or `event: error` with the error's JSON. A
//!   client that goes away drops the stream, which cancels the generator in the worker (its
//!   `finally` runs).
//! * `x-snakepit-session: ID` on either: the call runs in that session (created on first use).
//! * `GET /metrics`: Prometheus text, when a recorder handle is given.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use snakepit::metrics::exporter::PrometheusHandle;
use snakepit::{CallOptions, CallStream, Error, Payload, Pool};

/// The header naming a call's session.
pub const SESSION_HEADER: &str = "x-snakepit-session";

/// What every handler sees.
#[derive(Clone)]
struct AppState {
    pool: Pool,
    metrics: Option<PrometheusHandle>,
}

/// The service's routes over `pool` (and `/metrics` when `metrics` is given).
pub fn app(pool: Pool, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/call/{tool}", post(call))
        .route("/stream/{tool}", get(stream))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { pool, metrics })
}

/// The HTTP status of an error, by its [kind](Error::kind).
pub fn status_of(e: &Error) -> StatusCode {
    match e.kind() {
        "bad_request" | "codec" | "invalid_variable" => StatusCode::BAD_REQUEST,
        "unknown_command" | "session_not_found" => StatusCode::NOT_FOUND,
        "session_lost" => StatusCode::CONFLICT,
        "worker" => StatusCode::UNPROCESSABLE_ENTITY,
        "pool_saturated" => StatusCode::TOO_MANY_REQUESTS,
        "worker_crashed" | "protocol" => StatusCode::BAD_GATEWAY,
        "unavailable" | "shutting_down" => StatusCode::SERVICE_UNAVAILABLE,
        "timeout" | "queue_timeout" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error as its JSON, with its status.
pub fn error_response(e: &Error) -> Response {
    (status_of(e), Json(e.to_json())).into_response()
}

fn session(headers: &HeaderMap) -> Option<&str> {
    headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok())
}

async fn call(
    State(s): State<AppState>,
    Path(tool): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let args = if body.is_empty() {
        serde_json::Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error_response(&Error::BadRequest(format!("the body is not JSON: {e}"))),
        }
    };
    let result = match session(&headers) {
        Some(sid) => s.pool.execute_in_session(sid, &tool, args).await,
        None => s.pool.execute(&tool, args).await,
    };
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

/// `?args=<url-encoded JSON>`.
#[derive(Deserialize)]
struct StreamQuery {
    args: Option<String>,
}

async fn stream(
    State(s): State<AppState>,
    Path(tool): Path<String>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response {
    let args = match q.args.as_deref().map(serde_json::from_str::<serde_json::Value>) {
        None => serde_json::Value::Null,
        Some(Ok(v)) => v,
        Some(Err(e)) => return error_response(&Error::BadRequest(format!("`args` is not JSON: {e}"))),
    };
    let opened =
        s.pool.execute_stream_with(session(&headers), &tool, Payload::from(args), CallOptions::default());
    match opened.await {
        // Errors before the first item (an unknown tool, a full queue) keep their status.
        Err(e) => error_response(&e),
        Ok(items) => Sse::new(events(items)).keep_alive(KeepAlive::default()).into_response(),
    }
}

/// The stream's items as events, then `end` (or `error`). Dropping it (the client went away)
/// drops the `CallStream`, which cancels the generator.
fn events(items: CallStream) -> impl futures::Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(Some(items), |state| async move {
        let mut items = state?;
        let event = match items.next_json().await {
            Some(Ok(v)) => {
                return Some((Ok(Event::default().event("chunk").data(v.to_string())), Some(items)))
            }
            Some(Err(e)) => Event::default().event("error").data(e.to_json().to_string()),
            None => Event::default().event("end").data(""),
        };
        Some((Ok(event), None))
    })
}

async fn render_metrics(State(s): State<AppState>) -> Response {
    match &s.metrics {
        Some(h) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are off\n").into_response(),
    }
}
