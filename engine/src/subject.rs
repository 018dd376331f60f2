//! Every NATS subject and consumer name Waybill uses is built here, and only
//! here.

use crate::id::{ServiceSubject, WorkflowName};

/// Prefix of every hop that asks a service for work.
pub const HOP_PREFIX: &str = "waybill.hop.";
/// Prefix of every terminal hop.
pub const DONE_PREFIX: &str = "waybill.done.";
/// Prefix of every dead letter.
pub const DLQ_PREFIX: &str = "waybill.dlq.";

/// `waybill.hop.<service>`: where documents wait for `service`.
pub fn hop(service: &ServiceSubject) -> String {
    format!("{HOP_PREFIX}{service}")
}

/// `waybill.done.<workflow>`: where an order's terminal hop is published.
pub fn done(workflow: &WorkflowName) -> String {
    format!("{DONE_PREFIX}{workflow}")
}

/// `waybill.done.>`: every terminal hop.
pub fn all_done() -> String {
    format!("{DONE_PREFIX}>")
}

/// `waybill.dlq.<rest of the original subject>`: where a message that cannot
/// be processed is kept with its reason.
pub fn dead_letter(original: &str) -> String {
    let rest = original
        .strip_prefix(HOP_PREFIX)
        .or_else(|| original.strip_prefix("waybill."))
        .unwrap_or(original);
    format!("{DLQ_PREFIX}{rest}")
}

/// Prefix of the start requests: `waybill.start.<workflow>`.
pub const START_PREFIX: &str = "waybill.start.";
/// Prefix of the status requests: `waybill.status.<order id>`.
pub const STATUS_PREFIX: &str = "waybill.status.";
/// The summary request.
pub const ORDERS: &str = "waybill.orders";
/// The queue group every coordinator answers the public requests in.
pub const COORDINATOR_GROUP: &str = "waybill-coordinator";

/// `waybill.stalled.<workflow>`: where coordinators announce each order
/// that stalls (a [`crate::coordinator::api::StalledEvent`]).
pub fn stalled(workflow: &WorkflowName) -> String {
    format!("waybill.stalled.{workflow}")
}

/// `waybill.coordinator.p<count>.<index>`: the requests only the
/// coordinators of one partition answer (the others forward to it).
pub fn partition_prefix(index: u32, count: u32) -> String {
    format!("waybill.coordinator.p{count}.{index}")
}

/// The durable consumer shared by every process serving `service`.
pub fn service_consumer(service: &ServiceSubject) -> String {
    format!("wb_{}", service.as_str().replace('.', "_"))
}

/// The service a hop subject is addressed to, if it is a hop subject.
pub fn service_of(subject: &str) -> Option<&str> {
    subject.strip_prefix(HOP_PREFIX)
}

/// `waybill.status.<order id>`: the status request of one order.
pub fn status(id: &crate::id::OrderId) -> String {
    format!("{STATUS_PREFIX}{id}")
}

/// `waybill.start.<workflow>`: the start request of a workflow's orders.
pub fn start(workflow: &str) -> String {
    format!("{START_PREFIX}{workflow}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        let s = ServiceSubject::new("payment.charge").unwrap();
        assert_eq!(hop(&s), "waybill.hop.payment.charge");
        assert_eq!(dead_letter(&hop(&s)), "waybill.dlq.payment.charge");
        assert_eq!(service_consumer(&s), "wb_payment_charge");
        assert_eq!(service_of("waybill.hop.payment.charge"), Some("payment.charge"));
        assert_eq!(done(&WorkflowName::new("order").unwrap()), "waybill.done.order");
    }
}
