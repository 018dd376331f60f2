//! The document: one workflow instance, travelling from service to service.
//!
//! Everything here is readable without the payload's Rust type: the payload is
//! opaque bytes with a content type, so the coordinator and the command line
//! can follow any workflow.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::id::{OrderId, ServiceSubject, SignalName, StepName, WorkerId};
use crate::workflow::{Route, RouteStep};

/// Microseconds since the Unix epoch. Its serde form (the number) belongs to
/// the coordinator (`OrderState`); documents write it through the codec's
/// wire structs.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

thread_local! {
    /// Set by [`Timestamp::follow_tokio_clock`]: the wall time and tokio's
    /// instant it was anchored at.
    static TOKIO_ANCHOR: std::cell::Cell<Option<(u64, tokio::time::Instant)>> =
        const { std::cell::Cell::new(None) };
}

impl Timestamp {
    /// The wall clock, unless this thread follows tokio's clock (tests).
    pub fn now() -> Self {
        match TOKIO_ANCHOR.get() {
            None => Self::wall(),
            Some((wall, at)) => Self(wall.saturating_add(u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX))),
        }
    }

    fn wall() -> Self {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        Self(u64::try_from(micros).unwrap_or(u64::MAX))
    }

    /// For tests on tokio's paused clock: from now on, on this thread,
    /// [`Timestamp::now`] moves with tokio's clock (from the wall time of
    /// this call), so that a step's wait of two days passes when a
    /// current-thread runtime with `start_paused` advances its clock, and
    /// costs no real time. Every task of such a runtime runs on its thread.
    /// Not for production: tokio's clock is monotonic and drifts from the
    /// wall clock that other hosts read.
    pub fn follow_tokio_clock() {
        TOKIO_ANCHOR.set(Some((Self::wall().0, tokio::time::Instant::now())));
    }

    pub fn plus(self, d: Duration) -> Self {
        let add = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(add))
    }

    /// How long from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}µs", self.0)
    }
}

/// Where an order stands. Written in lower case wherever it appears as text
/// (its serde form is the coordinator's JSON replies and queries; documents
/// write it through the codec's wire structs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Compensating,
    Completed,
    Failed,
    Compensated,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Running,
        Status::Compensating,
        Status::Completed,
        Status::Failed,
        Status::Compensated,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Compensating => "compensating",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Compensated => "compensated",
            Status::Cancelled => "cancelled",
        }
    }

    /// Terminal statuses end the journey.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Running | Status::Compensating)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of the six.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status `{0}`; expected one of running, compensating, completed, failed, compensated, cancelled")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, UnknownStatus> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// How a payload's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentType {
    Postcard,
    Json,
}

impl ContentType {
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Postcard => "application/postcard",
            ContentType::Json => "application/json",
        }
    }
}

/// A payload could not be encoded or decoded as the type asked for.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is not valid {content_type:?} for `{ty}`: {detail}")]
    Decode {
        content_type: &'static str,
        ty: &'static str,
        detail: String,
    },
    #[error("payload could not be encoded: {0}")]
    Encode(String),
}

/// The business data of an order: opaque bytes and their content type.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    pub content_type: ContentType,
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({}, {} bytes)", self.content_type.as_str(), self.bytes.len())
    }
}

impl Payload {
    /// Encodes `value` with postcard, the compact default.
    pub fn postcard<T: Serialize>(value: &T) -> Result<Self, PayloadError> {
        Ok(Self {
            content_type: ContentType::Postcard,
            bytes: postcard::to_stdvec(value).map_err(|e| PayloadError::Encode(e.to_string()))?,
        })
    }

    /// Encodes `value` as JSON, for clients in other languages.
    pub fn json<T: Serialize>(value: &T) -> Result<Self, PayloadError> {
        Ok(Self {
            content_type: ContentType::Json,
            bytes: serde_json::to_vec(value).map_err(|e| PayloadError::Encode(e.to_string()))?,
        })
    }

