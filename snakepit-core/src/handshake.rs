//! The `hello` / `ready` handshake of protocol v1, for any transport (see `docs/protocol.md`).
//!
//! The host speaks first: it sends `hello` (the versions it offers, the frame limit, the
//! adapter's configuration...); the worker answers with one message, `ready` (the version it
//! chose, its pid and tools) or `refuse` (it speaks none of the versions offered). This module
//! holds the transport-independent halves of that exchange: [`encode_hello`] writes the message
//! body, [`parse_ready`] reads the answer's body and checks it. A transport adds only its framing
//! and its I/O:
//!
//! ```
//! use snakepit_core::handshake::{encode_hello, parse_ready};
//! use snakepit_core::{Hello, WorkerId};
//!
//! let hello = Hello::new(WorkerId { slot: 0, generation: 0 }, 1 << 20, serde_json::Value::Null);
//! let mut body = Vec::new();
//! encode_hello(&mut body, &hello);
//! // ... frame `body`, send it, read the worker's first message ...
//! let answer = br#"{"t":"ready","version":1,"pid":4242,"tools":[{"name":"echo"}]}"#;
//! let ready = parse_ready(&hello, answer)?;
//! assert_eq!(ready.pid, 4242);
//! # Ok::<(), snakepit_core::Error>(())
//! ```
//!
//! End-of-file or a broken frame before the answer are the transport's to report
//! ([`Error::Disconnected`], [`Error::Protocol`]); the caller bounds the whole exchange with the
//! adapter's handshake timeout.

use crate::wire::{HelloMsg, Inbound};
use crate::{Codec, Error, Hello, Ready};

/// Appends the JSON body of the `hello` message for `hello` to `out` (no framing: the transport
/// adds its own).
///
/// The body names `hello.worker`, the versions offered, the JSON codec, the frame limit, the
/// adapter configuration, how many calls the host may send at once, the transport settings
/// (omitted when `null`) and the busy-poll window (omitted when zero).
pub fn encode_hello(out: &mut Vec<u8>, hello: &Hello) {
    let msg = HelloMsg {
        t: "hello",
        versions: &hello.versions,
        codecs: &[Codec::Json.name()],
        worker: hello.worker.to_string(),
        max_frame: hello.max_frame,
        config: &hello.config,
        max_in_flight: hello.max_in_flight,
        pipeline_depth: (hello.pipeline_depth > 1).then_some(hello.pipeline_depth),
        transport: &hello.transport,
        busy_ping: hello.busy_ping,
        busy_poll_us: (!hello.busy_poll.is_zero())
            .then(|| u64::try_from(hello.busy_poll.as_micros()).unwrap_or(u64::MAX)),
        segments: hello.segments,
        shm: hello.shm.as_ref().map(|o| crate::wire::ShmMsg {
            fd: o.fd,
            size: o.arena.size(),
            split: o.arena.split(),
            threshold: o.threshold,
        }),
    };
    // Serialising a struct of strings, numbers and a `Value` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, &msg);
}

/// How the reason of a [`Error::VersionMismatch`] starts when the worker answered `ready` with a
/// version the host did not offer (rather than `refuse`).
pub const CHOSE_UNOFFERED: &str = "the worker chose version";

