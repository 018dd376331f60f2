//! Transitions: (document, result of one step attempt) → what happens next.
//!
//! [`apply`] is pure: it reads no clock and no randomness of its own (both come
//! in through [`Attempt`]) and does no I/O. It appends exactly one record to
//! the history and moves the cursor; the worker runtime then publishes the
//! document where the [`Decision`] says.
//!
//! The rules:
//! - An outcome the route maps onward (to the next step, another step, or
//!   completion) means the step is done: its compensation, if it has one, is
//!   now owed. An outcome mapped to `fail`, or not mapped at all, fails the
//!   order; the step did nothing that needs undoing.
//! - A transient error is retried with the step's backoff (a retry is a new
//!   hop to the same service, due after the delay) until the step's attempts
//!   run out; then it is a permanent failure.
//! - A step whose attempts run out on transient errors may have done part of
//!   its work (a transient error says the outcome is unknown): its own
//!   compensation is owed too, and runs first. So a compensation must
//!   accept an order its step never did, or did in part. A permanent error
//!   says the step did nothing; a business outcome says what it did.
//! - A permanent failure starts compensation: the owed compensations run one
//!   per hop, newest first; when none are left the order is `compensated`.
//!   With nothing owed, the order is `failed` at once.
//! - A compensation that cannot be done (its retries exhausted, or a
//!   permanent error) ends the order `failed`, with the compensations still
//!   owed left in the document for a person to see.

use std::time::Duration;

use compact_str::CompactString;

use crate::document::{AttemptResult, Compensation, Document, Status, StepKind, StepRecord, Timestamp};
use crate::id::{Outcome, ServiceSubject, WorkerId};
use crate::workflow::{Backoff, Next};

/// What a handler's attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    /// A business outcome (`ok`, `declined`, …) and an optional detail to
    /// record (such as a tracking number).
    Outcome {
        outcome: CompactString,
        detail: Option<CompactString>,
    },
    /// A failure worth retrying (a gateway timeout, a lost connection).
    Transient(String),
    /// A failure retrying will not fix.
    Permanent(String),
}

impl StepResult {
    pub fn ok() -> Self {
        StepResult::Outcome {
            outcome: CompactString::const_new("ok"),
            detail: None,
        }
    }

    pub fn outcome(name: impl AsRef<str>) -> Self {
        StepResult::Outcome {
            outcome: CompactString::new(name.as_ref()),
            detail: None,
        }
    }
}

/// One finished attempt, with everything `apply` needs from the outside.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub result: StepResult,
    pub worker: WorkerId,
    pub started_at: Timestamp,
    pub ended_at: Timestamp,
    /// A random number in `[0, 1)` for the backoff's jitter.
    pub jitter: f64,
}

/// Where the document goes after `apply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Publish the document to this service (the next step, a retry of the
    /// same one, or a compensation).
    Hop {
        service: ServiceSubject,
        /// Set for retries: the document is not due before this delay.
        delay: Option<Duration>,
    },
    /// The order reached a terminal status; publish the terminal hop.
    Finish(Status),
}

/// Why `apply` could not be used on a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("order is already {0}; there is no step to apply a result to")]
    Terminal(Status),
    #[error("document has no current step (cursor {0} is outside the route)")]
    NoStep(u16),
}

/// Applies one attempt's result to the document and returns where it goes.
/// Appends exactly one history record and advances `hop` by one.
pub fn apply(doc: &mut Document, attempt: Attempt) -> Result<Decision, TransitionError> {
    let (step_name, service, kind, retry) = match doc.status {
        Status::Running => {
            let s = doc.current_step().ok_or(TransitionError::NoStep(doc.step))?;
            (s.name.clone(), s.service.clone(), StepKind::Forward, s.retry)
        }
        Status::Compensating => {
            let c = doc.owed.last().ok_or(TransitionError::NoStep(doc.step))?;
            let retry = doc
                .route
                .step_by_name(&c.step)
                .map(|s| s.retry)
                .unwrap_or_else(Backoff::none);
            (c.step.clone(), c.service.clone(), StepKind::Compensation, retry)
        }
        terminal => return Err(TransitionError::Terminal(terminal)),
    };

    let (result, detail) = match attempt.result {
        StepResult::Outcome { outcome, detail } => (AttemptResult::Outcome(outcome), detail),
        StepResult::Transient(message) => (
            AttemptResult::Error {
                message,
                transient: true,
            },
            None,
        ),
        StepResult::Permanent(message) => (
            AttemptResult::Error {
                message,
                transient: false,
            },
            None,
        ),
    };
    doc.history.push(StepRecord {
        step: step_name.clone(),
        service: service.clone(),
        kind,
        attempt: doc.attempt,
        result: result.clone(),
        detail,
        started_at: attempt.started_at,
        ended_at: attempt.ended_at,
        worker: attempt.worker,
    });
    doc.hop = doc.hop.saturating_add(1);

    let decision = match (kind, result) {
        (_, AttemptResult::Error { transient: true, .. }) if doc.attempt < retry.max_attempts => {
            let delay = retry.delay(doc.attempt, attempt.jitter);
            doc.attempt += 1;
            doc.not_before = Some(attempt.ended_at.plus(delay));
            Decision::Hop {
                service,
                delay: Some(delay),
            }
        }
        (StepKind::Forward, AttemptResult::Error { message, transient }) => {
            let why = if transient {
                if let Some(service) = doc.current_step().and_then(|s| s.compensate.clone()) {
                    doc.owed.push(Compensation {
                        step: step_name.clone(),
                        service,
                    });
                }
                format!("step `{step_name}` failed after {} attempts: {message}", doc.attempt)
            } else {
                format!("step `{step_name}` failed: {message}")
            };
            fail(doc, why)
        }
        (StepKind::Compensation, AttemptResult::Error { message, .. }) => {
            let prior = doc.failure.take().unwrap_or_default();
            doc.failure = Some(format!(
                "{prior}; compensation `{step_name}` ({service}) could not be done after {} attempts: {message}",
                doc.attempt
            ));
            finish(doc, Status::Failed)
        }
        (StepKind::Compensation, AttemptResult::Outcome(_)) => {
            doc.owed.pop();
            match doc.owed.last() {
                Some(next) => {
                    let service = next.service.clone();
                    reset_attempt(doc);
                    Decision::Hop { service, delay: None }
                }
                None => finish(doc, Status::Compensated),
            }
        }
        (StepKind::Forward, AttemptResult::Outcome(outcome)) => forward(doc, outcome),
    };
    Ok(decision)
}

