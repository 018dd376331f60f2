//! The one versioned wire format of a document.
//!
//! Binary (the default), envelope version 1:
//!
//! ```text
//! "WB" | version (1 byte) | route length (varint) | route (postcard) | body (postcard)
//! ```
//!
//! The body is every field of the document but the route, in the order of
//! [`WireBody`]. The route has a section of its own because it is the same in
//! every document of one workflow version: decoders intern it by its bytes
//! (checked once, then shared), so a hop does not re-read its route.
//!
//! JSON, for clients in other languages, is one object: `"envelope": 1`, the
//! route under `"route"`, and the body's fields.
//!
//! Decoding is bounded by a size limit and never panics: anything malformed
//! is a [`DecodeError`]. The wire structs live here and only here;
//! [`ENVELOPE_VERSION`] changes when they do in a way that this build would
//! read an older document differently. An addition that every older
//! document still decodes the same under (a new variant at the end of an
//! enum, such as a history record's `Unavailable` wait) keeps the version:
//! this build reads every version-1 document, and an older build refuses a
//! document with the new variant as malformed (a dead letter), so workers
//! are upgraded before the builds that write it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::document::{Compensation, Document, Payload, Status, StepRecord, Timestamp};
use crate::hash::FastState;
use crate::id::OrderId;
use crate::workflow::{DefinitionError, Route};

/// The version of the document envelope this build writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;
const MAGIC: [u8; 2] = *b"WB";

/// Content type of a binary (postcard) document.
pub const CONTENT_TYPE_POSTCARD: &str = "application/vnd.waybill.doc+postcard";
/// Content type of a JSON document.
pub const CONTENT_TYPE_JSON: &str = "application/vnd.waybill.doc+json";

/// Largest encoded document accepted unless configured otherwise: 1 MiB, the
/// default maximum message size of nats-server.
pub const DEFAULT_MAX_SIZE: usize = 1024 * 1024;

/// Which encoding a document is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Postcard,
    Json,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Postcard => CONTENT_TYPE_POSTCARD,
            Format::Json => CONTENT_TYPE_JSON,
        }
    }

    pub fn from_content_type(ct: &str) -> Result<Self, DecodeError> {
        match ct {
            CONTENT_TYPE_POSTCARD => Ok(Format::Postcard),
            CONTENT_TYPE_JSON => Ok(Format::Json),
            other => Err(DecodeError::UnknownContentType(other.to_owned())),
        }
    }
}

/// Why bytes are not a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("document is {size} bytes, over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("document is empty")]
    Empty,
    #[error("no content type given for the document")]
    MissingContentType,
    #[error("unknown document content type `{0}`; expected `{CONTENT_TYPE_POSTCARD}` or `{CONTENT_TYPE_JSON}`")]
    UnknownContentType(String),
    #[error("not a waybill document (bad magic bytes)")]
    BadMagic,
    #[error("document envelope version {0} is not supported (this build reads version {ENVELOPE_VERSION})")]
    UnknownVersion(u64),
    #[error("document is truncated")]
    Truncated,
    #[error("document has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("document is malformed: {0}")]
    Malformed(String),
    #[error("document carries an invalid route: {0}")]
    InvalidRoute(#[from] DefinitionError),
    #[error("document is inconsistent: {0}")]
    Inconsistent(String),
}

/// Why a document could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("document is {size} bytes encoded, over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("document could not be encoded: {0}")]
    Failed(String),
}

/// What a document says about where its order stands, read without its
/// history or payload: what the coordinator tracks per hop.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub id: OrderId,
    pub route: Arc<Route>,
    pub hop: u32,
    pub status: Status,
    /// The route step the hop is for: the step to run while running, the
    /// step being undone while compensating, the last cursor once terminal.
    pub step: u16,
    pub attempt: u32,
    pub not_before: Option<Timestamp>,
}

