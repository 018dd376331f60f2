//! The coordinator's request interface: JSON bodies on plain NATS subjects,
//! usable from any NATS client (see the README for examples).
//!
//! | subject                      | request body                  | reply                       |
//! |------------------------------|-------------------------------|-----------------------------|
//! | `waybill.start.<workflow>`   | the order (JSON)              | [`StartReply`]              |
//! | `waybill.status.<order id>`  | empty                         | [`StatusReply`]             |
//! | `waybill.orders`             | empty, or an [`OrdersQuery`]  | [`OrdersReply`]             |
//! | `waybill.cancel.<order id>`  | empty, or a [`CancelRequest`] | [`CancelReply`]             |
//!
//! Every failure is `{"error": "<message>"}` ([`ErrorReply`]); a failed
//! start also says whether to try again (`"retryable"`) and under which id
//! (`"id"`).

use serde::{Deserialize, Serialize};

use super::timing::TimeSummary;
use super::view::{Filter, OrderState, StepKey, Summary};
use crate::document::{AttemptResult, Document, Status, StepKind, StepRecord, Timestamp};
use crate::id::{OrderId, ServiceSubject, StepName, WorkflowName};

/// Largest start request body accepted.
pub const MAX_START_BYTES: usize = 256 * 1024;
/// Ids listed by an orders request unless it asks for another number.
pub const DEFAULT_LIST: usize = 100;
/// Most ids one orders request lists.
pub const MAX_LIST: usize = 10_000;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
    /// On a start: `true` if the order could not be stored for now (the
    /// stream unavailable: a time-out, a leader election, a lost
    /// connection): send the same request again, with header
    /// `Waybill-Order` set to `id`; `false` if it was refused for cause
    /// (an invalid order, an unknown workflow, a bad id), which the same
    /// request again will not change. Absent on other requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// On a retryable start: the order's id (the header's, or the one the
    /// coordinator chose), to retry with. The try may have been stored
    /// after all; a retry under this id then answers `"duplicate": true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<OrderId>,
    /// What kind of error it is, where a caller may act on it (the text is
    /// for people).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

/// The kind of an error answer, to decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The coordinator tracks no such order (or not yet: it reads the
    /// stream a moment behind a start).
    UnknownOrder,
    /// The order has ended: nothing can change it.
    Ended,
    /// The order's route waits for no signal of that name.
    NotAwaited,
}

impl ErrorReply {
    /// An error of a request other than a start.
    pub fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            retryable: None,
            id: None,
            code: None,
        }
    }

    /// An error of a kind a caller may act on.
    pub fn coded(code: ErrorCode, error: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            ..Self::new(error)
        }
    }

    /// A start refused for cause: the same request again will not succeed.
    pub fn refused(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            retryable: Some(false),
            id: None,
            code: None,
        }
    }

    /// A start that could not be stored for now: retry it under `id`.
    pub fn retry(error: impl Into<String>, id: OrderId) -> Self {
        Self {
            error: error.into(),
            retryable: Some(true),
            id: Some(id),
            code: None,
        }
    }
}

/// The answer to a start: the new order's id once hop 0 is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartReply {
    pub id: OrderId,
    pub workflow: WorkflowName,
    pub version: u32,
    /// This id was started before (inside the stream's duplicate window):
    /// nothing new was started.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// One executed attempt of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub step: StepName,
    pub service: ServiceSubject,
    pub kind: StepKind,
    pub attempt: u32,
    /// The business outcome (`ok`, `declined`, …), if the step returned one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The error, if the step failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transient: Option<bool>,
    /// Set when this record is a wait on unavailable infrastructure (not an
    /// attempt): `error` is the last fault seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<Waiting>,
    /// Set when the order was cancelled at this hop: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled: Option<String>,
    /// Set when this record ends the step's wait for a signal (not an
    /// attempt): the signal, and its JSON if it came (none: its deadline
    /// passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<SignalRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub started_at: String,
    pub ended_at: String,
    pub worker: String,
}

/// A signal in an order's history: its name, and its JSON as text (none
/// when its deadline passed without it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRecord {
    pub name: String,
    #[serde(default)]
    pub data: Option<String>,
}