fn forward(doc: &mut Document, outcome: CompactString) -> Decision {
    let Some(step) = doc.current_step() else {
        return fail(doc, format!("cursor {} is outside the route", doc.step));
    };
    let step_name = step.name.clone();
    let compensate = step.compensate.clone();
    let next = match Outcome::new(&outcome) {
        Ok(o) => step.next_for(&o),
        Err(e) => return fail(doc, format!("step `{step_name}` returned an invalid outcome: {e}")),
    };
    let Some(next) = next else {
        return fail(
            doc,
            format!("step `{step_name}` returned outcome `{outcome}`, which the route does not map"),
        );
    };
    if next == Next::Fail {
        return fail(doc, format!("step `{step_name}` returned outcome `{outcome}`"));
    }
    // The step is done and moves the order on: its undoing is now owed.
    if let Some(service) = compensate {
        doc.owed.push(Compensation {
            step: step_name,
            service,
        });
    }
    let target = match next {
        Next::Continue => {
            let n = usize::from(doc.step) + 1;
            if n < doc.route.steps.len() {
                Some(n)
            } else {
                None
            }
        }
        Next::Goto(i) => Some(usize::from(i)),
        Next::Complete | Next::Fail => None,
    };
    let Some(target) = target else {
        doc.owed.clear();
        return finish(doc, Status::Completed);
    };
    let route_step = &doc.route.steps[target];
    if let Some(max) = route_step.max_visits {
        if doc.visits(&route_step.name) >= max {
            let why = format!("step `{}` was entered {max} times, its limit", route_step.name);
            return fail(doc, why);
        }
    }
    let service = route_step.service.clone();
    // Route length is bounded by MAX_STEPS, far below u16::MAX.
    doc.step = u16::try_from(target).unwrap_or(u16::MAX);
    reset_attempt(doc);
    Decision::Hop { service, delay: None }
}

fn reset_attempt(doc: &mut Document) {
    doc.attempt = 1;
    doc.not_before = None;
}

/// A permanent failure: compensate what is owed, or fail at once.
fn fail(doc: &mut Document, why: String) -> Decision {
    doc.failure = Some(why);
    reset_attempt(doc);
    match doc.owed.last() {
        Some(c) => {
            doc.status = Status::Compensating;
            Decision::Hop {
                service: c.service.clone(),
                delay: None,
            }
        }
        None => finish(doc, Status::Failed),
    }
}

