//! The coordinator: every order tracked and queryable, beside the data
//! path, with no database of its own.
//!
//! It follows the hop log into its [`View`], answers the requests of
//! [`api`], reports stalled orders and re-drives the hops nothing will
//! deliver again. It is written once, above the transport seam
//! ([`HopLog`] + [`Rpc`]): the same coordinator runs on NATS and in one
//! process on the embedded transport.
//!
//! ```text
//!            hop log ──► feed ──► Tracker (view, replay, counters) ◄── requests ◄── Rpc
//!                                        ▲
//!                                  stalls (every check_every: expire, report, re-drive)
//! ```
//!
//! - [`view`]: what is tracked per order, built from the hops alone (pure).
//! - [`api`]: the JSON request interface any NATS client can use, and
//!   [`CoordinatorClient`], the typed way to ask it.
//! - `tracker`: the state the three tasks share, behind methods (no task
//!   holds its lock across an await).
//! - `feed`, `requests`, `stalls`: one task each.
//!
//! Why it works as it does (40 bytes per order and no history kept, a
//! view that replays to the same state, partitions by a hash of the id
//! rather than by subject, which stalled hops are re-driven and which only
//! reported) and what it was measured at (206,000 hops/s replayed,
//! 1,000,000 orders in flight in about 170 MiB): `docs/COORDINATOR.md` in
//! the repository.

pub mod api;
pub mod client;
mod feed;
mod requests;
mod stalls;
pub mod timing;
mod tracker;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use client::{CoordinatorClient, RequestError};
pub use view::{Applied, Filter, OrderState, Partition, PartitionError, StoredHop, Summary, View};

use crate::codec::{Codec, Format};
use crate::registry::Registry;
use crate::subject;
use crate::transport::{Error as TransportError, HopLog, Rpc, Transport};
use api::{Dashboard, FeedStats, OrdersQuery, OrdersReply};
use tracker::Tracker;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Which orders it tracks.
    pub partition: Partition,
    /// How long finished orders stay queryable.
    pub retention: Duration,
    /// How far past its step's deadline an order must be to count as
    /// stalled (queues and redeliveries take time too).
    pub stall_grace: Duration,
    /// How often stalled orders are looked for and finished ones dropped.
    pub check_every: Duration,
    /// Republish a stalled hop that no consumer will deliver again.
    pub redrive: bool,
    /// How long a forwarded request waits for the partition's coordinator.
    pub forward_timeout: Duration,
    /// How long a start keeps trying to store its order's first hop through
    /// retryable errors before it answers `"retryable": true`: under the
    /// 5 s a client typically waits for an answer, so the answer comes
    /// before the client gives up.
    pub start_timeout: Duration,
    pub codec: Codec,
    /// The format of the documents it starts.
    pub format: Format,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            partition: Partition::ALL,
            retention: Duration::from_secs(600),
            stall_grace: Duration::from_secs(10),
            check_every: Duration::from_secs(1),
            redrive: true,
            forward_timeout: Duration::from_secs(2),
            start_timeout: Duration::from_secs(4),
            codec: Codec::default(),
            format: Format::Postcard,
        }
    }
}

/// Why a coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl CoordinatorError {
    /// Whether starting again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            CoordinatorError::Transport(e) => e.is_retryable(),
        }
    }
}

/// What the coordinator's tasks share.
struct Shared<T> {
    config: CoordinatorConfig,
    transport: T,
    registry: Option<Arc<Registry>>,
    tracker: Tracker,
}

/// A running coordinator. Dropping it does not stop it: call
/// [`CoordinatorHandle::shutdown`].
pub struct CoordinatorHandle<T> {
    shared: Arc<Shared<T>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl<T> std::fmt::Debug for CoordinatorHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorHandle")
            .field("partition", &self.shared.config.partition)
            .finish_non_exhaustive()
    }
}

