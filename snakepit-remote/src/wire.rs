//! Conversions between the core's types and the `snakepit.v1.Agent` messages.

use std::time::Duration;

use snakepit_core::{Codec, Error, Payload, WorkerError, WorkerId};

use crate::proto;

pub(crate) fn value(p: &Payload) -> proto::Value {
    proto::Value { json: p.bytes().to_vec(), segments: p.segments().iter().map(|s| s.to_vec()).collect() }
}

pub(crate) fn payload(v: proto::Value) -> Payload {
    let p = Payload::from_encoded(Codec::Json, v.json);
    if v.segments.is_empty() {
        p
    } else {
        p.with_segments(v.segments.into_iter().map(bytes::Bytes::from).collect())
    }
}

pub(crate) fn worker_error(e: &WorkerError) -> proto::RemoteWorkerError {
    proto::RemoteWorkerError {
        r#type: e.kind.clone(),
        message: e.message.clone(),
        traceback: e.traceback.clone().unwrap_or_default(),
    }
}

pub(crate) fn from_worker_error(e: proto::RemoteWorkerError) -> WorkerError {
    WorkerError {
        kind: e.r#type,
        message: e.message,
        traceback: (!e.traceback.is_empty()).then_some(e.traceback),
    }
}

pub(crate) fn call_error(e: &Error) -> proto::CallError {
    proto::CallError { kind: e.kind().to_owned(), message: e.to_string(), json: e.to_json().to_string() }
}

/// Rebuilds an agent's error as the front end's: the same kind where the core has a variant
/// that means the same thing here (`worker`, `timeout`, `not_started`, ...), with this front
/// end's worker id; the rest as `unavailable` naming the agent and the original kind.
pub(crate) fn from_call_error(e: proto::CallError, worker: WorkerId, command: &str, agent: &str) -> Error {
    let j: serde_json::Value = serde_json::from_str(&e.json).unwrap_or(serde_json::Value::Null);
    let s = |k: &str| j.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let command = command.to_owned();
    match e.kind.as_str() {
        "worker" => Error::Worker {
            worker,
            command,
            error: WorkerError {
                kind: s("type"),
                message: s("message"),
                traceback: j.get("traceback").and_then(|v| v.as_str()).map(str::to_owned),
            },
        },
        "timeout" => Error::Timeout { command, worker: Some(worker), after: Duration::ZERO },
        "cancelled" => Error::Cancelled { command },
        // Refused before it ran (the agent drains, or its worker died before the call started):
        // it never ran, so the pool may send it elsewhere.
        "not_started" | "shutting_down" => Error::NotStarted { worker, command },
        "worker_crashed" => Error::WorkerCrashed {
            worker,
            command: Some(command),
            exit: serde_json::from_value(j.get("exit").cloned().unwrap_or_default())
                .unwrap_or(snakepit_core::ExitInfo::Unknown),
            stderr_tail: s("stderr_tail"),
        },
        "unknown_command" => Error::UnknownCommand {
            command,
            available: j
                .get("available")
                .and_then(|a| serde_json::from_value(a.clone()).ok())
                .unwrap_or_default(),
        },
        "bad_request" => Error::BadRequest(format!("agent {agent}: {}", e.message)),
        "session_lost" => Error::SessionLost { session: s("session"), worker },
        "pool_saturated" | "queue_timeout" | "unavailable" => {
            Error::Unavailable(format!("agent {agent} cannot take the call ({}): {}", e.kind, e.message))
        }
        other => Error::Unavailable(format!("agent {agent} failed the call ({other}): {}", e.message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_kind_across_the_hop() {
        let w = WorkerId { slot: 3, generation: 1 };
        let theirs = WorkerId { slot: 0, generation: 9 };
        let e = Error::Worker {
            worker: theirs,
            command: "f".into(),
            error: WorkerError {
                kind: "ValueError".into(),
                message: "bad".into(),
                traceback: Some("tb".into()),
            },
        };
        match from_call_error(call_error(&e), w, "f", "https://a") {
            Error::Worker { worker, error, .. } => {
                assert_eq!(worker, w);
                assert_eq!((error.kind.as_str(), error.message.as_str()), ("ValueError", "bad"));
                assert_eq!(error.traceback.as_deref(), Some("tb"));
            }
            other => panic!("{other:?}"),
        }
        let e = Error::NotStarted { worker: theirs, command: "f".into() };
        assert_eq!(from_call_error(call_error(&e), w, "f", "a").kind(), "not_started");
        let e = Error::WorkerCrashed {
            worker: theirs,
            command: None,
            exit: snakepit_core::ExitInfo::Signal(9),
            stderr_tail: "x".into(),
        };
        match from_call_error(call_error(&e), w, "f", "a") {
            Error::WorkerCrashed { exit, stderr_tail, .. } => {
                assert_eq!((exit, stderr_tail.as_str()), (snakepit_core::ExitInfo::Signal(9), "x"));
            }
            other => panic!("{other:?}"),
        }
        let garbage =
            proto::CallError { kind: "weird".into(), message: "m".into(), json: "{not json".into() };
        assert_eq!(from_call_error(garbage, w, "f", "a").kind(), "unavailable");
    }

    #[test]
    fn payloads_round_trip_with_segments() {
        let p =
            Payload::mixed(&serde_json::json!({"a": {"$seg": 0}}), vec![bytes::Bytes::from_static(b"xyz")]);
        let back = payload(value(&p));
        assert_eq!(back.bytes(), p.bytes());
        assert_eq!(back.segments(), p.segments());
    }
}
