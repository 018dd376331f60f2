//! The worker runtime: one process serving one or more service subjects.
//!
//! ```text
//!  consumer (per service) ──fetch──▶ pump ──spawn, one permit each──▶ step task
//!                                                                      │
//!   decode + verify ── bad? ──▶ dead letter (reason) + term            │
//!   not due yet?    ──────────▶ nak(remaining delay)                   │
//!   handler (timeout, panics caught, progress kept alive)              │
//!   transition::apply ─▶ encode ─▶ publish `<order>:<hop>` ─▶ stored? ─▶ ack input
//!                                                  └─ failed ─▶ nak, redelivered later
//! ```
//!
//! Three kinds of failure: a transient error spends one of the step's
//! attempts (retried with the route's backoff), a permanent one fails the
//! order (compensating), and an *unavailable* infrastructure (a store or
//! NATS with no responders, a leader election, a time-out, a lost
//! connection) spends nothing: the step is tried again after a capped
//! backoff while the order stays running, its history saying since when it
//! waits and why; so are the runtime's own publishes. Only the operator's
//! limit ([`WorkerBuilder::unavailable_limit`]) ends such a wait, as a dead
//! letter of kind `unavailable` to redrive, never as a failed order.
//!
//! The output hop is stored before the input is acknowledged, so a crash at
//! any point leads to a redelivery, and the redelivery to the same result:
//! handlers are idempotent on [`StepContext::idempotency_key`], and the
//! republished hop carries the same deduplication id.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use compact_str::CompactString;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::codec::{Codec, Format};
use crate::document::{Document, Payload, PayloadError, StepKind, Timestamp};
use crate::headers;
use crate::id::{DedupId, NameError, OrderId, ServiceSubject, StepName, WorkerId, WorkflowName};
use crate::subject;
use crate::transition::{self, Attempt, Decision, StepResult};
use crate::transport::{Consumer, ConsumerConfig, DeadLetter, DeadLetterKind, Delivery, Outgoing, Transport};
use crate::workflow::DEFAULT_STEP_TIMEOUT;

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
}

impl StepContext {
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
    outcome: CompactString,
    detail: Option<CompactString>,
    payload: Option<Payload>,
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
    message: String,
    kind: ErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
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

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker serves no service subject; add one with `serve`")]
    NoServices,
    #[error(transparent)]
    BadSubject(#[from] NameError),
    #[error("service `{0}` is served twice")]
    DuplicateService(String),
    #[error("concurrency must be at least 1")]
    ZeroConcurrency,
    #[error("cannot open the consumer for `{service}`: {source}")]
    Consumer {
        service: String,
        #[source]
        source: crate::transport::Error,
    },
}

/// Counters of what a worker did, for tests, logs and the command line.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Step attempts run (handler called).
    pub steps: AtomicU64,
    /// Hops published and stored.
    pub published: AtomicU64,
    /// Published hops the stream already had (redelivered work).
    pub duplicates: AtomicU64,
    /// Messages sent to the dead-letter store.
    pub dead_lettered: AtomicU64,
    /// Deliveries handed back (not due yet, or publishing failed).
    pub naks: AtomicU64,
    /// Step runs that found their infrastructure unavailable (no attempt
    /// spent; tried again later).
    pub unavailable: AtomicU64,
    /// Publishes of a next hop tried again because the stream was
    /// unavailable.
    pub publish_retries: AtomicU64,
}

impl WorkerStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Configures and starts a worker.
#[must_use]
pub struct WorkerBuilder<T> {
    transport: T,
    id: WorkerId,
    concurrency: usize,
    batch: usize,
    pumps: usize,
    ack_wait: Duration,
    max_deliver: u32,
    unavailable_limit: Duration,
    codec: Codec,
    format: Format,
    accept: Option<Arc<HashSet<(WorkflowName, u32)>>>,
    services: Vec<(String, Arc<dyn Handler>)>,
}

