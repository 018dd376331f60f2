//! The one versioned wire format of a document.
//!
//! Binary (the default), envelope version 1:
//!
//! ```text
//! "WB" | version (1 byte) | route length (varint) | route (postcard) | body (postcard)
//! ```
//!
//! The body is every field of the document but the route, in the order of
//! `wire::WireBody`. The route has a section of its own because it is the
//! same in every document of one workflow version: each codec interns it by
//! its bytes (checked once, then shared by the codec's clones, see
//! `routes`), so a hop does not re-read its route.
//!
//! JSON, for clients in other languages, is one object: `"envelope": 1`, the
//! route under `"route"`, and the body's fields (`json`).
//!
//! Decoding is bounded by a size limit and never panics: anything malformed
//! is a [`DecodeError`]. The wire structs live in `wire` (and `payload`) and
//! only there: no domain type is handed to serde by the codec, so a change
//! to one cannot change the format unnoticed. [`ENVELOPE_VERSION`] changes
//! when the wire structs do in a way that this build would read an older
//! document differently. An addition that every older
//! document still decodes the same under (a new variant at the end of an
//! enum, such as a history record's `Unavailable` wait) keeps the version:
//! this build reads every version-1 document, and an older build refuses a
//! document with the new variant as malformed (a dead letter), so workers
//! are upgraded before the builds that write it.

mod json;
mod payload;
mod routes;
#[cfg(test)]
mod tests;
mod wire;

use std::fmt;
use std::sync::Arc;

use crate::document::{Document, Status, Timestamp};
use crate::id::OrderId;
use crate::workflow::{DefinitionError, Route};
use routes::RouteCache;
use wire::{WireBody, WireBodyRef, WireBodyRefV3, WireBodyV3, WireHead};

/// The newest version of the document envelope this build writes and
/// reads; it reads every version from 1. A document is written in the
/// oldest version that holds its route: version 2 when a step waits,
/// version 3 when the route forks.
pub const ENVELOPE_VERSION: u8 = 3;
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
    #[error("document envelope version {0} is not supported (this build reads versions 1 to {ENVELOPE_VERSION})")]
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
    /// The fork and branch whose document this is (see
    /// [`Document::branch`]).
    pub branch: Option<crate::document::BranchAt>,
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
            branch: doc.branch,
        })
    }
}

/// Encodes and decodes documents within a size limit.
///
/// Each codec keeps the routes it has read and written, so that a hop does
/// not re-read the route every document of its workflow version shares;
/// clones share that cache (and are cheap: a size and an `Arc`). Hand a
/// clone around rather than making a new codec for each message.
#[derive(Clone)]
pub struct Codec {
    max_size: usize,
    routes: Arc<RouteCache>,
}

impl Default for Codec {
    fn default() -> Self {
        Self::with_max_size(DEFAULT_MAX_SIZE)
    }
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec").field("max_size", &self.max_size).finish()
    }
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
    /// A codec that refuses documents over `max_size` bytes, with a route
    /// cache of its own.
    pub fn with_max_size(max_size: usize) -> Self {
        Self {
            max_size,
            routes: Arc::default(),
        }
    }

    pub fn max_size(&self) -> usize {
        self.max_size
    }

    pub fn encode(&self, doc: &Document, format: Format) -> Result<Vec<u8>, EncodeError> {
        let bytes = match format {
            Format::Postcard => {
                let (version, route) = self.routes.bytes_of(&doc.route)?;
                // Room for the payload and the history, so it rarely grows.
                let mut out =
                    Vec::with_capacity(64 + route.len() + doc.payload.bytes.len() + 96 * (doc.history.len() + 1));
                out.extend_from_slice(&MAGIC);
                out.push(version);
                put_varint(&mut out, route.len());
                out.extend_from_slice(&route);
                if version >= 3 {
                    postcard::to_extend(&WireBodyRefV3::from(doc), out)
                } else {
                    postcard::to_extend(&WireBodyRef::from(doc), out)
                }
                .map_err(|e| EncodeError::Failed(e.to_string()))?
            }
            Format::Json => json::encode(doc)?,
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
            Format::Postcard => self.peek_postcard(bytes),
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
            Format::Postcard => self.decode_postcard(bytes)?,
            Format::Json => json::decode(bytes)?,
        };
        check(&doc)?;
        Ok(doc)
    }
}