/// Interprets `body`, the worker's answer to `hello`, and returns its [`Ready`].
///
/// Errors, all naming `hello.worker`:
/// * [`Error::VersionMismatch`]: the worker sent `refuse` (with its reason, or "no reason
///   given"), or it chose a version `hello` did not offer;
/// * [`Error::Protocol`]: the body is not a JSON message (the parse error is the error's
///   source), it is not `ready` or `refuse`, or a `ready` lacks `version` or `pid`.
pub fn parse_ready(hello: &Hello, body: &[u8]) -> Result<Ready, Error> {
    let worker = hello.worker;
    let protocol = |detail: String| Error::Protocol { worker, detail, source: None };
    let msg: Inbound<'_> = serde_json::from_slice(body).map_err(|e| Error::Protocol {
        worker,
        detail: "handshake: expected `ready`, got a malformed message".into(),
        source: Some(Box::new(e)),
    })?;
    let ready = match &*msg.t {
        "ready" => msg.ready().ok_or_else(|| protocol("`ready` without `version` and `pid`".into()))?,
        "refuse" => {
            return Err(Error::VersionMismatch {
                worker,
                offered: hello.versions.clone(),
                speaks: msg.versions.and_then(|v| serde_json::from_str(v.get()).ok()).unwrap_or_default(),
                reason: msg.reason.unwrap_or_else(|| "no reason given".into()),
            })
        }
        other => return Err(protocol(format!("handshake: expected `ready`, got `{other}`"))),
    };
    if ready.segments && !hello.segments {
        return Err(protocol("`ready` announces binary segments, which the host did not offer".into()));
    }
    if ready.shm && hello.shm.is_none() {
        return Err(protocol("`ready` announces a shared-memory arena, and the host offered none".into()));
    }
    if ready.busy_ping && !hello.busy_ping {
        return Err(protocol("`ready` announces pings while busy, which the host did not offer".into()));
    }
    if ready.pipeline_depth > hello.pipeline_depth {
        return Err(protocol(format!(
            "`ready` announces a pipeline depth of {}, over the {} the host offered",
            ready.pipeline_depth, hello.pipeline_depth
        )));
    }
    if ready.pipeline_depth > 1 && ready.max_in_flight > 1 {
        return Err(protocol(format!(
            "`ready` announces both a pipeline depth of {} and {} calls at once; a worker pipelines only \
             when it runs one call at a time",
            ready.pipeline_depth, ready.max_in_flight
        )));
    }
    // Offered, and spoken by this host (a conformance check may offer versions it does not).
    if !hello.versions.contains(&ready.version) || !crate::PROTOCOL_VERSIONS.contains(&ready.version) {
        return Err(Error::VersionMismatch {
            worker,
            offered: hello.versions.clone(),
            speaks: vec![ready.version],
            reason: format!("{CHOSE_UNOFFERED} {}, which was not offered", ready.version),
        });
    }
    Ok(ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ToolInfo, WorkerId};

    fn hello() -> Hello {
        Hello::new(WorkerId { slot: 2, generation: 5 }, 4096, serde_json::json!({"k": "v"}))
    }

    #[test]
    fn hello_body_carries_the_offer() {
        let mut out = b"prefix".to_vec();
        let h = hello()
            .with_max_in_flight(4)
            .with_busy_poll(std::time::Duration::from_micros(50))
            .with_transport(serde_json::json!({"kind": "test"}));
        encode_hello(&mut out, &h);
        assert!(out.starts_with(b"prefix"), "appends");
        let v: serde_json::Value = serde_json::from_slice(&out[6..]).expect("json");
        assert_eq!(v["t"], "hello");
        assert_eq!(v["versions"], serde_json::json!(crate::PROTOCOL_VERSIONS));
        assert_eq!(v["codecs"], serde_json::json!(["json"]));
        assert_eq!(v["worker"], "worker 2.5");
        assert_eq!(v["max_frame"], 4096);
        assert_eq!(v["config"]["k"], "v");
        assert_eq!(v["max_in_flight"], 4);
        assert_eq!(v["transport"]["kind"], "test");
        assert_eq!(v["busy_poll_us"], 50);
        // Defaults: no transport settings, no busy-poll window.
        let mut out = Vec::new();
        encode_hello(&mut out, &hello());
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert!(v.get("transport").is_none() && v.get("busy_poll_us").is_none(), "{v}");
    }

    #[test]
    fn ready_is_parsed() {
        let body = br#"{"t":"ready","version":1,"pid":9,"tools":[{"name":"a"},{"name":"s","stream":true}],
            "max_in_flight":3,"bridge":"py","cancel_signal":10,"address":"unix:/x"}"#;
        let r = parse_ready(&hello(), body).expect("ready");
        let want = Ready::new(1, 9)
            .with_tools(vec![ToolInfo::new("a"), ToolInfo::stream("s")])
            .with_max_in_flight(3)
            .with_bridge("py")
            .with_cancel_signal(Some(10))
            .with_address(Some("unix:/x".into()));
        assert_eq!(r, want);
        // Absent fields take their defaults.
        let r = parse_ready(&hello(), br#"{"t":"ready","version":1,"pid":9}"#).expect("ready");
        assert_eq!(r, Ready::new(1, 9));
    }

    #[test]
    fn refuse_is_a_version_mismatch() {
        let h = hello();
        let e = parse_ready(&h, br#"{"t":"refuse","reason":"I speak v7 only","versions":[7]}"#);
        match &e {
            Err(Error::VersionMismatch { worker, offered, speaks, reason }) => {
                assert_eq!(*worker, h.worker);
                assert_eq!(*offered, h.versions);
                assert_eq!(*speaks, [7]);
                assert_eq!(reason, "I speak v7 only");
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = e.expect_err("mismatch").to_string();
        let want = format!(
            "worker 2.5 refused the handshake: the host (snakepit {}) offered protocol versions [1], \
             the worker speaks [7]: I speak v7 only",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(text, want);
        match parse_ready(&h, br#"{"t":"refuse","reason":"r","versions":"seven"}"#) {
            Err(Error::VersionMismatch { speaks, reason, .. }) => assert!(speaks.is_empty() && reason == "r"),
            other => panic!("a malformed `versions` is still a refusal: {other:?}"),
        }
        match parse_ready(&h, br#"{"t":"refuse"}"#) {
            Err(e @ Error::VersionMismatch { .. }) => {
                assert!(
                    e.to_string().ends_with("the worker speaks versions it did not list: no reason given"),
                    "{e}"
                );
                assert_eq!(e.kind(), "version_mismatch");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn pipelining_is_accepted_up_to_the_offer_and_only_one_call_at_a_time() {
        let h = hello().with_pipeline_depth(4);
        let mut out = Vec::new();
        encode_hello(&mut out, &h);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["pipeline_depth"], 4);
        let r = parse_ready(
            &h,
            br#"{"t":"ready","version":1,"pid":9,"pipeline_depth":4,"cancel_signals":[64,63,62,61,60]}"#,
        )
        .expect("ready");
        assert_eq!(
            (r.pipeline_depth, r.cancel_signal_for(0), r.cancel_signal_for(6)),
            (4, Some(64), Some(63))
        );
        // No more signals than the depth: none is sent (one could reach the wrong call).
        for body in [
            &br#"{"t":"ready","version":1,"pid":9,"pipeline_depth":4,"cancel_signals":[64,63,62,61]}"#[..],
            br#"{"t":"ready","version":1,"pid":9,"pipeline_depth":4,"cancel_signals":[64],"cancel_signal":10}"#,
        ] {
            assert_eq!(parse_ready(&h, body).expect("ready").cancel_signal_for(0), None);
        }
        for (body, want) in [
            (&br#"{"t":"ready","version":1,"pid":9,"pipeline_depth":5}"#[..], "over the 4"),
            (
                br#"{"t":"ready","version":1,"pid":9,"pipeline_depth":2,"max_in_flight":2}"#,
                "one call at a time",
            ),
        ] {
            match parse_ready(&h, body) {
                Err(Error::Protocol { detail, .. }) => assert!(detail.contains(want), "{detail}"),
                other => panic!("unexpected {other:?}"),
            }
        }
        // Not offered (the default hello): a worker announcing it is refused.
        assert!(parse_ready(&hello(), br#"{"t":"ready","version":1,"pid":9,"pipeline_depth":2}"#).is_err());
    }

    #[test]
    fn busy_pings_are_announced_only_when_offered() {
        let ready = br#"{"t":"ready","version":1,"pid":9,"busy_ping":true}"#;
        match parse_ready(&hello(), ready) {
            Err(Error::Protocol { detail, .. }) => assert!(detail.contains("did not offer"), "{detail}"),
            other => panic!("unexpected {other:?}"),
        }
        let h = hello().with_busy_ping(true);
        let mut out = Vec::new();
        encode_hello(&mut out, &h);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["busy_ping"], true);
        assert!(parse_ready(&h, ready).expect("ready").busy_ping);
    }

    #[test]
    fn a_version_not_offered_is_a_version_mismatch() {
        match parse_ready(&hello(), br#"{"t":"ready","version":99,"pid":9}"#) {
            Err(Error::VersionMismatch { reason, offered, .. }) => {
                assert!(reason.contains("99") && reason.contains("not offered"), "{reason}");
                assert_eq!(offered, crate::PROTOCOL_VERSIONS);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn malformed_answers_are_protocol_errors() {
        use std::error::Error as _;
        let h = hello();
        let e = parse_ready(&h, b"{not json").expect_err("malformed");
        assert_eq!(e.kind(), "protocol");
        assert_eq!(e.worker(), Some(h.worker));
        assert!(e.to_string().contains("malformed message"), "{e}");
        assert!(e.source().is_some_and(|s| s.is::<serde_json::Error>()), "keeps the parse error");
        for (body, want) in [
            (&br#"{"t":"ready","pid":9}"#[..], "without `version`"),
            (br#"{"t":"ready","version":1}"#, "without `version` and `pid`"),
            (br#"{"t":"result","id":1,"ok":1}"#, "got `result`"),
            (br#"{"version":1,"pid":9}"#, "malformed"),
        ] {
            match parse_ready(&h, body) {
                Err(Error::Protocol { detail, .. }) => assert!(detail.contains(want), "{detail}"),
                other => panic!("{}: unexpected {other:?}", String::from_utf8_lossy(body)),
            }
        }
    }
}