fn finish(doc: &mut Document, status: Status) -> Decision {
    doc.status = status;
    doc.not_before = None;
    Decision::Finish(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::Payload;
    use crate::id::OrderId;
    use crate::workflow::{Then, Workflow};

    fn order() -> Document {
        let wf = Workflow::builder("order", 1)
            .step("charge", "payment.charge")
            .compensate("payment.refund")
            .retry(Backoff::exponential(3, Duration::from_millis(50)).with_jitter(0.0))
            .on("declined", Then::Fail)
            .step("reserve", "inventory.reserve")
            .compensate("inventory.release")
            .step("ship", "shipping.dispatch")
            .build()
            .unwrap();
        Document::new(OrderId::new(), wf.shared_route(), Payload::postcard(&()).unwrap())
    }

    fn run(doc: &mut Document, result: StepResult) -> Decision {
        apply(
            doc,
            Attempt {
                result,
                worker: WorkerId::new("t"),
                started_at: Timestamp(1_000),
                ended_at: Timestamp(2_000),
                jitter: 0.5,
            },
        )
        .unwrap()
    }

    fn hop(s: &str) -> Decision {
        Decision::Hop {
            service: ServiceSubject::new(s).unwrap(),
            delay: None,
        }
    }

    #[test]
    fn happy_path() {
        let mut d = order();
        assert_eq!(run(&mut d, StepResult::ok()), hop("inventory.reserve"));
        assert_eq!(run(&mut d, StepResult::ok()), hop("shipping.dispatch"));
        assert_eq!(run(&mut d, StepResult::ok()), Decision::Finish(Status::Completed));
        assert_eq!(d.history.len(), 3);
        assert_eq!(d.hop, 3);
        assert!(d.owed.is_empty());
    }

    #[test]
    fn declined_fails_with_nothing_to_undo() {
        let mut d = order();
        assert_eq!(
            run(&mut d, StepResult::outcome("declined")),
            Decision::Finish(Status::Failed)
        );
        assert!(d.failure.unwrap().contains("declined"));
    }

    #[test]
    fn late_failure_compensates_newest_first() {
        let mut d = order();
        run(&mut d, StepResult::ok());
        run(&mut d, StepResult::ok());
        assert_eq!(
            run(&mut d, StepResult::Permanent("XX".into())),
            hop("inventory.release")
        );
        assert_eq!(d.status, Status::Compensating);
        assert_eq!(run(&mut d, StepResult::ok()), hop("payment.refund"));
        assert_eq!(run(&mut d, StepResult::ok()), Decision::Finish(Status::Compensated));
        let kinds: Vec<_> = d.history.iter().map(|r| (r.step.as_str(), r.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("charge", StepKind::Forward),
                ("reserve", StepKind::Forward),
                ("ship", StepKind::Forward),
                ("reserve", StepKind::Compensation),
                ("charge", StepKind::Compensation),
            ]
        );
    }

    #[test]
    fn transient_errors_retry_with_backoff_then_fail() {
        let mut d = order();
        assert_eq!(
            run(&mut d, StepResult::Transient("gateway".into())),
            Decision::Hop {
                service: ServiceSubject::new("payment.charge").unwrap(),
                delay: Some(Duration::from_millis(50))
            }
        );
        assert_eq!(d.attempt, 2);
        assert_eq!(d.not_before, Some(Timestamp(2_000 + 50_000)));
        run(&mut d, StepResult::Transient("gateway".into()));
        assert_eq!(d.attempt, 3);
        // Out of attempts, the charge may have gone through in part: its
        // refund runs, and the order ends compensated.
        assert_eq!(
            run(&mut d, StepResult::Transient("gateway".into())),
            hop("payment.refund")
        );
        assert!(d.failure.as_deref().unwrap().contains("after 3 attempts"));
        assert_eq!(d.history.len(), 3);
        assert_eq!(run(&mut d, StepResult::ok()), Decision::Finish(Status::Compensated));
    }

    #[test]
    fn a_permanent_error_owes_nothing_for_its_own_step() {
        let mut d = order();
        assert_eq!(
            run(&mut d, StepResult::Permanent("card unknown".into())),
            Decision::Finish(Status::Failed)
        );
        assert!(d.owed.is_empty());
    }

    #[test]
    fn unmapped_and_invalid_outcomes_fail() {
        let mut d = order();
        run(&mut d, StepResult::ok());
        assert_eq!(run(&mut d, StepResult::outcome("weird")), hop("payment.refund"));
        assert!(d.failure.as_deref().unwrap().contains("does not map"));
        let mut d = order();
        assert_eq!(
            run(&mut d, StepResult::outcome("bad outcome")),
            Decision::Finish(Status::Failed)
        );
    }

    #[test]
    fn terminal_documents_refuse_results() {
        let mut d = order();
        run(&mut d, StepResult::outcome("declined"));
        let e = apply(
            &mut d,
            Attempt {
                result: StepResult::ok(),
                worker: WorkerId::new("t"),
                started_at: Timestamp(0),
                ended_at: Timestamp(0),
                jitter: 0.0,
            },
        );
        assert_eq!(e, Err(TransitionError::Terminal(Status::Failed)));
    }

    #[test]
    fn loops_stop_at_their_bound() {
        let wf = Workflow::builder("poll", 1)
            .step("check", "s.check")
            .max_visits(3)
            .on("again", Then::step("check"))
            .build()
            .unwrap();
        let mut d = Document::new(OrderId::new(), wf.shared_route(), Payload::postcard(&()).unwrap());
        assert_eq!(run(&mut d, StepResult::outcome("again")), hop("s.check"));
        assert_eq!(run(&mut d, StepResult::outcome("again")), hop("s.check"));
        assert_eq!(
            run(&mut d, StepResult::outcome("again")),
            Decision::Finish(Status::Failed)
        );
        assert!(d.failure.unwrap().contains("limit"));
    }
}
