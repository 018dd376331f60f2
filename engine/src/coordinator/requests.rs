//! The request API ([`super::api`]): takes requests off the transport and
//! answers each in a task of its own, at most [`MAX_ANSWERING`] at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::api::{
    CancelReply, CancelRequest, ErrorCode, ErrorReply, OrdersQuery, OrdersReply, SignalReply, StartReply, StatusReply,
    DEFAULT_CANCEL_REASON, MAX_CANCEL_REASON, MAX_SIGNAL_BYTES, MAX_START_BYTES,
};
use super::view::Partition;
use super::Shared;
use crate::client::{first_hop, store_first_hop};
use crate::headers;
use crate::id::OrderId;
use crate::subject::{self, CoordinatorRequest};
use crate::transport::{Error as TransportError, Headers, HopLog, Request, Requests, Rpc, Transport};

/// Requests answered at once, at most.
const MAX_ANSWERING: usize = 256;

/// The pause after a start's first unconfirmed try, and the most it
/// doubles to, inside the coordinator's `start_timeout`.
const START_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_millis(500));

pub(super) fn json<T: serde::Serialize>(value: &T) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(v) => Bytes::from(v),
        Err(e) => error(format!("the answer could not be written: {e}")),
    }
}

fn error(message: impl Into<String>) -> Bytes {
    error_reply(&ErrorReply::new(message))
}

fn error_reply(e: &ErrorReply) -> Bytes {
    // Strings, a flag and an id always serialise.
    Bytes::from(serde_json::to_vec(e).unwrap_or_default())
}

/// The answer about an order the coordinator does not track (`id` named in
/// the text when given).
fn unknown_order<T>(shared: &Shared<T>, id: Option<&OrderId>) -> Bytes {
    let named = id.map(|id| format!(" {id}")).unwrap_or_default();
    let text = if shared.tracker.is_caught_up() {
        format!("unknown order{named}")
    } else {
        format!("unknown order{named} (so far: the coordinator is still replaying the hop stream)")
    };
    error_reply(&ErrorReply::coded(ErrorCode::UnknownOrder, text))
}

/// A start refused for cause (`"retryable": false`).
fn refused(message: impl Into<String>) -> Bytes {
    error_reply(&ErrorReply::refused(message))
}

pub(super) async fn serve<T: Transport + HopLog + Rpc>(
    shared: Arc<Shared<T>>,
    mut requests: T::Requests,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_ANSWERING));
    loop {
        let request = tokio::select! {
            _ = cancel.cancelled() => return,
            r = requests.next() => r,
        };
        let Some(request) = request else {
            tracing::error!("the request subscriptions ended; no longer answering requests");
            return;
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        tracker.spawn(async move {
            let answer = answer(&shared, &request).await;
            let subject = request.subject().to_owned();
            if let Err(e) = request.respond(answer).await {
                tracing::warn!(%subject, error = %e, "could not send an answer");
            }
            drop(permit);
        });
    }
}

async fn answer<T: Transport + HopLog + Rpc>(shared: &Shared<T>, request: &impl Request) -> Bytes {
    let subject = request.subject();
    let p = shared.config.partition;
    match CoordinatorRequest::parse(subject, p.index, p.count) {
        Some(CoordinatorRequest::Start { workflow }) => {
            start_order(shared, workflow, request.headers(), request.payload()).await
        }
        Some(CoordinatorRequest::Status { id, public }) => status(shared, id, public).await,
        Some(CoordinatorRequest::Cancel { id, public }) => cancel_order(shared, id, request.payload(), public).await,
        Some(CoordinatorRequest::Signal { id, name, public }) => {
            signal_order(shared, id, name, request.payload(), public).await
        }
        Some(CoordinatorRequest::Orders { public }) => orders(shared, request.payload(), public).await,
        None => error(format!("no such request: `{subject}`")),
    }
}