/// The leading fields of [`WireBody`], read on their own: postcard reads
/// fields in order, so the rest (history, payload) is never touched.
#[derive(Deserialize)]
struct WireHead {
    id: OrderId,
    hop: u32,
    status: Status,
    step: u16,
    attempt: u32,
    not_before: Option<Timestamp>,
}

impl Envelope {
    fn of(doc: &Document) -> Result<Self, DecodeError> {
        let step = match doc.target() {
            Some(t) if t.kind == crate::document::StepKind::Compensation => doc
                .route
                .steps
                .iter()
                .position(|s| &s.name == t.step)
                .and_then(|i| u16::try_from(i).ok())
                .ok_or_else(|| {
                    DecodeError::Inconsistent(format!("owes the undoing of `{}`, which its route lacks", t.step))
                })?,
            _ => doc.step,
        };
        Ok(Self {
            id: doc.id,
            route: doc.route.clone(),
            hop: doc.hop,
            status: doc.status,
            step,
            attempt: doc.attempt,
            not_before: doc.not_before,
        })
    }
}

/// Encodes and decodes documents within a size limit.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    max_size: usize,
}

impl Default for Codec {
    fn default() -> Self {
        Self {
            max_size: DEFAULT_MAX_SIZE,
        }
    }
}

/// The document's fields other than the route, as they are written.
#[derive(Serialize)]
struct WireBodyRef<'a> {
    id: &'a OrderId,
    hop: u32,
    status: Status,
    step: u16,
    attempt: u32,
    not_before: Option<Timestamp>,
    history: &'a [StepRecord],
    owed: &'a [Compensation],
    failure: &'a Option<String>,
    created_at: Timestamp,
    payload: &'a Payload,
}

/// The document's fields other than the route, as they are read.
#[derive(Deserialize)]
struct WireBody {
    id: OrderId,
    hop: u32,
    status: Status,
    step: u16,
    attempt: u32,
    not_before: Option<Timestamp>,
    history: Vec<StepRecord>,
    owed: Vec<Compensation>,
    failure: Option<String>,
    created_at: Timestamp,
    payload: Payload,
}

impl<'a> WireBodyRef<'a> {
    fn of(d: &'a Document) -> Self {
        Self {
            id: &d.id,
            hop: d.hop,
            status: d.status,
            step: d.step,
            attempt: d.attempt,
            not_before: d.not_before,
            history: &d.history,
            owed: &d.owed,
            failure: &d.failure,
            created_at: d.created_at,
            payload: &d.payload,
        }
    }
}

impl WireBody {
    fn with_route(self, route: Arc<Route>) -> Document {
        Document {
            id: self.id,
            route,
            hop: self.hop,
            status: self.status,
            step: self.step,
            attempt: self.attempt,
            not_before: self.not_before,
            history: self.history,
            owed: self.owed,
            failure: self.failure,
            created_at: self.created_at,
            payload: self.payload,
        }
    }
}

#[derive(Serialize)]
struct JsonOut<'a> {
    envelope: u8,
    route: &'a Route,
    #[serde(flatten)]
    body: WireBodyRef<'a>,
}

#[derive(Deserialize)]
struct JsonVersion {
    envelope: u64,
}

#[derive(Deserialize)]
struct JsonIn {
    #[allow(dead_code)]
    envelope: u64,
    route: Route,
    #[serde(flatten)]
    body: WireBody,
}

/// Routes already seen, by their encoded bytes (decoding) and by identity
/// (encoding). Bounded: cleared when full, which only costs re-reading.
/// A route and its encoded bytes.
type EncodedRoute = (Arc<Route>, Arc<[u8]>);

#[derive(Default)]
struct Routes {
    by_bytes: HashMap<Box<[u8]>, Arc<Route>, FastState>,
    /// Keyed by the `Arc`'s address; the entry holds the `Arc`, so the
    /// address cannot be reused while it is cached.
    by_ptr: HashMap<usize, EncodedRoute, FastState>,
}

const ROUTE_CACHE: usize = 1024;