    /// Decodes the payload as a `T` that may borrow from it (`&str` fields,
    /// no copies): the cheap way for a handler to read what it needs.
    /// Postcard payloads only borrow; JSON ones may need owned fields.
    pub fn decode_borrowed<'a, T: Deserialize<'a>>(&'a self) -> Result<T, PayloadError> {
        let err = |detail: String| PayloadError::Decode {
            content_type: self.content_type.as_str(),
            ty: std::any::type_name::<T>(),
            detail,
        };
        match self.content_type {
            ContentType::Postcard => match postcard::take_from_bytes(&self.bytes) {
                Ok((v, [])) => Ok(v),
                Ok((_, rest)) => Err(err(format!("{} trailing bytes", rest.len()))),
                Err(e) => Err(err(e.to_string())),
            },
            ContentType::Json => serde_json::from_slice(&self.bytes).map_err(|e| err(e.to_string())),
        }
    }

    /// Decodes the payload as `T`, whichever content type it has.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        self.decode_borrowed()
    }
}

/// Whether a step record is the step itself or the undoing of it. Its serde
/// form (lower case) is in the coordinator's JSON replies; documents write it
/// through the codec's wire structs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    Forward,
    Compensation,
}

/// What one attempt of a step came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// The handler reported a business outcome (`ok`, `declined`, …).
    Outcome(compact_str::CompactString),
    /// The handler failed; `transient` errors may be retried.
    Error { message: String, transient: bool },
    /// The step could not run: the infrastructure it depends on (NATS, a
    /// store) was unavailable. Not an attempt: it spends none and never
    /// fails the order. Consecutive tries of one attempt fold into one
    /// record: `since` the first, `tries` in all, the last `message`.
    Unavailable {
        message: String,
        since: Timestamp,
        tries: u32,
    },
    /// The order was cancelled at this hop, before its step ran (`reason`
    /// as the canceller gave it): the completed steps are undone and the
    /// order ends `cancelled`.
    Cancelled { reason: String },
    /// The step's wait for a signal ended, before the step ran: with the
    /// signal's JSON (`data`), or without it when its deadline passed. Not
    /// an attempt.
    Signal { name: SignalName, data: Option<String> },
}

impl AttemptResult {
    /// Whether this record is a wait on infrastructure rather than an
    /// attempt of the step.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AttemptResult::Unavailable { .. })
    }

    /// Whether this record is an attempt of its step (or of its undoing):
    /// not a wait on infrastructure nor the end of a wait for a signal.
    pub fn is_attempt(&self) -> bool {
        !matches!(self, AttemptResult::Unavailable { .. } | AttemptResult::Signal { .. })
    }
}

/// One executed attempt of one step, appended to the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    pub step: StepName,
    pub service: ServiceSubject,
    pub kind: StepKind,
    pub attempt: u32,
    pub result: AttemptResult,
    /// Anything the handler chose to record, such as a tracking number.
    pub detail: Option<compact_str::CompactString>,
    pub started_at: Timestamp,
    pub ended_at: Timestamp,
    pub worker: WorkerId,
}

/// A compensation still owed: the undoing of a step that completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compensation {
    pub step: StepName,
    pub service: ServiceSubject,
}

/// One workflow instance with everything it needs to travel on its own.
///
/// Its wire form is defined in [`crate::codec`], not by this struct: the
/// route, identical in every document of one workflow version, is shared
/// (`Arc`) and travels as a section of its own that decoders intern.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub id: OrderId,
    /// The route the order was started with (name and version included).
    pub route: Arc<Route>,
    /// How many hops were published before this one; the deduplication id of
    /// this hop is `<id>:<hop>`.
    pub hop: u32,
    pub status: Status,
    /// Index of the current step while running.
    pub step: u16,
    /// Attempt number (1-based) of the current step or compensation.
    pub attempt: u32,
    /// Do not run the current step before this time (a retry's backoff).
    pub not_before: Option<Timestamp>,
    pub history: Vec<StepRecord>,
    /// Compensations owed, oldest first; they run from the end.
    pub owed: Vec<Compensation>,
    /// Why the order failed, once it has.
    pub failure: Option<String>,
    pub created_at: Timestamp,
    pub payload: Payload,
    /// Set on the copy of the document a branch of a fork runs: which
    /// one, and what the document held when it forked. `None` on the
    /// order's own document.
    pub branch: Option<BranchAt>,
}

