//! The wire form of a [`Payload`].
//!
//! Binary formats carry the bytes as bytes; JSON carries a JSON payload as
//! the JSON value itself (so other languages read it directly) and a binary
//! one as an array of numbers.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::document::{self, Payload};

/// How a payload's bytes are encoded, as written. Named as the domain type,
/// which serde quotes in its errors (see `wire::read`).
#[derive(Clone, Copy, Serialize, Deserialize)]
enum ContentType {
    #[serde(rename = "application/postcard")]
    Postcard,
    #[serde(rename = "application/json")]
    Json,
}

impl From<document::ContentType> for ContentType {
    fn from(c: document::ContentType) -> Self {
        match c {
            document::ContentType::Postcard => ContentType::Postcard,
            document::ContentType::Json => ContentType::Json,
        }
    }
}

impl From<ContentType> for document::ContentType {
    fn from(c: ContentType) -> Self {
        match c {
            ContentType::Postcard => document::ContentType::Postcard,
            ContentType::Json => document::ContentType::Json,
        }
    }
}

/// A payload, as written.
pub(in crate::codec) struct WirePayloadRef<'a>(pub &'a Payload);

/// A payload, as read.
pub(in crate::codec) struct WirePayload(pub Payload);

impl Serialize for WirePayloadRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let p = self.0;
        let content_type = ContentType::from(p.content_type);
        if s.is_human_readable() && p.content_type == document::ContentType::Json {
            let value: serde_json::Value = serde_json::from_slice(&p.bytes).map_err(serde::ser::Error::custom)?;
            let mut st = s.serialize_struct("Payload", 2)?;
            st.serialize_field("content_type", &content_type)?;
            st.serialize_field("json", &value)?;
            st.end()
        } else {
            let mut st = s.serialize_struct("Payload", 2)?;
            st.serialize_field("content_type", &content_type)?;
            st.serialize_field("bytes", &RawBytes(&p.bytes))?;
            st.end()
        }
    }
}

struct RawBytes<'a>(&'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

struct OwnedBytes(Vec<u8>);

impl<'de> Deserialize<'de> for OwnedBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OwnedBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<OwnedBytes, E> {
                Ok(OwnedBytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<OwnedBytes, E> {
                Ok(OwnedBytes(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OwnedBytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(OwnedBytes(out))
            }
        }
        d.deserialize_bytes(V)
    }
}

impl<'de> Deserialize<'de> for WirePayload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Human {
                content_type: ContentType,
                #[serde(default)]
                json: Option<serde_json::Value>,
                #[serde(default)]
                bytes: Option<Vec<u8>>,
            }
            let h = Human::deserialize(d)?;
            let content_type = document::ContentType::from(h.content_type);
            let bytes = match (content_type, h.json, h.bytes) {
                (document::ContentType::Json, Some(v), None) => {
                    serde_json::to_vec(&v).map_err(serde::de::Error::custom)?
                }
                (_, None, Some(b)) => b,
                _ => {
                    return Err(serde::de::Error::custom(
                        "payload needs `json` (for application/json) or `bytes`, not both",
                    ))
                }
            };
            Ok(WirePayload(Payload { content_type, bytes }))
        } else {
            #[derive(Deserialize)]
            struct Binary {
                content_type: ContentType,
                bytes: OwnedBytes,
            }
            let b = Binary::deserialize(d)?;
            Ok(WirePayload(Payload {
                content_type: b.content_type.into(),
                bytes: b.bytes.0,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_both_ways() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct P {
            a: u32,
            b: String,
        }
        let v = P { a: 7, b: "x".into() };
        for p in [Payload::postcard(&v).unwrap(), Payload::json(&v).unwrap()] {
            assert_eq!(p.decode::<P>().unwrap(), v);
            let json = serde_json::to_string(&WirePayloadRef(&p)).unwrap();
            let back: WirePayload = serde_json::from_str(&json).unwrap();
            assert_eq!(back.0.decode::<P>().unwrap(), v);
            let bin = postcard::to_stdvec(&WirePayloadRef(&p)).unwrap();
            let back: WirePayload = postcard::from_bytes(&bin).unwrap();
            assert_eq!(back.0, p);
        }
        let json = serde_json::to_string(&WirePayloadRef(&Payload::json(&v).unwrap())).unwrap();
        assert!(json.contains(r#""json":{"a":7,"b":"x"}"#), "{json}");
    }

    #[test]
    fn a_payload_with_both_or_neither_form_is_refused() {
        for json in [
            r#"{"content_type":"application/json","json":1,"bytes":[1]}"#,
            r#"{"content_type":"application/postcard"}"#,
            r#"{"content_type":"application/postcard","json":{}}"#,
        ] {
            assert!(serde_json::from_str::<WirePayload>(json).is_err(), "{json}");
        }
    }
}
