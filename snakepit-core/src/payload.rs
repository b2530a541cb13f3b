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
#[derive(Debug, Clone)]
pub struct Payload {
    codec: Codec,
    bytes: Bytes,
    /// Whether the bytes were produced by an encoder (and so are well-formed).
    trusted: bool,
}

impl Payload {
    /// Wraps bytes that are already encoded with `codec`. The bytes are not checked here; a
    /// transport that needs them well-formed checks them before sending.
    pub fn from_encoded(codec: Codec, bytes: impl Into<Bytes>) -> Self {
        Payload { codec, bytes: bytes.into(), trusted: false }
    }

    /// Wraps bytes known to be well-formed for `codec` (produced by an encoder or received in a
    /// frame that was parsed whole); transports skip their well-formedness check.
    pub fn from_trusted(codec: Codec, bytes: impl Into<Bytes>) -> Self {
        Payload { codec, bytes: bytes.into(), trusted: true }
    }

    /// Whether the bytes are known to be well-formed (see [`Payload::from_trusted`]).
    pub fn is_trusted(&self) -> bool {
        self.trusted
    }

    /// Encodes any serde value as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        serde_json::to_vec(value)
            .map(|v| Payload { codec: Codec::Json, bytes: v.into(), trusted: true })
            .map_err(|source| Error::Codec { context: "cannot encode arguments as JSON", source })
    }

    /// The JSON `null` payload.
    pub fn null() -> Self {
        Payload { codec: Codec::Json, bytes: Bytes::from_static(b"null"), trusted: true }
    }

    /// Decodes the payload into a serde value.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        match self.codec {
            Codec::Json => serde_json::from_slice(&self.bytes).map_err(|source| Error::Codec {
                context: "cannot decode result as the requested type",
                source,
            }),
        }
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

    /// Length of the encoded bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the encoded bytes are empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.codec == other.codec && self.bytes == other.bytes
    }
}

impl Eq for Payload {}

impl From<serde_json::Value> for Payload {
    fn from(v: serde_json::Value) -> Self {
        // Serialising a `Value` cannot fail (all keys are strings).
        Payload { codec: Codec::Json, bytes: v.to_string().into_bytes().into(), trusted: true }
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
}
