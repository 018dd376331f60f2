//! The wire structs as read, and what they become.
//!
//! They carry the names of the domain types they stand for (the codec uses
//! them as `WireRoute` and so on): serde quotes a type's own name in its
//! errors (`expected struct StepRecord with 9 elements`, `struct variant
//! AttemptResult::Error`), and the reason a dead letter gives for a
//! malformed document reads as it did when the domain types were read
//! directly. The small enums and `Backoff` are written as they are read.

use serde::{Deserialize, Serialize};

use super::super::payload::WirePayload;
use super::super::DecodeError;
use crate::document::{self, Document, Timestamp};
use crate::id::{OrderId, Outcome, ServiceSubject, SignalName, StepName, WorkerId, WorkflowName};
use crate::workflow;

// ---------------------------------------------------------------- route

/// A route: its steps are [`RouteStep`] in envelope version 1,
/// [`RouteStepV2`] in version 2 and [`JsonStep`] in JSON.
#[derive(Deserialize)]
pub(in crate::codec) struct Route<S = RouteStep> {
    workflow: WorkflowName,
    version: u32,
    steps: Vec<S>,
}

/// A route of version 3: version 2's, then its forks.
#[derive(Deserialize)]
pub(in crate::codec) struct RouteV3 {
    route: Route<RouteStepV2>,
    forks: Vec<Fork>,
}

/// A route in JSON: its forks, where it has any, beside its steps.
#[derive(Deserialize)]
pub(in crate::codec) struct JsonRoute {
    #[serde(flatten)]
    route: Route<JsonStep>,
    #[serde(default)]
    forks: Vec<Fork>,
}

/// A fork (envelope version 3), written as it is read.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct Fork {
    name: StepName,
    starts: Vec<u16>,
    end: u16,
    first: Option<u8>,
    merge: Merge,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Merge {
    Fields,
    Keep,
}

impl From<&workflow::Fork> for Fork {
    fn from(f: &workflow::Fork) -> Self {
        Self {
            name: f.name.clone(),
            starts: f.starts.clone(),
            end: f.end,
            first: f.join.first,
            merge: match f.join.merge {
                workflow::Merge::Fields => Merge::Fields,
                workflow::Merge::Keep => Merge::Keep,
            },
        }
    }
}

impl From<Fork> for workflow::Fork {
    fn from(f: Fork) -> Self {
        Self {
            name: f.name,
            starts: f.starts,
            end: f.end,
            join: workflow::Join {
                first: f.first,
                merge: match f.merge {
                    Merge::Fields => workflow::Merge::Fields,
                    Merge::Keep => workflow::Merge::Keep,
                },
            },
        }
    }
}

/// Where a branch's document stands in its fork (envelope version 3),
/// written as it is read.
#[derive(Clone, Copy, Serialize, Deserialize)]
pub(in crate::codec) struct BranchAt {
    fork: u8,
    branch: u8,
    hop_at: u32,
    history_at: u32,
    owed_at: u32,
}

impl From<&document::BranchAt> for BranchAt {
    fn from(b: &document::BranchAt) -> Self {
        Self {
            fork: b.fork,
            branch: b.branch,
            hop_at: b.hop_at,
            history_at: b.history_at,
            owed_at: b.owed_at,
        }
    }
}

impl From<BranchAt> for document::BranchAt {
    fn from(b: BranchAt) -> Self {
        Self {
            fork: b.fork,
            branch: b.branch,
            hop_at: b.hop_at,
            history_at: b.history_at,
            owed_at: b.owed_at,
        }
    }
}

/// A step of version 2: version 1's fields, then its wait. (A nested struct
/// is written as its fields in order, so this is the flat layout.)
#[derive(Deserialize)]
pub(in crate::codec) struct RouteStepV2 {
    step: RouteStep,
    wait: Option<Wait>,
}

/// A step in JSON: version 1's fields, and `wait` where there is one.
#[derive(Deserialize)]
pub(in crate::codec) struct JsonStep {
    #[serde(flatten)]
    step: RouteStep,
    #[serde(default)]
    wait: Option<Wait>,
}

/// What a step waits for. New kinds go at the end (an older build refuses
/// a document with one as malformed).
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Wait {
    Delay {
        ms: u64,
    },
    Until {
        field: compact_str::CompactString,
    },
    Signal {
        name: SignalName,
        timeout_ms: u64,
        on_timeout: Next,
    },
}

impl From<&workflow::Wait> for Wait {
    fn from(w: &workflow::Wait) -> Self {
        match w {
            workflow::Wait::Delay { ms } => Wait::Delay { ms: *ms },
            workflow::Wait::Until { field } => Wait::Until { field: field.clone() },
            workflow::Wait::Signal {
                name,
                timeout_ms,
                on_timeout,
            } => Wait::Signal {
                name: name.clone(),
                timeout_ms: *timeout_ms,
                on_timeout: (*on_timeout).into(),
            },
        }
    }
}