/// Where a branch's document stands: its fork (by index in the route) and
/// branch, and how much of the history and of the compensations owed it
/// holds from before the fork.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BranchAt {
    pub fork: u8,
    pub branch: u8,
    /// The order's hop when it forked: its branches' first hops.
    pub hop_at: u32,
    pub history_at: u32,
    pub owed_at: u32,
}

impl Document {
    /// A new document at hop 0, about to run the route's first step.
    /// If the first step waits, the document is not due before its wait.
    pub fn new(id: OrderId, route: Arc<Route>, payload: Payload) -> Self {
        let created_at = Timestamp::now();
        let not_before = route
            .steps
            .first()
            .and_then(|s| s.wait.as_ref()?.duration())
            .map(|d| created_at.plus(d));
        Self {
            id,
            route,
            hop: 0,
            status: Status::Running,
            step: 0,
            attempt: 1,
            not_before,
            history: Vec::new(),
            owed: Vec::new(),
            failure: None,
            created_at,
            payload,
            branch: None,
        }
    }

    /// The route step that is current while running.
    pub fn current_step(&self) -> Option<&RouteStep> {
        self.route.step(self.step)
    }

    /// Where this hop goes: the service of the current step, or of the newest
    /// owed compensation while compensating; `None` once terminal.
    pub fn target(&self) -> Option<Target<'_>> {
        match self.status {
            Status::Running => self.current_step().map(|s| Target {
                step: &s.name,
                service: &s.service,
                kind: StepKind::Forward,
            }),
            Status::Compensating => self.owed.last().map(|c| Target {
                step: &c.step,
                service: &c.service,
                kind: StepKind::Compensation,
            }),
            _ => None,
        }
    }

    /// How often the named step was entered: its first attempts, and the
    /// entries that ended without it running (its signal's deadline
    /// passed). Waits on infrastructure are not attempts.
    pub fn visits(&self, step: &StepName) -> u32 {
        let n = self
            .history
            .iter()
            .filter(|r| {
                r.kind == StepKind::Forward
                    && &r.step == step
                    && match r.result {
                        AttemptResult::Signal { ref data, .. } => data.is_none(),
                        ref other => r.attempt == 1 && other.is_attempt(),
                    }
            })
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The wait on infrastructure the current hop is in, if its last record
    /// is one: (since, tries, last error).
    pub fn waiting(&self) -> Option<(Timestamp, u32, &str)> {
        if self.status.is_terminal() {
            return None;
        }
        match self.history.last().map(|r| &r.result) {
            Some(AttemptResult::Unavailable { message, since, tries }) => Some((*since, *tries, message.as_str())),
            _ => None,
        }
    }

    /// The JSON of the signal `name` as the order received it (the latest,
    /// if a step entered again received it again), if it did.
    pub fn signal(&self, name: &str) -> Option<&str> {
        self.history.iter().rev().find_map(|r| match &r.result {
            AttemptResult::Signal { name: n, data } if n.as_str() == name => data.as_deref(),
            _ => None,
        })
    }

    /// The signal the order waits for now: running, at a step that waits
    /// for a signal, and not yet received on this entry into the step (nor
    /// timed out).
    pub fn awaited_signal(&self) -> Option<AwaitedSignal<'_>> {
        if self.status != Status::Running {
            return None;
        }
        let step = self.current_step()?;
        let name = step.awaits()?;
        let wait = step
            .wait
            .as_ref()
            .and_then(crate::workflow::Wait::duration)
            .unwrap_or_default();
        let awaited = |since: Timestamp| AwaitedSignal {
            name,
            since,
            deadline: since.plus(wait),
        };
        // This entry's records come last (waits on infrastructure); then
        // the record that moved the order here, which says when: another
        // step's, or an outcome of this one (a loop). None: the start.
        for r in self.history.iter().rev() {
            if r.step != step.name || r.kind != StepKind::Forward {
                return Some(awaited(r.ended_at));
            }
            match &r.result {
                AttemptResult::Signal { data: Some(_), .. } => return None,
                // An earlier entry's end: it ran, or its wait timed out.
                AttemptResult::Outcome(_) | AttemptResult::Signal { data: None, .. } => {
                    return Some(awaited(r.ended_at))
                }
                _ => {}
            }
        }
        Some(awaited(self.created_at))
    }

    /// The latest `detail` recorded by the named step, if any.
    pub fn detail_of(&self, step: &str) -> Option<&str> {
        self.history
            .iter()
            .rev()
            .find(|r| r.step.as_str() == step && r.detail.is_some())
            .and_then(|r| r.detail.as_deref())
    }
}

