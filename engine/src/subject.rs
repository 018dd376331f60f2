//! Every NATS subject and consumer name Waybill uses is built here, and only
//! here.

use crate::id::{OrderId, ServiceSubject, SignalName, WorkflowName};

/// Prefix of every hop that asks a service for work.
pub const HOP_PREFIX: &str = "waybill.hop.";
/// Prefix of every terminal hop.
pub const DONE_PREFIX: &str = "waybill.done.";
/// Prefix of every dead letter.
pub const DLQ_PREFIX: &str = "waybill.dlq.";

/// Prefix of every hop that is not due yet, kept by the server until it is.
pub const TIMER_PREFIX: &str = "waybill.timer.";

/// `waybill.timer.<order>`: an order's hop that is not due yet, as a
/// message the server publishes to the hop's subject when it is due
/// (nats-server 2.12+ message scheduling). One per order: a new one
/// replaces the last.
pub fn timer(order: &OrderId) -> String {
    format!("{TIMER_PREFIX}{order}")
}

/// The timer subject of an order's hop: `waybill.timer.<order>`, or for a
/// branch's hop `waybill.timer.<order>.<fork>.<branch>` (each branch
/// sleeps apart: a schedule replaces the one before it on its subject).
pub fn timer_of(order: &OrderId, branch: Option<(u8, u8)>) -> String {
    match branch {
        None => timer(order),
        Some((fork, b)) => format!("{TIMER_PREFIX}{order}.{fork}.{b}"),
    }
}

/// `waybill.timer.<order>.>`: the timers of an order's branches.
pub fn branch_timers(order: &OrderId) -> String {
    format!("{TIMER_PREFIX}{order}.>")
}

/// `waybill.timer.>`: every hop that is not due yet.
pub fn all_timers() -> String {
    format!("{TIMER_PREFIX}>")
}

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

/// `waybill.hop.>`: every hop that asks a service for work.
pub fn all_hops() -> String {
    format!("{HOP_PREFIX}>")
}

/// `waybill.dlq.>`: every dead letter.
pub fn all_dead_letters() -> String {
    format!("{DLQ_PREFIX}>")
}

/// The subjects of the stream every hop is stored in: every hop, every
/// terminal hop, and every hop not due yet.
pub fn hops_stream() -> Vec<String> {
    vec![all_hops(), all_done(), all_timers()]
}

/// The subjects of the dead-letter stream.
pub fn dlq_stream() -> Vec<String> {
    vec![all_dead_letters()]
}

/// Prefix of JetStream's acknowledgement (reply) subjects:
/// `$JS.ACK.<stream>.<consumer>.…`.
pub const JS_ACK_PREFIX: &str = "$JS.ACK.";

/// `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`: where
/// JetStream announces a message of `consumer` that ran out of deliveries.
pub fn max_deliveries_advisory(stream: &str, consumer: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}")
}

