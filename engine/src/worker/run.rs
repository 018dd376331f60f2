//! The run phase: the handler called under its deadline (panics caught,
//! the delivery kept alive while it runs long), its answer folded into the
//! [`Attempt`] the transition records.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

use super::handle::{Service, Shared, WorkerStats};
use super::handler::{BoxFuture, ErrorKind, StepContext, StepError, StepOutput};
use crate::document::{Document, StepKind, Timestamp};
use crate::transition::{Attempt, StepResult};
use crate::transport::Delivery;
use crate::workflow::DEFAULT_STEP_TIMEOUT;

/// What running the step came to.
pub(super) enum Ran {
    /// An attempt to record: the hop goes on.
    Attempt(Attempt),
    /// The step waited out its infrastructure past the worker's limit: a
    /// dead letter of kind `unavailable`, with this reason.
    OverLimit(String),
    /// The step could not start yet: hand the delivery back after `delay`.
    Deferred { delay: Duration, why: String },
}

/// The handler's context for the document's current step, its timeout, and
/// the span the step runs in; `None` if the document has no current step.
pub(super) fn prepare<T>(shared: &Shared<T>, doc: &Document) -> Option<(StepContext, Duration, tracing::Span)> {
    let target = doc.target()?;
    let kind = target.kind;
    let step = target.step.clone();
    let timeout = doc
        .route
        .step_by_name(&step)
        .map(|s| s.timeout())
        .unwrap_or(DEFAULT_STEP_TIMEOUT);
    let ctx = StepContext {
        order_id: doc.id,
        workflow: doc.route.workflow.clone(),
        version: doc.route.version,
        visit: doc.visits(&step) + u32::from(kind == StepKind::Forward && doc.attempt == 1),
        step,
        kind,
        attempt: doc.attempt,
        hop: doc.hop,
        deadline: tokio::time::Instant::now() + timeout,
        worker: shared.worker.clone(),
        signals: doc
            .history
            .iter()
            .filter_map(|r| match &r.result {
                crate::document::AttemptResult::Signal { name, data: Some(d) } => Some((name.clone(), d.clone())),
                _ => None,
            })
            .collect(),
    };
    let span = step_span(doc, &ctx);
    Some((ctx, timeout, span))
}

/// The span the step runs in. Its name and the fields `trace_id` (the order
/// id, which is the trace id) and `hop` are what a tracer reads to put it in
/// its order's trace ([`crate::trace`]): one order's steps on any host join
/// into one trace, chained hop to hop.
fn step_span(doc: &Document, ctx: &StepContext) -> tracing::Span {
    tracing::info_span!(
        crate::trace::STEP_SPAN,
        trace_id = %doc.id.as_uuid().simple(),
        order_id = %doc.id,
        step = %ctx.step,
        attempt = doc.attempt,
        kind = ?ctx.kind,
        hop = doc.hop,
    )
}

/// Runs the step's handler on the document's payload (replaced by the one
/// the handler returns, if any) and folds its answer into an attempt.
///
/// The handler is called at once, where `run` is called (inside the step's
/// span); only what awaits its answer is in the returned future, so that
/// the context, handed over already, takes no room in every step's future.
pub(super) fn run<'a, T>(
    shared: &'a Shared<T>,
    svc: &Service,
    doc: &'a mut Document,
    ctx: StepContext,
    timeout: Duration,
    delivery: &'a impl Delivery,
) -> impl Future<Output = Ran> + 'a {
    WorkerStats::bump(&shared.stats.steps);
    let started_at = Timestamp::now();
    let fut = svc.handler.handle(ctx, doc.payload.clone());
    async move {
        let result = run_guarded(fut, timeout, delivery, shared.ack_wait).await;
        let ended_at = Timestamp::now();
        let result = match result {
            Ok(out) => {
                if let Some(p) = out.payload {
                    doc.payload = p;
                }
                StepResult::Outcome {
                    outcome: out.outcome,
                    detail: out.detail,
                }
            }
            Err(e) => match e.kind {
                ErrorKind::Transient => StepResult::Transient(e.message),
                ErrorKind::Permanent => StepResult::Permanent(e.message),
                ErrorKind::Unavailable => {
                    WorkerStats::bump(&shared.stats.unavailable);
                    // Since when this hop's step waits, this try included.
                    let since = doc.waiting().map_or(started_at, |(since, _, _)| since);
                    let waited = ended_at.since(since);
                    if waited >= shared.unavailable_limit {
                        return Ran::OverLimit(format!(
                            "unavailable: {} (the step waited {} s on its infrastructure, over the limit of {} s; \
                             nothing failed: redrive it once the outage is over)",
                            e.message,
                            waited.as_secs(),
                            shared.unavailable_limit.as_secs()
                        ));
                    }
                    tracing::debug!(reason = %e.message, ?waited, "infrastructure unavailable; the step will be tried again");
                    StepResult::Unavailable(e.message)
                }
                ErrorKind::Defer(delay) => {
                    tracing::debug!(reason = %e.message, ?delay, "step deferred");
                    return Ran::Deferred {
                        delay,
                        why: format!("deferred: {}", e.message),
                    };
                }
            },
        };
        tracing::debug!(?result, "step ran");
        Ran::Attempt(Attempt {
            result,
            worker: shared.worker.clone(),
            started_at,
            ended_at,
            jitter: fastrand::f64(),
        })
    }
}