static ROUTES: RwLock<Option<Routes>> = RwLock::new(None);

fn route_bytes(route: &Arc<Route>) -> Result<Arc<[u8]>, EncodeError> {
    let key = Arc::as_ptr(route) as usize;
    if let Some(hit) = ROUTES
        .read()
        .ok()
        .and_then(|g| g.as_ref().and_then(|r| r.by_ptr.get(&key).map(|e| e.1.clone())))
    {
        return Ok(hit);
    }
    let bytes: Arc<[u8]> = postcard::to_stdvec(&**route)
        .map_err(|e| EncodeError::Failed(e.to_string()))?
        .into();
    if let Ok(mut g) = ROUTES.write() {
        let r = g.get_or_insert_with(Routes::default);
        if r.by_ptr.len() >= ROUTE_CACHE {
            r.by_ptr.clear();
        }
        r.by_ptr.insert(key, (route.clone(), bytes.clone()));
    }
    Ok(bytes)
}

/// The route encoded as `bytes`: from the cache, or decoded, checked and
/// cached.
fn intern_route(bytes: &[u8]) -> Result<Arc<Route>, DecodeError> {
    // Hops of one workflow version come in runs: the route this thread
    // read last is compared first, without hashing or locking.
    type Last = std::cell::RefCell<Option<(Box<[u8]>, Arc<Route>)>>;
    thread_local!(static LAST: Last = const { std::cell::RefCell::new(None) });
    let last = LAST.with(|l| match &*l.borrow() {
        Some((b, r)) if &**b == bytes => Some(r.clone()),
        _ => None,
    });
    if let Some(hit) = last {
        return Ok(hit);
    }
    let route = intern_route_shared(bytes)?;
    LAST.with(|l| *l.borrow_mut() = Some((bytes.into(), route.clone())));
    Ok(route)
}

fn intern_route_shared(bytes: &[u8]) -> Result<Arc<Route>, DecodeError> {
    if let Some(hit) = ROUTES
        .read()
        .ok()
        .and_then(|g| g.as_ref().and_then(|r| r.by_bytes.get(bytes).cloned()))
    {
        return Ok(hit);
    }
    let route: Route = match postcard::take_from_bytes(bytes) {
        Ok((route, [])) => route,
        Ok((_, rest)) => {
            return Err(DecodeError::Malformed(format!(
                "route has {} trailing bytes",
                rest.len()
            )))
        }
        Err(postcard::Error::DeserializeUnexpectedEnd) => return Err(DecodeError::Truncated),
        Err(e) => return Err(DecodeError::Malformed(format!("route: {e}"))),
    };
    route.check_structure()?;
    let route = Arc::new(route);
    if let Ok(mut g) = ROUTES.write() {
        let r = g.get_or_insert_with(Routes::default);
        if r.by_bytes.len() >= ROUTE_CACHE {
            r.by_bytes.clear();
        }
        r.by_bytes.insert(bytes.into(), route.clone());
        if r.by_ptr.len() < ROUTE_CACHE {
            r.by_ptr
                .insert(Arc::as_ptr(&route) as usize, (route.clone(), Arc::from(bytes)));
        }
    }
    Ok(route)
}