/// `<bucket prefix><key>`: the subject a key-value bucket stores `key`
/// under, given the bucket's subject prefix (`$KV.<bucket>.`, as the
/// client reports it).
pub fn kv_key(bucket_prefix: &str, key: &str) -> String {
    format!("{bucket_prefix}{key}")
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

/// The hop subject a dead letter kept under `dlq_subject` came from
/// (`waybill.dlq.<rest>` → `waybill.hop.<rest>`); `None` for any other
/// subject.
pub fn origin_of_dead_letter(dlq_subject: &str) -> Option<String> {
    let rest = dlq_subject.strip_prefix(DLQ_PREFIX).filter(|r| !r.is_empty())?;
    Some(format!("{HOP_PREFIX}{rest}"))
}

/// Prefix of the start requests: `waybill.start.<workflow>`.
pub const START_PREFIX: &str = "waybill.start.";
/// Prefix of the status requests: `waybill.status.<order id>`.
pub const STATUS_PREFIX: &str = "waybill.status.";
/// Prefix of the cancel requests: `waybill.cancel.<order id>`.
pub const CANCEL_PREFIX: &str = "waybill.cancel.";
/// Prefix of the signal deliveries: `waybill.signal.<order id>.<name>`.
pub const SIGNAL_PREFIX: &str = "waybill.signal.";
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

/// `<partition prefix>.status.<id>`: a status request only the
/// coordinators of partition `owner` of `count` answer.
pub fn partition_status(owner: u32, count: u32, id: &OrderId) -> String {
    format!("{}.status.{id}", partition_prefix(owner, count))
}

/// `<partition prefix>.cancel.<id>`: a cancel request only the
/// coordinators of partition `owner` of `count` answer.
pub fn partition_cancel(owner: u32, count: u32, id: &OrderId) -> String {
    format!("{}.cancel.{id}", partition_prefix(owner, count))
}

/// `<partition prefix>.signal.<id>.<name>`: a signal only the coordinators
/// of partition `owner` of `count` answer.
pub fn partition_signal(owner: u32, count: u32, id: &OrderId, name: &SignalName) -> String {
    format!("{}.signal.{id}.{name}", partition_prefix(owner, count))
}

/// `<partition prefix>.orders`: an orders request for one partition.
pub fn partition_orders(owner: u32, count: u32) -> String {
    format!("{}.orders", partition_prefix(owner, count))
}

/// The subjects a coordinator of partition `index` of `count` serves.
pub fn coordinator_subjects(index: u32, count: u32) -> Vec<String> {
    let own = partition_prefix(index, count);
    vec![
        format!("{START_PREFIX}*"),
        format!("{STATUS_PREFIX}*"),
        format!("{CANCEL_PREFIX}*"),
        format!("{SIGNAL_PREFIX}*.*"),
        ORDERS.to_owned(),
        format!("{own}.status.*"),
        format!("{own}.cancel.*"),
        format!("{own}.signal.*.*"),
        format!("{own}.orders"),
    ]
}

/// A request to the coordinators, as its subject says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoordinatorRequest<'a> {
    /// `waybill.start.<workflow>`.
    Start { workflow: &'a str },
    /// `waybill.status.<id>` (public: any coordinator takes it and asks
    /// the owner), or the partition's own form (only the owner answers).
    Status { id: &'a str, public: bool },
    /// `waybill.cancel.<id>`, or the partition's own form.
    Cancel { id: &'a str, public: bool },
    /// `waybill.signal.<id>.<name>`, or the partition's own form.
    Signal { id: &'a str, name: &'a str, public: bool },
    /// `waybill.orders`, or the partition's own form.
    Orders { public: bool },
}

impl<'a> CoordinatorRequest<'a> {
    /// The request `subject` asks of the coordinators of partition `index`
    /// of `count`; `None` for a subject that is none of theirs.
    pub fn parse(subject: &'a str, index: u32, count: u32) -> Option<Self> {
        if let Some(workflow) = subject.strip_prefix(START_PREFIX) {
            return Some(Self::Start { workflow });
        }
        if let Some(id) = subject.strip_prefix(STATUS_PREFIX) {
            return Some(Self::Status { id, public: true });
        }
        if let Some(id) = subject.strip_prefix(CANCEL_PREFIX) {
            return Some(Self::Cancel { id, public: true });
        }
        if let Some(rest) = subject.strip_prefix(SIGNAL_PREFIX) {
            let (id, name) = rest.split_once('.')?;
            return Some(Self::Signal { id, name, public: true });
        }
        if subject == ORDERS {
            return Some(Self::Orders { public: true });
        }
        let own = partition_prefix(index, count);
        let rest = subject.strip_prefix(own.as_str())?;
        if let Some(id) = rest.strip_prefix(".status.") {
            return Some(Self::Status { id, public: false });
        }
        if let Some(id) = rest.strip_prefix(".cancel.") {
            return Some(Self::Cancel { id, public: false });
        }
        if let Some((id, name)) = rest.strip_prefix(".signal.").and_then(|r| r.split_once('.')) {
            return Some(Self::Signal {
                id,
                name,
                public: false,
            });
        }
        (rest == ".orders").then_some(Self::Orders { public: false })
    }
}

/// The durable consumer shared by every process serving `service`.
pub fn service_consumer(service: &ServiceSubject) -> String {
    format!("wb_{}", service.as_str().replace('.', "_"))
}

/// `wb_client_<id>`: the private consumer of one client (`id` in simple
/// form, so the name has no `-`).
pub fn client_consumer(id: &uuid::Uuid) -> String {
    format!("wb_client_{}", id.simple())
}

/// The service a hop subject is addressed to, if it is a hop subject.
pub fn service_of(subject: &str) -> Option<&str> {
    subject.strip_prefix(HOP_PREFIX)
}

/// `waybill.status.<order id>`: the status request of one order.
pub fn status(id: &crate::id::OrderId) -> String {
    format!("{STATUS_PREFIX}{id}")
}

/// `waybill.cancel.<order id>`: the cancel request of one order.
pub fn cancel(id: &crate::id::OrderId) -> String {
    format!("{CANCEL_PREFIX}{id}")
}

/// `waybill.signal.<order id>.<name>`: the delivery of a signal to an
/// order.
pub fn signal(id: &OrderId, name: &SignalName) -> String {
    format!("{SIGNAL_PREFIX}{id}.{name}")
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

    #[test]
    fn stream_and_infrastructure_subjects() {
        assert_eq!(all_done(), "waybill.done.>");
        assert_eq!(hops_stream(), ["waybill.hop.>", "waybill.done.>", "waybill.timer.>"]);
        assert_eq!(dlq_stream(), ["waybill.dlq.>"]);
        assert_eq!(
            max_deliveries_advisory("WAYBILL_HOPS", "wb_payment_charge"),
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.WAYBILL_HOPS.wb_payment_charge"
        );
        assert_eq!(kv_key("$KV.stock.", "sku-1"), "$KV.stock.sku-1");
        let id: uuid::Uuid = "01890a5d-ac96-774b-bcce-b302099a8057".parse().unwrap();
        assert_eq!(client_consumer(&id), "wb_client_01890a5dac96774bbcceb302099a8057");
        assert_eq!(stalled(&WorkflowName::new("order").unwrap()), "waybill.stalled.order");
        assert_eq!(
            partition_status(1, 2, &OrderId::from_uuid(id)),
            "waybill.coordinator.p2.1.status.01890a5d-ac96-774b-bcce-b302099a8057"
        );
        assert_eq!(partition_orders(1, 2), "waybill.coordinator.p2.1.orders");
        assert_eq!(start("order"), "waybill.start.order");
    }

    #[test]
    fn coordinator_requests_parse_from_their_subjects() {
        use CoordinatorRequest as R;
        assert_eq!(
            R::parse("waybill.start.order", 0, 2),
            Some(R::Start { workflow: "order" })
        );
        assert_eq!(
            R::parse("waybill.status.x", 0, 2),
            Some(R::Status { id: "x", public: true })
        );
        assert_eq!(R::parse("waybill.orders", 0, 2), Some(R::Orders { public: true }));
        assert_eq!(
            R::parse("waybill.cancel.x", 0, 2),
            Some(R::Cancel { id: "x", public: true })
        );
        assert_eq!(
            R::parse("waybill.coordinator.p2.1.cancel.x", 1, 2),
            Some(R::Cancel { id: "x", public: false })
        );
        assert_eq!(
            R::parse("waybill.signal.x.approved", 0, 1),
            Some(R::Signal {
                id: "x",
                name: "approved",
                public: true
            })
        );
        assert_eq!(R::parse("waybill.signal.x", 0, 1), None);
        assert_eq!(
            R::parse("waybill.coordinator.p2.1.signal.x.approved", 1, 2),
            Some(R::Signal {
                id: "x",
                name: "approved",
                public: false
            })
        );
        assert_eq!(
            R::parse("waybill.coordinator.p2.1.status.x", 1, 2),
            Some(R::Status { id: "x", public: false })
        );
        assert_eq!(
            R::parse("waybill.coordinator.p2.1.orders", 1, 2),
            Some(R::Orders { public: false })
        );
        assert_eq!(R::parse("waybill.coordinator.p2.0.orders", 1, 2), None);
        assert_eq!(R::parse("waybill.coordinator.p2.1.ordersx", 1, 2), None);
        assert_eq!(R::parse("waybill.other", 0, 1), None);
        for s in coordinator_subjects(1, 2) {
            let concrete = s.replace('*', "x");
            assert!(R::parse(&concrete, 1, 2).is_some(), "{s}");
        }
    }
}