/// Runs `fut`, telling the server every third of the ack wait that the
/// delivery is still being worked on.
pub(super) async fn keep_alive<F: Future + Unpin>(
    mut fut: F,
    delivery: &impl Delivery,
    ack_wait: Duration,
) -> F::Output {
    let mut tick = tokio::time::interval(ack_wait / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            r = &mut fut => return r,
            _ = tick.tick() => {
                if let Err(e) = delivery.in_progress().await {
                    tracing::warn!(error = %e, "could not extend the ack deadline");
                }
            }
        }
    }
}

/// Runs the handler under its timeout, turning a panic into a transient
/// error and keeping the delivery alive while the step runs long.
async fn run_guarded(
    fut: BoxFuture<Result<StepOutput, StepError>>,
    timeout: Duration,
    delivery: &impl Delivery,
    ack_wait: Duration,
) -> Result<StepOutput, StepError> {
    let mut fut = AssertUnwindSafe(fut).catch_unwind();
    // Most handlers of an in-process service finish on their first poll:
    // those need no timer at all, and the slow path's state is boxed so it
    // does not weigh on every step.
    let outcome = match futures::poll!(&mut fut) {
        std::task::Poll::Ready(r) => Ok(r),
        std::task::Poll::Pending => Box::pin(wait_guarded(fut, timeout, delivery, ack_wait)).await,
    };
    match outcome {
        Ok(Ok(r)) => r,
        Ok(Err(panic)) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic".into());
            tracing::error!(panic = %what, "step handler panicked");
            Err(StepError::transient(format!("handler panicked: {what}")))
        }
        Err(_) => Err(StepError::transient(format!(
            "timed out after {} ms",
            timeout.as_millis()
        ))),
    }
}

/// The rest of a handler that did not finish at once: under its timeout,
/// keeping the delivery alive with progress acks when the step runs long.
async fn wait_guarded<F: Future + Unpin>(
    fut: F,
    timeout: Duration,
    delivery: &impl Delivery,
    ack_wait: Duration,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let guarded = tokio::time::timeout(timeout, fut);
    if timeout <= ack_wait / 2 {
        return guarded.await;
    }
    keep_alive(std::pin::pin!(guarded), delivery, ack_wait).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

    use super::*;
    use crate::id::{OrderId, WorkerId};
    use crate::trace::{HOP_FIELD, STEP_SPAN, TRACE_ID_FIELD};
    use crate::{Payload, Workflow};
    use std::sync::{Arc, Mutex};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata};

    /// A subscriber that keeps the metadata of the last span opened.
    struct Seen(Arc<Mutex<Option<&'static Metadata<'static>>>>);

    impl tracing::Subscriber for Seen {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, span: &Attributes<'_>) -> Id {
            *self.0.lock().unwrap() = Some(span.metadata());
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[test]
    fn the_step_span_has_the_name_and_fields_a_tracer_reads() {
        let wf = Workflow::builder("order", 1)
            .step("charge", "payment.charge")
            .build()
            .unwrap();
        let doc = Document::new(OrderId::new(), wf.shared_route(), Payload::postcard(&1u8).unwrap());
        let ctx = StepContext {
            order_id: doc.id,
            workflow: doc.route.workflow.clone(),
            version: 1,
            step: "charge".parse().unwrap(),
            kind: StepKind::Forward,
            attempt: 1,
            visit: 1,
            hop: doc.hop,
            deadline: tokio::time::Instant::now(),
            worker: WorkerId::new("test"),
            signals: Vec::new(),
        };
        let seen = Arc::new(Mutex::new(None));
        let span = tracing::subscriber::with_default(Seen(seen.clone()), || step_span(&doc, &ctx));
        drop(span);
        let meta = seen.lock().unwrap().take().expect("a span was opened");
        assert_eq!(meta.name(), STEP_SPAN);
        for field in [TRACE_ID_FIELD, HOP_FIELD] {
            assert!(meta.fields().field(field).is_some(), "no field {field} in {meta:?}");
        }
    }
}
