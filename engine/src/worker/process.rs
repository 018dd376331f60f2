//! One delivery, in three phases: admit (decode and check it: [`admit`]),
//! run (the handler under its deadline, folded into an attempt: [`run`]) and
//! hand off (the attempt applied and the next hop encoded, [`next_hop`];
//! stored, [`hand_off`]; then the input acknowledged).

use std::fmt;

use tracing::Instrument;

use super::handle::{Service, Shared, WorkerStats};
use super::handoff::{cancel_hop, dead_letter, hand_back, hand_off, hop_for, next_hop, publish_retry_delay, Unstored};
use super::run::{prepare, run, Ran};
use crate::codec::DecodeError;
use crate::document::{Document, Status, Timestamp};
use crate::headers::{self, HeaderError};
use crate::id::{OrderId, ServiceSubject, WorkflowName};
use crate::transport::{Consumer, DeadLetterKind, Delivery, Transport};

/// Takes one delivery through its three phases: [`admit`] it, [`run`] its
/// step, and hand the next hop off ([`next_hop`], [`hand_off`]), then
/// acknowledge it. Every way out that is not the usual one (a rejection, a
/// wait past the limit, a deferral, a hop that cannot be made or stored)
/// ends in a dead letter or hands the delivery back.
///
/// The slow paths' futures are boxed so that they do not weigh on every
/// step's future; the delivery is owned here alone, and the phases borrow
/// it (a NATS delivery is a few hundred bytes).
pub(super) async fn process<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    delivery: <T::Consumer as Consumer>::Delivery,
) {
    let mut doc = match admit(shared, svc, &delivery) {
        Ok(doc) => doc,
        Err(why) => return Box::pin(dead_letter(shared, svc, delivery, why.kind(), why.to_string())).await,
    };
    // The order's document entering a fork, and a branch's arriving at its
    // join: the join's record is written, and the hops that follow stored.
    // (A cancel reaches the branches: each stops at its first hop.)
    let branching = if crate::join::arriving(&doc) {
        Some(Box::pin(super::branching::arrive(shared, svc, &doc, &delivery)).await)
    } else if let Some(f) = crate::join::forking(&doc) {
        Some(Box::pin(super::branching::fork(shared, svc, &doc, f, &delivery)).await)
    } else {
        None
    };
    if let Some(done) = branching {
        return match done {
            Ok(()) => {
                if let Err(e) = delivery.ack().await {
                    tracing::warn!(error = %e, "ack failed");
                }
            }
            Err(e) => Box::pin(unstored(shared, svc, delivery, e)).await,
        };
    }
    // A cancel applies before the step, and before a retry's due time: an
    // order asleep stops too. A hop woken from its wait by a cancel says so
    // itself (it may come before the cancel reaches this worker).
    let cancel = shared
        .transport
        .cancel_requested(&doc.id)
        .or_else(|| delivery.message().headers.get(headers::CANCEL).map(str::to_owned));
    if let Some(reason) = cancel {
        match cancel_hop(shared, &mut doc, reason) {
            Ok(Some(hop)) => {
                tracing::info!(order = %doc.id, "cancelled at this hop");
                if let Some(m) = &shared.metrics {
                    m.hop(&svc.service, "cancelled");
                }
                return Box::pin(store_and_ack(shared, svc, &doc, hop, delivery)).await;
            }
            Ok(None) => {}
            Err(e) => {
                let why = e.to_string();
                return Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Invalid, why)).await;
            }
        }
    }
    // A branch whose join was decided without it stops here, asleep or
    // not: it arrives at the join, owing what it owes.
    if doc.branch.is_some() && doc.status == Status::Running {
        match Box::pin(super::branching::stop_reason(shared, &delivery, &doc)).await {
            Ok(None) => {}
            Ok(Some(why)) => {
                tracing::info!(order = %doc.id, %why, "a branch stops at this hop");
                crate::join::stop(&mut doc, why);
                let hop = super::handoff::encode_hop(shared, &doc, &crate::transition::Decision::Arrive);
                return match hop {
                    Ok(hop) => Box::pin(store_and_ack(shared, svc, &doc, hop, delivery)).await,
                    Err(e) => {
                        let why = e.to_string();
                        Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Invalid, why)).await
                    }
                };
            }
            Err(e) => return Box::pin(unstored(shared, svc, delivery, e)).await,
        }
    }
    if doc.awaited_signal().is_some() {
        match Box::pin(await_signal(shared, &mut doc, delivery.delivered())).await {
            Awaited::Run => {}
            Awaited::Hop(Ok(hop)) => return Box::pin(store_and_ack(shared, svc, &doc, hop, delivery)).await,
            Awaited::Hop(Err(e)) => {
                let why = e.to_string();
                return Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Invalid, why)).await;
            }
            Awaited::NotDue(delay) => {
                return Box::pin(hand_back(shared, svc, delivery, Some(delay), "not due yet")).await;
            }
            Awaited::Sleep(delay) => {
                Box::pin(hand_back(shared, svc, delivery, Some(delay), "waiting for a signal")).await;
                // A signal delivered while this worker looked finds no hop
                // asleep to wake: look again now that it sleeps. (This is
                // the embedded default's way to wait, where every hop comes
                // at once. Over NATS a waiting hop comes early only when a
                // wake found its signal, so this is rare there; a hop
                // handed back is then no timer, and wakes at its deadline.)
                return Box::pin(wake_if_signalled(shared, &doc)).await;
            }
            Awaited::Failed(why) => {
                return Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Invalid, why)).await;
            }
        }
    }
    if let Some(due) = doc.not_before {
        let now = Timestamp::now();
        if due > now {
            return Box::pin(hand_back(shared, svc, delivery, Some(due.since(now)), "not due yet")).await;
        }
    }
    let Some((ctx, timeout, span)) = prepare(shared, &doc) else {
        return;
    };
    async {
        let attempt = match run(shared, svc, &mut doc, ctx, timeout, &delivery).await {
            Ran::Attempt(attempt) => {
                if let Some(m) = &shared.metrics {
                    let took = attempt.ended_at.since(attempt.started_at).as_secs_f64();
                    m.step(&svc.service, &attempt.result, took);
                }
                attempt
            }
            Ran::OverLimit(reason) => {
                return Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Unavailable, reason)).await
            }
            Ran::Deferred { delay, why } => {
                if let Some(m) = &shared.metrics {
                    m.hop(&svc.service, "deferred");
                }
                return Box::pin(hand_back(shared, svc, delivery, Some(delay), &why)).await;
            }
        };
        let hop = match next_hop(shared, &mut doc, attempt) {
            Ok(hop) => hop,
            Err(e) => {
                return Box::pin(dead_letter(
                    shared,
                    svc,
                    delivery,
                    DeadLetterKind::Invalid,
                    e.to_string(),
                ))
                .await
            }
        };
        store_and_ack(shared, svc, &doc, hop, delivery).await
    }
    .instrument(span)
    .await
}

