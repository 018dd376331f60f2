//! Where a step sits in its order's distributed trace, derived from the hop
//! alone, so that every host that runs one of an order's steps puts it in
//! the same trace without any trace header travelling with the hop.
//!
//! The trace id is the order id (a UUID v7: 128 bits, time-ordered). The
//! step that runs hop `h` has span id `h + 1`; its parent is the step that
//! ran hop `h - 1` and published hop `h` (span id `h`), so an order's steps
//! chain hop to hop, forward and compensating alike; hop 0's step is the
//! trace's root. [`crate::headers::traceparent`] writes the same context in
//! W3C form.
//!
//! The engine does not depend on OpenTelemetry: the worker runtime opens
//! each step's `tracing` span with the fields named here
//! ([`STEP_SPAN`], [`TRACE_ID_FIELD`], [`HOP_FIELD`]), and an exporter (the
//! `waybill-workers` crate's `otel` module) reads them and gives the span
//! the ids of [`HopTrace::new`]. Nothing is computed per hop unless such a
//! tracer is installed.

use crate::id::OrderId;

/// The name of the span each step runs in.
pub const STEP_SPAN: &str = "step";
/// The step span's field holding its order's trace id: the order id as 32
/// lower-case hexadecimal digits (no hyphens).
pub const TRACE_ID_FIELD: &str = "trace_id";
/// The step span's field holding the number of the hop the step runs on.
pub const HOP_FIELD: &str = "hop";

/// The trace context of the step that runs one hop of one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HopTrace {
    /// The order id's 128 bits.
    pub trace_id: u128,
    /// `hop + 1` (never 0, which W3C trace context reserves for "none").
    pub span_id: u64,
    /// The span of the step that published this hop: `hop`; `None` for
    /// hop 0, whose step is the trace's root.
    pub parent_span_id: Option<u64>,
}

impl HopTrace {
    /// The trace context of the step on hop `hop` of `order`.
    pub fn new(order: &OrderId, hop: u32) -> Self {
        let span_id = u64::from(hop) + 1;
        Self {
            trace_id: order.as_uuid().as_u128(),
            span_id,
            parent_span_id: (hop > 0).then_some(u64::from(hop)),
        }
    }

    /// The trace context of a step span, from its fields as a tracer reads
    /// them: [`TRACE_ID_FIELD`] (32 hexadecimal digits) and [`HOP_FIELD`].
    /// `None` if the trace id is not such a number or the hop does not fit
    /// a hop number.
    pub fn from_fields(trace_id: &str, hop: i64) -> Option<Self> {
        if trace_id.len() != 32 || !trace_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let id = u128::from_str_radix(trace_id, 16).ok()?;
        let hop = u32::try_from(hop).ok()?;
        Some(Self::new(&OrderId::from_uuid(uuid::Uuid::from_u128(id)), hop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_chain_hop_to_hop_in_the_order_trace() {
        let order = OrderId::new();
        let first = HopTrace::new(&order, 0);
        assert_eq!(first.trace_id, order.as_uuid().as_u128());
        assert_eq!((first.span_id, first.parent_span_id), (1, None));
        let third = HopTrace::new(&order, 2);
        assert_eq!((third.span_id, third.parent_span_id), (3, Some(2)));
        assert_eq!(third.parent_span_id, Some(HopTrace::new(&order, 1).span_id));
        let last = HopTrace::new(&order, u32::MAX);
        assert_eq!(last.span_id, u64::from(u32::MAX) + 1);
    }

    #[test]
    fn the_fields_of_a_step_span_give_the_same_context() {
        let order = OrderId::new();
        let hex = order.as_uuid().simple().to_string();
        assert_eq!(HopTrace::from_fields(&hex, 4), Some(HopTrace::new(&order, 4)));
        assert_eq!(
            HopTrace::from_fields(&hex.to_uppercase(), 4),
            Some(HopTrace::new(&order, 4))
        );
        assert_eq!(HopTrace::from_fields(&order.to_string(), 4), None, "hyphenated");
        assert_eq!(HopTrace::from_fields("zz", 4), None);
        assert_eq!(HopTrace::from_fields(&format!("+{}", &hex[1..]), 4), None);
        assert_eq!(HopTrace::from_fields(&hex, -1), None);
        assert_eq!(HopTrace::from_fields(&hex, i64::from(u32::MAX) + 1), None);
    }
}
