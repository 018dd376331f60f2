//! The routing metadata every hop carries in its headers, so that nothing
//! needs the body to route or observe a hop, and the check that the headers
//! and the body agree.

use crate::codec::Format;
use crate::document::{Document, Status};
use crate::id::OrderId;
use crate::transport::Headers;

pub const WORKFLOW: &str = "Waybill-Workflow";
pub const VERSION: &str = "Waybill-Version";
pub const ORDER: &str = "Waybill-Order";
pub const HOP: &str = "Waybill-Hop";
/// The service the hop is addressed to; absent on terminal hops.
pub const SERVICE: &str = "Waybill-Service";
pub const STATUS: &str = "Waybill-Status";
pub const CONTENT_TYPE: &str = "Content-Type";
/// W3C trace context: the order id is the trace id, so every hop of one order
/// joins one trace wherever it runs.
pub const TRACEPARENT: &str = "traceparent";
/// On a dead letter: why it is there.
pub const DLQ_REASON: &str = "Waybill-Dlq-Reason";

/// The headers of the hop that carries `doc`.
pub fn for_hop(doc: &Document, format: Format) -> Headers {
    use compact_str::{CompactString, ToCompactString};
    // Built without `fmt` and without a duplicate check: this runs per hop.
    let mut h = Headers::with_capacity(8);
    h.append(WORKFLOW, CompactString::new(doc.route.workflow.as_str()));
    h.append(VERSION, doc.route.version.to_compact_string());
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    h.append(
        ORDER,
        CompactString::new(doc.id.as_uuid().hyphenated().encode_lower(&mut buf)),
    );
    h.append(HOP, doc.hop.to_compact_string());
    if let Some(t) = doc.target() {
        h.append(SERVICE, CompactString::new(t.service.as_str()));
    }
    h.append(STATUS, CompactString::const_new(doc.status.as_str()));
    h.append(CONTENT_TYPE, CompactString::const_new(format.content_type()));
    h.append(TRACEPARENT, traceparent(doc));
    h
}

/// `00-<trace id>-<span id>-01`: the order id is the trace id, the hop
/// number (plus one) the span id.
fn traceparent(doc: &Document) -> compact_str::CompactString {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    let mut simple = [0u8; uuid::fmt::Simple::LENGTH];
    out[3..35].copy_from_slice(doc.id.as_uuid().simple().encode_lower(&mut simple).as_bytes());
    out[35] = b'-';
    let span = u64::from(doc.hop) + 1;
    for (i, slot) in out[36..52].iter_mut().enumerate() {
        *slot = HEX[((span >> (60 - 4 * i)) & 0xf) as usize];
    }
    out[52..].copy_from_slice(b"-01");
    // Every byte written above is ASCII.
    compact_str::CompactString::from_utf8_lossy(&out)
}

/// Headers and body disagree, or a header is missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header `{0}` is missing")]
    Missing(&'static str),
    #[error("header `{name}` says `{header}` but the document says `{body}`")]
    Mismatch {
        name: &'static str,
        header: String,
        body: String,
    },
}

/// Checks that the hop's headers describe the document in its body.
pub fn verify(headers: &Headers, doc: &Document) -> Result<(), HeaderError> {
    fn get<'a>(headers: &'a Headers, name: &'static str) -> Result<&'a str, HeaderError> {
        headers.get(name).ok_or(HeaderError::Missing(name))
    }
    fn mismatch(name: &'static str, header: &str, body: &dyn std::fmt::Display) -> HeaderError {
        HeaderError::Mismatch {
            name,
            header: header.to_owned(),
            body: body.to_string(),
        }
    }
    // Compared parsed, not formatted: this runs on every hop.
    let order = get(headers, ORDER)?;
    if order.parse::<OrderId>().ok() != Some(doc.id) {
        return Err(mismatch(ORDER, order, &doc.id));
    }
    let hop = get(headers, HOP)?;
    if hop.parse::<u32>().ok() != Some(doc.hop) {
        return Err(mismatch(HOP, hop, &doc.hop));
    }
    let workflow = get(headers, WORKFLOW)?;
    if workflow != doc.route.workflow.as_str() {
        return Err(mismatch(WORKFLOW, workflow, &doc.route.workflow));
    }
    let version = get(headers, VERSION)?;
    if version.parse::<u32>().ok() != Some(doc.route.version) {
        return Err(mismatch(VERSION, version, &doc.route.version));
    }
    if let Some(t) = doc.target() {
        let service = get(headers, SERVICE)?;
        if service != t.service.as_str() {
            return Err(mismatch(SERVICE, service, t.service));
        }
    }
    if let Some(s) = headers.get(STATUS) {
        if s.parse::<Status>().ok() != Some(doc.status) {
            return Err(mismatch(STATUS, s, &doc.status));
        }
    }
    Ok(())
}
