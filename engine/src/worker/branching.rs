//! Forks and joins at a hop: the order's document forking into its
//! branches, a branch's document arriving at its join, and a branch's
//! document stopped because its join was decided without it. The join's
//! record is read and written ([`crate::join`]) before any hop is stored,
//! and the input is acknowledged after every hop is: a redelivery does the
//! same again, and its hops carry the same deduplication ids.

use std::time::Duration;

use super::handle::{Service, Shared};
use super::handoff::{encode_hop, hand_off, NextHop, Unstored};
use super::run::keep_alive;
use crate::document::{Document, Timestamp};
use crate::join::{self, JoinState, PayloadJson};
use crate::transition::{self, Decision};
use crate::transport::{Delivery, Error, PublishAck, Transport};

/// Most forks a join may lead straight into, one after another, in one
/// hand-off (a route cannot loop across a join, so a route's forks bound
/// it anyway).
const MAX_CHAINED: usize = 64;

/// Does what `decision` (a fork, or a branch's arrival at its join) asks
/// of `doc`, and stores every hop that follows. The caller acknowledges
/// the input once this returns `Ok`.
pub(super) async fn follow<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    doc: &Document,
    decision: Decision,
    delivery: &impl Delivery,
) -> Result<PublishAck, Unstored> {
    let mut todo = vec![(doc.clone(), decision)];
    let mut done = 0usize;
    while let Some((mut doc, decision)) = todo.pop() {
        done += 1;
        if done > MAX_CHAINED {
            return Err(Unstored::Failed(Error::BadConfig(
                "a join leads into more forks than a route can hold".into(),
            )));
        }
        match decision {
            Decision::Fork(f) => {
                fork(shared, delivery, &doc, f).await?;
                let at = doc.history.last().map_or_else(Timestamp::now, |r| r.ended_at);
                todo.extend(join::branches(&doc, f, at));
            }
            Decision::Arrive => todo.extend(arrive(shared, delivery, &doc).await?),
            decision => {
                let decision = transition::wait_until(&mut doc, |d| super::handoff::payload_json(shared, d))
                    .unwrap_or(decision);
                match encode_hop(shared, &doc, &decision) {
                    Ok(NextHop::Store { subject, body }) => {
                        hand_off(shared, svc, &doc, (&subject, &body), delivery).await?;
                        if doc.awaited_signal().is_some() {
                            Box::pin(super::process::wake_if_signalled(shared, &doc)).await;
                        }
                    }
                    Ok(NextHop::Branching(d)) => todo.push((doc, d)),
                    // A merge may outgrow the size limit.
                    Err(e) => return Err(Unstored::Invalid(format!("a hop past a fork or join: {e}"))),
                }
            }
        }
    }
    Ok(PublishAck {
        sequence: 0,
        duplicate: false,
    })
}

/// Writes the join's record of fork `f` with the order's document as it
/// forks, unless it is there already (a redelivery).
async fn fork<T: Transport>(shared: &Shared<T>, delivery: &impl Delivery, doc: &Document, f: usize) -> Result<(), Unstored> {
    let fork = u8::try_from(f).unwrap_or(u8::MAX);
    let state = JoinState {
        base: doc.clone(),
        arrivals: Vec::new(),
    };
    let bytes = join::encode(&shared.codec, &state).map_err(invalid)?;
    let t = &shared.transport;
    let written = retrying(shared, delivery, || t.put_join_state(doc.id, fork, bytes.clone(), 0)).await?;
    if !written {
        tracing::debug!(order = %doc.id, fork, "the join's record was there already (a redelivery)");
    }
    Ok(())
}

/// Records the arrival of a branch's document at its join (once: a
/// redelivery finds it there) and returns what follows, by the record.
async fn arrive<T: Transport>(
    shared: &Shared<T>,
    delivery: &impl Delivery,
    doc: &Document,
) -> Result<Vec<(Document, Decision)>, Unstored> {
    let Some(at) = doc.branch else {
        return Err(Unstored::Invalid("only a branch's document arrives at a join".into()));
    };
    let t = &shared.transport;
    loop {
        let Some((mut state, revision)) = read(shared, delivery, doc, at.fork).await? else {
            return Err(Unstored::Invalid(format!(
                "order {} has no record of its join of fork {}",
                doc.id, at.fork
            )));
        };
        if join::record(&mut state, doc) {
            let bytes = join::encode(&shared.codec, &state).map_err(invalid)?;
            if !retrying(shared, delivery, || t.put_join_state(doc.id, at.fork, bytes.clone(), revision)).await? {
                // Another branch arrived meanwhile: read again.
                continue;
            }
            tracing::debug!(order = %doc.id, fork = at.fork, branch = at.branch, status = %doc.status, "arrived at the join");
        }
        let out = join::follow(&state, usize::from(at.fork), at.branch, &Json(shared));
        // The arrival that decided the join without every branch wakes
        // those asleep (a delay, a signal): they stop at once.
        let branches = doc.route.forks.get(usize::from(at.fork)).map_or(0, |f| f.starts.len());
        let decided_by_me = match doc.route.forks.get(usize::from(at.fork)).map(|f| join::verdict(f, &state.arrivals)) {
            Some(join::Verdict::Fail { by } | join::Verdict::GoOn { by }) => {
                state.arrivals[by].branch.map(|b| b.branch) == Some(at.branch)
            }
            _ => false,
        };
        if decided_by_me && state.arrivals.len() < branches {
            if let Err(e) = t.wake(doc.id, None).await {
                tracing::warn!(order = %doc.id, error = %e, "could not wake the branches asleep; they stop when they wake");
            }
        }
        return Ok(out);
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

