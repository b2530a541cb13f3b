//! Payloads: bytes already encoded by the caller, with the codec that encoded them.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::Error;

/// How a payload's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Codec {
    /// UTF-8 JSON text (protocol v1's only codec).
    #[default]
    Json,
}

impl Codec {
    /// The codec's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
        }
    }
}

/// An encoded value travelling between host and worker.
///
/// The host never decodes a payload it only forwards; typed helpers encode and decode at the
/// edge. Cloning is cheap (reference-counted bytes).
///
/// Besides its JSON, a payload may carry **binary segments**: raw bytes that travel beside the
/// JSON, never encoded into it. The JSON refers to segment `i` with the object `{"$seg": i}`
/// (possibly with more keys: the Python bridge adds `dtype` and `shape` to a numpy array's). A
/// worker must announce that it accepts segments (`ready.segments`, docs/protocol.md); a payload
/// with segments sent to one that did not fails with [`Error::BadRequest`].
///
/// ```
/// use snakepit_core::Payload;
/// let p = Payload::from_bytes(vec![1u8, 2, 3]);
/// assert_eq!(p.bytes().as_ref(), br#"{"$seg":0}"#);
/// assert_eq!(p.segments().len(), 1);
/// assert_eq!(p.into_segment().unwrap().as_ref(), &[1, 2, 3]);
/// ```
#[derive(Debug, Clone)]
pub struct Payload {
    codec: Codec,
    bytes: Bytes,
    /// Whether the bytes were produced by an encoder (and so are well-formed).
    trusted: bool,
    /// Binary segments the JSON refers to as `{"$seg": i}` (empty: none; no allocation).
    segments: Vec<Bytes>,
}

impl Payload {
    /// Wraps bytes that are already encoded with `codec`. The bytes are not checked here; a
    /// transport that needs them well-formed checks them before sending.
    pub fn from_encoded(codec: Codec, bytes: impl Into<Bytes>) -> Self {
        Payload { codec, bytes: bytes.into(), trusted: false, segments: Vec::new() }
    }

    /// Wraps bytes known to be well-formed for `codec` (produced by an encoder or received in a
    /// frame that was parsed whole); transports skip their well-formedness check.
    pub fn from_trusted(codec: Codec, bytes: impl Into<Bytes>) -> Self {
        Payload { codec, bytes: bytes.into(), trusted: true, segments: Vec::new() }
    }

    /// Whether the bytes are known to be well-formed (see [`Payload::from_trusted`]).
    pub fn is_trusted(&self) -> bool {
        self.trusted
    }

