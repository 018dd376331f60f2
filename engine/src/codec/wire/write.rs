//! The wire structs as written: borrowed views of the domain types, each
//! with the same fields in the same order as its twin in `read`.

use serde::Serialize;

use super::super::payload::WirePayloadRef;
use super::read::{Backoff, BranchAt, Fork, Next, Status, StepKind, Wait};
use super::Seq;
use crate::document::{AttemptResult, Compensation, Document, StepRecord};
use crate::id::{OrderId, Outcome, ServiceSubject, SignalName, StepName, WorkerId, WorkflowName};
use crate::workflow::{Branch, Route, RouteStep};

// ---------------------------------------------------------------- route

/// A route, as written: its steps as [`WireStepRef`] (envelope version 1),
/// [`WireStepRefV2`] (version 2) or [`JsonStepRef`] (JSON).
#[derive(Serialize)]
#[serde(bound(serialize = "W: From<&'a RouteStep> + Serialize"))]
pub(in crate::codec) struct WireRouteRef<'a, W = WireStepRef<'a>> {
    workflow: &'a WorkflowName,
    version: u32,
    steps: Seq<'a, RouteStep, W>,
}

/// Version 3: version 2's route, then its forks.
#[derive(Serialize)]
pub(in crate::codec) struct WireRouteRefV3<'a> {
    route: WireRouteRef<'a, WireStepRefV2<'a>>,
    forks: Seq<'a, crate::workflow::Fork, Fork>,
}

impl<'a> From<&'a Route> for WireRouteRefV3<'a> {
    fn from(r: &'a Route) -> Self {
        Self {
            route: r.into(),
            forks: Seq::of(&r.forks),
        }
    }
}

/// A route in JSON: its forks beside its steps, where it has any.
#[derive(Serialize)]
pub(in crate::codec) struct JsonRouteRef<'a> {
    #[serde(flatten)]
    route: WireRouteRef<'a, JsonStepRef<'a>>,
    #[serde(skip_serializing_if = "Seq::is_empty")]
    forks: Seq<'a, crate::workflow::Fork, Fork>,
}

impl<'a> From<&'a Route> for JsonRouteRef<'a> {
    fn from(r: &'a Route) -> Self {
        Self {
            route: r.into(),
            forks: Seq::of(&r.forks),
        }
    }
}

/// Version 2: version 1's fields, then the wait.
#[derive(Serialize)]
pub(in crate::codec) struct WireStepRefV2<'a> {
    step: WireStepRef<'a>,
    wait: Option<Wait>,
}

#[derive(Serialize)]
pub(in crate::codec) struct JsonStepRef<'a> {
    #[serde(flatten)]
    step: WireStepRef<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wait: Option<Wait>,
}

impl<'a> From<&'a RouteStep> for WireStepRefV2<'a> {
    fn from(s: &'a RouteStep) -> Self {
        Self {
            step: s.into(),
            wait: s.wait.as_ref().map(Into::into),
        }
    }
}

impl<'a> From<&'a RouteStep> for JsonStepRef<'a> {
    fn from(s: &'a RouteStep) -> Self {
        Self {
            step: s.into(),
            wait: s.wait.as_ref().map(Into::into),
        }
    }
}

#[derive(Serialize)]
pub(in crate::codec) struct WireStepRef<'a> {
    name: &'a StepName,
    service: &'a ServiceSubject,
    compensate: Option<&'a ServiceSubject>,
    retry: Backoff,
    timeout_ms: u32,
    branches: Seq<'a, Branch, WireBranchRef<'a>>,
    max_visits: Option<u32>,
}

#[derive(Serialize)]
struct WireBranchRef<'a> {
    outcome: &'a Outcome,
    next: Next,
}

impl<'a, W> From<&'a Route> for WireRouteRef<'a, W> {
    fn from(r: &'a Route) -> Self {
        Self {
            workflow: &r.workflow,
            version: r.version,
            steps: Seq::of(&r.steps),
        }
    }
}

impl<'a> From<&'a RouteStep> for WireStepRef<'a> {
    fn from(s: &'a RouteStep) -> Self {
        Self {
            name: &s.name,
            service: &s.service,
            compensate: s.compensate.as_ref(),
            retry: s.retry.into(),
            timeout_ms: s.timeout_ms,
            branches: Seq::of(&s.branches),
            max_visits: s.max_visits,
        }
    }
}

