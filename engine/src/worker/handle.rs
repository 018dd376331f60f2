//! A running worker: its handle, its counters, and the state its tasks
//! share.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handler::Handler;
use crate::codec::{Codec, Format};
use crate::id::{ServiceSubject, WorkerId, WorkflowName};

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
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running worker. Dropping it does not stop the worker: call
/// [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct WorkerHandle {
    pub(super) cancel: CancellationToken,
    pub(super) tracker: TaskTracker,
    pub(super) stats: Arc<WorkerStats>,
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

/// One service subject a worker serves, and its handler.
pub(super) struct Service {
    pub(super) service: ServiceSubject,
    pub(super) handler: Arc<dyn Handler>,
}

/// What every task of a worker shares.
pub(super) struct Shared<T> {
    pub(super) transport: T,
    pub(super) codec: Codec,
    pub(super) format: Format,
    pub(super) worker: WorkerId,
    pub(super) accept: Option<Arc<HashSet<(WorkflowName, u32)>>>,
    /// Reads payloads as JSON for a route that needs a field of one.
    pub(super) registry: Option<Arc<crate::Registry>>,
    pub(super) stats: Arc<WorkerStats>,
    pub(super) ack_wait: Duration,
    pub(super) max_deliver: u32,
    pub(super) unavailable_limit: Duration,
    /// Prometheus series, when asked for.
    pub(super) metrics: Option<super::metrics::WorkerMetrics>,
    pub(super) cancel: CancellationToken,
}
