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
//! - An unavailable infrastructure (a store or NATS with no responders, a
//!   stream electing its leader, a lost connection) is not an attempt: it
//!   spends none and never fails or compensates the order. The step is
//!   tried again after a capped backoff ([`unavailable_delay`]) on the same
//!   attempt; consecutive tries fold into one history record, so a long
//!   outage does not grow the document. Only the worker's operator-set
//!   limit ends such a wait, by dead-lettering the hop, never by a
//!   transition.
//! - A cancel ([`cancel`]) applies at the order's next hop, before its step
//!   runs: it records why, undoes the completed steps newest first (a step
//!   that finished while the cancel was asked is one of them), and ends
//!   the order `cancelled`; with nothing to undo, at once. An order already
//!   compensating goes on as it would: it is undoing its steps anyway.

use std::time::Duration;

use compact_str::CompactString;

use crate::document::{AttemptResult, Compensation, Document, Status, StepKind, StepRecord, Timestamp};
use crate::id::{Outcome, ServiceSubject, WorkerId};
use crate::workflow::{Backoff, Next, Onward, Wait};

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
    /// The infrastructure the step depends on was unavailable: no attempt.
    Unavailable(String),
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
        /// Set for retries and for a step that waits: the document is not
        /// due before this delay.
        delay: Option<Duration>,
    },
    /// The order reached a terminal status; publish the terminal hop. (A
    /// branch's document ends so only when it undid its own steps, after
    /// its join had gone on without it.)
    Finish(Status),
    /// A branch's document is done with its branch (it completed, failed,
    /// or was cancelled or stopped: its status says which): it arrives at
    /// its fork's join ([`crate::join`]) with its compensations owed. The
    /// arrival is a hop of its own, to the service of the step it ended
    /// at, so that its deduplication id protects it as any hop's does; the
    /// worker that takes it writes the join's record.
    Arrive,
}

/// Why `apply` could not be used on a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("order is already {0}; there is no step to apply a result to")]
    Terminal(Status),
    #[error("document has no current step (cursor {0} is outside the route)")]
    NoStep(u16),
    #[error("step `{0}` waits for no signal")]
    NoSignal(String),
}

/// The first wait after an unavailable infrastructure.
pub const UNAVAILABLE_FIRST_DELAY: Duration = Duration::from_millis(50);
/// The longest wait between tries on an unavailable infrastructure.
pub const UNAVAILABLE_MAX_DELAY: Duration = Duration::from_secs(5);

/// How long to wait before try `tries + 1` on an unavailable
/// infrastructure: 50 ms doubling up to 5 s, each wait drawn from its upper
/// half by `jitter` (in `[0, 1)`), so the orders an outage held back do not
/// all come back at the same instant.
pub fn unavailable_delay(tries: u32, jitter: f64) -> Duration {
    let doublings = tries.saturating_sub(1).min(16);
    let full = UNAVAILABLE_FIRST_DELAY
        .saturating_mul(1 << doublings)
        .min(UNAVAILABLE_MAX_DELAY);
    full / 2 + full.mul_f64(0.5 * jitter.clamp(0.0, 1.0))
}

