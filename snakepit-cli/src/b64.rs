//! `{"$b64": "..."}` for the JSON-lines commands (`serve`, `call`): binary segments spelled in
//! JSON. A single-key object `{"$b64": "<base64>"}` anywhere in a request's `args` becomes a
//! binary segment (the worker sees bytes, not a string), and each segment a result or chunk
//! refers to (`{"$seg": i, ...}`) is written back as `{"$b64": "<base64>", ...}` (other keys,
//! such as a numpy array's `dtype` and `shape`, kept). Standard base64 with padding.

use base64::Engine as _;
use snakepit::{Bytes, Payload};

const ENGINE: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `args` with its `{"$b64": ...}` objects turned into segment references and segments;
/// unchanged (no parse) when the text has no `"$b64"`. An error message for bad base64.
pub(crate) fn decode_args(args: Payload) -> Result<Payload, String> {
    if memchr::memmem::find(args.bytes(), b"\"$b64\"").is_none() {
        return Ok(args);
    }
    let mut value: serde_json::Value =
        serde_json::from_slice(args.bytes()).map_err(|e| format!("args are not JSON: {e}"))?;
    let mut segments = Vec::new();
    take_b64(&mut value, &mut segments)?;
    Ok(Payload::mixed(&value, segments))
}

fn take_b64(v: &mut serde_json::Value, segments: &mut Vec<Bytes>) -> Result<(), String> {
    match v {
        serde_json::Value::Object(map) => {
            if map.len() == 1 {
                if let Some(serde_json::Value::String(text)) = map.get("$b64") {
                    let bytes = ENGINE
                        .decode(text.as_bytes())
                        .map_err(|e| format!("`$b64` value is not base64: {e}"))?;
                    *v = serde_json::json!({"$seg": segments.len()});
                    segments.push(Bytes::from(bytes));
                    return Ok(());
                }
            }
            map.values_mut().try_for_each(|x| take_b64(x, segments))
        }
        serde_json::Value::Array(items) => items.iter_mut().try_for_each(|x| take_b64(x, segments)),
        _ => Ok(()),
    }
}

/// A result or chunk with its segment references written as `{"$b64": ...}` (the payload
/// itself when it has no segments). An error message for a reference to a missing segment.
pub(crate) fn encode_result(p: Payload) -> Result<Payload, String> {
    if !p.has_segments() {
        return Ok(p);
    }
    let mut value: serde_json::Value =
        serde_json::from_slice(p.bytes()).map_err(|e| format!("result is not JSON: {e}"))?;
    put_b64(&mut value, p.segments())?;
    Ok(Payload::from(value))
}

fn put_b64(v: &mut serde_json::Value, segments: &[Bytes]) -> Result<(), String> {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(i) = map.get("$seg").and_then(serde_json::Value::as_u64) {
                let seg = usize::try_from(i).ok().and_then(|i| segments.get(i)).ok_or_else(|| {
                    format!("the result refers to segment {i}, and carries {}", segments.len())
                })?;
                map.remove("$seg");
                map.insert("$b64".into(), serde_json::Value::String(ENGINE.encode(seg)));
                return Ok(());
            }
            map.values_mut().try_for_each(|x| put_b64(x, segments))
        }
        serde_json::Value::Array(items) => items.iter_mut().try_for_each(|x| put_b64(x, segments)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn b64_objects_become_segments_and_back() {
        let args = Payload::from(json!({"img": {"$b64": "AAEC"}, "list": [{"$b64": ""}], "x": {"$b64": 1}}));
        let p = decode_args(args).expect("decode");
        assert_eq!(
            p.to_value().expect("json"),
            json!({"img": {"$seg": 0}, "list": [{"$seg": 1}], "x": {"$b64": 1}})
        );
        assert_eq!(p.segments(), [Bytes::from_static(&[0, 1, 2]), Bytes::new()]);
        let out = Payload::from(json!({"a": {"$seg": 1, "dtype": "<u1", "shape": [3]}, "b": [{"$seg": 0}]}))
            .with_segments(vec![Bytes::from_static(b"hi"), Bytes::from_static(&[0, 1, 2])]);
        let v = encode_result(out).expect("encode").to_value().expect("json");
        assert_eq!(v, json!({"a": {"$b64": "AAEC", "dtype": "<u1", "shape": [3]}, "b": [{"$b64": "aGk="}]}));
    }

    #[test]
    fn plain_payloads_pass_untouched_and_bad_input_is_an_error() {
        let p = Payload::from(json!({"s": "no base64 here"}));
        assert_eq!(decode_args(p.clone()).expect("plain"), p);
        assert_eq!(encode_result(p.clone()).expect("plain"), p);
        let e = decode_args(Payload::from(json!({"$b64": "***"}))).expect_err("bad base64");
        assert!(e.contains("not base64"), "{e}");
        let e = encode_result(Payload::from(json!({"$seg": 4})).with_segments(vec![Bytes::new()]))
            .expect_err("missing segment");
        assert!(e.contains("segment 4"), "{e}");
    }
}