/// Reads a postcard varint (u32) from the front of `bytes`.
fn take_varint(bytes: &[u8]) -> Result<(usize, &[u8]), DecodeError> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(5) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let n = usize::try_from(value).map_err(|_| DecodeError::Malformed("route length overflows".into()))?;
            return Ok((n, &bytes[i + 1..]));
        }
    }
    if bytes.len() < 5 {
        Err(DecodeError::Truncated)
    } else {
        Err(DecodeError::Malformed("route length is not a valid varint".into()))
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

impl Codec {
    pub fn with_max_size(max_size: usize) -> Self {
        Self { max_size }
    }

    pub fn max_size(&self) -> usize {
        self.max_size
    }

    pub fn encode(&self, doc: &Document, format: Format) -> Result<Vec<u8>, EncodeError> {
        let bytes = match format {
            Format::Postcard => {
                let route = route_bytes(&doc.route)?;
                // Room for the payload and the history, so it rarely grows.
                let mut out =
                    Vec::with_capacity(64 + route.len() + doc.payload.bytes.len() + 96 * (doc.history.len() + 1));
                out.extend_from_slice(&MAGIC);
                out.push(ENVELOPE_VERSION);
                put_varint(&mut out, route.len());
                out.extend_from_slice(&route);
                postcard::to_extend(&WireBodyRef::of(doc), out).map_err(|e| EncodeError::Failed(e.to_string()))?
            }
            Format::Json => serde_json::to_vec(&JsonOut {
                envelope: ENVELOPE_VERSION,
                route: &doc.route,
                body: WireBodyRef::of(doc),
            })
            .map_err(|e| EncodeError::Failed(e.to_string()))?,
        };
        if bytes.len() > self.max_size {
            return Err(EncodeError::TooLarge {
                size: bytes.len(),
                max: self.max_size,
            });
        }
        Ok(bytes)
    }

    /// Decodes a document whose content type is given as text (a header);
    /// `None` when the message carried none.
    pub fn decode_as(&self, bytes: &[u8], content_type: Option<&str>) -> Result<Document, DecodeError> {
        let ct = content_type.ok_or(DecodeError::MissingContentType)?;
        self.decode(bytes, Format::from_content_type(ct)?)
    }

    /// Reads only what locates the order (id, route, hop, status, step):
    /// several times cheaper than [`Codec::decode`] on a long history. A
    /// binary document's body past those fields is not checked.
    pub fn peek(&self, bytes: &[u8], format: Format) -> Result<Envelope, DecodeError> {
        self.check_size(bytes)?;
        match format {
            Format::Postcard => peek_postcard(bytes),
            Format::Json => Envelope::of(&self.decode(bytes, format)?),
        }
    }

    fn check_size(&self, bytes: &[u8]) -> Result<(), DecodeError> {
        if bytes.len() > self.max_size {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                max: self.max_size,
            });
        }
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        Ok(())
    }

    pub fn decode(&self, bytes: &[u8], format: Format) -> Result<Document, DecodeError> {
        self.check_size(bytes)?;
        let doc = match format {
            Format::Postcard => decode_postcard(bytes)?,
            Format::Json => decode_json(bytes)?,
        };
        check(&doc)?;
        Ok(doc)
    }
}

