//! The hand-off phase: the attempt applied, the next hop (or the order's
//! end) encoded and stored, and only then the input acknowledged; or the
//! input handed back, or turned into a dead letter.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use super::handle::{Service, Shared, WorkerStats};
use super::run::keep_alive;
use crate::codec::EncodeError;
use crate::document::Document;
use crate::headers;
use crate::id::{DedupId, MsgId};
use crate::subject;
use crate::transition::{self, Attempt, Decision, TransitionError};
use crate::transport::{Consumer, DeadLetter, DeadLetterKind, Delivery, Outgoing, PublishAck, Transport};

/// The hop that follows an attempt: where it goes, and its bytes.
pub(super) struct NextHop {
    pub(super) subject: String,
    pub(super) body: Bytes,
}

/// Why no next hop follows an attempt: the input becomes a dead letter of
/// kind `invalid`.
#[derive(Debug)]
pub(super) enum NoNextHop {
    /// The document and the attempt do not make a transition.
    Transition(TransitionError),
    /// The next document cannot be encoded (over the size limit, say).
    Encode(EncodeError),
}

impl fmt::Display for NoNextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoNextHop::Transition(e) => e.fmt(f),
            NoNextHop::Encode(e) => write!(f, "the next hop cannot be encoded: {e}"),
        }
    }
}

/// Applies `attempt` to `doc` and encodes the hop that follows.
pub(super) fn next_hop<T>(shared: &Shared<T>, doc: &mut Document, attempt: Attempt) -> Result<NextHop, NoNextHop> {
    let decision = transition::apply(doc, attempt).map_err(NoNextHop::Transition)?;
    hop_for(shared, doc, decision)
}

/// Encodes the hop `decision` leads to, once a step it enters that waits
/// until a payload time has that time (or the order failed for want of
/// it).
pub(super) fn hop_for<T>(shared: &Shared<T>, doc: &mut Document, decision: Decision) -> Result<NextHop, NoNextHop> {
    let decision = transition::wait_until(doc, |d| payload_json(shared, d)).unwrap_or(decision);
    encode_hop(shared, doc, &decision)
}

/// The document's payload as JSON: through the worker's registry, or as it
/// is when it is JSON.
pub(super) fn payload_json<T>(shared: &Shared<T>, doc: &Document) -> Result<serde_json::Value, String> {
    match &shared.registry {
        Some(r) => r
            .payload_json(doc.route.workflow.as_str(), &doc.payload)
            .map_err(|e| format!("cannot be read: {e}")),
        None if doc.payload.content_type == crate::document::ContentType::Json => {
            serde_json::from_slice(&doc.payload.bytes).map_err(|e| format!("cannot be read: {e}"))
        }
        None => Err(format!(
            "cannot be read here: the payload is {} and this worker has no registry \
             (WorkerBuilder::registry) to read it with",
            doc.payload.content_type.as_str()
        )),
    }
}

/// Applies a cancel asked for the order (see [`transition::cancel`]) and
/// encodes the hop that follows; `None` when the cancel changes nothing
/// (the order is compensating already).
pub(super) fn cancel_hop<T>(
    shared: &Shared<T>,
    doc: &mut Document,
    reason: String,
) -> Result<Option<NextHop>, NoNextHop> {
    let decision = transition::cancel(doc, reason, shared.worker.clone(), crate::document::Timestamp::now())
        .map_err(NoNextHop::Transition)?;
    decision.map(|d| encode_hop(shared, doc, &d)).transpose()
}

pub(super) fn encode_hop<T>(shared: &Shared<T>, doc: &Document, decision: &Decision) -> Result<NextHop, NoNextHop> {
    let subject = match decision {
        Decision::Hop { service, .. } => subject::hop(service),
        Decision::Finish(status) => {
            if doc.branch.is_some() && !doc.owed.is_empty() {
                // A branch its join went on without could not undo its
                // own steps: the order has gone on (or ended) without it.
                tracing::error!(order = %doc.id, %status, failure = ?doc.failure, "a branch could not undo its steps");
            }
            tracing::debug!(%status, "order finished");
            subject::done(&doc.route.workflow)
        }
        // To the service of the step the branch ended at: its worker
        // takes the arrival.
        Decision::Arrive => match doc.route.step(doc.step) {
            Some(s) => subject::hop(&s.service),
            None => return Err(NoNextHop::Transition(TransitionError::NoStep(doc.step))),
        },
    };
    let body = shared.codec.encode(doc, shared.format).map_err(NoNextHop::Encode)?;
    Ok(NextHop {
        subject,
        body: Bytes::from(body),
    })
}

/// Stores the hop `subject`, `body` of `doc` under its deduplication id
/// `<order>:<hop>` (see [`store`]); the caller acknowledges the input once
/// it is stored.
pub(super) async fn hand_off<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    doc: &Document,
    hop: &NextHop,
    delivery: &impl Delivery,
) -> Result<PublishAck, Unstored> {
    // Built again for each try (rare): cheaper than copying one up front.
    let out = || Outgoing {
        subject: hop.subject.clone(),
        msg_id: Some(MsgId::hop(DedupId {
            order: doc.id,
            hop: doc.hop,
            branch: doc.branch.map(|b| (b.fork, b.branch)),
        })),
        headers: headers::for_hop(doc, shared.format),
        payload: hop.body.clone(),
        due: crate::transport::Due::of(doc),
    };
    store(shared, svc, delivery, out).await
}