/// Starts an order: refusals for cause answer `"retryable": false`; a first
/// hop that could not be stored is tried again under the same id until
/// `start_timeout`, then answered `"retryable": true` with the id.
async fn start_order<T: HopLog + Rpc>(shared: &Shared<T>, workflow: &str, headers: &Headers, body: &Bytes) -> Bytes {
    let deadline = tokio::time::Instant::now() + shared.config.start_timeout;
    let Some(registry) = &shared.registry else {
        return refused("this coordinator was started without workflow definitions and cannot start orders");
    };
    if body.len() > MAX_START_BYTES {
        return refused(format!(
            "the order is {} bytes, over the limit of {MAX_START_BYTES}",
            body.len()
        ));
    }
    let id = match headers.get(headers::ORDER) {
        Some(v) => match v.parse::<OrderId>() {
            Ok(id) => id,
            Err(e) => return refused(format!("header {}: {e}", headers::ORDER)),
        },
        None => OrderId::new(),
    };
    let (wf, payload) = match registry.prepare_json(workflow, body) {
        Ok(p) => p,
        Err(e) => return refused(e.to_string()),
    };
    let out = match first_hop(&shared.config.codec, shared.config.format, id, &wf, payload) {
        Ok(o) => o,
        Err(e) => return refused(e.to_string()),
    };
    match store_first_hop(&shared.transport, id, out, deadline, START_BACKOFF, true).await {
        Ok(ack) => json(&StartReply {
            id,
            workflow: wf.name().clone(),
            version: wf.version(),
            duplicate: ack.duplicate,
        }),
        Err(not) if not.error.is_retryable() => {
            tracing::warn!(order_id = %id, tries = not.tries, error = %not.error, "a start could not be stored; answering retryable");
            error_reply(&ErrorReply::retry(
                format!(
                    "the order could not be stored for now ({} tries in {:?}): {}; send it again with header {}: {id}",
                    not.tries,
                    not.waited,
                    not.error,
                    headers::ORDER
                ),
                id,
            ))
        }
        Err(not) => refused(format!("the order could not be stored: {}", not.error)),
    }
}

/// Why a partition's coordinators gave no answer.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("the coordinator of partition {owner}/{count} did not answer within {wait:?}")]
    TimedOut { owner: u32, count: u32, wait: Duration },
    #[error(
        "no coordinator runs partition {owner}/{count}; start one with `waybill coordinator --partition {owner}/{count}`"
    )]
    Nobody { owner: u32, count: u32 },
    #[error("asking partition {owner}/{count} failed: {source}")]
    Failed {
        owner: u32,
        count: u32,
        source: TransportError,
    },
}

/// Asks the coordinators of another partition, and relays their answer.
/// The answer about an order of another partition: asked on a public
/// subject, the owner's, forwarded on `subject(owner, count)`; asked on
/// this partition's own subject, a refusal. `None` for an order of this
/// partition.
async fn elsewhere<T: Rpc>(
    shared: &Shared<T>,
    id: &OrderId,
    public: bool,
    subject: impl FnOnce(u32, u32) -> String,
    body: &Bytes,
) -> Option<Bytes> {
    let p = shared.config.partition;
    let owner = Partition::of(id, p.count);
    if owner == p.index {
        return None;
    }
    if !public {
        return Some(error(format!(
            "order {id} belongs to partition {owner}/{}, not {p}",
            p.count
        )));
    }
    let subject = subject(owner, p.count);
    Some(
        forward(shared, owner, subject, body.clone())
            .await
            .unwrap_or_else(|e| error(e.to_string())),
    )
}

async fn forward<T: Rpc>(shared: &Shared<T>, owner: u32, subject: String, body: Bytes) -> Result<Bytes, ForwardError> {
    let count = shared.config.partition.count;
    let wait = shared.config.forward_timeout;
    match shared.transport.request(subject, Headers::new(), body, wait).await {
        Ok(answer) => Ok(answer),
        Err(TransportError::TimedOut(_)) => Err(ForwardError::TimedOut { owner, count, wait }),
        Err(TransportError::NoResponders(_)) => Err(ForwardError::Nobody { owner, count }),
        Err(source) => Err(ForwardError::Failed { owner, count, source }),
    }
}