/// Applies one attempt's result to the document and returns where it goes.
/// Appends exactly one history record (or, for another try on an
/// unavailable infrastructure, updates the one it folds into) and advances
/// `hop` by one.
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

    let Attempt {
        result,
        worker,
        started_at,
        ended_at,
        jitter,
    } = attempt;
    let (result, detail) = match result {
        StepResult::Unavailable(message) => {
            let tries = note_unavailable(
                doc,
                (&step_name, &service, kind),
                message,
                (started_at, ended_at),
                worker,
            );
            doc.hop = doc.hop.saturating_add(1);
            let delay = unavailable_delay(tries, jitter);
            doc.not_before = Some(ended_at.plus(delay));
            return Ok(Decision::Hop {
                service,
                delay: Some(delay),
            });
        }
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
        started_at,
        ended_at,
        worker,
    });
    doc.hop = doc.hop.saturating_add(1);

    let decision = match (kind, result) {
        (_, AttemptResult::Error { transient: true, .. }) if doc.attempt < retry.max_attempts => {
            let delay = retry.delay(doc.attempt, jitter);
            doc.attempt += 1;
            doc.not_before = Some(ended_at.plus(delay));
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
                None => {
                    let end = if was_cancelled(doc) {
                        Status::Cancelled
                    } else {
                        Status::Compensated
                    };
                    finish(doc, end)
                }
            }
        }
        (StepKind::Forward, AttemptResult::Outcome(outcome)) => forward(doc, outcome, ended_at),
        // Waits on infrastructure returned above, and cancels and signals
        // are made by `cancel` and `signal`: no such record is made here. Were one to be, the step
        // runs again, which is always safe.
        (_, AttemptResult::Unavailable { .. } | AttemptResult::Cancelled { .. } | AttemptResult::Signal { .. }) => {
            Decision::Hop { service, delay: None }
        }
    };
    Ok(decision)
}

/// Applies a cancel asked for the order, at its hop now and before the
/// step runs: appends one record (the current step, `reason`), advances
/// `hop`, and starts undoing what was done, newest first, to end
/// `cancelled`; with nothing owed, ends `cancelled` at once. `None` when
/// the cancel changes nothing: an order already compensating goes on.
pub fn cancel(
    doc: &mut Document,
    reason: String,
    worker: WorkerId,
    at: Timestamp,
) -> Result<Option<Decision>, TransitionError> {
    match doc.status {
        Status::Running => {}
        Status::Compensating => return Ok(None),
        terminal => return Err(TransitionError::Terminal(terminal)),
    }
    let step = doc.current_step().ok_or(TransitionError::NoStep(doc.step))?;
    doc.history.push(StepRecord {
        step: step.name.clone(),
        service: step.service.clone(),
        kind: StepKind::Forward,
        attempt: doc.attempt,
        result: AttemptResult::Cancelled { reason: reason.clone() },
        detail: None,
        started_at: at,
        ended_at: at,
        worker,
    });
    doc.hop = doc.hop.saturating_add(1);
    doc.failure = Some(format!("cancelled: {reason}"));
    reset_attempt(doc);
    if doc.branch.is_some() {
        // The join undoes every branch's steps together.
        doc.status = Status::Cancelled;
        return Ok(Some(Decision::Arrive));
    }
    Ok(Some(match doc.owed.last() {
        Some(c) => {
            doc.status = Status::Compensating;
            Decision::Hop {
                service: c.service.clone(),
                delay: None,
            }
        }
        None => finish(doc, Status::Cancelled),
    }))
}

/// Whether a cancel started the order's compensation.
pub(crate) fn was_cancelled(doc: &Document) -> bool {
    doc.history
        .iter()
        .rev()
        .any(|r| matches!(r.result, AttemptResult::Cancelled { .. }))
}

/// Records a try on an unavailable infrastructure: folded into the last
/// record when that is a wait of the same attempt, a new record otherwise.
/// Returns the tries of this wait so far.
fn note_unavailable(
    doc: &mut Document,
    (step, service, kind): (&crate::id::StepName, &ServiceSubject, StepKind),
    message: String,
    (started_at, ended_at): (Timestamp, Timestamp),
    worker: WorkerId,
) -> u32 {
    let current = doc.attempt;
    if let Some(last) = doc.history.last_mut() {
        if let AttemptResult::Unavailable { message: m, tries, .. } = &mut last.result {
            if &last.step == step && last.kind == kind && last.attempt == current {
                *m = message;
                *tries = tries.saturating_add(1);
                last.ended_at = ended_at;
                last.worker = worker;
                return *tries;
            }
        }
    }
    doc.history.push(StepRecord {
        step: step.clone(),
        service: service.clone(),
        kind,
        attempt: current,
        result: AttemptResult::Unavailable {
            message,
            since: started_at,
            tries: 1,
        },
        detail: None,
        started_at,
        ended_at,
        worker,
    });
    1
}

