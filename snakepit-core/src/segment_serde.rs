//! Typed payloads with binary segments: `serialize_bytes` becomes a segment reference on the
//! way out, and a segment reference is what `deserialize_bytes` reads on the way back.
//!
//! * Out: [`to_json_with_segments`] serialises with `serde_json`, except that every
//!   `serialize_bytes` call (a `serde_bytes` field, a `bytes::Bytes` with its serde feature)
//!   writes `{"$seg": i}` and makes those bytes segment `i`.
//! * Back: [`from_json_with_segments`] deserialises with `serde_json` through a thin wrapper
//!   that, where the target type asks for bytes (`deserialize_bytes`/`deserialize_byte_buf`),
//!   accepts a segment reference `{"$seg": i, ...}` and hands the type segment `i`. Everything
//!   else is forwarded untouched, so the same JSON still decodes into types without bytes.

use std::fmt;
use std::io;

use bytes::Bytes;
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};
use serde::Serialize;

/// A `serde_json` formatter (compact) that turns byte arrays into segment references.
struct SegmentFormatter<'a> {
    segments: &'a mut Vec<Bytes>,
}

impl serde_json::ser::Formatter for SegmentFormatter<'_> {
    fn write_byte_array<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: &[u8]) -> io::Result<()> {
        write!(writer, r#"{{"$seg":{}}}"#, self.segments.len())?;
        self.segments.push(Bytes::copy_from_slice(value));
        Ok(())
    }
}

/// `value` as compact JSON, its byte arrays as segment references, and those segments.
pub(crate) fn to_json_with_segments<T: Serialize + ?Sized>(
    value: &T,
) -> Result<(Vec<u8>, Vec<Bytes>), serde_json::Error> {
    let mut out = Vec::with_capacity(128);
    let mut segments = Vec::new();
    let mut ser =
        serde_json::Serializer::with_formatter(&mut out, SegmentFormatter { segments: &mut segments });
    value.serialize(&mut ser)?;
    Ok((out, segments))
}

/// Decodes `json` into `T`, reading segment references as bytes where `T` wants bytes.
pub(crate) fn from_json_with_segments<T: de::DeserializeOwned>(
    json: &[u8],
    segments: &[Bytes],
) -> Result<T, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let value = T::deserialize(De { inner: &mut de, segs: segments })?;
    de.end()?;
    Ok(value)
}

/// A deserializer that forwards to `inner`, watching for bytes.
struct De<'s, D> {
    inner: D,
    segs: &'s [Bytes],
}

/// A visitor that forwards to `v`, wrapping what it is handed so nested values are watched too.
struct Wrap<'s, V> {
    v: V,
    segs: &'s [Bytes],
}

/// The visitor for a value where bytes are wanted: a segment reference is read as segment `i`.
struct BytesProbe<'s, V> {
    v: V,
    segs: &'s [Bytes],
}

struct Seed<'s, T> {
    seed: T,
    segs: &'s [Bytes],
}

impl<'de, T: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<'_, T> {
    type Value = T::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T::Value, D::Error> {
        self.seed.deserialize(De { inner: d, segs: self.segs })
    }
}

macro_rules! forward {
    ($($method:ident),*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
            self.inner.$method(Wrap { v, segs: self.segs })
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for De<'_, D> {
    type Error = D::Error;

    forward!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any
    );

    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_any(BytesProbe { v, segs: self.segs })
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_any(BytesProbe { v, segs: self.segs })
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_unit_struct(name, Wrap { v, segs: self.segs })
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_newtype_struct(name, Wrap { v, segs: self.segs })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_tuple(len, Wrap { v, segs: self.segs })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_tuple_struct(name, len, Wrap { v, segs: self.segs })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_struct(name, fields, Wrap { v, segs: self.segs })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_enum(name, variants, Wrap { v, segs: self.segs })
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

macro_rules! visit {
    ($($method:ident($ty:ty)),*) => {$(
        fn $method<E: de::Error>(self, x: $ty) -> Result<V::Value, E> {
            self.v.$method(x)
        }
    )*};
}

macro_rules! visit_all {
    () => {
        visit!(
            visit_bool(bool),
            visit_i8(i8),
            visit_i16(i16),
            visit_i32(i32),
            visit_i64(i64),
            visit_i128(i128),
            visit_u8(u8),
            visit_u16(u16),
            visit_u32(u32),
            visit_u64(u64),
            visit_u128(u128),
            visit_f32(f32),
            visit_f64(f64),
            visit_char(char),
            visit_str(&str),
            visit_string(String),
            visit_bytes(&[u8]),
            visit_byte_buf(Vec<u8>)
        );

        fn visit_borrowed_str<E: de::Error>(self, x: &'de str) -> Result<V::Value, E> {
            self.v.visit_borrowed_str(x)
        }

        fn visit_borrowed_bytes<E: de::Error>(self, x: &'de [u8]) -> Result<V::Value, E> {
            self.v.visit_borrowed_bytes(x)
        }

        fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
            self.v.visit_none()
        }

        fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
            self.v.visit_unit()
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.v.visit_some(De { inner: d, segs: self.segs })
        }

        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.v.visit_newtype_struct(De { inner: d, segs: self.segs })
        }

        fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
            self.v.visit_seq(Wrap { v: a, segs: self.segs })
        }

        fn visit_enum<A: EnumAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
            self.v.visit_enum(Wrap { v: a, segs: self.segs })
        }
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.v.expecting(f)
    }

    visit_all!();

    fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        self.v.visit_map(Wrap { v: a, segs: self.segs })
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for BytesProbe<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.v.expecting(f)?;
        f.write_str(" or a segment reference {\"$seg\": i}")
    }

    visit_all!();

    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<V::Value, A::Error> {
        // A segment reference: `$seg` first (as every sender here writes it), then any other
        // keys (a numpy array's `dtype` and `shape`), which bytes have no use for.
        let mut seg = None;
        while let Some(key) = a.next_key::<String>()? {
            if key == "$seg" {
                seg = Some(a.next_value::<usize>()?);
            } else {
                a.next_value::<de::IgnoredAny>()?;
            }
        }
        let i = seg.ok_or_else(|| de::Error::invalid_type(de::Unexpected::Map, &self))?;
        let bytes = self.segs.get(i).ok_or_else(|| {
            de::Error::custom(format_args!("segment {i} referred to, {} carried", self.segs.len()))
        })?;
        self.v.visit_bytes(bytes)
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.v.next_element_seed(Seed { seed, segs: self.segs })
    }

    fn size_hint(&self) -> Option<usize> {
        self.v.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.v.next_key_seed(Seed { seed, segs: self.segs })
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.v.next_value_seed(Seed { seed, segs: self.segs })
    }

    fn size_hint(&self) -> Option<usize> {
        self.v.size_hint()
    }
}

