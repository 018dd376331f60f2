//! Message headers: the [`Headers`] type, the name of every header Waybill
//! reads or writes (here, and only here), the routing metadata every hop
//! carries in its headers, so that nothing needs the body to route or
//! observe a hop, and the check that the headers and the body agree.
//!
//! Nothing here depends on the transports; they use it.

use std::borrow::Cow;
use std::fmt;

use crate::codec::Format;
use crate::document::{Document, Status};
use crate::id::OrderId;

/// Everything that routes and locates a hop, in one header:
/// `<order id> <hop> <workflow>/<version> <status>[ <service>]`, e.g.
/// `0192…e5775 3 order/1 running payment.charge` (no service once terminal).
///
/// One header rather than one per field: every reader of the stream (each
/// worker, and the coordinator replaying all of it) parses every header of
/// every hop, and in async-nats each header line costs about as much as the
/// rest of the message. Measured reading 250,000 stored hops with one
/// client: nine headers per hop read at 80,000 hops/s, three at 190,000
/// (async-nats 0.51, one connection, one reader).
pub const HOP: &str = "Waybill-Hop";
/// On a scheduled message (nats-server 2.12+): when the server publishes it
/// (`@at <RFC 3339 time>`).
pub const SCHEDULE: &str = "Nats-Schedule";
/// On a scheduled message: the subject the server publishes it to.
pub const SCHEDULE_TARGET: &str = "Nats-Schedule-Target";

/// Whether a header is the server's scheduling metadata (`Nats-Schedule`,
/// `Nats-Schedule-Target`, and what it puts on a message it fired:
/// `Nats-Scheduler`, `Nats-Schedule-Next`). A hop passed on (redriven,
/// dead-lettered) drops them: they would schedule it again, and a stream
/// that does not take schedules refuses them.
pub fn is_schedule_header(name: &str) -> bool {
    name.len() >= SCHEDULE.len() && name[..SCHEDULE.len()].eq_ignore_ascii_case(SCHEDULE)
}

/// On a start request: the id to start the order under (optional).
pub const ORDER: &str = "Waybill-Order";
/// The encoding of the body (see [`crate::codec::Format::content_type`]).
pub const CONTENT_TYPE: &str = "Content-Type";
/// On a dead letter: why it is there.
pub const DLQ_REASON: &str = "Waybill-Dlq-Reason";
/// Header of a dead letter: why it is one, as a code
/// ([`crate::transport::DeadLetterKind`]): `invalid`, `exhausted` or
/// `unavailable`.
pub const DLQ_KIND: &str = "Waybill-Dlq-Kind";
/// On a dead letter: the consumer that gave up on it.
pub const DLQ_CONSUMER: &str = "Waybill-Dlq-Consumer";
/// On a hop woken from its wait to meet a cancel: the cancel's reason (the
/// worker may see the hop before the cancel itself reaches it).
pub const CANCEL: &str = "Waybill-Cancel";
/// On a hop that waits for a signal: its name. A signal wakes only a hop
/// that waits for it (a signal kept for a later step leaves the order
/// asleep where it is).
pub const AWAITS: &str = "Waybill-Awaits";
/// On a hop the coordinator re-drove: the sequence of the hop it repeats.
pub const REDRIVE: &str = "Waybill-Redrive";
/// NATS's deduplication id (set through [`crate::transport::Outgoing::msg_id`],
/// never by hand).
pub const MSG_ID: &str = "Nats-Msg-Id";
/// On a JetStream flow-control message: the subject to answer so that a
/// stalled consumer delivers again.
pub const CONSUMER_STALLED: &str = "Nats-Consumer-Stalled";
/// On a JetStream idle heartbeat: the last consumer sequence the server
/// sent.
pub const LAST_CONSUMER: &str = "Nats-Last-Consumer";
/// On a NATS key-value entry: `DEL` or `PURGE` for a removed key.
pub const KV_OPERATION: &str = "KV-Operation";

/// Message headers: an ordered list of name/value pairs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(Cow<'static, str>, HeaderValue)>);

/// A header value: short values and `&'static str` values are stored
/// without allocating.
pub type HeaderValue = compact_str::CompactString;

impl Headers {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// Sets `name` (replacing any value it had).
    pub fn insert(&mut self, name: impl Into<Cow<'static, str>>, value: impl Into<HeaderValue>) {
        let name = name.into();
        let value = value.into();
        match self.0.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(&name)) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// Adds `name` without looking for an earlier value (for building
    /// headers whose names are known to be distinct).
    pub fn append(&mut self, name: impl Into<Cow<'static, str>>, value: impl Into<HeaderValue>) {
        self.0.push((name.into(), value.into()));
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        // Names are case-insensitive; exact matches (the usual case) are
        // found without folding case.
        self.0
            .iter()
            .find(|(n, _)| n.len() == name.len() && (n == name || n.eq_ignore_ascii_case(name)))
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_ref(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter().map(|(n, v)| (n, v))).finish()
    }
}

/// The headers of the hop that carries `doc`.
pub fn for_hop(doc: &Document, format: Format) -> Headers {
    use compact_str::CompactString;
    use std::fmt::Write;
    // One allocation: this runs per hop.
    let mut v = CompactString::with_capacity(96);
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    v.push_str(doc.id.as_uuid().hyphenated().encode_lower(&mut buf));
    let _ = write!(
        v,
        " {} {}/{} {}",
        doc.hop, doc.route.workflow, doc.route.version, doc.status
    );
    if let Some(t) = doc.target() {
        v.push(' ');
        v.push_str(t.service.as_str());
    }
    let mut h = Headers::with_capacity(2);
    h.append(HOP, v);
    h.append(CONTENT_TYPE, CompactString::const_new(format.content_type()));
    if let Some(a) = doc.awaited_signal() {
        h.append(AWAITS, CompactString::new(a.name.as_str()));
    }
    h
}