fn forward(doc: &mut Document, outcome: CompactString, ended_at: Timestamp) -> Decision {
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
    go(doc, next, ended_at)
}

/// Moves the order from its current step to `next` (not `Fail`): the step
/// it leads to, entered at `ended_at` (its wait counted from then), or
/// completion.
fn go(doc: &mut Document, next: Next, ended_at: Timestamp) -> Decision {
    let target = match doc.route.onward(doc.step, next) {
        Onward::Step(j) => Some(usize::from(j)),
        Onward::Fork(f) => return enter_fork(doc, f),
        Onward::Join(_) | Onward::Complete | Onward::Fail => None,
    };
    let Some(target) = target else {
        return complete(doc);
    };
    enter(doc, target, ended_at)
}

/// Moves the order into fork `f`: its document goes, as a hop of its own,
/// to the first step of the fork's first branch, where the worker that
/// takes it writes the join's record and makes one document per branch
/// (see [`crate::join::branches`]). A hop rather than copies made here, so
/// that a redelivery of the step before the fork that goes another way (a
/// cancel, a retry) is a duplicate of it and cannot start a second set.
pub(crate) fn enter_fork(doc: &mut Document, f: usize) -> Decision {
    let Some(start) = doc.route.forks.get(f).and_then(|fork| fork.starts.first().copied()) else {
        return complete(doc);
    };
    doc.step = start;
    reset_attempt(doc);
    Decision::Hop {
        service: doc.route.steps[usize::from(start)].service.clone(),
        delay: None,
    }
}

/// Moves the order to step `target`, entered at `ended_at`.
pub(crate) fn enter(doc: &mut Document, target: usize, ended_at: Timestamp) -> Decision {
    let Some(route_step) = doc.route.steps.get(target) else {
        return complete(doc);
    };
    if let Some(max) = route_step.max_visits {
        if doc.visits(&route_step.name) >= max {
            let why = format!("step `{}` was entered {max} times, its limit", route_step.name);
            return fail(doc, why);
        }
    }
    let service = route_step.service.clone();
    let wait = route_step.wait.as_ref().and_then(Wait::duration);
    // Route length is bounded by MAX_STEPS, far below u16::MAX.
    doc.step = u16::try_from(target).unwrap_or(u16::MAX);
    reset_attempt(doc);
    // A step that waits is due its wait after the step before it ended.
    doc.not_before = wait.map(|d| ended_at.plus(d));
    Decision::Hop { service, delay: wait }
}

/// Ends the order's wait for the signal its current step waits for
/// ([`Wait::Signal`], see [`Document::awaited_signal`]), before the step
/// runs: appends one record (not an attempt) at `at`. With the signal's
/// JSON, the step runs now (the hop is no longer held to its deadline):
/// `None`. Without (its deadline passed), the order goes where the wait's
/// `on_timeout` says, the step unrun, and the returned decision is its next
/// hop.
pub fn signal(
    doc: &mut Document,
    data: Option<String>,
    worker: WorkerId,
    at: Timestamp,
) -> Result<Option<Decision>, TransitionError> {
    if doc.status.is_terminal() {
        return Err(TransitionError::Terminal(doc.status));
    }
    let step = doc.current_step().ok_or(TransitionError::NoStep(doc.step))?;
    let Some(Wait::Signal { name, on_timeout, .. }) = &step.wait else {
        return Err(TransitionError::NoSignal(step.name.to_string()));
    };
    let (name, on_timeout, step_name) = (name.clone(), *on_timeout, step.name.clone());
    let received = data.is_some();
    doc.history.push(StepRecord {
        step: step.name.clone(),
        service: step.service.clone(),
        kind: StepKind::Forward,
        attempt: doc.attempt,
        result: AttemptResult::Signal {
            name: name.clone(),
            data,
        },
        detail: None,
        started_at: at,
        ended_at: at,
        worker,
    });
    if received {
        doc.not_before = None;
        return Ok(None);
    }
    doc.hop = doc.hop.saturating_add(1);
    let why = format!("step `{step_name}` waited for signal `{name}` past its deadline");
    Ok(Some(match on_timeout {
        Next::Fail => fail(doc, why),
        next => {
            tracing::debug!(order = %doc.id, "{why}; going on");
            go(doc, next, at)
        }
    }))
}