impl HistoryEntry {
    pub fn of(r: &StepRecord) -> Self {
        let cancelled = match &r.result {
            AttemptResult::Cancelled { reason } => Some(reason.clone()),
            _ => None,
        };
        let signal = match &r.result {
            AttemptResult::Signal { name, data } => Some(SignalRecord {
                name: name.to_string(),
                data: data.clone(),
            }),
            _ => None,
        };
        let (outcome, error, transient, unavailable) = match &r.result {
            AttemptResult::Cancelled { .. } | AttemptResult::Signal { .. } => (None, None, None, None),
            AttemptResult::Outcome(o) => (Some(o.to_string()), None, None, None),
            AttemptResult::Error { message, transient } => (None, Some(message.clone()), Some(*transient), None),
            AttemptResult::Unavailable { message, since, tries } => (
                None,
                Some(message.clone()),
                None,
                Some(Waiting {
                    since: rfc3339(*since),
                    tries: *tries,
                    error: message.clone(),
                }),
            ),
        };
        Self {
            step: r.step.clone(),
            service: r.service.clone(),
            kind: r.kind,
            attempt: r.attempt,
            outcome,
            error,
            transient,
            unavailable,
            cancelled,
            signal,
            detail: r.detail.as_ref().map(|d| d.to_string()),
            started_at: rfc3339(r.started_at),
            ended_at: rfc3339(r.ended_at),
            worker: r.worker.to_string(),
        }
    }
}

/// A step waiting on unavailable infrastructure (a store or NATS with no
/// responders, a leader election): since when, how many tries, the last
/// error. No attempt is spent meanwhile and the order does not fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub since: String,
    pub tries: u32,
    pub error: String,
}

/// Where one order stands, and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub id: OrderId,
    pub workflow: WorkflowName,
    pub version: u32,
    pub status: Status,
    /// The step the order is at (being undone while compensating; the last
    /// one once finished).
    pub step: StepName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSubject>,
    pub hop: u32,
    pub attempt: u32,
    /// The stream sequence of the latest hop.
    pub sequence: u64,
    pub last_hop_at: String,
    /// When the current step should have moved on (in flight only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<String>,
    /// Past `due` plus the coordinator's grace.
    pub stalled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Set while the current step waits on unavailable infrastructure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// Set while the order sleeps before its current step (the step's
    /// wait, or a retry's backoff): when it is due. It has slept since
    /// `last_hop_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asleep_until: Option<String>,
    /// Set while the order waits for a signal before its current step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting: Option<Awaiting>,
    pub history: Vec<HistoryEntry>,
    /// The order's payload as JSON, when the coordinator can read it (its
    /// workflow registered there, or a JSON payload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// Why the payload is not shown, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_error: Option<String>,
    /// Set when the latest hop could not be read back from the stream (the
    /// history is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_error: Option<String>,
    /// The coordinator partition that tracks the order (`index/count`).
    pub partition: String,
}

impl StatusReply {
    pub fn new(state: &OrderState, stalled: bool, partition: String) -> Self {
        Self {
            id: state.id,
            workflow: state.workflow.clone(),
            version: state.version,
            status: state.status,
            step: state.step.clone(),
            service: state.service.clone(),
            hop: state.hop,
            attempt: state.attempt,
            sequence: state.sequence,
            last_hop_at: rfc3339(state.last_hop_at),
            due: state.due.map(rfc3339),
            stalled,
            failure: None,
            waiting: None,
            asleep_until: None,
            awaiting: None,
            history: Vec::new(),
            payload: None,
            payload_error: None,
            history_error: None,
            partition,
        }
    }

    /// Adds what only the document holds: the history and the failure.
    pub fn with_document(mut self, doc: &Document) -> Self {
        self.history = doc.history.iter().map(HistoryEntry::of).collect();
        self.failure = doc.failure.clone();
        self.waiting = doc.waiting().map(|(since, tries, error)| Waiting {
            since: rfc3339(since),
            tries,
            error: error.to_owned(),
        });
        self.awaiting = doc.awaited_signal().map(|a| Awaiting {
            signal: a.name.to_string(),
            since: rfc3339(a.since),
            deadline: rfc3339(a.deadline),
        });
        self.asleep_until = doc
            .not_before
            .filter(|due| !doc.status.is_terminal() && *due > Timestamp::now() && self.awaiting.is_none())
            .map(rfc3339);
        self
    }
}

/// What an order waits for before its current step: a signal, since it
/// entered the step, at most until its deadline (then the route goes on
/// without it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Awaiting {
    pub signal: String,
    pub since: String,
    pub deadline: String,
}

/// The reason a cancel records when its request gives none.
pub const DEFAULT_CANCEL_REASON: &str = "cancelled by an operator";
/// Longest cancel reason accepted, in bytes.
pub const MAX_CANCEL_REASON: usize = 1024;