/// A hop's `Waybill-Hop` header, split into its fields (unchecked text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopHeader<'a> {
    pub order: &'a str,
    pub hop: &'a str,
    pub workflow: &'a str,
    pub version: &'a str,
    pub status: &'a str,
    pub service: Option<&'a str>,
}

impl<'a> HopHeader<'a> {
    /// `None` if the value does not have the header's shape.
    pub fn parse(value: &'a str) -> Option<Self> {
        let mut parts = value.split(' ');
        let order = parts.next()?;
        let hop = parts.next()?;
        let (workflow, version) = parts.next()?.split_once('/')?;
        let status = parts.next()?;
        let service = parts.next();
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            order,
            hop,
            workflow,
            version,
            status,
            service,
        })
    }
}

/// W3C trace context of a hop, `00-<trace id>-<span id>-01`: the order id is
/// the trace id and the hop number (plus one) the span id, so every hop of
/// one order joins one trace wherever it runs ([`crate::trace::HopTrace`]).
/// Not sent as a header (all it holds is in `Waybill-Hop`); derived wherever
/// a tracer wants it.
pub fn traceparent(doc: &Document) -> compact_str::CompactString {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let trace = crate::trace::HopTrace::new(&doc.id, doc.hop);
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    for (i, slot) in out[3..35].iter_mut().enumerate() {
        *slot = HEX[((trace.trace_id >> (124 - 4 * i)) & 0xf) as usize];
    }
    out[35] = b'-';
    for (i, slot) in out[36..52].iter_mut().enumerate() {
        *slot = HEX[((trace.span_id >> (60 - 4 * i)) & 0xf) as usize];
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
    #[error("header `{HOP}` is not `<order id> <hop> <workflow>/<version> <status>[ <service>]`: `{0}`")]
    Malformed(String),
    #[error("header `{HOP}` gives {field} `{header}` but the document says `{body}`")]
    Mismatch {
        field: &'static str,
        header: String,
        body: String,
    },
}

/// Checks that the hop's headers describe the document in its body.
pub fn verify(headers: &Headers, doc: &Document) -> Result<(), HeaderError> {
    fn mismatch(field: &'static str, header: &str, body: &dyn std::fmt::Display) -> HeaderError {
        HeaderError::Mismatch {
            field,
            header: header.to_owned(),
            body: body.to_string(),
        }
    }
    let value = headers.get(HOP).ok_or(HeaderError::Missing(HOP))?;
    let h = HopHeader::parse(value).ok_or_else(|| HeaderError::Malformed(value.to_owned()))?;
    // Compared parsed, not formatted: this runs on every hop.
    if h.order.parse::<OrderId>().ok() != Some(doc.id) {
        return Err(mismatch("order", h.order, &doc.id));
    }
    if h.hop.parse::<u32>().ok() != Some(doc.hop) {
        return Err(mismatch("hop", h.hop, &doc.hop));
    }
    if h.workflow != doc.route.workflow.as_str() {
        return Err(mismatch("workflow", h.workflow, &doc.route.workflow));
    }
    if h.version.parse::<u32>().ok() != Some(doc.route.version) {
        return Err(mismatch("version", h.version, &doc.route.version));
    }
    if h.status.parse::<Status>().ok() != Some(doc.status) {
        return Err(mismatch("status", h.status, &doc.status));
    }
    let want = doc.target().map(|t| t.service.as_str());
    if h.service != want {
        return Err(mismatch(
            "service",
            h.service.unwrap_or("(none)"),
            &want.unwrap_or("(none)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::document::Payload;
    use crate::workflow::Workflow;

    fn doc() -> Document {
        let wf = Workflow::builder("order", 2)
            .step("charge", "payment.charge")
            .build()
            .unwrap();
        Document::new(OrderId::new(), wf.shared_route(), Payload::postcard(&1u8).unwrap())
    }

    #[test]
    fn one_header_locates_the_hop_and_is_checked_against_the_body() {
        let mut d = doc();
        let h = for_hop(&d, Format::Postcard);
        assert_eq!(h.len(), 2);
        let v = h.get(HOP).unwrap();
        assert_eq!(v, format!("{} 0 order/2 running payment.charge", d.id));
        let p = HopHeader::parse(v).unwrap();
        assert_eq!(
            (p.workflow, p.version, p.service),
            ("order", "2", Some("payment.charge"))
        );
        assert_eq!(verify(&h, &d), Ok(()));

        d.hop = 5;
        assert!(matches!(
            verify(&h, &d),
            Err(HeaderError::Mismatch { field: "hop", .. })
        ));
        d.hop = 0;
        d.status = Status::Completed;
        let done = for_hop(&d, Format::Json);
        assert!(done.get(HOP).unwrap().ends_with(" completed"));
        assert_eq!(verify(&done, &d), Ok(()));
        assert!(matches!(
            verify(&h, &d),
            Err(HeaderError::Mismatch { field: "status", .. })
        ));

        let mut bad = Headers::new();
        bad.insert(HOP, "three words only");
        assert!(matches!(verify(&bad, &d), Err(HeaderError::Malformed(_))));
        assert_eq!(verify(&Headers::new(), &d), Err(HeaderError::Missing(HOP)));
    }

    #[test]
    fn the_trace_context_is_derived_from_the_order_and_hop() {
        let d = doc();
        let t = traceparent(&d);
        assert_eq!(t, format!("00-{}-0000000000000001-01", d.id.as_uuid().simple()));
    }
}