impl<'de, 's, A: EnumAccess<'de>> EnumAccess<'de> for Wrap<'s, A> {
    type Error = A::Error;
    type Variant = Wrap<'s, A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self::Variant), A::Error> {
        let segs = self.segs;
        let (value, variant) = self.v.variant_seed(Seed { seed, segs })?;
        Ok((value, Wrap { v: variant, segs }))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.v.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.v.newtype_variant_seed(Seed { seed, segs: self.segs })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, A::Error> {
        self.v.tuple_variant(len, Wrap { v, segs: self.segs })
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, A::Error> {
        self.v.struct_variant(fields, Wrap { v, segs: self.segs })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Image {
        name: String,
        #[serde(with = "serde_bytes")]
        pixels: Vec<u8>,
        thumb: Option<serde_bytes::ByteBuf>,
        tags: Vec<String>,
        nested: Vec<Part>,
        kind: Kind,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Part {
        #[serde(with = "serde_bytes")]
        raw: Vec<u8>,
        n: u32,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Plain,
        Blob(#[serde(with = "serde_bytes")] Vec<u8>),
        Pair {
            #[serde(with = "serde_bytes")]
            a: Vec<u8>,
            b: i64,
        },
    }

    fn image() -> Image {
        Image {
            name: "x".into(),
            pixels: vec![1, 2, 3],
            thumb: Some(serde_bytes::ByteBuf::from(vec![9; 4])),
            tags: vec!["a".into()],
            nested: vec![Part { raw: b"rr".to_vec(), n: 7 }],
            kind: Kind::Pair { a: b"aa".to_vec(), b: -1 },
        }
    }

    #[test]
    fn bytes_become_segments_and_come_back() {
        let (json, segs) = to_json_with_segments(&image()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["pixels"], serde_json::json!({"$seg": 0}));
        assert_eq!(v["thumb"], serde_json::json!({"$seg": 1}));
        assert_eq!(v["nested"][0]["raw"], serde_json::json!({"$seg": 2}));
        assert_eq!(v["kind"]["Pair"]["a"], serde_json::json!({"$seg": 3}));
        assert_eq!(segs.len(), 4);
        assert_eq!(segs[0].as_ref(), &[1, 2, 3]);
        let back: Image = from_json_with_segments(&json, &segs).unwrap();
        assert_eq!(back, image());
        let blob = Kind::Blob(b"zz".to_vec());
        let (json, segs) = to_json_with_segments(&blob).unwrap();
        assert_eq!(from_json_with_segments::<Kind>(&json, &segs).unwrap(), blob);
    }

    #[test]
    fn plain_values_and_extra_keys_decode_as_before() {
        // Bytes as a JSON array still decode; a reference may carry numpy's keys.
        let json = br#"{"name":"x","pixels":[1,2,3],"thumb":{"dtype":"<f4","$seg":0,"shape":[1]},"tags":[],"nested":[],"kind":"Plain"}"#;
        let back: Image = from_json_with_segments(json, &[Bytes::from_static(&[5, 6, 7, 8])]).unwrap();
        assert_eq!(back.pixels, vec![1, 2, 3]);
        assert_eq!(back.thumb.unwrap().as_ref(), &[5, 6, 7, 8]);
        // A type without bytes sees the reference object itself.
        let v: serde_json::Value = from_json_with_segments(br#"{"$seg":0}"#, &[]).unwrap();
        assert_eq!(v, serde_json::json!({"$seg": 0}));
        let (json, segs) = to_json_with_segments(&serde_json::json!({"a": [1, 2]})).unwrap();
        assert_eq!((json.as_slice(), segs.len()), (br#"{"a":[1,2]}"#.as_slice(), 0));
    }

    #[test]
    fn bad_references_are_errors() {
        let json = br#"{"name":"x","pixels":{"$seg":3},"thumb":null,"tags":[],"nested":[],"kind":"Plain"}"#;
        let e = from_json_with_segments::<Image>(json, &[]).unwrap_err();
        assert!(e.to_string().contains("segment 3 referred to, 0 carried"), "{e}");
        let json = br#"{"name":"x","pixels":{"other":1},"thumb":null,"tags":[],"nested":[],"kind":"Plain"}"#;
        let e = from_json_with_segments::<Image>(json, &[]).unwrap_err();
        assert!(e.to_string().contains("segment reference"), "{e}");
        assert!(from_json_with_segments::<Image>(b"{} trailing", &[]).is_err());
    }
}
