//! Protocol v1 messages as they appear on the wire (see `docs/protocol.md`).
//!
//! Every frame body is one JSON object with a `t` (type) tag. Payloads (`args`, `ok`) are
//! embedded as raw JSON values so the host never re-encodes what it forwards.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Ready, WorkerError};

/// `hello`: host → worker, first frame.
#[derive(Debug, Serialize)]
pub struct HelloMsg<'a> {
    /// Always `"hello"`.
    pub t: &'static str,
    /// Versions the host speaks, newest first.
    pub versions: &'a [u32],
    /// Codecs the host accepts for payloads.
    pub codecs: &'a [&'a str],
    /// The worker's id, for its logs.
    pub worker: String,
    /// Largest frame body either side may send.
    pub max_frame: usize,
    /// Adapter configuration.
    pub config: &'a serde_json::Value,
    /// How many calls the host may send at once.
    pub max_in_flight: usize,
    /// Pipelining offered (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline_depth: Option<usize>,
    /// Transport-specific settings (absent for stdio).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub transport: &'a serde_json::Value,
    /// Heartbeats while busy offered (absent: no).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub busy_ping: bool,
    /// Busy-poll window in microseconds (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub busy_poll_us: Option<u64>,
    /// Whether the host offers binary segments (absent: no).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub segments: bool,
    /// The shared-memory arena offered (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shm: Option<ShmMsg>,
}

/// `hello.shm`: the arena the host offers (docs/protocol.md, "Shared memory").
#[derive(Debug, Serialize)]
pub struct ShmMsg {
    /// The descriptor a cold worker inherited it at.
    pub fd: i32,
    /// Its size in bytes.
    pub size: usize,
    /// Where the worker's part starts; the host's part is `[0, split)`.
    pub split: usize,
    /// The smallest segment either side puts in the arena.
    pub threshold: usize,
}

/// One entry of a segmented frame's `seg` table: a segment's length in the frame's body, or
/// `[offset, length]` of a segment in the shared-memory arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegEntry {
    /// In the frame's body, this many bytes.
    Inline(u64),
    /// In the arena: `[offset, length]`.
    Shm([u64; 2]),
}