/// Why a next hop was not stored.
#[derive(Debug)]
pub(super) enum Unstored {
    /// Unavailable for longer than the worker's limit.
    OverLimit(crate::transport::Error),
    /// Not worth trying again here (or the worker is draining): hand the
    /// input back; its redelivery does the step again, idempotently.
    Failed(crate::transport::Error),
    /// No hop can be made of the input, however often it is tried (a
    /// join's record that cannot be read, a merge over the size limit): a
    /// dead letter of kind `invalid`.
    Invalid(String),
}

/// Stores the next hop, waiting out an unavailable stream (a leader
/// election, a node restarting, a lost connection) with capped backoff
/// while keeping the input's delivery alive, up to the worker's
/// `unavailable_limit`. Handing the input back instead would spend one of
/// its deliveries per try, and a failover longer than those turned healthy
/// orders into dead letters. Every try carries the same deduplication id,
/// so a try that was stored after all is not stored twice.
pub(super) async fn store<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    delivery: &impl Delivery,
    out: impl Fn() -> Outgoing + Sync,
) -> Result<PublishAck, Unstored> {
    // Most hops are stored at once. The retries' state (their timers, the
    // keep-alive) is boxed on the slow path so that it does not weigh on
    // every step's future: inlined, it cost the embedded benchmark about 6 %.
    match shared.transport.publish(out()).await {
        Ok(ack) => Ok(ack),
        Err(e) => Box::pin(store_again(shared, svc, delivery, &out, e)).await,
    }
}

/// [`store`]'s slow path, after a first try failed with `first`.
async fn store_again<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    delivery: &impl Delivery,
    out: &(dyn Fn() -> Outgoing + Sync),
    first: crate::transport::Error,
) -> Result<PublishAck, Unstored> {
    let began = tokio::time::Instant::now();
    let tries = async move {
        let mut e = first;
        let mut tries = 0u32;
        loop {
            if !e.is_unavailable() || shared.cancel.is_cancelled() {
                return Err(Unstored::Failed(e));
            }
            if began.elapsed() >= shared.unavailable_limit {
                return Err(Unstored::OverLimit(e));
            }
            tries += 1;
            WorkerStats::bump(&shared.stats.publish_retries);
            if let Some(m) = &shared.metrics {
                m.unavailable_retry(&svc.service);
            }
            let wait = transition::unavailable_delay(tries, fastrand::f64());
            if tries == 1 || tries.is_power_of_two() {
                tracing::warn!(error = %e, tries, retry_in = ?wait, "the next hop was not stored; trying again");
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.cancel.cancelled() => return Err(Unstored::Failed(e)),
            }
            e = match shared.transport.publish(out()).await {
                Ok(ack) => return Ok(ack),
                Err(e) => e,
            };
        }
    };
    keep_alive(std::pin::pin!(tries), delivery, shared.ack_wait).await
}

/// How long to wait before trying a step again whose next hop could not be
/// stored: doubling from 250 ms up to 10 s, so the deliveries a message has
/// (10 by default) outlast a stream leader's election or a server restart
/// (about 45 s in all) before it becomes a dead letter.
pub(super) fn publish_retry_delay(delivered: u32) -> Duration {
    let doublings = delivered.saturating_sub(1).min(6);
    (Duration::from_millis(250) * (1 << doublings)).min(Duration::from_secs(10))
}

/// Hands a delivery back for later, unless its deliveries are used up, in
/// which case it becomes a dead letter.
pub(super) async fn hand_back<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    delivery: <T::Consumer as Consumer>::Delivery,
    delay: Option<Duration>,
    why: &str,
) {
    if delivery.delivered() >= shared.max_deliver {
        let reason = format!(
            "{why}, on delivery {} of at most {}",
            delivery.delivered(),
            shared.max_deliver
        );
        return dead_letter(shared, svc, delivery, DeadLetterKind::Exhausted, reason).await;
    }
    WorkerStats::bump(&shared.stats.naks);
    if let Err(e) = delivery.nak(delay).await {
        tracing::warn!(error = %e, "nak failed; the ack deadline will bring the message back");
    }
}

pub(super) async fn dead_letter<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    delivery: <T::Consumer as Consumer>::Delivery,
    kind: DeadLetterKind,
    reason: String,
) {
    tracing::warn!(service = %svc.service, %kind, %reason, "dead-lettering a message");
    let letter = DeadLetter {
        message: delivery.message().clone(),
        kind,
        reason,
        consumer: subject::service_consumer(&svc.service),
    };
    match shared.transport.dead_letter(letter).await {
        Ok(()) => {
            WorkerStats::bump(&shared.stats.dead_lettered);
            if let Some(m) = &shared.metrics {
                m.dead_letter(kind);
            }
            if let Err(e) = delivery.term().await {
                tracing::warn!(error = %e, "term failed after dead-lettering");
            }
        }
        Err(e) => {
            // Never drop: leave it for a later delivery to try again.
            tracing::error!(error = %e, "could not store the dead letter; handing the message back");
            let _ = delivery.nak(Some(Duration::from_secs(1))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn publish_retries_back_off_to_ten_seconds() {
        let d: Vec<u128> = (1..=10).map(|n| super::publish_retry_delay(n).as_millis()).collect();
        assert_eq!(d, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000, 10000, 10000]);
        assert!(d.iter().sum::<u128>() > 40_000);
    }
}