/// The signal an order waits for ([`Document::awaited_signal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwaitedSignal<'a> {
    pub name: &'a SignalName,
    /// When the order entered the step.
    pub since: Timestamp,
    /// When the wait ends without it: the step's wait after `since`.
    pub deadline: Timestamp,
}

/// A readable record of a document: its status, why it failed, and one line
/// per step attempt. `doc.journal().to_string()`.
#[derive(Debug, Clone, Copy)]
pub struct Journal<'a>(&'a Document);

impl Document {
    /// The document as a readable record (see [`Journal`]).
    pub fn journal(&self) -> Journal<'_> {
        Journal(self)
    }
}

impl fmt::Display for Journal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        write!(f, "{} v{}: {}", d.route.workflow, d.route.version, d.status)?;
        if let Some(why) = &d.failure {
            write!(f, " ({why})")?;
        }
        writeln!(f)?;
        for (i, r) in d.history.iter().enumerate() {
            let kind = match r.kind {
                StepKind::Forward => "",
                StepKind::Compensation => "undo ",
            };
            let result = match &r.result {
                AttemptResult::Outcome(o) => o.to_string(),
                AttemptResult::Error { message, transient } => {
                    format!(
                        "{} error: {message}",
                        if *transient { "transient" } else { "permanent" }
                    )
                }
                AttemptResult::Unavailable { message, tries, since } => {
                    let waited = r.ended_at.since(*since);
                    format!(
                        "unavailable ({tries} tries over {} ms, not an attempt): {message}",
                        waited.as_millis()
                    )
                }
                AttemptResult::Cancelled { reason } => format!("cancelled: {reason}"),
                AttemptResult::Signal { name, data: Some(data) } => format!("signal `{name}` received: {data}"),
                AttemptResult::Signal { name, data: None } => format!("no signal `{name}` by its deadline"),
            };
            write!(
                f,
                "  {:>2}. {kind}{} ({}) attempt {}: {result}",
                i + 1,
                r.step,
                r.service,
                r.attempt
            )?;
            if let Some(detail) = &r.detail {
                write!(f, " [{detail}]")?;
            }
            writeln!(f)?;
        }
        if !d.owed.is_empty() && d.status.is_terminal() {
            let owed: Vec<&str> = d.owed.iter().map(|c| c.service.as_str()).collect();
            writeln!(f, "  still owed: {}", owed.join(", "))?;
        }
        Ok(())
    }
}

/// What the current hop asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub step: &'a StepName,
    pub service: &'a ServiceSubject,
    pub kind: StepKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_lower_case_everywhere() {
        for st in Status::ALL {
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
            assert_eq!(st.to_string().parse::<Status>().unwrap(), st);
            assert_eq!(st.as_str(), st.as_str().to_lowercase());
        }
        assert!("Completed".parse::<Status>().is_err());
    }

    #[test]
    fn payload_of_the_wrong_shape_is_an_error() {
        let p = Payload::postcard(&1u8).unwrap();
        assert!(p.decode::<(String, String)>().is_err());
        let p = Payload {
            content_type: ContentType::Json,
            bytes: b"{not json".to_vec(),
        };
        assert!(p.decode::<u32>().is_err());
    }
}