/// What the wait for a signal came to, at a hop of a step that waits for
/// one.
enum Awaited {
    /// The signal is there (recorded in the document): run the step.
    Run,
    /// The next hop: the wait timed out, or the signal could not be read
    /// (an unavailable store: tried again, not an attempt).
    Hop(Result<super::handoff::NextHop, super::handoff::NoNextHop>),
    /// Not there, and the deadline is this far off: hand the hop back.
    Sleep(std::time::Duration),
    /// A retry of the look-up (its store was unavailable), due in this
    /// long: hand the hop back, unread.
    NotDue(std::time::Duration),
    /// The signal cannot be read here at all.
    Failed(String),
}

/// Looks for the signal the document's step waits for: recorded in the
/// document if it came; the route's way on if its deadline passed.
async fn await_signal<T: Transport>(shared: &Shared<T>, doc: &mut Document, delivered: u32) -> Awaited {
    let Some((name, deadline)) = doc.awaited_signal().map(|a| (a.name.clone(), a.deadline)) else {
        return Awaited::Run;
    };
    // A hop due before its deadline is a retry's backoff, not the wait:
    // honoured, or a store that cannot be read would be asked again at
    // once. Unless it comes again early: then it was woken, by someone who
    // read the signal (so the store answers again).
    let now = Timestamp::now();
    if let Some(due) = doc
        .not_before
        .filter(|due| *due > now && *due != deadline && delivered == 1)
    {
        return Awaited::NotDue(due.since(now));
    }
    let found = shared.transport.signal(&doc.id, &name).await;
    let now = Timestamp::now();
    let ended = match found {
        // Kept in time, however late this hop is read; or read before the
        // deadline (a store's clock a little ahead is no reason to wait).
        Ok(Some(s)) if s.at <= deadline || now < deadline => {
            tracing::debug!(order = %doc.id, signal = %name, "signal received");
            Some(s.data)
        }
        Ok(Some(_)) => {
            tracing::info!(order = %doc.id, signal = %name, "the signal came after its deadline");
            None
        }
        Ok(None) if deadline > now => return Awaited::Sleep(deadline.since(now)),
        Ok(None) => None,
        // A store that cannot answer for now (or says to ask again) is
        // waited out, never a dead letter.
        Err(e) if e.is_unavailable() || e.is_retryable() => {
            let attempt = crate::transition::Attempt {
                result: crate::transition::StepResult::Unavailable(format!("signal `{name}` cannot be read: {e}")),
                worker: shared.worker.clone(),
                started_at: now,
                ended_at: now,
                jitter: fastrand::f64(),
            };
            return Awaited::Hop(next_hop(shared, doc, attempt));
        }
        Err(e) => return Awaited::Failed(format!("signal `{name}` cannot be read: {e}")),
    };
    match crate::transition::signal(doc, ended, shared.worker.clone(), now) {
        Ok(None) => Awaited::Run,
        // Its way on may enter a step that waits until a payload time.
        Ok(Some(decision)) => Awaited::Hop(hop_for(shared, doc, decision)),
        Err(e) => Awaited::Failed(e.to_string()),
    }
}