    /// Encodes any serde value as JSON.
    ///
    /// Bytes the value serialises as bytes (a `serde_bytes` field, `bytes::Bytes` with its serde
    /// feature) become binary segments, referred to as `{"$seg": i}`, instead of JSON arrays of
    /// numbers; [`Payload::decode`] reads such references back into bytes:
    ///
    /// ```
    /// # use snakepit_core::Payload;
    /// #[derive(serde::Serialize)]
    /// struct Args<'a> { #[serde(with = "serde_bytes")] image: &'a [u8], width: u32 }
    /// let p = Payload::json(&Args { image: b"\x89PNG", width: 64 }).unwrap();
    /// assert_eq!(p.bytes().as_ref(), br#"{"image":{"$seg":0},"width":64}"#);
    /// assert_eq!(p.segments()[0].as_ref(), b"\x89PNG");
    /// ```
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        crate::segment_serde::to_json_with_segments(value)
            .map(|(v, segments)| Payload { codec: Codec::Json, bytes: v.into(), trusted: true, segments })
            .map_err(|source| Error::Codec { context: "cannot encode arguments as JSON", source })
    }

    /// A payload of raw bytes: the JSON `{"$seg":0}` and `bytes` as its one segment. A Python
    /// tool receives it as a `memoryview` (no copy, no JSON).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        Payload::null().with_segments(vec![bytes.into()]).with_json_static(br#"{"$seg":0}"#)
    }

    /// JSON with binary segments, which `json` refers to as `{"$seg": i}` (e.g.
    /// `json!({"image": {"$seg": 0}, "width": 640})` with the image's bytes as segment 0).
    pub fn mixed(json: &serde_json::Value, segments: Vec<Bytes>) -> Self {
        Payload::from(json.clone()).with_segments(segments)
    }

    fn with_json_static(mut self, json: &'static [u8]) -> Self {
        self.bytes = Bytes::from_static(json);
        self
    }

    /// Replaces the payload's binary segments.
    pub fn with_segments(mut self, segments: Vec<Bytes>) -> Self {
        self.segments = segments;
        self
    }

    /// The binary segments the JSON refers to as `{"$seg": i}` (empty for a plain payload).
    pub fn segments(&self) -> &[Bytes] {
        &self.segments
    }

    /// Whether the payload carries binary segments.
    pub fn has_segments(&self) -> bool {
        !self.segments.is_empty()
    }

    /// The bytes of a payload that *is* one segment reference, `{"$seg": i, ...}` (a Python
    /// tool that returned `bytes`, a `memoryview` or a numpy array): segment `i`, without a
    /// copy. [`Error::Codec`] for any other payload.
    pub fn into_segment(mut self) -> Result<Bytes, Error> {
        // The usual answer to `execute_bytes`, without a parse.
        if self.segments.len() == 1 && self.bytes.as_ref() == br#"{"$seg":0}"# {
            if let Some(b) = self.segments.pop() {
                return Ok(b);
            }
        }
        #[derive(serde::Deserialize)]
        struct SegRef {
            #[serde(rename = "$seg")]
            seg: usize,
        }
        let not_bytes = |detail: String| Error::Codec {
            context: "the result is not bytes",
            source: <serde_json::Error as serde::de::Error>::custom(detail),
        };
        let r: SegRef = serde_json::from_slice(&self.bytes).map_err(|e| {
            let shown = String::from_utf8_lossy(&self.bytes[..self.bytes.len().min(80)]).into_owned();
            not_bytes(format!("expected a segment reference {{\"$seg\": n}}, got `{shown}` ({e})"))
        })?;
        let n = self.segments.len();
        self.segments
            .into_iter()
            .nth(r.seg)
            .ok_or_else(|| not_bytes(format!("segment {} referred to, {n} carried", r.seg)))
    }

    /// The JSON `null` payload.
    pub fn null() -> Self {
        Payload {
            codec: Codec::Json,
            bytes: Bytes::from_static(b"null"),
            trusted: true,
            segments: Vec::new(),
        }
    }

    /// Decodes the payload into a serde value.
    ///
    /// Where `T` wants bytes (a `serde_bytes` field, `bytes::Bytes`), a segment reference
    /// `{"$seg": i}` is read as segment `i` (see [`Payload::json`]).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        let decoded = match self.codec {
            Codec::Json if self.segments.is_empty() => serde_json::from_slice(&self.bytes),
            Codec::Json => crate::segment_serde::from_json_with_segments(&self.bytes, &self.segments),
        };
        decoded
            .map_err(|source| Error::Codec { context: "cannot decode result as the requested type", source })
    }

    /// Decodes the payload into a `serde_json::Value`.
    pub fn to_value(&self) -> Result<serde_json::Value, Error> {
        self.decode()
    }

    /// The codec of the bytes.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Length of the encoded bytes (the JSON; see [`Payload::segments`] for the rest).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Length of the JSON and every segment together.
    pub fn total_len(&self) -> usize {
        self.bytes.len() + self.segments.iter().map(Bytes::len).sum::<usize>()
    }

    /// Whether the encoded bytes are empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.codec == other.codec && self.bytes == other.bytes && self.segments == other.segments
    }
}

impl Eq for Payload {}

impl From<serde_json::Value> for Payload {
    fn from(v: serde_json::Value) -> Self {
        // Serialising a `Value` cannot fail (all keys are strings).
        Payload {
            codec: Codec::Json,
            bytes: v.to_string().into_bytes().into(),
            trusted: true,
            segments: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let p = Payload::json(&serde_json::json!({"a": 1})).expect("encode");
        assert_eq!(p.bytes().as_ref(), br#"{"a":1}"#);
        let v: serde_json::Value = p.decode().expect("decode");
        assert_eq!(v["a"], 1);
        assert!(Payload::null().decode::<u32>().is_err());
    }

    #[test]
    fn segments() {
        let p = Payload::mixed(
            &serde_json::json!({"a": {"$seg": 1}, "b": {"$seg": 0}}),
            vec![Bytes::from_static(b"zero"), Bytes::from_static(b"one")],
        );
        assert!(p.has_segments() && p.segments().len() == 2);
        assert_eq!(p.total_len(), p.len() + 7);
        assert_ne!(p, Payload::from(serde_json::json!({"a": {"$seg": 1}, "b": {"$seg": 0}})));
        let e = p.into_segment().expect_err("an object with two references is not bytes");
        assert_eq!(e.kind(), "codec");
        let r = Payload::from(serde_json::json!({"$seg": 1, "dtype": "<f4", "shape": [1]}))
            .with_segments(vec![Bytes::new(), Bytes::from_static(b"abcd")]);
        assert_eq!(r.into_segment().expect("segment 1").as_ref(), b"abcd");
        let e = Payload::from(serde_json::json!({"$seg": 3})).into_segment().expect_err("out of range");
        assert!(e.to_string().contains("segment 3 referred to, 0 carried"), "{e}");
        assert!(Payload::from(serde_json::json!("text")).into_segment().is_err());
    }
}