/// How long a step waits out an unavailable infrastructure, by default,
/// before its hop becomes a dead letter of kind `unavailable`: generous, so
/// that a node's restart or a long failover only ever delays orders.
pub const DEFAULT_UNAVAILABLE_LIMIT: Duration = Duration::from_secs(15 * 60);

impl<T: fmt::Debug> fmt::Debug for WorkerBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("id", &self.id)
            .field("concurrency", &self.concurrency)
            .field("services", &self.services.iter().map(|s| &s.0).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The worker runtime. See the module documentation.
#[derive(Debug)]
pub struct Worker;

impl Worker {
    pub fn builder<T: Transport>(transport: T) -> WorkerBuilder<T> {
        WorkerBuilder {
            transport,
            id: WorkerId::from_process(),
            concurrency: 256,
            batch: 64,
            pumps: std::thread::available_parallelism().map_or(1, |n| n.get()).min(8),
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            unavailable_limit: DEFAULT_UNAVAILABLE_LIMIT,
            codec: Codec::default(),
            format: Format::Postcard,
            accept: None,
            services: Vec::new(),
        }
    }
}

impl<T: Transport> WorkerBuilder<T> {
    /// Serves `service` (such as `payment.charge`) with `handler`.
    pub fn serve(mut self, service: impl Into<String>, handler: impl Handler) -> Self {
        self.services.push((service.into(), Arc::new(handler)));
        self
    }

    /// Serves `service` with a shared handler.
    pub fn serve_arc(mut self, service: impl Into<String>, handler: Arc<dyn Handler>) -> Self {
        self.services.push((service.into(), handler));
        self
    }

    /// Names this worker in the histories it writes.
    pub fn id(mut self, id: WorkerId) -> Self {
        self.id = id;
        self
    }

    /// Steps run at once, per service subject.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Fetch loops per service, each on its own handle of the service's
    /// consumer (default: one per core, at most 8). The concurrency is
    /// shared among them.
    pub fn pumps(mut self, n: usize) -> Self {
        self.pumps = n.max(1);
        self
    }

    /// Messages fetched at once per service.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = d;
        self
    }

    pub fn max_deliver(mut self, n: u32) -> Self {
        self.max_deliver = n;
        self
    }

    /// How long one step may wait out an unavailable infrastructure (its
    /// handler returning [`StepError::unavailable`], or its next hop not
    /// being stored) before the hop becomes a dead letter of kind
    /// `unavailable` (default [`DEFAULT_UNAVAILABLE_LIMIT`]). Never a
    /// failure of the order: redrive the dead letter after the outage.
    pub fn unavailable_limit(mut self, limit: Duration) -> Self {
        self.unavailable_limit = limit;
        self
    }

    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The format of the hops this worker publishes.
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Only documents of these workflow versions are accepted; others are
    /// dead-lettered. Without this, any well-formed route is followed.
    pub fn accept(mut self, versions: impl IntoIterator<Item = (WorkflowName, u32)>) -> Self {
        self.accept = Some(Arc::new(versions.into_iter().collect()));
        self
    }

    /// Opens a consumer per service and starts serving.
    pub async fn start(self) -> Result<WorkerHandle, WorkerError> {
        if self.services.is_empty() {
            return Err(WorkerError::NoServices);
        }
        if self.concurrency == 0 {
            return Err(WorkerError::ZeroConcurrency);
        }
        let mut services = Vec::with_capacity(self.services.len());
        for (name, handler) in self.services {
            let service = ServiceSubject::new(name)?;
            if services.iter().any(|s: &Service| s.service == service) {
                return Err(WorkerError::DuplicateService(service.to_string()));
            }
            services.push(Service { service, handler });
        }
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let shared = Arc::new(Shared {
            transport: self.transport,
            codec: self.codec,
            format: self.format,
            worker: self.id,
            accept: self.accept,
            stats: Arc::new(WorkerStats::default()),
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            unavailable_limit: self.unavailable_limit,
            batch: self.batch,
            cancel: cancel.clone(),
        });
        // Open every consumer before serving any: a misconfigured one fails
        // the start with nothing running.
        let mut consumers = Vec::with_capacity(services.len());
        for svc in services {
            let mut cfg = ConsumerConfig::new(subject::service_consumer(&svc.service), subject::hop(&svc.service));
            cfg.ack_wait = shared.ack_wait;
            cfg.max_deliver = shared.max_deliver;
            let mut handles = Vec::with_capacity(self.pumps);
            for _ in 0..self.pumps {
                let consumer =
                    open_consumer(&shared.transport, &cfg)
                        .await
                        .map_err(|source| WorkerError::Consumer {
                            service: svc.service.to_string(),
                            source,
                        })?;
                handles.push(consumer);
            }
            consumers.push((Arc::new(svc), handles));
        }
        let per_pump = self.concurrency.div_ceil(self.pumps).max(1);
        for (svc, handles) in consumers {
            for (n, consumer) in handles.into_iter().enumerate() {
                let span = tracing::info_span!("pump", service = %svc.service, pump = n);
                tracker.spawn(pump(shared.clone(), svc.clone(), consumer, per_pump).instrument(span));
            }
        }
        Ok(WorkerHandle {
            cancel,
            tracker,
            stats: shared.stats.clone(),
        })
    }
}