impl From<Wait> for workflow::Wait {
    fn from(w: Wait) -> Self {
        match w {
            Wait::Delay { ms } => workflow::Wait::Delay { ms },
            Wait::Until { field } => workflow::Wait::Until { field },
            Wait::Signal {
                name,
                timeout_ms,
                on_timeout,
            } => workflow::Wait::Signal {
                name,
                timeout_ms,
                on_timeout: on_timeout.into(),
            },
        }
    }
}

#[derive(Deserialize)]
pub(in crate::codec) struct RouteStep {
    name: StepName,
    service: ServiceSubject,
    compensate: Option<ServiceSubject>,
    retry: Backoff,
    timeout_ms: u32,
    branches: Vec<Branch>,
    max_visits: Option<u32>,
}

#[derive(Deserialize)]
struct Branch {
    outcome: Outcome,
    next: Next,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
pub(super) enum Next {
    Continue,
    Goto(u16),
    Fail,
    Complete,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
pub(super) struct Backoff {
    max_attempts: u32,
    initial_ms: u32,
    max_ms: u32,
    multiplier: f32,
    jitter: f32,
}

/// A route off the wire is followed only once its structure is sound.
impl<S: Into<workflow::RouteStep>> TryFrom<Route<S>> for workflow::Route {
    type Error = DecodeError;

    fn try_from(r: Route<S>) -> Result<Self, DecodeError> {
        let route = workflow::Route {
            workflow: r.workflow,
            version: r.version,
            steps: r.steps.into_iter().map(Into::into).collect(),
            forks: Vec::new(),
        };
        route.check_structure()?;
        Ok(route)
    }
}

impl TryFrom<RouteV3> for workflow::Route {
    type Error = DecodeError;

    fn try_from(r: RouteV3) -> Result<Self, DecodeError> {
        with_forks(r.route, r.forks)
    }
}

impl TryFrom<JsonRoute> for workflow::Route {
    type Error = DecodeError;

