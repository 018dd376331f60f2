//! Every `check_every`: drops finished orders past the retention, reports
//! orders newly stalled (on `waybill.stalled.<workflow>` and in the log),
//! and re-drives the hops nothing will deliver again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::api::{StallAction, StalledEvent};
use super::requests::json;
use super::view::OrderState;
use super::Shared;
use crate::document::Timestamp;
use crate::headers;
use crate::id::{DedupId, MsgId, ServiceSubject};
use crate::subject;
use crate::transport::{ConsumerPosition, Error as TransportError, Headers, HopLog, Outgoing, Rpc};

/// Stalled orders logged one by one per round; the rest are counted.
const LOGGED: usize = 20;

pub(super) async fn watch<T: HopLog + Rpc>(shared: Arc<Shared<T>>, cancel: CancellationToken) {
    // A half-replayed view would call orders stalled that only lack their
    // later hops: look only once caught up.
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = shared.tracker.wait_caught_up() => {}
    }
    let mut tick = tokio::time::interval(shared.config.check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_log = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let checked = shared.tracker.check(Timestamp::now(), shared.config.stall_grace);
        // One look at each service's consumer per round.
        let mut consumers = HashMap::new();
        for (n, s) in checked.fresh.iter().enumerate() {
            let Some(service) = &s.service else { continue };
            if !consumers.contains_key(service) {
                let position = consumer_of(&shared.transport, service).await;
                consumers.insert(service.clone(), position);
            }
            let (action, why) = act(&shared, &consumers[service], s).await;
            // For alerting: one event per order and hop that stalls.
            let event = StalledEvent::new(s, action, why.clone());
            if let Err(e) = shared
                .transport
                .announce(subject::stalled(&s.workflow), json(&event))
                .await
            {
                tracing::warn!(error = %e, "could not publish a stalled event");
            }
            if n < LOGGED {
                tracing::warn!(
                    order = %s.id,
                    workflow = %s.workflow,
                    step = %s.step,
                    service = %service,
                    hop = s.hop,
                    sequence = s.sequence,
                    since = %super::api::rfc3339(s.last_hop_at),
                    "order stalled: no hop past its step's deadline; {why}"
                );
            }
        }
        if checked.fresh.len() > LOGGED {
            tracing::warn!(
                more = checked.fresh.len() - LOGGED,
                stalled = checked.stalled,
                "more orders stalled (see `waybill orders --stalled`)"
            );
        }
        if last_log.elapsed() >= Duration::from_secs(30) {
            last_log = Instant::now();
            let f = shared.tracker.feed_stats();
            tracing::info!(
                tracked = checked.tracked,
                in_flight = checked.in_flight,
                stalled = checked.stalled,
                hops_read = f.hops_read,
                undecodable = f.undecodable,
                redriven = f.redriven,
                view_bytes = f.view_bytes,
                "coordinator"
            );
        }
    }
}

/// What is done about one stalled order, and why.
async fn act<T: HopLog + Rpc>(
    shared: &Shared<T>,
    consumer: &Result<Option<ConsumerPosition>, String>,
    s: &OrderState,
) -> (StallAction, String) {
    match diagnose(consumer, s) {
        Diagnosis::Passed if shared.config.redrive => match redrive(shared, s).await {
            Ok(true) => (
                StallAction::Redriven,
                "its service's consumer moved past the hop without a next hop; re-driven".to_owned(),
            ),
            Ok(false) => (
                StallAction::Reported,
                "it moved on while being looked at, or was re-driven once already (see the dead letters)".to_owned(),
            ),
            Err(e) => {
                // Look again next round.
                shared.tracker.forget_reported(&s.id);
                (StallAction::Reported, format!("re-drive failed: {e}"))
            }
        },
        Diagnosis::Passed => (
            StallAction::Reported,
            "its service's consumer moved past the hop without a next hop".to_owned(),
        ),
        Diagnosis::Waiting(why) => (StallAction::Reported, why),
    }
}

/// Why a stalled order is where it is, as far as its service's consumer
/// tells.
enum Diagnosis {
    /// The consumer has moved past the hop without a next hop appearing:
    /// nothing will deliver it again.
    Passed,
    Waiting(String),
}