/// When the order has just entered a step that waits until a payload time
/// ([`Wait::Until`]), reads that time from the payload's JSON form (asked
/// of `json` only then) and makes the hop due at it. A payload without the
/// field, or with something there that is not a time, fails the order
/// (compensating what it owes), naming the field: the returned decision
/// replaces the one [`apply`] gave.
pub fn wait_until(
    doc: &mut Document,
    json: impl FnOnce(&Document) -> Result<serde_json::Value, String>,
) -> Option<Decision> {
    if doc.status != Status::Running || doc.attempt != 1 || doc.not_before.is_some() {
        return None;
    }
    let step = doc.current_step()?;
    let Some(Wait::Until { field }) = &step.wait else {
        return None;
    };
    let (step, field) = (step.name.clone(), field.clone());
    let due = json(doc).and_then(|v| due_in(&v, &field));
    match due {
        Ok(at) => {
            doc.not_before = Some(at);
            None
        }
        Err(why) => Some(fail(
            doc,
            format!("step `{step}` waits until the payload's `{field}`, which {why}"),
        )),
    }
}

/// The time at `field` (a dotted path) of a payload's JSON form.
fn due_in(json: &serde_json::Value, field: &str) -> Result<Timestamp, String> {
    let mut at = json;
    for part in field.split('.') {
        at = at.get(part).ok_or_else(|| "is missing".to_owned())?;
    }
    match at {
        serde_json::Value::String(s) => parse_rfc3339(s).ok_or_else(|| format!("is `{s}`, not an RFC 3339 time")),
        serde_json::Value::Number(n) => n
            .as_u64()
            .and_then(|ms| ms.checked_mul(1000))
            .map(Timestamp)
            .ok_or_else(|| format!("is {n}, not milliseconds since the epoch")),
        other => Err(format!("is {other}, not a time")),
    }
}

/// `2026-12-05T22:39:00Z`, `2026-12-05T22:39:00.25+01:00`: microseconds
/// since the epoch (`None` if it is not such a time, or before 1970).
pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok())?
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let frac = s.get(start..i).filter(|f| !f.is_empty())?;
        let six: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
        micros = six.parse().ok()?;
    }
    let offset = match s.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && matches!(&tz[..1], "+" | "-") && &tz[3..4] == ":" => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            let o = (oh * 60 + om) * 60;
            if &tz[..1] == "+" {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    // Days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    u64::try_from(secs.checked_mul(1_000_000)?.checked_add(micros)?)
        .ok()
        .map(Timestamp)
}

fn reset_attempt(doc: &mut Document) {
    doc.attempt = 1;
    doc.not_before = None;
}

/// The order (or a branch's document: its branch) is complete.
fn complete(doc: &mut Document) -> Decision {
    if doc.branch.is_some() {
        // What it owes is the join's to keep or undo.
        doc.status = Status::Completed;
        doc.not_before = None;
        return Decision::Arrive;
    }
    doc.owed.clear();
    finish(doc, Status::Completed)
}