    fn try_from(r: JsonRoute) -> Result<Self, DecodeError> {
        with_forks(r.route, r.forks)
    }
}

fn with_forks<S: Into<workflow::RouteStep>>(route: Route<S>, forks: Vec<Fork>) -> Result<workflow::Route, DecodeError> {
    let route = workflow::Route {
        workflow: route.workflow,
        version: route.version,
        steps: route.steps.into_iter().map(Into::into).collect(),
        forks: forks.into_iter().map(Into::into).collect(),
    };
    route.check_structure()?;
    Ok(route)
}

impl From<RouteStep> for workflow::RouteStep {
    fn from(s: RouteStep) -> Self {
        Self {
            name: s.name,
            service: s.service,
            compensate: s.compensate,
            retry: s.retry.into(),
            timeout_ms: s.timeout_ms,
            branches: s
                .branches
                .into_iter()
                .map(|b| workflow::Branch {
                    outcome: b.outcome,
                    next: b.next.into(),
                })
                .collect(),
            max_visits: s.max_visits,
            wait: None,
        }
    }
}

impl From<RouteStepV2> for workflow::RouteStep {
    fn from(s: RouteStepV2) -> Self {
        Self {
            wait: s.wait.map(Into::into),
            ..s.step.into()
        }
    }
}

impl From<JsonStep> for workflow::RouteStep {
    fn from(s: JsonStep) -> Self {
        Self {
            wait: s.wait.map(Into::into),
            ..s.step.into()
        }
    }
}

impl From<workflow::Next> for Next {
    fn from(n: workflow::Next) -> Self {
        match n {
            workflow::Next::Continue => Next::Continue,
            workflow::Next::Goto(i) => Next::Goto(i),
            workflow::Next::Fail => Next::Fail,
            workflow::Next::Complete => Next::Complete,
        }
    }
}

impl From<Next> for workflow::Next {
    fn from(n: Next) -> Self {
        match n {
            Next::Continue => workflow::Next::Continue,
            Next::Goto(i) => workflow::Next::Goto(i),
            Next::Fail => workflow::Next::Fail,
            Next::Complete => workflow::Next::Complete,
        }
    }
}

impl From<workflow::Backoff> for Backoff {
    fn from(b: workflow::Backoff) -> Self {
        Self {
            max_attempts: b.max_attempts,
            initial_ms: b.initial_ms,
            max_ms: b.max_ms,
            multiplier: b.multiplier,
            jitter: b.jitter,
        }
    }
}

impl From<Backoff> for workflow::Backoff {
    fn from(b: Backoff) -> Self {
        Self {
            max_attempts: b.max_attempts,
            initial_ms: b.initial_ms,
            max_ms: b.max_ms,
            multiplier: b.multiplier,
            jitter: b.jitter,
        }
    }
}

// ---------------------------------------------------------------- body

#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(in crate::codec) enum Status {
    Running,
    Compensating,
    Completed,
    Failed,
    Compensated,
    Cancelled,
}

impl From<document::Status> for Status {
    fn from(s: document::Status) -> Self {
        match s {
            document::Status::Running => Status::Running,
            document::Status::Compensating => Status::Compensating,
            document::Status::Completed => Status::Completed,
            document::Status::Failed => Status::Failed,
            document::Status::Compensated => Status::Compensated,
            document::Status::Cancelled => Status::Cancelled,
        }
    }
}

impl From<Status> for document::Status {
    fn from(s: Status) -> Self {
        match s {
            Status::Running => document::Status::Running,
            Status::Compensating => document::Status::Compensating,
            Status::Completed => document::Status::Completed,
            Status::Failed => document::Status::Failed,
            Status::Compensated => document::Status::Compensated,
            Status::Cancelled => document::Status::Cancelled,
        }
    }
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum StepKind {
    Forward,
    Compensation,
}

impl From<document::StepKind> for StepKind {
    fn from(k: document::StepKind) -> Self {
        match k {
            document::StepKind::Forward => StepKind::Forward,
            document::StepKind::Compensation => StepKind::Compensation,
        }
    }
}

impl From<StepKind> for document::StepKind {
    fn from(k: StepKind) -> Self {
        match k {
            StepKind::Forward => document::StepKind::Forward,
            StepKind::Compensation => document::StepKind::Compensation,
        }
    }
}

/// What one attempt came to. New variants go at the end only: an older
/// document must keep its variant indices.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum AttemptResult {
    Outcome(compact_str::CompactString),
    Error {
        message: String,
        transient: bool,
    },
    Unavailable {
        message: String,
        since: u64,
        tries: u32,
    },
    /// Added after version 1's first documents: last, so they keep their
    /// bytes.
    Cancelled {
        reason: String,
    },
    /// Added with signals (envelope version 2).
    Signal {
        name: SignalName,
        data: Option<String>,
    },
}

impl From<AttemptResult> for document::AttemptResult {
    fn from(r: AttemptResult) -> Self {
        match r {
            AttemptResult::Outcome(o) => Self::Outcome(o),
            AttemptResult::Error { message, transient } => Self::Error { message, transient },
            AttemptResult::Unavailable { message, since, tries } => Self::Unavailable {
                message,
                since: Timestamp(since),
                tries,
            },
            AttemptResult::Cancelled { reason } => Self::Cancelled { reason },
            AttemptResult::Signal { name, data } => Self::Signal { name, data },
        }
    }
}

#[derive(Deserialize)]
struct StepRecord {
    step: StepName,
    service: ServiceSubject,
    kind: StepKind,
    attempt: u32,
    result: AttemptResult,
    detail: Option<compact_str::CompactString>,
    started_at: u64,
    ended_at: u64,
    worker: WorkerId,
}

impl From<StepRecord> for document::StepRecord {
    fn from(r: StepRecord) -> Self {
        Self {
            step: r.step,
            service: r.service,
            kind: r.kind.into(),
            attempt: r.attempt,
            result: r.result.into(),
            detail: r.detail,
            started_at: Timestamp(r.started_at),
            ended_at: Timestamp(r.ended_at),
            worker: r.worker,
        }
    }
}

#[derive(Deserialize)]
struct Compensation {
    step: StepName,
    service: ServiceSubject,
}

impl From<Compensation> for document::Compensation {
    fn from(c: Compensation) -> Self {
        Self {
            step: c.step,
            service: c.service,
        }
    }
}

/// The document's fields other than the route, as they are read.
#[derive(Deserialize)]
pub(in crate::codec) struct WireBody {
    id: OrderId,
    hop: u32,
    status: Status,
    step: u16,
    attempt: u32,
    not_before: Option<u64>,
    history: Vec<StepRecord>,
    owed: Vec<Compensation>,
    failure: Option<String>,
    created_at: u64,
    payload: WirePayload,
}

/// The body of version 3: version 2's fields, then where a branch's
/// document stands.
#[derive(Deserialize)]
pub(in crate::codec) struct WireBodyV3 {
    pub body: WireBody,
    pub branch: Option<BranchAt>,
}

impl WireBody {
    /// The document these fields make with its route.
    pub(in crate::codec) fn with_route(self, route: std::sync::Arc<workflow::Route>) -> Document {
        Document {
            id: self.id,
            route,
            hop: self.hop,
            status: self.status.into(),
            step: self.step,
            attempt: self.attempt,
            not_before: self.not_before.map(Timestamp),
            history: self.history.into_iter().map(document::StepRecord::from).collect(),
            owed: self.owed.into_iter().map(document::Compensation::from).collect(),
            failure: self.failure,
            created_at: Timestamp(self.created_at),
            payload: self.payload.0,
            branch: None,
        }
    }
}

/// The leading fields of [`WireBody`], read on their own: postcard reads
/// fields in order, so the rest (history, payload) is never touched.
#[derive(Deserialize)]
pub(in crate::codec) struct WireHead {
    pub id: OrderId,
    pub hop: u32,
    pub status: Status,
    pub step: u16,
    pub attempt: u32,
    pub not_before: Option<u64>,
}