/// Where the durable consumer of `service` stands: `None` if there is none.
async fn consumer_of<T: HopLog>(transport: &T, service: &ServiceSubject) -> Result<Option<ConsumerPosition>, String> {
    let durable = subject::service_consumer(service);
    transport
        .consumer_position(&durable)
        .await
        .map_err(|e| format!("consumer {durable} could not be read: {e}"))
}

fn diagnose(consumer: &Result<Option<ConsumerPosition>, String>, state: &OrderState) -> Diagnosis {
    let service = state.service.as_ref().map_or("?", |s| s.as_str());
    match consumer {
        Err(e) => Diagnosis::Waiting(e.clone()),
        Ok(None) => Diagnosis::Waiting(format!(
            "no worker has ever served `{service}`: the hop waits in the stream for the first one"
        )),
        Ok(Some(p)) if p.ack_floor >= state.sequence => Diagnosis::Passed,
        Ok(Some(p)) if p.delivered < state.sequence => {
            if p.waiting == 0 {
                Diagnosis::Waiting(format!("no worker of `{service}` is pulling from {}", p.durable))
            } else {
                Diagnosis::Waiting(format!("queued: {} hops wait for `{service}`", p.pending))
            }
        }
        Ok(Some(_)) => Diagnosis::Waiting(format!("delivered to a worker of `{service}`, not yet acknowledged")),
    }
}

/// Why a re-drive could not be done now.
#[derive(Debug, thiserror::Error)]
enum RedriveError {
    #[error("the view is behind the stream; trying again later")]
    Behind,
    #[error("the hop (sequence {0}) is no longer in the stream")]
    Gone(u64),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Republishes the order's latest hop as it was stored, under a new
/// deduplication id: the worker's own next hop keeps its usual id, so a
/// re-drive never doubles a step's output.
async fn redrive<T: HopLog>(shared: &Shared<T>, state: &OrderState) -> Result<bool, RedriveError> {
    // The consumer is past the hop; make sure the view has read every hop
    // stored before that was looked at, so a next hop it simply had not read
    // yet does not pass for a missing one.
    let last = shared.transport.log_info().await?.last_sequence;
    if !shared.tracker.reached(last, Duration::from_secs(5)).await {
        return Err(RedriveError::Behind);
    }
    let current = shared.tracker.get(&state.id);
    if current.as_ref().map(|c| c.sequence) != Some(state.sequence) {
        return Ok(false);
    }
    let m = shared
        .transport
        .get(state.sequence)
        .await?
        .ok_or(RedriveError::Gone(state.sequence))?;
    // At most one re-drive per hop: a re-driven hop that was passed over
    // again (a worker dead-lettered it, say) is reported, not republished
    // in a loop.
    if m.message.headers.get(headers::REDRIVE).is_some() {
        shared.tracker.redrive_refused.fetch_add(1, Ordering::Relaxed);
        return Ok(false);
    }
    let mut h = Headers::with_capacity(m.message.headers.len() + 1);
    for (name, value) in m
        .message
        .headers
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case(headers::MSG_ID) && !headers::is_schedule_header(n))
    {
        h.append(name.to_owned(), value);
    }
    h.insert(headers::REDRIVE, state.sequence.to_string());
    // A hop stored to wait (`waybill.timer.<order>`) and past due: to the
    // service its header names.
    let subject = if m.message.subject.starts_with(crate::subject::TIMER_PREFIX) {
        let service = m
            .message
            .headers
            .get(headers::HOP)
            .and_then(|v| headers::HopHeader::parse(v).and_then(|h| h.service))
            .and_then(|s| crate::id::ServiceSubject::new(s).ok());
        match service {
            Some(s) => crate::subject::hop(&s),
            None => return Ok(false),
        }
    } else {
        m.message.subject
    };
    shared
        .transport
        .publish(Outgoing {
            subject,
            msg_id: Some(MsgId::redrive(
                DedupId::main(state.id, state.hop),
                state.sequence,
            )),
            headers: h,
            payload: m.message.payload,
            due: None,
        })
        .await?;
    shared.tracker.redriven.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}
