//! What a service author reads: the [`Handler`] a step runs, the
//! [`StepContext`] it is given, and what it returns ([`StepOutput`] or
//! [`StepError`]).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use compact_str::CompactString;

use crate::document::{Payload, PayloadError, StepKind};
use crate::id::{OrderId, SignalName, StepName, WorkerId, WorkflowName};

/// A boxed future, as handlers return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The key a handler uses to make its effect happen once per (order, step):
/// the same on every redelivery and retry of that step.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a handler knows about the step it runs.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub order_id: OrderId,
    pub workflow: WorkflowName,
    pub version: u32,
    pub step: StepName,
    pub kind: StepKind,
    /// 1 for the first attempt, 2 for the first retry, …
    pub attempt: u32,
    /// How often the step was entered so far, this time included (loops).
    pub visit: u32,
    /// The order's hop being run (it grows by one per published hop): with
    /// the order id, it names this delivery's work exactly.
    pub hop: u32,
    /// When the attempt times out.
    pub deadline: tokio::time::Instant,
    pub worker: WorkerId,
    /// The signals the order received so far, each with its JSON (empty
    /// for most orders): see [`StepContext::signal`].
    pub signals: Vec<(SignalName, String)>,
}

impl StepContext {
    /// The JSON of the signal `name`, if the order received it (a step
    /// that waits for one runs once it has: [`crate::WorkflowBuilder::await_signal`]).
    pub fn signal(&self, name: &str) -> Option<&str> {
        self.signals
            .iter()
            .rev()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, data)| data.as_str())
    }

    /// `<order>:<step>` for a step (`#<visit>` added past the first visit),
    /// `<order>:<step>:undo` for its compensation.
    pub fn idempotency_key(&self) -> IdempotencyKey {
        let mut key = format!("{}:{}", self.order_id, self.step);
        if self.visit > 1 {
            key.push_str(&format!("#{}", self.visit));
        }
        if self.kind == StepKind::Compensation {
            key.push_str(":undo");
        }
        IdempotencyKey(key)
    }
}

/// A handler's success: a business outcome, optionally a new payload and a
/// detail for the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutput {
    pub(super) outcome: CompactString,
    pub(super) detail: Option<CompactString>,
    pub(super) payload: Option<Payload>,
}

impl StepOutput {
    /// The step did what it was asked.
    pub fn ok() -> Self {
        Self::outcome("ok")
    }

    /// A named business outcome, mapped by the route (`declined`, …).
    pub fn outcome(name: impl AsRef<str>) -> Self {
        Self {
            outcome: CompactString::new(name.as_ref()),
            detail: None,
            payload: None,
        }
    }

    /// Records `detail` (a tracking number, a receipt) in the history.
    pub fn with_detail(mut self, detail: impl AsRef<str>) -> Self {
        self.detail = Some(CompactString::new(detail.as_ref()));
        self
    }

    /// Replaces the document's payload.
    pub fn with_payload(mut self, payload: Payload) -> Self {
        self.payload = Some(payload);
        self
    }
}

/// A handler's failure. Transient ones are retried by the route's backoff;
/// unavailable ones are waited out without spending an attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    pub(super) message: String,
    pub(super) kind: ErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ErrorKind {
    Transient,
    Permanent,
    /// The infrastructure the step needs is unavailable: not an attempt.
    Unavailable,
    /// Not an attempt at all: the step could not start yet (another run of
    /// it still holds the order, say); deliver it again after the delay.
    Defer(Duration),
}

impl StepError {
    /// A failure worth retrying: counts as an attempt, retried with the
    /// step's backoff.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: ErrorKind::Transient,
        }
    }

    /// A failure retrying will not fix: the order fails (compensating).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: ErrorKind::Permanent,
        }
    }

    /// The infrastructure the step depends on (NATS, a store, a service it
    /// calls) is unavailable: no responders, a stream electing its leader,
    /// a time-out, a lost connection. Not the step's fault and not the
    /// order's: no attempt is spent, the order stays running and never
    /// fails or compensates for it. The step is tried again after a capped
    /// backoff (50 ms doubling to 5 s), the wait recorded in the history,
    /// until the worker's `unavailable_limit`; then the hop becomes a dead
    /// letter of kind `unavailable`, to redrive after the outage.
    ///
    /// Return it only where the step's effect did not happen or will be
    /// found again by its idempotency key: the step runs again.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: ErrorKind::Unavailable,
        }
    }

    /// The step cannot run yet: no attempt is recorded, the delivery is
    /// handed back and comes again after `delay`. For waiting out another
    /// run of the same step (a redelivery overlapping a slow original).
    /// Bounded by the consumer's maximum deliveries.
    pub fn defer(message: impl Into<String>, delay: Duration) -> Self {
        Self {
            message: message.into(),
            kind: ErrorKind::Defer(delay),
        }
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// Whether this is an unavailable infrastructure, not a step's failure.
    pub fn is_unavailable(&self) -> bool {
        self.kind == ErrorKind::Unavailable
    }

    /// The delay of a deferred step.
    pub fn deferred_for(&self) -> Option<Duration> {
        match self.kind {
            ErrorKind::Defer(d) => Some(d),
            _ => None,
        }
    }
}

impl From<PayloadError> for StepError {
    fn from(e: PayloadError) -> Self {
        StepError::permanent(e.to_string())
    }
}

/// A step handler: an async function of the step's context and the payload.
/// Closures `Fn(StepContext, Payload) -> impl Future<Output = Result<StepOutput, StepError>>`
/// are handlers.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, ctx: StepContext, payload: Payload) -> BoxFuture<Result<StepOutput, StepError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(StepContext, Payload) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<StepOutput, StepError>> + Send + 'static,
{
    fn handle(&self, ctx: StepContext, payload: Payload) -> BoxFuture<Result<StepOutput, StepError>> {
        Box::pin(self(ctx, payload))
    }
}