/// A permanent failure: compensate what is owed, or fail at once. A
/// branch's document arrives at its join failed instead, owing what it
/// owes: the join undoes every branch's steps together.
pub(crate) fn fail(doc: &mut Document, why: String) -> Decision {
    doc.failure = Some(why);
    reset_attempt(doc);
    if doc.branch.is_some() && doc.status == Status::Running {
        doc.status = Status::Failed;
        return Decision::Arrive;
    }
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

    fn cancel_now(doc: &mut Document) -> Option<Decision> {
        cancel(doc, "asked".into(), WorkerId::new("t"), Timestamp(3_000)).unwrap()
    }

    #[test]
    fn a_cancel_undoes_what_was_done_newest_first_and_ends_cancelled() {
        let mut d = order();
        run(&mut d, StepResult::ok());
        run(&mut d, StepResult::ok());
        // At the ship hop: charge and reserve are owed their undoing.
        assert_eq!(cancel_now(&mut d), Some(hop("inventory.release")));
        assert_eq!(d.status, Status::Compensating);
        assert_eq!(d.hop, 3);
        let last = d.history.last().unwrap();
        assert_eq!(last.step.as_str(), "ship");
        assert_eq!(last.result, AttemptResult::Cancelled { reason: "asked".into() });
        assert_eq!(run(&mut d, StepResult::ok()), hop("payment.refund"));
        assert_eq!(run(&mut d, StepResult::ok()), Decision::Finish(Status::Cancelled));
        assert_eq!(d.failure.as_deref(), Some("cancelled: asked"));
    }

    #[test]
    fn a_cancel_with_nothing_to_undo_ends_at_once() {
        let mut d = order();
        assert_eq!(cancel_now(&mut d), Some(Decision::Finish(Status::Cancelled)));
        assert_eq!(d.history.len(), 1);
    }

    #[test]
    fn a_cancel_stops_an_order_asleep_on_a_retry() {
        let mut d = order();
        run(&mut d, StepResult::Transient("gateway".into()));
        assert!(d.not_before.is_some());
        assert_eq!(cancel_now(&mut d), Some(Decision::Finish(Status::Cancelled)));
        assert_eq!(d.not_before, None);
    }

    #[test]
    fn a_cancel_changes_nothing_once_compensating_or_ended() {
        let mut d = order();
        run(&mut d, StepResult::ok());
        run(&mut d, StepResult::Permanent("no".into()));
        assert_eq!(d.status, Status::Compensating);
        let before = d.clone();
        assert_eq!(cancel_now(&mut d), None);
        assert_eq!(d, before);
        assert_eq!(run(&mut d, StepResult::ok()), Decision::Finish(Status::Compensated));
        assert_eq!(
            cancel(&mut d, "late".into(), WorkerId::new("t"), Timestamp(4_000)),
            Err(TransitionError::Terminal(Status::Compensated))
        );
    }

    fn waiting_order() -> Document {
        let wf = Workflow::builder("remind", 1)
            .step("hold", "booking.hold")
            .delay(Duration::from_secs(60))
            .compensate("booking.release")
            .on("again", Then::step("hold"))
            .max_visits(2)
            .step("remind", "mail.remind")
            .delay(Duration::from_secs(48 * 3600))
            .step("confirm", "booking.confirm")
            .build()
            .unwrap();
        Document::new(OrderId::new(), wf.shared_route(), Payload::postcard(&()).unwrap())
    }

    #[test]
    fn a_step_that_waits_is_due_its_wait_after_the_step_before_it() {
        let mut d = waiting_order();
        // The first step's wait counts from the start.
        assert_eq!(d.not_before, Some(d.created_at.plus(Duration::from_secs(60))));
        let two_days = Duration::from_secs(48 * 3600);
        assert_eq!(
            run(&mut d, StepResult::ok()),
            Decision::Hop {
                service: ServiceSubject::new("mail.remind").unwrap(),
                delay: Some(two_days),
            }
        );
        assert_eq!(d.not_before, Some(Timestamp(2_000).plus(two_days)));
        // A retry of a step that waited waits its backoff, not the step's wait.
        run(&mut d, StepResult::Transient("smtp".into()));
        assert_eq!(d.attempt, 2);
        assert!(d.not_before.unwrap() < Timestamp(2_000).plus(Duration::from_secs(60)));
        // The step after has no wait.
        assert_eq!(run(&mut d, StepResult::ok()), hop("booking.confirm"));
        assert_eq!(d.not_before, None);
    }

    #[test]
    fn a_step_entered_again_waits_again_and_a_cancel_wakes_a_sleeping_order() {
        let mut d = waiting_order();
        let d_again = run(&mut d, StepResult::outcome("again"));
        assert_eq!(
            d_again,
            Decision::Hop {
                service: ServiceSubject::new("booking.hold").unwrap(),
                delay: Some(Duration::from_secs(60)),
            }
        );
        assert_eq!(d.not_before, Some(Timestamp(2_000).plus(Duration::from_secs(60))));
        // Asleep before its second try: a cancel undoes the hold at once.
        assert_eq!(cancel_now(&mut d), Some(hop("booking.release")));
        assert_eq!(d.not_before, None);
    }

    #[test]
    fn rfc3339_times_read_as_microseconds() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(Timestamp(0)));
        assert_eq!(
            parse_rfc3339("2026-12-05T22:39:00.25Z"),
            Some(Timestamp(1_796_510_340_250_000))
        );
        assert_eq!(
            parse_rfc3339("2026-12-05T23:39:00.25+01:00"),
            parse_rfc3339("2026-12-05T22:39:00.25Z")
        );
        assert_eq!(
            parse_rfc3339("2026-12-05T21:39:00-01:00"),
            parse_rfc3339("2026-12-05T22:39:00Z")
        );
        // What the coordinator writes reads back.
        let t = Timestamp(1_764_974_340_123_456);
        assert_eq!(parse_rfc3339(&crate::coordinator::api::rfc3339(t)), Some(t));
        for bad in [
            "",
            "2026-12-05",
            "2026-13-05T22:39:00Z",
            "2026-12-05T22:39:00",
            "2026-12-05T22:39:00+0100",
            "2026-12-05T22:39:00.Z",
            "1969-12-31T23:59:59Z",
            "2026-12-0xT22:39:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_step_waits_until_the_payload_says_or_the_order_fails_naming_the_field() {
        let wf = Workflow::builder("ship_later", 1)
            .step("pack", "shipping.pack")
            .compensate("shipping.unpack")
            .step("ship", "shipping.dispatch")
            .not_before("delivery.at")
            .build()
            .unwrap();
        let start = |payload: serde_json::Value| {
            Document::new(OrderId::new(), wf.shared_route(), Payload::json(&payload).unwrap())
        };
        let json = |d: &Document| serde_json::from_slice(&d.payload.bytes).map_err(|e| e.to_string());

        let mut d = start(serde_json::json!({"delivery": {"at": "2026-12-24T08:00:00Z"}}));
        assert_eq!(d.not_before, None, "the first step does not wait");
        run(&mut d, StepResult::ok());
        assert_eq!(wait_until(&mut d, json), None);
        assert_eq!(d.not_before, parse_rfc3339("2026-12-24T08:00:00Z"));
        // Read once: a retry of the step keeps its backoff.
        run(&mut d, StepResult::Transient("carrier".into()));
        let backoff = d.not_before;
        assert_eq!(wait_until(&mut d, |_| panic!("not read again")), None);
        assert_eq!(d.not_before, backoff);

        let mut d = start(serde_json::json!({"delivery": {"at": 1_766_563_200_000u64}}));
        run(&mut d, StepResult::ok());
        wait_until(&mut d, json);
        assert_eq!(d.not_before, Some(Timestamp(1_766_563_200_000_000)));

        for (payload, why) in [
            (serde_json::json!({"delivery": {}}), "which is missing"),
            (
                serde_json::json!({"delivery": {"at": "soon"}}),
                "which is `soon`, not an RFC 3339 time",
            ),
            (
                serde_json::json!({"delivery": {"at": true}}),
                "which is true, not a time",
            ),
        ] {
            let mut d = start(payload);
            run(&mut d, StepResult::ok());
            assert_eq!(wait_until(&mut d, json), Some(hop("shipping.unpack")), "{why}");
            assert_eq!(d.status, Status::Compensating);
            let failure = d.failure.clone().unwrap();
            assert!(
                failure.contains("step `ship` waits until the payload's `delivery.at`") && failure.contains(why),
                "{failure}"
            );
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
    fn unavailable_spends_no_attempt_and_folds_into_one_record() {
        let mut d = order();
        // Far more tries than the step's 3 attempts: none is spent.
        for n in 1..=20u32 {
            let decision = run(&mut d, StepResult::Unavailable("ledger: no responders".into()));
            let Decision::Hop { service, delay } = decision else {
                panic!("an unavailable store must not end the order: {decision:?}")
            };
            assert_eq!(service.as_str(), "payment.charge");
            assert_eq!(delay, Some(unavailable_delay(n, 0.5)));
            assert_eq!(d.status, Status::Running);
            assert_eq!(d.attempt, 1);
            assert_eq!(d.hop, n);
            assert_eq!(d.history.len(), 1, "tries fold into one record");
            assert_eq!(d.waiting().map(|(_, tries, _)| tries), Some(n));
        }
        assert!(d.owed.is_empty() && d.failure.is_none());
        // The store is back: the step runs as its first attempt.
        assert_eq!(run(&mut d, StepResult::ok()), hop("inventory.reserve"));
        assert_eq!(d.waiting(), None);
        assert_eq!(d.visits(&d.history[0].step.clone()), 1, "a wait is not a visit");
        assert_eq!(d.history.len(), 2);
        assert_eq!(d.history[1].attempt, 1);
        // A wait after a transient error keeps that error's attempt count.
        assert!(matches!(
            run(&mut d, StepResult::Transient("t".into())),
            Decision::Hop { .. }
        ));
        assert_eq!(d.attempt, 2);
        run(&mut d, StepResult::Unavailable("x".into()));
        run(&mut d, StepResult::Unavailable("y".into()));
        assert_eq!(d.attempt, 2);
        let Some(AttemptResult::Unavailable { message, tries, since }) = d.history.last().map(|r| r.result.clone())
        else {
            panic!("expected a wait record")
        };
        assert_eq!((message.as_str(), tries, since), ("y", 2, Timestamp(1_000)));
    }

    #[test]
    fn unavailable_during_compensation_keeps_compensating() {
        let mut d = order();
        run(&mut d, StepResult::ok());
        run(&mut d, StepResult::outcome("weird"));
        assert_eq!(d.status, Status::Compensating);
        for _ in 0..10 {
            assert!(matches!(
                run(&mut d, StepResult::Unavailable("down".into())),
                Decision::Hop { ref service, .. } if service.as_str() == "payment.refund"
            ));
        }
        assert_eq!(d.status, Status::Compensating);
        assert_eq!(run(&mut d, StepResult::ok()), Decision::Finish(Status::Compensated));
    }

    #[test]
    fn unavailable_backoff_is_capped_with_jitter() {
        assert_eq!(unavailable_delay(1, 1.0), Duration::from_millis(50));
        assert_eq!(unavailable_delay(1, 0.0), Duration::from_millis(25));
        assert_eq!(unavailable_delay(3, 1.0), Duration::from_millis(200));
        assert_eq!(unavailable_delay(8, 1.0), UNAVAILABLE_MAX_DELAY);
        assert_eq!(unavailable_delay(u32::MAX, 1.0), UNAVAILABLE_MAX_DELAY);
        assert!(unavailable_delay(40, 0.0) >= UNAVAILABLE_MAX_DELAY / 2);
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
