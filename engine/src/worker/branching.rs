//! Forks and joins at a hop: the order's document entering a fork (a hop
//! of its own, to the fork's first step: [`fork`]), and a branch's
//! document arriving at its join (a hop of its own too, to the service of
//! the step it ended at: [`arrive`]). The join's record is read and
//! written ([`crate::join`]) before any hop that follows is stored, and
//! the input is acknowledged after every one is: a redelivery does the
//! same again, and its hops carry the same deduplication ids. And a
//! redelivery of an earlier hop that goes another way (a cancel, a stop, a
//! retry) makes a hop with the id of the one that was stored: a duplicate.

use std::time::Duration;

use super::handle::{Service, Shared};
use super::handoff::{encode_hop, hand_off, Unstored};
use super::run::keep_alive;
use crate::document::{Document, Timestamp};
use crate::join::{self, JoinState, PayloadJson};
use crate::transition::{self, Decision};
use crate::transport::{Delivery, Error, Transport};

/// The order's document `doc` entering fork `f`: writes the join's
/// record (unless a delivery before this one did), then stores one
/// document per branch.
pub(super) async fn fork<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    doc: &Document,
    f: usize,
    delivery: &impl Delivery,
) -> Result<(), Unstored> {
    let fork = u8::try_from(f).unwrap_or(u8::MAX);
    let state = JoinState {
        base: doc.clone(),
        arrivals: Vec::new(),
    };
    let bytes = join::encode(&shared.codec, &state).map_err(invalid)?;
    let t = &shared.transport;
    if !retrying(shared, delivery, || t.put_join_state(doc.id, fork, bytes.clone(), 0)).await? {
        tracing::debug!(order = %doc.id, fork, "the join's record was there already (a redelivery)");
    }
    let at = doc.history.last().map_or_else(Timestamp::now, |r| r.ended_at);
    store_all(shared, svc, delivery, join::branches(doc, f, at)).await
}

/// A branch's document `doc` arriving at its join: records it (once: a
/// redelivery finds it there) and stores what follows, by the record.
pub(super) async fn arrive<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    doc: &Document,
    delivery: &impl Delivery,
) -> Result<(), Unstored> {
    let Some(at) = doc.branch else {
        return Err(Unstored::Invalid("only a branch's document arrives at a join".into()));
    };
    let t = &shared.transport;
    let state = loop {
        let Some((mut state, revision)) = read(shared, delivery, doc, at.fork).await? else {
            return Err(Unstored::Invalid(format!(
                "order {} has no record of its join of fork {}",
                doc.id, at.fork
            )));
        };
        if let Some(there) = state.arrivals.iter().find(|a| a.branch.map(|b| b.branch) == Some(at.branch)) {
            if there.hop != doc.hop {
                // An arrival from a delivery older than the one recorded,
                // stored once the duplicate window had passed: nothing.
                tracing::warn!(order = %doc.id, fork = at.fork, branch = at.branch, "an old arrival at a join, ignored");
                return Ok(());
            }
            break state;
        }
        join::record(&mut state, doc);
        let bytes = join::encode(&shared.codec, &state).map_err(invalid)?;
        if retrying(shared, delivery, || t.put_join_state(doc.id, at.fork, bytes.clone(), revision)).await? {
            tracing::debug!(order = %doc.id, fork = at.fork, branch = at.branch, status = %doc.status, "arrived at the join");
            break state;
        }
        // Another branch arrived meanwhile: read again.
    };
    let out = join::follow(&state, usize::from(at.fork), at.branch, &Json(shared));
    // The arrival that decided the join without every branch wakes those
    // asleep (a delay, a signal): they stop at once.
    let fork = doc.route.forks.get(usize::from(at.fork));
    let decided_by_me = match fork.map(|f| join::verdict(f, &state.arrivals)) {
        Some(join::Verdict::Fail { by } | join::Verdict::GoOn { by }) => {
            state.arrivals[by].branch.map(|b| b.branch) == Some(at.branch)
        }
        _ => false,
    };
    if decided_by_me && state.arrivals.len() < fork.map_or(0, |f| f.starts.len()) {
        wake(shared, doc).await;
    }
    store_all(shared, svc, delivery, out).await
}

/// Stores each hop (a branch's, the order's past its join, a branch's
/// undoing), in order.
async fn store_all<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    delivery: &impl Delivery,
    hops: Vec<(Document, Decision)>,
) -> Result<(), Unstored> {
    for (mut doc, decision) in hops {
        let decision =
            transition::wait_until(&mut doc, |d| super::handoff::payload_json(shared, d)).unwrap_or(decision);
        // A merge may outgrow the size limit.
        let hop = encode_hop(shared, &doc, &decision)
            .map_err(|e| Unstored::Invalid(format!("a hop past a fork or join: {e}")))?;
        hand_off(shared, svc, &doc, &hop, delivery).await?;
        if doc.awaited_signal().is_some() {
            Box::pin(super::process::wake_if_signalled(shared, &doc)).await;
        }
    }
    Ok(())
}