/// Starts a coordinator on `transport`. With a registry it also starts
/// orders (`waybill.start.<workflow>`); without one it answers start
/// requests with an error.
pub async fn start<T: Transport + HopLog + Rpc>(
    transport: T,
    registry: Option<Arc<Registry>>,
    config: CoordinatorConfig,
) -> Result<CoordinatorHandle<T>, CoordinatorError> {
    // The log must be there (a clear error now, rather than a feed that
    // retries for ever).
    transport.log_info().await?;
    let partition = config.partition;
    // Serve before reading the log, so no request is refused while the
    // view is rebuilt (answers say how far the replay is).
    let requests = transport
        .serve(
            &subject::coordinator_subjects(partition.index, partition.count),
            subject::COORDINATOR_GROUP,
        )
        .await?;
    let shared = Arc::new(Shared {
        tracker: Tracker::new(partition, config.retention),
        config,
        transport,
        registry,
    });
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let span = tracing::info_span!("coordinator", partition = %partition);
    {
        let (shared, cancel) = (shared.clone(), cancel.clone());
        tasks.spawn(
            async move {
                let s = &*shared;
                feed::feed(s.transport.clone(), &s.tracker, &s.config.codec, cancel).await;
            }
            .instrument(span.clone()),
        );
    }
    tasks.spawn(requests::serve(shared.clone(), requests, cancel.clone(), tasks.clone()).instrument(span.clone()));
    tasks.spawn(stalls::watch(shared.clone(), cancel.clone()).instrument(span));
    Ok(CoordinatorHandle { shared, cancel, tasks })
}

/// A reader of a coordinator's counts, cheap to clone, for what reports
/// them apart from requests (metrics). After the coordinator stops it
/// reads the counts as they were.
pub struct CoordinatorCounts<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for CoordinatorCounts<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> std::fmt::Debug for CoordinatorCounts<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorCounts")
            .field("partition", &self.shared.config.partition)
            .finish_non_exhaustive()
    }
}

impl<T> CoordinatorCounts<T> {
    /// The summary an unfiltered orders request gets from this coordinator
    /// (its partition only), without ids.
    pub fn summary(&self) -> Summary {
        let query = OrdersQuery {
            limit: Some(0),
            ..OrdersQuery::default()
        };
        self.shared
            .tracker
            .orders(&query, self.shared.config.stall_grace)
            .summary
    }

    pub fn feed_stats(&self) -> FeedStats {
        self.shared.tracker.feed_stats()
    }

    /// Orders that reached each end since the view began (cheap: no pass
    /// over the orders).
    pub fn finished(&self) -> std::collections::BTreeMap<crate::document::Status, u64> {
        self.shared.tracker.finished()
    }

    /// What an operator's page shows of this coordinator now: its counts,
    /// its steps' times, and at most `limit` each of the stalled orders
    /// and the latest that failed.
    pub fn dashboard(&self, limit: usize) -> Dashboard {
        self.shared.tracker.dashboard(self.shared.config.stall_grace, limit)
    }
}

impl<T> CoordinatorHandle<T> {
    /// A reader of this coordinator's counts (see [`CoordinatorCounts`]).
    pub fn counts(&self) -> CoordinatorCounts<T> {
        CoordinatorCounts {
            shared: self.shared.clone(),
        }
    }

    pub fn partition(&self) -> Partition {
        self.shared.config.partition
    }

    /// Waits until the view has replayed the log as it was at start.
    pub async fn caught_up(&self) {
        self.shared.tracker.wait_caught_up().await;
    }

    /// Waits, at most `within`, until the view has read every hop up to
    /// `sequence`; says whether it has.
    pub async fn reached(&self, sequence: u64, within: Duration) -> bool {
        self.shared.tracker.reached(sequence, within).await
    }

    /// Where an order stands, if this coordinator tracks it.
    pub fn get(&self, id: &crate::id::OrderId) -> Option<OrderState> {
        self.shared.tracker.get(id)
    }

    /// Every tracked order, sorted by id.
    pub fn snapshot(&self) -> Vec<OrderState> {
        self.shared.tracker.snapshot()
    }

    /// The summary an unfiltered orders request gets from this coordinator.
    pub fn orders(&self, query: &OrdersQuery) -> OrdersReply {
        self.shared.tracker.orders(query, self.shared.config.stall_grace)
    }

    pub fn feed_stats(&self) -> FeedStats {
        self.shared.tracker.feed_stats()
    }

    /// Stops reading, answering and checking; waits for the tasks to end.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