// By hand rather than `untagged`: no buffering of each entry on the hot path.
impl<'de> Deserialize<'de> for SegEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = SegEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a segment length or [offset, length]")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<SegEntry, E> {
                Ok(SegEntry::Inline(n))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<SegEntry, A::Error> {
                let mut next =
                    |i| a.next_element::<u64>()?.ok_or_else(|| serde::de::Error::invalid_length(i, &self));
                let entry = SegEntry::Shm([next(0)?, next(1)?]);
                match a.next_element::<serde::de::IgnoredAny>()? {
                    None => Ok(entry),
                    Some(_) => Err(serde::de::Error::invalid_length(3, &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Any message a worker sends. Fields a tag does not use are absent.
#[derive(Debug, Deserialize)]
pub struct Inbound<'a> {
    /// The message type: `ready`, `refuse`, `result`, `error`, `pong`, `log`.
    #[serde(borrow)]
    pub t: Cow<'a, str>,
    /// The request id the message answers.
    #[serde(default)]
    pub id: Option<u64>,
    /// `result`: the value.
    #[serde(default, borrow)]
    pub ok: Option<&'a RawValue>,
    /// `chunk`: one item of a stream.
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
    /// `host_call`: the host tool's name.
    #[serde(default)]
    pub name: Option<String>,
    /// `host_call`: the request it is made for.
    #[serde(default)]
    pub call: Option<u64>,
    /// `host_call`: the arguments.
    #[serde(default, borrow)]
    pub args: Option<&'a RawValue>,
    /// `error`: the exception.
    #[serde(default)]
    pub error: Option<WorkerError>,
    /// `refuse`: why.
    #[serde(default)]
    pub reason: Option<String>,
    /// `refuse`: the protocol versions the worker speaks (raw: a malformed list must not
    /// turn a `refuse` into a parse error).
    #[serde(default, borrow)]
    pub versions: Option<&'a RawValue>,
    /// `ready`: the chosen version.
    #[serde(default)]
    pub version: Option<u32>,
    /// `ready`: the worker's pid.
    #[serde(default)]
    pub pid: Option<u32>,
    /// `ready`: its tools.
    #[serde(default)]
    pub tools: Option<Vec<crate::ToolInfo>>,
    /// `ready`: its concurrency.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// `ready`: its bridge description.
    #[serde(default)]
    pub bridge: Option<String>,
    /// `ready`: the signal to send after `cancel`.
    #[serde(default)]
    pub cancel_signal: Option<i32>,
    /// `ready`: the pipeline depth the worker accepts.
    #[serde(default)]
    pub pipeline_depth: Option<usize>,
    /// `ready`: a pipelined worker's cancel signals, by call position.
    #[serde(default)]
    pub cancel_signals: Option<Vec<i32>>,
    /// `ready`: whether the worker answers pings while busy.
    #[serde(default)]
    pub busy_ping: Option<bool>,
    /// `ready`: where the worker serves its transport.
    #[serde(default)]
    pub address: Option<String>,
    /// `ready`: whether the worker accepts binary segments.
    #[serde(default)]
    pub segments: Option<bool>,
    /// `ready`: whether the worker mapped the shared-memory arena.
    #[serde(default)]
    pub shm: Option<bool>,
    /// A segmented frame's segment table, in order.
    #[serde(default)]
    pub seg: Option<Vec<SegEntry>>,
    /// `result`, `error`, `end`: the call's argument regions in the arena could not be let
    /// go of (the tool still holds a view): never reuse them.
    #[serde(default)]
    pub keep: Option<bool>,
}

impl Inbound<'_> {
    /// The handshake fields of a `ready` message, if `version` and `pid` are present.
    pub fn ready(self) -> Option<Ready> {
        Some(Ready {
            version: self.version?,
            pid: self.pid?,
            tools: self.tools.unwrap_or_default(),
            max_in_flight: self.max_in_flight.unwrap_or(1).max(1),
            bridge: self.bridge.unwrap_or_default(),
            cancel_signal: self.cancel_signal,
            pipeline_depth: self.pipeline_depth.unwrap_or(1).max(1),
            cancel_signals: self.cancel_signals.unwrap_or_default(),
            busy_ping: self.busy_ping.unwrap_or(false),
            address: self.address,
            segments: self.segments.unwrap_or(false),
            shm: self.shm.unwrap_or(false),
            open_tools: false,
        })
    }
}

/// Appends a `call` message body to `out`. `args` must be well-formed JSON. `stream` asks for
/// a streamed answer with that initial credit.
pub fn encode_call(
    out: &mut Vec<u8>,
    id: u64,
    command: &str,
    args: &[u8],
    timeout_ms: Option<u64>,
    stream: Option<u32>,
    session: Option<&str>,
) {
    out.extend_from_slice(br#"{"t":"call","id":"#);
    push_u64(out, id);
    out.extend_from_slice(br#","cmd":"#);
    // A command name is a short string; serialising a &str to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, command);
    if let Some(ms) = timeout_ms {
        out.extend_from_slice(br#","timeout_ms":"#);
        push_u64(out, ms);
    }
    if let Some(w) = stream {
        out.extend_from_slice(br#","stream":"#);
        push_u64(out, u64::from(w));
    }
    if let Some(sid) = session {
        out.extend_from_slice(br#","session":"#);
        let _ = serde_json::to_writer(&mut *out, sid);
    }
    out.extend_from_slice(br#","args":"#);
    out.extend_from_slice(args);
    out.push(b'}');
}

/// Replaces the closing `}` of the message at the end of `out` with `,"seg":[len, ...]}`: the
/// segment table of a segmented frame (docs/protocol.md, "Binary segments").
pub fn push_segment_table(out: &mut Vec<u8>, segments: &[bytes::Bytes]) {
    if out.last() == Some(&b'}') {
        out.pop();
    }
    out.extend_from_slice(br#","seg":["#);
    for (i, s) in segments.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_u64(out, s.len() as u64);
    }
    out.extend_from_slice(b"]}");
}

/// Replaces the closing `}` of the message at the end of `out` with a segment table whose
/// entries are given: `n` for `n` bytes in the body, `[offset,n]` for `n` bytes in the arena.
pub fn push_segment_entries(out: &mut Vec<u8>, entries: impl IntoIterator<Item = SegEntry>) {
    if out.last() == Some(&b'}') {
        out.pop();
    }
    out.extend_from_slice(br#","seg":["#);
    for (i, e) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match e {
            SegEntry::Inline(n) => push_u64(out, n),
            SegEntry::Shm([offset, n]) => {
                out.push(b'[');
                push_u64(out, offset);
                out.push(b',');
                push_u64(out, n);
                out.push(b']');
            }
        }
    }
    out.extend_from_slice(b"]}");
}

#[cfg(test)]
mod seg_tests {
    use super::SegEntry;

    #[test]
    fn segment_table_entries_parse_strictly() {
        let t: Vec<SegEntry> = serde_json::from_str("[3, [65536, 10], 0]").expect("table");
        assert_eq!(t, [SegEntry::Inline(3), SegEntry::Shm([65536, 10]), SegEntry::Inline(0)]);
        for bad in ["[-1]", "[[1]]", "[[1,2,3]]", "[\"a\"]", "[1.5]", "[[1,-2]]", "[{}]"] {
            assert!(serde_json::from_str::<Vec<SegEntry>>(bad).is_err(), "{bad}");
        }
    }
}

/// Appends a `release` message: the worker may reuse its arena regions at `offsets` (the host
/// has copied them out).
pub fn encode_release(out: &mut Vec<u8>, offsets: &[u64]) {
    out.extend_from_slice(br#"{"t":"release","shm":["#);
    for (i, &o) in offsets.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_u64(out, o);
    }
    out.extend_from_slice(b"]}");
}

/// Appends a `host_result` message: `Ok(json)` or the error.
pub fn encode_host_result(out: &mut Vec<u8>, id: u64, result: Result<&[u8], &crate::WorkerError>) {
    out.extend_from_slice(br#"{"t":"host_result","id":"#);
    push_u64(out, id);
    match result {
        Ok(json) => {
            out.extend_from_slice(br#","ok":"#);
            out.extend_from_slice(json);
        }
        Err(e) => {
            out.extend_from_slice(br#","error":"#);
            // A struct of strings serialises into a Vec without failing.
            let _ = serde_json::to_writer(&mut *out, e);
        }
    }
    out.push(b'}');
}

/// Appends a `credit` message (the consumer took `n` more chunks of stream `id`).
pub fn encode_credit(out: &mut Vec<u8>, id: u64, n: u32) {
    out.extend_from_slice(br#"{"t":"credit","id":"#);
    push_u64(out, id);
    out.extend_from_slice(br#","n":"#);
    push_u64(out, u64::from(n));
    out.push(b'}');
}

/// Appends a message with only a tag and an id (`ping`, `cancel`) to `out`.
pub fn encode_simple(out: &mut Vec<u8>, tag: &str, id: Option<u64>) {
    out.extend_from_slice(br#"{"t":""#);
    out.extend_from_slice(tag.as_bytes());
    out.push(b'"');
    if let Some(id) = id {
        out.extend_from_slice(br#","id":"#);
        push_u64(out, id);
    }
    out.push(b'}');
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_encodes_as_json() {
        let mut out = Vec::new();
        encode_call(&mut out, 42, "a\"b", br#"{"x":[1,2]}"#, Some(7), Some(16), Some("s1"));
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid json");
        assert_eq!(v["t"], "call");
        assert_eq!(v["id"], 42);
        assert_eq!(v["cmd"], "a\"b");
        assert_eq!(v["timeout_ms"], 7);
        assert_eq!(v["args"]["x"][1], 2);
        assert_eq!(v["stream"], 16);
        assert_eq!(v["session"], "s1");
        let mut out = Vec::new();
        encode_credit(&mut out, 3, 8);
        assert_eq!(out, br#"{"t":"credit","id":3,"n":8}"#);
        let mut out = Vec::new();
        encode_simple(&mut out, "ping", Some(0));
        assert_eq!(out, br#"{"t":"ping","id":0}"#);
    }

    #[test]
    fn inbound_parses_result_and_ready() {
        let m: Inbound<'_> =
            serde_json::from_slice(br#"{"t":"result","id":3,"ok":{"a":"b"}}"#).expect("parse");
        assert_eq!(m.t, "result");
        assert_eq!(m.ok.map(|r| r.get()), Some(r#"{"a":"b"}"#));
        let m: Inbound<'_> =
            serde_json::from_slice(br#"{"t":"ready","version":1,"pid":9,"tools":[{"name":"x"}]}"#)
                .expect("parse");
        let r: Ready = m.ready().expect("ready fields");
        assert_eq!(r.pid, 9);
        assert_eq!(r.max_in_flight, 1);
        let m: Inbound<'_> = serde_json::from_slice(br#"{"t":"result","id":3,"ok":1}"#).expect("parse");
        assert!(m.ready().is_none());
    }
}