impl<'a> From<&'a Branch> for WireBranchRef<'a> {
    fn from(b: &'a Branch) -> Self {
        Self {
            outcome: &b.outcome,
            next: b.next.into(),
        }
    }
}

// ---------------------------------------------------------------- body

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum WireAttemptRef<'a> {
    Outcome(&'a compact_str::CompactString),
    Error {
        message: &'a str,
        transient: bool,
    },
    Unavailable {
        message: &'a str,
        since: u64,
        tries: u32,
    },
    /// Last but one: see the reader.
    Cancelled {
        reason: &'a str,
    },
    Signal {
        name: &'a SignalName,
        data: Option<&'a str>,
    },
}

impl<'a> From<&'a AttemptResult> for WireAttemptRef<'a> {
    fn from(r: &'a AttemptResult) -> Self {
        match r {
            AttemptResult::Outcome(o) => WireAttemptRef::Outcome(o),
            AttemptResult::Error { message, transient } => WireAttemptRef::Error {
                message,
                transient: *transient,
            },
            AttemptResult::Unavailable { message, since, tries } => WireAttemptRef::Unavailable {
                message,
                since: since.0,
                tries: *tries,
            },
            AttemptResult::Cancelled { reason } => WireAttemptRef::Cancelled { reason },
            AttemptResult::Signal { name, data } => WireAttemptRef::Signal {
                name,
                data: data.as_deref(),
            },
        }
    }
}

#[derive(Serialize)]
struct WireRecordRef<'a> {
    step: &'a StepName,
    service: &'a ServiceSubject,
    kind: StepKind,
    attempt: u32,
    result: WireAttemptRef<'a>,
    detail: Option<&'a compact_str::CompactString>,
    started_at: u64,
    ended_at: u64,
    worker: &'a WorkerId,
}

impl<'a> From<&'a StepRecord> for WireRecordRef<'a> {
    fn from(r: &'a StepRecord) -> Self {
        Self {
            step: &r.step,
            service: &r.service,
            kind: r.kind.into(),
            attempt: r.attempt,
            result: (&r.result).into(),
            detail: r.detail.as_ref(),
            started_at: r.started_at.0,
            ended_at: r.ended_at.0,
            worker: &r.worker,
        }
    }
}

#[derive(Serialize)]
struct WireCompensationRef<'a> {
    step: &'a StepName,
    service: &'a ServiceSubject,
}

impl<'a> From<&'a Compensation> for WireCompensationRef<'a> {
    fn from(c: &'a Compensation) -> Self {
        Self {
            step: &c.step,
            service: &c.service,
        }
    }
}

/// The document's fields other than the route, as they are written.
#[derive(Serialize)]
pub(in crate::codec) struct WireBodyRef<'a> {
    id: &'a OrderId,
    hop: u32,
    status: Status,
    step: u16,
    attempt: u32,
    not_before: Option<u64>,
    history: Seq<'a, StepRecord, WireRecordRef<'a>>,
    owed: Seq<'a, Compensation, WireCompensationRef<'a>>,
    failure: Option<&'a str>,
    created_at: u64,
    payload: WirePayloadRef<'a>,
}

/// The body of version 3: version 2's, then where a branch's document
/// stands.
#[derive(Serialize)]
pub(in crate::codec) struct WireBodyRefV3<'a> {
    body: WireBodyRef<'a>,
    branch: Option<BranchAt>,
}

impl<'a> From<&'a Document> for WireBodyRefV3<'a> {
    fn from(d: &'a Document) -> Self {
        Self {
            body: d.into(),
            branch: d.branch.as_ref().map(Into::into),
        }
    }
}

impl<'a> From<&'a Document> for WireBodyRef<'a> {
    fn from(d: &'a Document) -> Self {
        Self {
            id: &d.id,
            hop: d.hop,
            status: d.status.into(),
            step: d.step,
            attempt: d.attempt,
            not_before: d.not_before.map(|t| t.0),
            history: Seq::of(&d.history),
            owed: Seq::of(&d.owed),
            failure: d.failure.as_deref(),
            created_at: d.created_at.0,
            payload: WirePayloadRef(&d.payload),
        }
    }
}