/// The binary form.
impl Codec {
    /// Splits a binary document into its (interned) route, its body and
    /// its envelope version.
    fn split_postcard<'b>(&self, bytes: &'b [u8]) -> Result<(Arc<Route>, &'b [u8], u8), DecodeError> {
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
        let version = bytes[2];
        if !(1..=ENVELOPE_VERSION).contains(&version) {
            return Err(DecodeError::UnknownVersion(u64::from(version)));
        }
        let (route_len, rest) = take_varint(&bytes[3..])?;
        if route_len > rest.len() {
            return Err(DecodeError::Truncated);
        }
        let (route, body) = rest.split_at(route_len);
        Ok((self.routes.intern(version, route)?, body, version))
    }

    /// The envelope of a binary document, its history and payload unread
    /// (except while compensating: the step being undone is in the owed
    /// list; and for a route with forks: whether it is a branch's comes
    /// last).
    fn peek_postcard(&self, bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let (route, body, version) = self.split_postcard(bytes)?;
        let head: WireHead = postcard::take_from_bytes(body).map_err(postcard_err)?.0;
        if Status::from(head.status) == Status::Compensating || version >= 3 {
            return Envelope::of(&self.decode_postcard(bytes)?);
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
            status: head.status.into(),
            step: head.step,
            attempt: head.attempt,
            not_before: head.not_before.map(Timestamp),
            branch: None,
        })
    }

    fn decode_postcard(&self, bytes: &[u8]) -> Result<Document, DecodeError> {
        let (route, body, version) = self.split_postcard(bytes)?;
        let read = if version >= 3 {
            postcard::take_from_bytes::<WireBodyV3>(body).map(|(b, rest)| {
                let mut doc = b.body.with_route(route);
                doc.branch = b.branch.map(Into::into);
                (doc, rest)
            })
        } else {
            postcard::take_from_bytes::<WireBody>(body).map(|(b, rest)| (b.with_route(route), rest))
        };
        match read {
            Ok((doc, [])) => Ok(doc),
            Ok((_, rest)) => Err(DecodeError::TrailingBytes(rest.len())),
            Err(e) => Err(postcard_err(e)),
        }
    }
}

fn postcard_err(e: postcard::Error) -> DecodeError {
    match e {
        postcard::Error::DeserializeUnexpectedEnd => DecodeError::Truncated,
        e => DecodeError::Malformed(e.to_string()),
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
    if let Some(b) = doc.branch {
        let fork = doc.route.forks.get(usize::from(b.fork)).ok_or_else(|| {
            DecodeError::Inconsistent(format!("branch of fork {}, which its route lacks", b.fork))
        })?;
        if usize::from(b.branch) >= fork.starts.len() {
            return Err(DecodeError::Inconsistent(format!(
                "branch {} of a {}-branch fork",
                b.branch,
                fork.starts.len()
            )));
        }
        if doc.status == crate::document::Status::Running && !fork.span(usize::from(b.branch)).contains(&doc.step) {
            return Err(DecodeError::Inconsistent(format!(
                "branch {} of fork `{}` at step {}, outside it",
                b.branch, fork.name, doc.step
            )));
        }
        let fits = |at: u32, len: usize| usize::try_from(at).is_ok_and(|at| at <= len);
        if !fits(b.history_at, doc.history.len()) || !fits(b.owed_at, doc.owed.len()) {
            return Err(DecodeError::Inconsistent(
                "a branch forked at more history or owed compensations than it holds".into(),
            ));
        }
    }
    Ok(())
}