/// Splits a binary document into its (interned) route and its body.
fn split_postcard(bytes: &[u8]) -> Result<(Arc<Route>, &[u8]), DecodeError> {
    if bytes.len() < 3 {
        return if MAGIC.starts_with(bytes) {
            Err(DecodeError::Truncated)
        } else {
            Err(DecodeError::BadMagic)
        };
    }
    if bytes[..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if bytes[2] != ENVELOPE_VERSION {
        return Err(DecodeError::UnknownVersion(u64::from(bytes[2])));
    }
    let (route_len, rest) = take_varint(&bytes[3..])?;
    if route_len > rest.len() {
        return Err(DecodeError::Truncated);
    }
    let (route, body) = rest.split_at(route_len);
    Ok((intern_route(route)?, body))
}

fn postcard_err(e: postcard::Error) -> DecodeError {
    match e {
        postcard::Error::DeserializeUnexpectedEnd => DecodeError::Truncated,
        e => DecodeError::Malformed(e.to_string()),
    }
}

/// The envelope of a binary document, its history and payload unread
/// (except while compensating: the step being undone is in the owed list).
fn peek_postcard(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let (route, body) = split_postcard(bytes)?;
    let head: WireHead = postcard::take_from_bytes(body).map_err(postcard_err)?.0;
    if head.status == Status::Compensating {
        return Envelope::of(&decode_postcard(bytes)?);
    }
    if usize::from(head.step) >= route.steps.len() {
        return Err(DecodeError::Inconsistent(format!(
            "cursor at step {} of a {}-step route",
            head.step,
            route.steps.len()
        )));
    }
    if head.attempt == 0 {
        return Err(DecodeError::Inconsistent("attempt 0 (attempts count from 1)".into()));
    }
    Ok(Envelope {
        id: head.id,
        route,
        hop: head.hop,
        status: head.status,
        step: head.step,
        attempt: head.attempt,
        not_before: head.not_before,
    })
}

fn decode_postcard(bytes: &[u8]) -> Result<Document, DecodeError> {
    let (route, body) = split_postcard(bytes)?;
    match postcard::take_from_bytes::<WireBody>(body) {
        Ok((body, [])) => Ok(body.with_route(route)),
        Ok((_, rest)) => Err(DecodeError::TrailingBytes(rest.len())),
        Err(e) => Err(postcard_err(e)),
    }
}

fn decode_json(bytes: &[u8]) -> Result<Document, DecodeError> {
    let v: JsonVersion = serde_json::from_slice(bytes).map_err(json_err)?;
    if v.envelope != u64::from(ENVELOPE_VERSION) {
        return Err(DecodeError::UnknownVersion(v.envelope));
    }
    let doc: JsonIn = serde_json::from_slice(bytes).map_err(json_err)?;
    doc.route.check_structure()?;
    Ok(doc.body.with_route(Arc::new(doc.route)))
}

fn json_err(e: serde_json::Error) -> DecodeError {
    if e.is_eof() {
        DecodeError::Truncated
    } else {
        DecodeError::Malformed(e.to_string())
    }
}

/// What must hold of any document before a worker follows it.
fn check(doc: &Document) -> Result<(), DecodeError> {
    if usize::from(doc.step) >= doc.route.steps.len() {
        return Err(DecodeError::Inconsistent(format!(
            "cursor at step {} of a {}-step route",
            doc.step,
            doc.route.steps.len()
        )));
    }
    if doc.attempt == 0 {
        return Err(DecodeError::Inconsistent("attempt 0 (attempts count from 1)".into()));
    }
    if doc.status == crate::document::Status::Compensating && doc.owed.is_empty() {
        return Err(DecodeError::Inconsistent(
            "compensating with no compensation owed".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::{Payload, Status};
    use crate::id::OrderId;
    use crate::workflow::Workflow;

    fn doc() -> Document {
        let wf = Workflow::builder("order", 1)
            .step("charge", "payment.charge")
            .compensate("payment.refund")
            .step("ship", "shipping.dispatch")
            .build()
            .unwrap();
        Document::new(
            OrderId::new(),
            wf.shared_route(),
            Payload::postcard(&("c-17", 3u32)).unwrap(),
        )
    }

    #[test]
    fn round_trips_in_both_formats() {
        let c = Codec::default();
        let d = doc();
        for f in [Format::Postcard, Format::Json] {
            let bytes = c.encode(&d, f).unwrap();
            assert_eq!(c.decode(&bytes, f).unwrap(), d);
            assert_eq!(c.decode_as(&bytes, Some(f.content_type())).unwrap(), d);
        }
    }

    #[test]
    fn peek_reads_the_envelope_the_full_decode_would() {
        let c = Codec::default();
        let mut d = doc();
        d.hop = 4;
        d.attempt = 2;
        d.not_before = Some(Timestamp(77));
        for f in [Format::Postcard, Format::Json] {
            let bytes = c.encode(&d, f).unwrap();
            let e = c.peek(&bytes, f).unwrap();
            assert_eq!(
                (e.id, e.hop, e.status, e.step, e.attempt),
                (d.id, 4, Status::Running, 0, 2)
            );
            assert_eq!(e.not_before, Some(Timestamp(77)));
            assert_eq!(*e.route, *d.route);
        }
        // Compensating: the step is the one being undone, found in the owed list.
        d.status = Status::Compensating;
        d.step = 1;
        d.owed.push(Compensation {
            step: "charge".parse().unwrap(),
            service: "payment.refund".parse().unwrap(),
        });
        for f in [Format::Postcard, Format::Json] {
            let e = c.peek(&c.encode(&d, f).unwrap(), f).unwrap();
            assert_eq!((e.status, e.step), (Status::Compensating, 0));
        }
        let bin = c.encode(&d, Format::Postcard).unwrap();
        assert_eq!(c.peek(&bin[..20], Format::Postcard), Err(DecodeError::Truncated));
        assert_eq!(c.peek(b"junk", Format::Postcard), Err(DecodeError::BadMagic));
        assert_eq!(c.peek(&[], Format::Postcard), Err(DecodeError::Empty));
    }

    #[test]
    fn every_malformed_input_is_a_typed_error() {
        let c = Codec::default();
        let d = doc();
        let bin = c.encode(&d, Format::Postcard).unwrap();

        assert_eq!(c.decode(&[], Format::Postcard), Err(DecodeError::Empty));
        assert_eq!(
            c.decode(&bin[..bin.len() - 3], Format::Postcard),
            Err(DecodeError::Truncated)
        );
        assert_eq!(c.decode(b"W", Format::Postcard), Err(DecodeError::Truncated));
        assert_eq!(c.decode(b"hello world", Format::Postcard), Err(DecodeError::BadMagic));
        let mut v2 = bin.clone();
        v2[2] = 2;
        assert_eq!(c.decode(&v2, Format::Postcard), Err(DecodeError::UnknownVersion(2)));
        let mut trailing = bin.clone();
        trailing.push(0);
        assert_eq!(
            c.decode(&trailing, Format::Postcard),
            Err(DecodeError::TrailingBytes(1))
        );
        assert_eq!(
            c.decode_as(&bin, Some("text/plain")),
            Err(DecodeError::UnknownContentType("text/plain".into()))
        );
        assert_eq!(c.decode_as(&bin, None), Err(DecodeError::MissingContentType));
        // A binary document read as JSON, and the other way round.
        assert!(matches!(c.decode(&bin, Format::Json), Err(DecodeError::Malformed(_))));
        let json = c.encode(&d, Format::Json).unwrap();
        assert_eq!(c.decode(&json, Format::Postcard), Err(DecodeError::BadMagic));

        let small = Codec::with_max_size(16);
        assert_eq!(
            small.decode(&bin, Format::Postcard),
            Err(DecodeError::TooLarge {
                size: bin.len(),
                max: 16
            })
        );
        assert!(matches!(
            small.encode(&d, Format::Postcard),
            Err(EncodeError::TooLarge { .. })
        ));

        let future = String::from_utf8(json.clone())
            .unwrap()
            .replace("\"envelope\":1", "\"envelope\":9");
        assert_eq!(
            c.decode(future.as_bytes(), Format::Json),
            Err(DecodeError::UnknownVersion(9))
        );
        assert_eq!(
            c.decode(&json[..json.len() / 2], Format::Json),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn inconsistent_documents_are_refused() {
        let c = Codec::default();
        let mut d = doc();
        d.step = 7;
        let bin = c.encode(&d, Format::Postcard).unwrap();
        assert!(matches!(
            c.decode(&bin, Format::Postcard),
            Err(DecodeError::Inconsistent(_))
        ));

        let mut d = doc();
        d.status = Status::Compensating;
        let bin = c.encode(&d, Format::Postcard).unwrap();
        assert!(matches!(
            c.decode(&bin, Format::Postcard),
            Err(DecodeError::Inconsistent(_))
        ));

        let mut d = doc();
        Arc::make_mut(&mut d.route).steps.clear();
        let bin = c.encode(&d, Format::Postcard).unwrap();
        assert!(matches!(
            c.decode(&bin, Format::Postcard),
            Err(DecodeError::InvalidRoute(_))
        ));
    }
}