/// A running worker. Dropping it does not stop the worker: call
/// [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct WorkerHandle {
    cancel: CancellationToken,
    tracker: TaskTracker,
    stats: Arc<WorkerStats>,
}

impl WorkerHandle {
    /// The worker's counters (they stay readable after shutdown).
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// Stops taking new work, lets every step in flight finish (each bounded
    /// by its timeout) and acknowledge, then returns. Nothing in flight is
    /// lost: a step that cannot finish is left unacknowledged and is
    /// redelivered to another worker.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// A token that stops the worker when cancelled (then await `shutdown`).
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

struct Service {
    service: ServiceSubject,
    handler: Arc<dyn Handler>,
}

struct Shared<T> {
    transport: T,
    codec: Codec,
    format: Format,
    worker: WorkerId,
    accept: Option<Arc<HashSet<(WorkflowName, u32)>>>,
    stats: Arc<WorkerStats>,
    ack_wait: Duration,
    max_deliver: u32,
    unavailable_limit: Duration,
    batch: usize,
    cancel: CancellationToken,
}

/// Opens a consumer, trying again for up to 30 s while the error may pass:
/// in a cluster, creating a replicated consumer can outlast a request's
/// timeout while its group forms or a node is away (the fault suite saw a
/// worker started beside a fresh three-node cluster give up on it).
async fn open_consumer<T: Transport>(
    transport: &T,
    cfg: &ConsumerConfig,
) -> Result<T::Consumer, crate::transport::Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut wait = Duration::from_millis(100);
    loop {
        match transport.consumer(cfg.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_retryable() && tokio::time::Instant::now() + wait < deadline => {
                tracing::warn!(consumer = %cfg.durable, error = %e, retry_in = ?wait, "cannot open the consumer yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Fetches work for one service and runs up to `concurrency` steps at once,
/// driving them inside this task (no task per message: the hot path of the
/// embedded default is measured in microseconds).
async fn pump<T: Transport>(shared: Arc<Shared<T>>, svc: Arc<Service>, mut consumer: T::Consumer, limit: usize) {
    let mut running = FuturesUnordered::new();
    let mut failures = 0u32;
    loop {
        let room = limit - running.len();
        let fetching = room > 0 && !shared.cancel.is_cancelled();
        if !fetching && running.is_empty() {
            // The acknowledgements of the last steps are queued on the
            // connection: send them before the process may exit, or those
            // steps are delivered again and run twice.
            // Bounded: with the server gone, a flush waits for a reconnect.
            match tokio::time::timeout(Duration::from_secs(5), shared.transport.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not flush the last acknowledgements"),
                Err(_) => tracing::warn!("the last acknowledgements were not flushed within 5 s"),
            }
            return;
        }
        tokio::select! {
            biased;
            Some(()) = running.next(), if !running.is_empty() => {}
            _ = shared.cancel.cancelled(), if fetching => {}
            batch = consumer.fetch(room.min(shared.batch)), if fetching => match batch {
                Ok(deliveries) => {
                    failures = 0;
                    for d in deliveries {
                        running.push(process(&shared, &svc, d));
                    }
                }
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_millis(50 * u64::from(failures.min(40)));
                    tracing::warn!(error = %e, retry_in = ?wait, "fetch failed");
                    if !e.is_retryable() && failures > 20 {
                        tracing::error!(error = %e, "giving up on this service");
                        shared.cancel.cancel();
                        continue;
                    }
                    // Keep finishing what runs while waiting to fetch again.
                    let pause = tokio::time::sleep(wait);
                    tokio::pin!(pause);
                    loop {
                        tokio::select! {
                            _ = &mut pause => break,
                            _ = shared.cancel.cancelled() => break,
                            Some(()) = running.next(), if !running.is_empty() => {}
                        }
                    }
                }
            },
        }
    }
}

/// Why an input cannot be processed at all.
fn unusable<T>(shared: &Shared<T>, svc: &Service, delivery: &impl Delivery) -> Result<Document, String> {
    let msg = delivery.message();
    let doc = shared
        .codec
        .decode_as(&msg.payload, msg.headers.get(headers::CONTENT_TYPE))
        .map_err(|e| format!("undecodable: {e}"))?;
    headers::verify(&msg.headers, &doc).map_err(|e| format!("headers disagree with the body: {e}"))?;
    if doc.status.is_terminal() {
        return Err(format!(
            "order {} is already {}; a terminal document is no work",
            doc.id, doc.status
        ));
    }
    let Some(target) = doc.target() else {
        return Err("document has no current step".into());
    };
    if target.service != &svc.service {
        return Err(format!(
            "hop addressed to `{}` arrived on `{}`",
            target.service, svc.service
        ));
    }
    if let Some(accept) = &shared.accept {
        if !accept.contains(&(doc.route.workflow.clone(), doc.route.version)) {
            return Err(format!(
                "unknown workflow `{}` version {}",
                doc.route.workflow, doc.route.version
            ));
        }
    }
    Ok(doc)
}

async fn process<T: Transport>(shared: &Shared<T>, svc: &Service, delivery: <T::Consumer as Consumer>::Delivery) {
    let mut doc = match unusable(shared, svc, &delivery) {
        Ok(doc) => doc,
        Err(reason) => return Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Invalid, reason)).await,
    };
    if let Some(due) = doc.not_before {
        let now = Timestamp::now();
        if due > now {
            return Box::pin(hand_back(shared, svc, delivery, Some(due.since(now)), "not due yet")).await;
        }
    }
    let Some(target) = doc.target() else { return };
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
        step: step.clone(),
        kind,
        attempt: doc.attempt,
        hop: doc.hop,
        deadline: tokio::time::Instant::now() + timeout,
        worker: shared.worker.clone(),
    };
    // The trace id is the order id (see `headers::traceparent`), so
    // one order's steps on any host join into one trace.
    let span = tracing::info_span!(
        "step",
        trace_id = %doc.id.as_uuid().simple(),
        order_id = %doc.id,
        step = %step,
        attempt = doc.attempt,
        kind = ?kind,
        hop = doc.hop,
    );
    async {
        WorkerStats::bump(&shared.stats.steps);
        let started_at = Timestamp::now();
        let fut = svc.handler.handle(ctx, doc.payload.clone());
        let result = run_guarded(fut, timeout, &delivery, shared.ack_wait).await;
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
                        let reason = format!(
                            "unavailable: {} (the step waited {} s on its infrastructure, over the limit of {} s; \
                             nothing failed: redrive it once the outage is over)",
                            e.message,
                            waited.as_secs(),
                            shared.unavailable_limit.as_secs()
                        );
                        return Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Unavailable, reason))
                            .await;
                    }
                    tracing::debug!(reason = %e.message, ?waited, "infrastructure unavailable; the step will be tried again");
                    StepResult::Unavailable(e.message)
                }
                ErrorKind::Defer(delay) => {
                    tracing::debug!(reason = %e.message, ?delay, "step deferred");
                    let why = format!("deferred: {}", e.message);
                    return Box::pin(hand_back(shared, svc, delivery, Some(delay), &why)).await;
                }
            },
        };
        tracing::debug!(?result, "step ran");
        let attempt = Attempt {
            result,
            worker: shared.worker.clone(),
            started_at,
            ended_at,
            jitter: fastrand::f64(),
        };
        let decision = match transition::apply(&mut doc, attempt) {
            Ok(d) => d,
            Err(e) => {
                return Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Invalid, e.to_string())).await
            }
        };
        let subject = match &decision {
            Decision::Hop { service, .. } => subject::hop(service),
            Decision::Finish(status) => {
                tracing::debug!(%status, "order finished");
                subject::done(&doc.route.workflow)
            }
        };
        let body = match shared.codec.encode(&doc, shared.format) {
            Ok(b) => b,
            Err(e) => {
                let reason = format!("the next hop cannot be encoded: {e}");
                return Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Invalid, reason)).await;
            }
        };
        let body = Bytes::from(body);
        // Built again for each try (rare): cheaper than copying one up front.
        let out = || Outgoing {
            subject: subject.clone(),
            msg_id: Some(
                DedupId {
                    order: doc.id,
                    hop: doc.hop,
                }
                .to_string(),
            ),
            headers: headers::for_hop(&doc, shared.format),
            payload: body.clone(),
        };
        match store(shared, &delivery, out).await {
            Ok(ack) => {
                WorkerStats::bump(if ack.duplicate {
                    &shared.stats.duplicates
                } else {
                    &shared.stats.published
                });
                if let Err(e) = delivery.ack().await {
                    // The output is stored; a redelivery will be a duplicate.
                    tracing::warn!(error = %e, "ack failed");
                }
            }
            Err(Unstored::OverLimit(e)) => {
                let reason = format!(
                    "unavailable: the next hop could not be stored for {} s, the limit: {e}; \
                     nothing failed: redrive it once the outage is over",
                    shared.unavailable_limit.as_secs()
                );
                Box::pin(dead_letter(shared, svc, delivery, DeadLetterKind::Unavailable, reason)).await;
            }
            Err(Unstored::Failed(e)) => {
                tracing::warn!(error = %e, "publishing the next hop failed");
                let delay = publish_retry_delay(delivery.delivered());
                hand_back(shared, svc, delivery, Some(delay), &format!("publish failed: {e}")).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Why a next hop was not stored.
enum Unstored {
    /// Unavailable for longer than the worker's limit.
    OverLimit(crate::transport::Error),
    /// Not worth trying again here (or the worker is draining): hand the
    /// input back; its redelivery does the step again, idempotently.
    Failed(crate::transport::Error),
}

/// Stores the next hop, waiting out an unavailable stream (a leader
/// election, a node restarting, a lost connection) with capped backoff
/// while keeping the input's delivery alive, up to the worker's
/// `unavailable_limit`. Handing the input back instead would spend one of
/// its deliveries per try, and a failover longer than those turned healthy
/// orders into dead letters. Every try carries the same deduplication id,
/// so a try that was stored after all is not stored twice.
async fn store<T: Transport>(
    shared: &Shared<T>,
    delivery: &impl Delivery,
    out: impl Fn() -> Outgoing + Sync,
) -> Result<crate::transport::PublishAck, Unstored> {
    // Most hops are stored at once. The retries' state (their timers, the
    // keep-alive) is boxed on the slow path so that it does not weigh on
    // every step's future: inlined, it cost the embedded benchmark about 6 %.
    match shared.transport.publish(out()).await {
        Ok(ack) => Ok(ack),
        Err(e) => Box::pin(store_again(shared, delivery, &out, e)).await,
    }
}

/// [`store`]'s slow path, after a first try failed with `first`.
async fn store_again<T: Transport>(
    shared: &Shared<T>,
    delivery: &impl Delivery,
    out: &(dyn Fn() -> Outgoing + Sync),
    first: crate::transport::Error,
) -> Result<crate::transport::PublishAck, Unstored> {
    let began = tokio::time::Instant::now();
    let tries = async move {
        let mut e = first;
        let mut tries = 0u32;
        loop {
            if !e.is_unavailable() || shared.cancel.is_cancelled() {
                return Err(Unstored::Failed(e));
            }
            if began.elapsed() >= shared.unavailable_limit {
                return Err(Unstored::OverLimit(e));
            }
            tries += 1;
            WorkerStats::bump(&shared.stats.publish_retries);
            let wait = transition::unavailable_delay(tries, fastrand::f64());
            if tries == 1 || tries.is_power_of_two() {
                tracing::warn!(error = %e, tries, retry_in = ?wait, "the next hop was not stored; trying again");
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.cancel.cancelled() => return Err(Unstored::Failed(e)),
            }
            e = match shared.transport.publish(out()).await {
                Ok(ack) => return Ok(ack),
                Err(e) => e,
            };
        }
    };
    keep_alive(std::pin::pin!(tries), delivery, shared.ack_wait).await
}

/// Runs `fut`, telling the server every third of the ack wait that the
/// delivery is still being worked on.
async fn keep_alive<F: Future + Unpin>(mut fut: F, delivery: &impl Delivery, ack_wait: Duration) -> F::Output {
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
async fn wait_guarded<F: std::future::Future + Unpin>(
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

/// How long to wait before trying a step again whose next hop could not be
/// stored: doubling from 250 ms up to 10 s, so the deliveries a message has
/// (10 by default) outlast a stream leader's election or a server restart
/// (about 45 s in all) before it becomes a dead letter.
fn publish_retry_delay(delivered: u32) -> Duration {
    let doublings = delivered.saturating_sub(1).min(6);
    (Duration::from_millis(250) * (1 << doublings)).min(Duration::from_secs(10))
}

/// Hands a delivery back for later, unless its deliveries are used up, in
/// which case it becomes a dead letter.
async fn hand_back<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    delivery: <T::Consumer as Consumer>::Delivery,
    delay: Option<Duration>,
    why: &str,
) {
    if delivery.delivered() >= shared.max_deliver {
        let reason = format!(
            "{why}, on delivery {} of at most {}",
            delivery.delivered(),
            shared.max_deliver
        );
        return dead_letter(shared, svc, delivery, DeadLetterKind::Exhausted, reason).await;
    }
    WorkerStats::bump(&shared.stats.naks);
    if let Err(e) = delivery.nak(delay).await {
        tracing::warn!(error = %e, "nak failed; the ack deadline will bring the message back");
    }
}

async fn dead_letter<T: Transport>(
    shared: &Shared<T>,
    svc: &Service,
    delivery: <T::Consumer as Consumer>::Delivery,
    kind: DeadLetterKind,
    reason: String,
) {
    tracing::warn!(service = %svc.service, %kind, %reason, "dead-lettering a message");
    let letter = DeadLetter {
        message: delivery.message().clone(),
        kind,
        reason,
        consumer: subject::service_consumer(&svc.service),
    };
    match shared.transport.dead_letter(letter).await {
        Ok(()) => {
            WorkerStats::bump(&shared.stats.dead_lettered);
            if let Err(e) = delivery.term().await {
                tracing::warn!(error = %e, "term failed after dead-lettering");
            }
        }
        Err(e) => {
            // Never drop: leave it for a later delivery to try again.
            tracing::error!(error = %e, "could not store the dead letter; handing the message back");
            let _ = delivery.nak(Some(Duration::from_secs(1))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn publish_retries_back_off_to_ten_seconds() {
        let d: Vec<u128> = (1..=10).map(|n| super::publish_retry_delay(n).as_millis()).collect();
        assert_eq!(d, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000, 10000, 10000]);
        assert!(d.iter().sum::<u128>() > 40_000);
    }
}
