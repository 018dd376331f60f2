//! The routing metadata every hop carries in its headers, so that nothing
//! needs the body to route or observe a hop, and the check that the headers
//! and the body agree.

use crate::codec::Format;
use crate::document::{Document, Status};
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
    let mut h = Headers::with_capacity(8);
    h.insert(WORKFLOW, doc.route.workflow.as_str().to_owned());
    h.insert(VERSION, doc.route.version.to_string());
    h.insert(ORDER, doc.id.to_string());
    h.insert(HOP, doc.hop.to_string());
    if let Some(t) = doc.target() {
        h.insert(SERVICE, t.service.as_str().to_owned());
    }
    h.insert(STATUS, doc.status.as_str());
    h.insert(CONTENT_TYPE, format.content_type());
    h.insert(TRACEPARENT, traceparent(doc));
    h
}

fn traceparent(doc: &Document) -> String {
    // Span id: the hop index, so each hop is its own span of the order's trace.
    format!("00-{}-{:016x}-01", doc.id.as_uuid().simple(), u64::from(doc.hop) + 1)
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
    fn check(headers: &Headers, name: &'static str, body: &dyn std::fmt::Display) -> Result<(), HeaderError> {
        let header = headers.get(name).ok_or(HeaderError::Missing(name))?;
        let body = body.to_string();
        if header != body {
            return Err(HeaderError::Mismatch {
                name,
                header: header.to_owned(),
                body,
            });
        }
        Ok(())
    }
    check(headers, ORDER, &doc.id)?;
    check(headers, HOP, &doc.hop)?;
    check(headers, WORKFLOW, &doc.route.workflow)?;
    check(headers, VERSION, &doc.route.version)?;
    if let Some(t) = doc.target() {
        check(headers, SERVICE, t.service)?;
    }
    if let Some(s) = headers.get(STATUS) {
        if s.parse::<Status>().ok() != Some(doc.status) {
            return Err(HeaderError::Mismatch {
                name: STATUS,
                header: s.to_owned(),
                body: doc.status.to_string(),
            });
        }
    }
    Ok(())
}