/// Wakes the order of `doc` if the signal its step waits for is there: a
/// hop just stored (or handed back) to wait for it may have missed the
/// wake of its delivery.
/// A store that does not answer is asked again a few times (about a
/// second in all) before the order is left to its deadline.
pub(super) async fn wake_if_signalled<T: Transport>(shared: &Shared<T>, doc: &Document) {
    const TRIES: u32 = 5;
    let Some(name) = doc.awaited_signal().map(|a| a.name) else {
        return;
    };
    for tries in 1..=TRIES {
        let e = match shared.transport.signal(&doc.id, name).await {
            Ok(None) => return,
            Ok(Some(_)) => match shared.transport.wake(doc.id, Some(name)).await {
                Ok(()) => return,
                Err(e) => e,
            },
            Err(e) => e,
        };
        if !e.is_retryable() || tries == TRIES {
            tracing::warn!(order = %doc.id, error = %e, "could not wake an order for its signal; it wakes at its deadline");
            return;
        }
        tokio::time::sleep(crate::transition::unavailable_delay(tries, fastrand::f64())).await;
    }
}

/// Stores the next hop, then acknowledges the input; or hands the input
/// back, or makes it a dead letter, when the hop cannot be stored.
async fn store_and_ack<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    doc: &Document,
    hop: super::handoff::NextHop,
    delivery: <T::Consumer as Consumer>::Delivery,
) {
    match hand_off(shared, svc, doc, &hop, &delivery).await {
        Ok(ack) => {
            WorkerStats::bump(if ack.duplicate {
                &shared.stats.duplicates
            } else {
                &shared.stats.published
            });
            if let Err(e) = delivery.ack().await {
                // The output is stored; a redelivery will be a duplicate.
                tracing::warn!(error = %e, "ack failed");
            }
            // Boxed, and only for a hop that waits for a signal: its state
            // would weigh on every step's future.
            if doc.awaited_signal().is_some() {
                Box::pin(wake_if_signalled(shared, doc)).await;
            }
            // A branch that goes to sleep after its join was decided
            // without it (the decision's wake came before it slept) is
            // woken to stop now.
            if doc.branch.is_some() && doc.not_before.is_some() {
                Box::pin(super::branching::wake_if_stopped(shared, doc)).await;
            }
        }
        Err(e) => Box::pin(unstored(shared, svc, delivery, e)).await,
    }
}

/// Settles a delivery whose next hop was not stored: a dead letter, or
/// handed back to be tried again.
async fn unstored<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    delivery: <T::Consumer as Consumer>::Delivery,
    e: Unstored,
) {
    match e {
        Unstored::OverLimit(e) => {
            let reason = format!(
                "unavailable: the next hop could not be stored for {} s, the limit: {e}; \
                 nothing failed: redrive it once the outage is over",
                shared.unavailable_limit.as_secs()
            );
            Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Unavailable, reason)).await;
        }
        Unstored::Invalid(why) => {
            Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Invalid, why)).await;
        }
        Unstored::Failed(e) => {
            tracing::warn!(error = %e, "publishing the next hop failed");
            let delay = publish_retry_delay(delivery.delivered());
            hand_back(shared, svc, delivery, Some(delay), &format!("publish failed: {e}")).await;
        }
    }
}