/// Wakes the order's hops asleep (its branches'), so that they stop.
async fn wake<T: Transport>(shared: &Shared<T>, doc: &Document) {
    if let Err(e) = shared.transport.wake(doc.id, None).await {
        tracing::warn!(order = %doc.id, error = %e, "could not wake the branches asleep; they stop when they wake");
    }
}

/// After a branch's hop that sleeps was stored: if its join was decided
/// meanwhile (whose wake came before it slept), wakes it to stop now.
pub(super) async fn wake_if_stopped<T: Transport>(shared: &Shared<T>, doc: &Document) {
    let (Some(at), Some(fork)) = (doc.branch, doc.branch.and_then(|b| doc.route.forks.get(usize::from(b.fork)))) else {
        return;
    };
    match shared.transport.join_state(&doc.id, at.fork).await {
        Ok(Some((bytes, _))) => {
            let stopped = join::decode(&shared.codec, &bytes)
                .ok()
                .and_then(|state| join::stop_reason(fork, &state, at.branch));
            if stopped.is_some() {
                wake(shared, doc).await;
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(order = %doc.id, error = %e, "could not read the join's record; the branch stops when it wakes"),
    }
}

/// The join's record of `fork`, read (and retried while the store is
/// unavailable).
async fn read<T: Transport>(
    shared: &Shared<T>,
    delivery: &impl Delivery,
    doc: &Document,
    fork: u8,
) -> Result<Option<(JoinState, u64)>, Unstored> {
    let t = &shared.transport;
    let Some((bytes, revision)) = retrying(shared, delivery, || t.join_state(&doc.id, fork)).await? else {
        return Ok(None);
    };
    let state = join::decode(&shared.codec, &bytes).map_err(invalid)?;
    Ok(Some((state, revision)))
}

/// Why a branch's document stops at this hop, if it does: its join was
/// decided without it. `Err` when the record cannot be read.
pub(super) async fn stop_reason<T: Transport>(
    shared: &Shared<T>,
    delivery: &impl Delivery,
    doc: &Document,
) -> Result<Option<String>, Unstored> {
    let Some(at) = doc.branch else {
        return Ok(None);
    };
    let Some(fork) = doc.route.forks.get(usize::from(at.fork)) else {
        return Ok(None);
    };
    Ok(read(shared, delivery, doc, at.fork)
        .await?
        .and_then(|(state, _)| join::stop_reason(fork, &state, at.branch)))
}

/// Runs a store operation, waiting out an unavailable store with capped
/// backoff (the delivery kept alive) up to the worker's limit.
async fn retrying<T, R, F, Fut>(shared: &Shared<T>, delivery: &impl Delivery, op: F) -> Result<R, Unstored>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<R, Error>>,
{
    let began = tokio::time::Instant::now();
    let tries = async move {
        let mut tries = 0u32;
        loop {
            let e = match op().await {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            if !e.is_unavailable() && !e.is_retryable() {
                return Err(Unstored::Failed(e));
            }
            if began.elapsed() >= shared.unavailable_limit {
                return Err(Unstored::OverLimit(e));
            }
            tries += 1;
            let wait: Duration = transition::unavailable_delay(tries, fastrand::f64());
            tracing::warn!(error = %e, tries, "a join's record could not be read or written; trying again");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.cancel.cancelled() => return Err(Unstored::Failed(e)),
            }
        }
    };
    keep_alive(std::pin::pin!(tries), delivery, shared.ack_wait).await
}

fn invalid(e: join::JoinError) -> Unstored {
    Unstored::Invalid(e.to_string())
}

/// Payloads as JSON for a merge: as they are, or through the worker's
/// registry.
struct Json<'a, T>(&'a Shared<T>);

impl<T> PayloadJson for Json<'_, T> {
    fn to_json(&self, doc: &Document, payload: &crate::document::Payload) -> Result<serde_json::Value, String> {
        let mut d = doc.clone();
        d.payload = payload.clone();
        super::handoff::payload_json(self.0, &d)
    }

    fn to_payload(&self, doc: &Document, json: &serde_json::Value) -> Result<crate::document::Payload, String> {
        let bytes = serde_json::to_vec(json).map_err(|e| e.to_string())?;
        match &self.0.registry {
            Some(r) => r
                .prepare_json(doc.route.workflow.as_str(), &bytes)
                .map(|(_, p)| p)
                .map_err(|e| e.to_string()),
            None if doc.payload.content_type == crate::document::ContentType::Json => Ok(crate::document::Payload {
                content_type: crate::document::ContentType::Json,
                bytes,
            }),
            None => Err(format!(
                "the merged payload cannot be written as {} without the worker's registry",
                doc.payload.content_type.as_str()
            )),
        }
    }
}

