//! Configuring and starting a worker ([`Worker::builder`]), and what it
//! opens before serving.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::handle::{Service, Shared, WorkerHandle, WorkerStats};
use super::handler::Handler;
use super::pump::pump;
use crate::codec::{Codec, Format};
use crate::id::{NameError, ServiceSubject, WorkerId, WorkflowName};
use crate::subject;
use crate::transport::{ConsumerConfig, Transport};

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
    #[error("cannot follow the cancels: {0}")]
    Cancels(#[source] crate::transport::Error),
    #[error("cannot open the consumer for `{service}`: {source}")]
    Consumer {
        service: String,
        #[source]
        source: crate::transport::Error,
    },
}

/// Configures and starts a worker.
#[must_use]
pub struct WorkerBuilder<T> {
    transport: T,
    id: WorkerId,
    concurrency: usize,
    prefetch: Option<usize>,
    pumps: usize,
    metrics: Option<super::metrics::WorkerMetrics>,
    ack_wait: Duration,
    max_deliver: u32,
    unavailable_limit: Duration,
    codec: Codec,
    format: Format,
    accept: Option<Arc<HashSet<(WorkflowName, u32)>>>,
    registry: Option<Arc<crate::Registry>>,
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

/// The most deliveries a fetch loop takes ahead by default
/// ([`WorkerBuilder::prefetch`]): past 128 to 256 a NATS server gains no
/// more from bigger pulls (`benches/README.md`).
pub const MAX_DEFAULT_PREFETCH: usize = 256;

/// The worker runtime. See the module documentation.
#[derive(Debug)]
pub struct Worker;

impl Worker {
    pub fn builder<T: Transport>(transport: T) -> WorkerBuilder<T> {
        WorkerBuilder {
            transport,
            id: WorkerId::from_process(),
            concurrency: 256,
            prefetch: None,
            metrics: None,
            pumps: std::thread::available_parallelism().map_or(1, |n| n.get()).min(8),
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            unavailable_limit: DEFAULT_UNAVAILABLE_LIMIT,
            codec: Codec::default(),
            format: Format::Postcard,
            accept: None,
            registry: None,
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

    /// Deliveries each fetch loop takes ahead of its free slots, and asks
    /// NATS for in one pull (default: its share of the concurrency, at most
    /// [`MAX_DEFAULT_PREFETCH`]). Those waiting are kept alive with progress
    /// acknowledgements, and handed back when the worker drains.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = Some(n.max(1));
        self
    }

    /// Counts steps, their durations, dead letters and unavailable retries
    /// into `metrics` (see [`super::WorkerMetrics::register`]).
    pub fn metrics(mut self, metrics: super::metrics::WorkerMetrics) -> Self {
        self.metrics = Some(metrics);
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
    /// handler returning
    /// [`StepError::unavailable`](crate::StepError::unavailable), or its
    /// next hop not being stored) before the hop becomes a dead letter of kind
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

    /// The workflows this worker knows: it accepts only their versions (see
    /// [`Self::accept`]), and reads their payloads through it where a route
    /// needs a field of one (a step that waits until a payload time). A
    /// JSON payload is read without it.
    pub fn registry(mut self, registry: Arc<crate::Registry>) -> Self {
        self.accept = Some(Arc::new(registry.versions().collect()));
        self.registry = Some(registry);
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
            registry: self.registry,
            stats: Arc::new(WorkerStats::default()),
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            unavailable_limit: self.unavailable_limit,
            metrics: self.metrics,
            cancel: cancel.clone(),
        });
        // The cancels asked for already are known before the first hop.
        follow_cancels(&shared.transport).await.map_err(WorkerError::Cancels)?;
        // Open every consumer before serving any: a misconfigured one fails
        // the start with nothing running.
        let per_pump = self.concurrency.div_ceil(self.pumps).max(1);
        let prefetch = self.prefetch.unwrap_or(per_pump.min(MAX_DEFAULT_PREFETCH));
        let mut consumers = Vec::with_capacity(services.len());
        for svc in services {
            let mut cfg = ConsumerConfig::new(subject::service_consumer(&svc.service), subject::hop(&svc.service))
                .prefetch(prefetch);
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
        for (svc, handles) in consumers {
            for (n, consumer) in handles.into_iter().enumerate() {
                let span = tracing::info_span!("pump", service = %svc.service, pump = n);
                tracker.spawn(pump(shared.clone(), svc.clone(), consumer, per_pump, prefetch).instrument(span));
            }
        }
        Ok(WorkerHandle {
            cancel,
            tracker,
            stats: shared.stats.clone(),
        })
    }
}

/// Starts following the cancels, trying again for up to 30 s while the
/// error may pass (a cluster still forming answers its first requests
/// late), as [`open_consumer`] does.
async fn follow_cancels<T: Transport>(transport: &T) -> Result<(), crate::transport::Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut wait = Duration::from_millis(100);
    loop {
        match transport.follow_cancels().await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && tokio::time::Instant::now() + wait < deadline => {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot follow the cancels yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
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