/// A cancel request's body (or none, for the default reason).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// Why, kept in the order's history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to a cancel request: the cancel is recorded, and the order
/// stops at its next hop, is undone and ends `cancelled`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReply {
    pub id: OrderId,
    /// A cancel of this order had been asked before (this one changed
    /// nothing).
    pub already_asked: bool,
    /// Where the order stood when the cancel was recorded.
    pub status: Status,
    pub step: StepName,
}

/// Largest signal accepted: its JSON, in bytes.
pub const MAX_SIGNAL_BYTES: usize = 64 * 1024;

/// The answer to a signal: kept for the order (`duplicate`: it had it
/// already, and this one changed nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalReply {
    pub id: OrderId,
    pub signal: String,
    /// The order had this signal already: the first one stays.
    pub duplicate: bool,
    /// The order waits for it now (else it is kept until the order reaches
    /// the step that waits for it).
    pub awaited: bool,
    /// Where the order stood when the signal was kept.
    pub status: Status,
    pub step: StepName,
}

/// A summary request: every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// A step name, or `workflow/step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stalled: bool,
    /// Answer only once the view has read the hop stored at this stream
    /// sequence (or later), waiting up to five seconds: read-your-writes
    /// for a client that knows the sequence of what it published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// How many ids to list (default 100, at most 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl OrdersQuery {
    pub fn filter(&self) -> Filter {
        Filter {
            status: self.status,
            step: self.step.clone(),
            stalled: self.stalled,
            workflow: self.workflow.clone(),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_LIST).min(MAX_LIST)
    }
}

/// How the stream's replay went, and what the coordinator has seen since.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedStats {
    /// Whether the view has reached the end of the stream as it was when the
    /// coordinator started.
    pub caught_up: bool,
    /// Hops read in that first replay, and how fast.
    pub replayed_hops: u64,
    pub replay_seconds: f64,
    pub replay_hops_per_sec: f64,
    /// The stream sequence of the latest hop read.
    pub last_sequence: u64,
    /// Hops read since start, including other partitions' hops.
    pub hops_read: u64,
    /// Messages on hop subjects that are not documents (dead-lettered by
    /// the workers; skipped here).
    pub undecodable: u64,
    /// Stalled hops republished so far.
    pub redriven: u64,
    /// Stalled hops passed over again after their one re-drive: reported,
    /// not republished again.
    #[serde(default)]
    pub redrive_refused: u64,
    /// Bytes held by the view's tables.
    pub view_bytes: u64,
}

/// The answer to an orders request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OrdersReply {
    #[serde(flatten)]
    pub summary: Summary,
    /// How many partitions the orders are split into, and which of them
    /// answered: a missing partition's orders are not counted.
    pub partitions: u32,
    pub answered: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<u32>,
    /// Per answering partition.
    pub feeds: Vec<FeedStats>,
}

impl OrdersReply {
    /// Adds another partition's answer to this one; ids stay at most `limit`.
    pub fn merge(&mut self, other: OrdersReply, limit: usize) {
        let s = &mut self.summary;
        let o = other.summary;
        s.tracked += o.tracked;
        s.in_flight += o.in_flight;
        s.stalled += o.stalled;
        s.matched += o.matched;
        s.waiting += o.waiting;
        for (wf, counts) in o.by_workflow {
            let mine = s.by_workflow.entry(wf).or_default();
            for (k, v) in counts {
                *mine.entry(k).or_insert(0) += v;
            }
        }
        for (k, v) in o.by_status {
            *s.by_status.entry(k).or_insert(0) += v;
        }
        for (k, v) in o.by_step {
            *s.by_step.entry(k).or_insert(0) += v;
        }
        for (k, v) in o.finished {
            *s.finished.entry(k).or_insert(0) += v;
        }
        s.ids.extend(o.ids);
        s.ids.truncate(limit);
        self.answered.extend(other.answered);
        self.answered.sort_unstable();
        self.feeds.extend(other.feeds);
    }
}

/// What an operator's page shows of one coordinator at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dashboard {
    /// Its counts (without ids).
    pub summary: Summary,
    /// How long orders stayed at each step lately, by `workflow/step`.
    pub step_times: std::collections::BTreeMap<StepKey, TimeSummary>,
    /// The longest overdue orders first.
    pub stalled: Vec<OrderState>,
    /// The latest orders to end other than completed, newest first.
    pub recent_failures: Vec<OrderState>,
    /// Its partition (`index/count`).
    pub partition: String,
    pub feed: FeedStats,
}