async fn status<T: HopLog + Rpc>(shared: &Shared<T>, id: &str, public: bool) -> Bytes {
    let id: OrderId = match id.parse() {
        Ok(id) => id,
        Err(e) => return error(e.to_string()),
    };
    let owners = |owner, count| subject::partition_status(owner, count, &id);
    if let Some(answer) = elsewhere(shared, &id, public, owners, &Bytes::new()).await {
        return answer;
    }
    let p = shared.config.partition;
    let Some(state) = shared.tracker.get(&id) else {
        return unknown_order(shared, None);
    };
    let t = crate::document::Timestamp::now();
    let stalled = state.due.is_some_and(|d| d.plus(shared.config.stall_grace) < t);
    let reply = StatusReply::new(&state, stalled, p.to_string());
    let latest = match shared.transport.get(state.sequence).await {
        Ok(Some(m)) => {
            let ct = m.message.headers.get(headers::CONTENT_TYPE);
            shared
                .config
                .codec
                .decode_as(&m.message.payload, ct)
                .map_err(|e| format!("the latest hop is unreadable: {e}"))
        }
        Ok(None) => Err(format!(
            "the latest hop (sequence {}) is no longer in the stream",
            state.sequence
        )),
        Err(e) => Err(format!(
            "the latest hop (sequence {}) could not be read from the stream: {e}",
            state.sequence
        )),
    };
    let reply = match latest {
        Ok(doc) => {
            let mut reply = reply.with_document(&doc);
            let shown = match &shared.registry {
                Some(r) => r.payload_json(doc.route.workflow.as_str(), &doc.payload),
                None => crate::registry::Registry::new().payload_json(doc.route.workflow.as_str(), &doc.payload),
            };
            match shown {
                Ok(v) => reply.payload = Some(v),
                Err(e) => reply.payload_error = Some(e),
            }
            reply
        }
        Err(e) => StatusReply {
            history_error: Some(e),
            ..reply
        },
    };
    json(&reply)
}

/// Records a cancel of an order in flight, for every worker to see at the
/// order's next hop. An order unknown or already ended is an error.
async fn cancel_order<T: Transport + HopLog + Rpc>(shared: &Shared<T>, id: &str, body: &Bytes, public: bool) -> Bytes {
    let id: OrderId = match id.parse() {
        Ok(id) => id,
        Err(e) => return error(e.to_string()),
    };
    let owners = |owner, count| subject::partition_cancel(owner, count, &id);
    if let Some(answer) = elsewhere(shared, &id, public, owners, body).await {
        return answer;
    }
    let asked: CancelRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRequest::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(q) => q,
            Err(e) => {
                return error(format!(
                    "bad cancel request: {e} (expected an object with an optional `reason`)"
                ))
            }
        }
    };
    let reason = asked.reason.unwrap_or_else(|| DEFAULT_CANCEL_REASON.to_owned());
    if reason.len() > MAX_CANCEL_REASON {
        return error(format!(
            "the reason is {} bytes, over the limit of {MAX_CANCEL_REASON}",
            reason.len()
        ));
    }
    let Some(state) = shared.tracker.get(&id) else {
        return unknown_order(shared, Some(&id));
    };
    if state.status.is_terminal() {
        return error_reply(&ErrorReply::coded(
            ErrorCode::Ended,
            format!("order {id} already ended {}: there is nothing to cancel", state.status),
        ));
    }
    match shared.transport.request_cancel(id, &reason).await {
        Ok(new) => json(&CancelReply {
            id,
            already_asked: !new,
            status: state.status,
            step: state.step,
        }),
        Err(e) if e.is_retryable() => error_reply(&ErrorReply::retry(
            format!("the cancel of order {id} was not recorded: {e}"),
            id,
        )),
        Err(e) => error(format!("the cancel of order {id} was not recorded: {e}")),
    }
}