/// Why a delivery is not work this worker can do: each becomes a dead
/// letter of the kind [`Rejection::kind`] says, with the reason its
/// `Display` gives.
#[derive(Debug)]
pub(super) enum Rejection {
    /// The body cannot be read (or its content type is missing or unknown).
    Undecodable(DecodeError),
    /// The routing header says otherwise than the body.
    HeadersDisagree(HeaderError),
    /// The order is finished: a terminal document is no work.
    Terminal { id: OrderId, status: Status },
    /// The document's cursor points at no step.
    NoCurrentStep,
    /// The hop is addressed to another service than the one it came on.
    Misaddressed { to: ServiceSubject, on: ServiceSubject },
    /// The worker does not accept this workflow version.
    UnknownVersion { workflow: WorkflowName, version: u32 },
}

impl Rejection {
    /// The kind of dead letter the delivery becomes: every rejection is an
    /// input that cannot be processed as it is.
    pub(super) fn kind(&self) -> DeadLetterKind {
        match self {
            Rejection::Undecodable(_)
            | Rejection::HeadersDisagree(_)
            | Rejection::Terminal { .. }
            | Rejection::NoCurrentStep
            | Rejection::Misaddressed { .. }
            | Rejection::UnknownVersion { .. } => DeadLetterKind::Invalid,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Undecodable(e) => write!(f, "undecodable: {e}"),
            Rejection::HeadersDisagree(e) => write!(f, "headers disagree with the body: {e}"),
            Rejection::Terminal { id, status } => {
                write!(f, "order {id} is already {status}; a terminal document is no work")
            }
            Rejection::NoCurrentStep => f.write_str("document has no current step"),
            Rejection::Misaddressed { to, on } => write!(f, "hop addressed to `{to}` arrived on `{on}`"),
            Rejection::UnknownVersion { workflow, version } => {
                write!(f, "unknown workflow `{workflow}` version {version}")
            }
        }
    }
}

/// Decodes a delivery and checks it is this service's work: the headers
/// agree with the body, the order is running, the hop is addressed here,
/// and (if the worker restricts them) its workflow version is accepted.
fn admit<T>(shared: &Shared<T>, svc: &Service, delivery: &impl Delivery) -> Result<Document, Rejection> {
    let msg = delivery.message();
    let doc = shared
        .codec
        .decode_as(&msg.payload, msg.headers.get(headers::CONTENT_TYPE))
        .map_err(Rejection::Undecodable)?;
    headers::verify(&msg.headers, &doc).map_err(Rejection::HeadersDisagree)?;
    // A branch's arrival at its join is taken by the service of the step
    // its branch ended at.
    let to = if crate::join::arriving(&doc) {
        &doc.route.step(doc.step).ok_or(Rejection::NoCurrentStep)?.service
    } else {
        if doc.status.is_terminal() {
            return Err(Rejection::Terminal {
                id: doc.id,
                status: doc.status,
            });
        }
        doc.target().ok_or(Rejection::NoCurrentStep)?.service
    };
    if to != &svc.service {
        return Err(Rejection::Misaddressed {
            to: to.clone(),
            on: svc.service.clone(),
        });
    }
    if let Some(accept) = &shared.accept {
        if !accept.contains(&(doc.route.workflow.clone(), doc.route.version)) {
            return Err(Rejection::UnknownVersion {
                workflow: doc.route.workflow.clone(),
                version: doc.route.version,
            });
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::Rejection;
    use crate::id::{ServiceSubject, WorkflowName};
    use crate::transport::DeadLetterKind;

    #[test]
    fn rejections_say_why_and_are_invalid_input() {
        let cases = [
            (Rejection::NoCurrentStep, "document has no current step"),
            (
                Rejection::Misaddressed {
                    to: ServiceSubject::new("t.a").unwrap(),
                    on: ServiceSubject::new("t.b").unwrap(),
                },
                "hop addressed to `t.a` arrived on `t.b`",
            ),
            (
                Rejection::UnknownVersion {
                    workflow: WorkflowName::new("order").unwrap(),
                    version: 9,
                },
                "unknown workflow `order` version 9",
            ),
        ];
        for (why, reason) in cases {
            assert_eq!(why.kind(), DeadLetterKind::Invalid);
            assert_eq!(why.to_string(), reason);
        }
    }
}