/// What a coordinator did about a stalled order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StallAction {
    /// Logged and counted; the hop waits (for a worker, say).
    Reported,
    /// Its hop was republished (at most once per hop).
    Redriven,
}

/// Published on `waybill.stalled.<workflow>` once per order and hop that
/// stalls: for alerting, and for anyone who would rather not poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StalledEvent {
    pub id: OrderId,
    pub workflow: WorkflowName,
    pub version: u32,
    pub step: StepName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSubject>,
    pub hop: u32,
    pub sequence: u64,
    pub last_hop_at: String,
    pub action: StallAction,
    /// Why, as far as the service's consumer tells.
    pub reason: String,
}

impl StalledEvent {
    pub fn new(state: &OrderState, action: StallAction, reason: String) -> Self {
        Self {
            id: state.id,
            workflow: state.workflow.clone(),
            version: state.version,
            step: state.step.clone(),
            service: state.service.clone(),
            hop: state.hop,
            sequence: state.sequence,
            last_hop_at: rfc3339(state.last_hop_at),
            action,
            reason,
        }
    }
}

/// `2026-11-26T07:10:24.123456Z` from microseconds since the epoch.
pub fn rfc3339(t: Timestamp) -> String {
    let secs = t.0 / 1_000_000;
    let micros = t.0 % 1_000_000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's
/// `civil_from_days`, for non-negative days.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_sleeping_order_says_until_when() {
        use std::time::Duration;
        let wf = crate::workflow::Workflow::builder("remind", 1)
            .step("remind", "mail.remind")
            .delay(Duration::from_secs(3600))
            .build()
            .unwrap();
        let mut doc = Document::new(
            OrderId::new(),
            wf.shared_route(),
            crate::document::Payload::postcard(&()).unwrap(),
        );
        let state = OrderState {
            id: doc.id,
            workflow: wf.name().clone(),
            version: 1,
            status: Status::Running,
            step: "remind".parse().unwrap(),
            service: None,
            hop: 0,
            attempt: 1,
            sequence: 1,
            last_hop_at: doc.created_at,
            due: None,
        };
        let until = doc.not_before.unwrap();
        let r = StatusReply::new(&state, false, "0/1".into()).with_document(&doc);
        assert_eq!(r.asleep_until, Some(rfc3339(until)));
        // Due already: awake.
        doc.not_before = Some(Timestamp(1));
        let r = StatusReply::new(&state, false, "0/1".into()).with_document(&doc);
        assert_eq!(r.asleep_until, None);
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(Timestamp(0)), "1970-01-01T00:00:00.000000Z");
        // 2026-11-26T07:10:24.5Z
        assert_eq!(rfc3339(Timestamp(1_795_677_024_500_000)), "2026-11-26T07:10:24.500000Z");
        // A leap day.
        assert_eq!(rfc3339(Timestamp(951_782_400_000_000)), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn a_wait_on_infrastructure_reads_as_one_not_as_an_attempt() {
        let r = StepRecord {
            step: StepName::new("charge").unwrap(),
            service: ServiceSubject::new("payment.charge").unwrap(),
            kind: StepKind::Forward,
            attempt: 1,
            result: AttemptResult::Unavailable {
                message: "ledger unavailable: no responders".into(),
                since: Timestamp(1_795_677_024_500_000),
                tries: 7,
            },
            detail: None,
            started_at: Timestamp(1_795_677_024_500_000),
            ended_at: Timestamp(1_795_677_030_500_000),
            worker: crate::id::WorkerId::new("w"),
        };
        let h = HistoryEntry::of(&r);
        assert_eq!(h.outcome, None);
        assert_eq!(h.transient, None);
        let json = serde_json::to_value(&h).unwrap();
        assert_eq!(
            json["unavailable"],
            serde_json::json!({"since": "2026-11-26T07:10:24.500000Z", "tries": 7, "error": "ledger unavailable: no responders"})
        );
    }

    #[test]
    fn orders_queries_reject_unknown_fields_and_cap_the_list() {
        let q: OrdersQuery = serde_json::from_str(r#"{"status":"running","stalled":true,"limit":99999}"#).unwrap();
        assert_eq!(q.limit(), MAX_LIST);
        assert_eq!(q.filter().status, Some(Status::Running));
        assert!(serde_json::from_str::<OrdersQuery>(r#"{"colour":"red"}"#).is_err());
        assert!(serde_json::from_str::<OrdersQuery>(r#"{"status":"lost"}"#).is_err());
    }
}