/// Delivers a signal (its JSON: the body, `{}` if empty) to an order in
/// flight whose route waits for it: kept for the step that waits for it,
/// and the order woken if it waits now. An order unknown, ended, or whose
/// route waits for no signal of that name, is an error.
async fn signal_order<T: Transport + HopLog + Rpc>(
    shared: &Shared<T>,
    id: &str,
    name: &str,
    body: &Bytes,
    public: bool,
) -> Bytes {
    let id: OrderId = match id.parse() {
        Ok(id) => id,
        Err(e) => return error(e.to_string()),
    };
    let name = match crate::id::SignalName::new(name) {
        Ok(n) => n,
        Err(e) => return error(e.to_string()),
    };
    let owners = |owner, count| subject::partition_signal(owner, count, &id, &name);
    if let Some(answer) = elsewhere(shared, &id, public, owners, body).await {
        return answer;
    }
    if body.len() > MAX_SIGNAL_BYTES {
        return error(format!(
            "signal `{name}` is {} bytes, over the limit of {MAX_SIGNAL_BYTES}",
            body.len()
        ));
    }
    let data = if body.iter().all(u8::is_ascii_whitespace) {
        "{}".to_owned()
    } else {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => v.to_string(),
            Err(e) => return error(format!("signal `{name}` is not JSON: {e}")),
        }
    };
    let Some(state) = shared.tracker.get(&id) else {
        return unknown_order(shared, Some(&id));
    };
    if state.status.is_terminal() {
        return error_reply(&ErrorReply::coded(
            ErrorCode::Ended,
            format!("order {id} already ended {}: no signal can reach it", state.status),
        ));
    }
    // The route, from the latest hop: a signal it never waits for is a
    // mistake (a misspelt name), not something to keep.
    let mut awaited = false;
    if let Ok(Some(m)) = shared.transport.get(state.sequence).await {
        let ct = m.message.headers.get(headers::CONTENT_TYPE);
        if let Ok(doc) = shared.config.codec.decode_as(&m.message.payload, ct) {
            let waits: Vec<&str> = doc
                .route
                .steps
                .iter()
                .filter_map(|s| s.awaits())
                .map(|n| n.as_str())
                .collect();
            if !waits.contains(&name.as_str()) {
                let expected = if waits.is_empty() {
                    "none".to_owned()
                } else {
                    waits.join(", ")
                };
                return error_reply(&ErrorReply::coded(
                    ErrorCode::NotAwaited,
                    format!(
                        "order {id} ({} v{}) waits for no signal `{name}`; its route waits for: {expected}",
                        doc.route.workflow, doc.route.version
                    ),
                ));
            }
            // Waiting for it, and not past its deadline (a signal kept
            // after it comes too late, however late its hop is read).
            let now = crate::document::Timestamp::now();
            awaited = doc
                .awaited_signal()
                .is_some_and(|a| a.name == &name && now <= a.deadline);
        }
    }
    match shared.transport.send_signal(id, &name, &data).await {
        Ok(fresh) => json(&SignalReply {
            id,
            signal: name.to_string(),
            duplicate: !fresh,
            awaited,
            status: state.status,
            step: state.step,
        }),
        Err(e) if e.is_retryable() => error_reply(&ErrorReply::retry(
            format!("signal `{name}` of order {id} was not recorded: {e}"),
            id,
        )),
        Err(e) => error(format!("signal `{name}` of order {id} was not recorded: {e}")),
    }
}

async fn orders<T: HopLog + Rpc>(shared: &Shared<T>, body: &[u8], public: bool) -> Bytes {
    let query: OrdersQuery = if body.iter().all(u8::is_ascii_whitespace) {
        OrdersQuery::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(q) => q,
            Err(e) => {
                return error(format!(
                    "bad orders request: {e} (expected an object with optional `status`, `step`, `workflow`, \
                     `stalled` and `limit`)"
                ))
            }
        }
    };
    let p = shared.config.partition;
    if let Some(seq) = query.after {
        if !shared.tracker.reached(seq, Duration::from_secs(5)).await {
            let at = shared.tracker.last_seq();
            return error(format!(
                "partition {p}: the view has read the stream up to sequence {at}, not yet {seq}; ask again"
            ));
        }
    }
    let mut reply = shared.tracker.orders(&query, shared.config.stall_grace);
    if public && p.count > 1 {
        let body = json(&query);
        let others = (0..p.count).filter(|&i| i != p.index).map(|i| {
            let body = body.clone();
            async move { (i, forward(shared, i, subject::partition_orders(i, p.count), body).await) }
        });
        for (i, answer) in futures::future::join_all(others).await {
            let parsed = answer.map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<OrdersReply>(&b).map_err(|_| String::from_utf8_lossy(&b).into_owned())
            });
            match parsed {
                Ok(other) => reply.merge(other, query.limit()),
                Err(e) => {
                    tracing::debug!(partition = i, error = %e, "a partition did not answer an orders request");
                    reply.missing.push(i);
                }
            }
        }
    }
    json(&reply)
}
