//! The client: start orders and wait for their end.
//!
//! A client follows the terminal hops (`waybill.done.>`) on a consumer of its
//! own and hands each finished document to whoever waits for that order.
//!
//! Starting is safe against outages: the order's id is chosen before the
//! first try, and a try that is not confirmed stored (a time-out, no stream
//! while a leader is elected, a lost connection) is tried again under the
//! same id, which the stream's deduplication stores once. An outage delays a
//! start; it neither loses nor doubles it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::codec::{Codec, Format};
use crate::document::{Document, Payload};
use crate::hash::FastMap;
use crate::headers;
use crate::id::{DedupId, MsgId, OrderId};
use crate::registry::StartError;
use crate::subject;
use crate::transport::{Consumer, ConsumerConfig, Delivery, Error as TransportError, Outgoing, PublishAck, Transport};
use crate::workflow::Workflow;

/// How long [`Client::start`] keeps trying to store an order by default.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest [`Client::start_timeout`] accepted. A retry is deduplicated
/// against the tries before it only inside the stream's duplicate window
/// (120 s by default, `NatsConfig::duplicate_window`): a retry later than
/// that, of a try that was stored after all, would store the order twice.
/// Kept well inside the window, with room for a try's own time-out.
pub const MAX_START_TIMEOUT: Duration = Duration::from_secs(90);

/// Finished orders taken at a time: a client reads each at once (and
/// acknowledges it), so big pulls cost it no redeliveries.
const FOLLOW_BATCH: usize = 256;

/// The pause after a start's first unconfirmed try; it doubles per try.
const START_BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between two tries of a start.
const START_BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Why waiting for an order failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("the client is closed")]
    Closed,
    #[error("cannot follow finished orders: {0}")]
    Transport(#[from] crate::transport::Error),
}

enum Slot {
    /// Started here; nobody waits yet.
    Started,
    Waiting(Vec<oneshot::Sender<Arc<Document>>>),
    Done(Arc<Document>),
}

struct Inner<T> {
    transport: T,
    /// The client's own consumer of terminal hops, deleted on close.
    durable: String,
    codec: Codec,
    format: Format,
    slots: Mutex<FastMap<OrderId, Slot>>,
}

/// Starts orders and waits for them. Cheap to clone.
pub struct Client<T> {
    inner: Arc<Inner<T>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    start_timeout: Duration,
}

impl<T> Clone for Client<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            cancel: self.cancel.clone(),
            tracker: self.tracker.clone(),
            start_timeout: self.start_timeout,
        }
    }
}

impl<T> std::fmt::Debug for Client<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

fn slots<T>(inner: &Inner<T>) -> std::sync::MutexGuard<'_, FastMap<OrderId, Slot>> {
    inner.slots.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: Transport> Client<T> {
    /// The transport the client publishes and follows on.
    pub fn transport(&self) -> &T {
        &self.inner.transport
    }

    /// Connects and starts following finished orders.
    pub async fn connect(transport: T) -> Result<Self, ClientError> {
        Self::with_codec(transport, Codec::default(), Format::Postcard).await
    }

    pub async fn with_codec(transport: T, codec: Codec, format: Format) -> Result<Self, ClientError> {
        let durable = subject::client_consumer(&uuid::Uuid::now_v7());
        // A client only reads what it is given, at once: a short ack wait
        // brings back soon a delivery lost in transit (a cluster node that
        // dies with it), which the default 30 s left the order's waiter
        // without for half a minute.
        let mut config = ConsumerConfig::new(durable.clone(), subject::all_done())
            .private()
            .prefetch(FOLLOW_BATCH);
        config.ack_wait = Duration::from_secs(2);
        let consumer = transport.consumer(config).await?;
        let inner = Arc::new(Inner {
            transport,
            durable,
            codec,
            format,
            slots: Mutex::new(FastMap::default()),
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(follow(inner.clone(), consumer, cancel.clone()).instrument(tracing::info_span!("client_follow")));
        Ok(Self {
            inner,
            cancel,
            tracker,
            start_timeout: DEFAULT_START_TIMEOUT,
        })
    }

    /// How long a start keeps trying to store its order through retryable
    /// errors (default [`DEFAULT_START_TIMEOUT`], at most
    /// [`MAX_START_TIMEOUT`], which keeps every retry inside the stream's
    /// duplicate window). Zero tries once. Applies to this handle and the
    /// clones made from it afterwards.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout.min(MAX_START_TIMEOUT);
        self
    }

    /// Starts an order of `workflow` with a payload (validate it first, for
    /// instance with [`crate::Registry::prepare`]) under a new id (UUID v7).
    /// Returns once hop 0 is stored. Retries as [`Client::start_with_id`]
    /// does; if it still fails, [`StartError::NotStored`] names the id.
    pub async fn start(&self, workflow: &Workflow, payload: Payload) -> Result<OrderId, StartError> {
        let id = OrderId::new();
        self.start_with_id(id, workflow, payload).await?;
        Ok(id)
    }

    /// Starts an order with a given id. Starting the same id twice (inside
    /// the duplicate window) stores it once; the second answer says
    /// `duplicate`.
    ///
    /// A try that fails with a retryable error (a time-out, no stream while
    /// a leader is elected, a lost connection) is tried again with the same
    /// id, after 50 ms doubling to 2 s (with jitter), until the start
    /// timeout; then [`StartError::NotStored`]. A duplicate answer to a
    /// retry means an earlier try was stored after all: that is success,
    /// and the answer says `duplicate` (it cannot tell this call's own try
    /// from an earlier start of the id). Any other error is returned at
    /// once, and nothing was stored.
    pub async fn start_with_id(
        &self,
        id: OrderId,
        workflow: &Workflow,
        payload: Payload,
    ) -> Result<PublishAck, StartError> {
        let out = first_hop(&self.inner.codec, self.inner.format, id, workflow, payload)?;
        slots(&self.inner).entry(id).or_insert(Slot::Started);
        let deadline = tokio::time::Instant::now() + self.start_timeout;
        let backoff = (START_BACKOFF_FIRST, START_BACKOFF_CAP);
        match store_first_hop(&self.inner.transport, id, out, deadline, backoff, false).await {
            Ok(ack) => Ok(ack),
            Err(not) => {
                slots(&self.inner).remove(&id);
                Err(if not.error.is_retryable() {
                    StartError::NotStored {
                        id,
                        tries: not.tries,
                        waited: not.waited,
                        source: not.error,
                    }
                } else {
                    StartError::Transport(not.error)
                })
            }
        }
    }

    /// Waits until the order reaches a terminal status and returns its final
    /// document. Put a `tokio::time::timeout` around it to bound the wait.
    pub async fn wait(&self, id: OrderId) -> Result<Arc<Document>, ClientError> {
        let rx = {
            let mut slots = slots(&self.inner);
            match slots.remove(&id) {
                Some(Slot::Done(doc)) => return Ok(doc),
                Some(Slot::Waiting(mut v)) => {
                    let (tx, rx) = oneshot::channel();
                    v.push(tx);
                    slots.insert(id, Slot::Waiting(v));
                    rx
                }
                Some(Slot::Started) | None => {
                    let (tx, rx) = oneshot::channel();
                    slots.insert(id, Slot::Waiting(vec![tx]));
                    rx
                }
            }
        };
        rx.await.map_err(|_| ClientError::Closed)
    }

    /// Stops following finished orders and deletes the client's consumer;
    /// pending waits end with `Closed`. Closes every clone of this client.
    pub async fn close(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        slots(&self.inner).clear();
        if let Err(e) = self.inner.transport.delete_consumer(&self.inner.durable).await {
            tracing::warn!(error = %e, consumer = %self.inner.durable, "could not delete the client's consumer");
        }
    }
}

/// Hop 0 of a new order: the document, addressed to the first step, with
/// the deduplication id that makes a repeated start store it once.
pub(crate) fn first_hop(
    codec: &Codec,
    format: Format,
    id: OrderId,
    workflow: &Workflow,
    payload: Payload,
) -> Result<Outgoing, StartError> {
    let doc = Document::new(id, workflow.shared_route(), payload);
    let body = codec.encode(&doc, format)?;
    let first = &workflow.route().steps[0];
    Ok(Outgoing {
        subject: subject::hop(&first.service),
        msg_id: Some(MsgId::hop(DedupId::main(id, 0))),
        headers: headers::for_hop(&doc, format),
        payload: Bytes::from(body),
        due: crate::transport::Due::of(&doc),
    })
}

/// Why [`store_first_hop`] gave up.
#[derive(Debug)]
pub(crate) struct Unstored {
    /// The last error: retryable if the deadline ended the tries.
    pub error: TransportError,
    pub tries: u32,
    pub waited: Duration,
}

/// Publishes a first hop, trying again under its same deduplication id
/// while the errors are retryable and a pause (`backoff`: the first, and the
/// cap it doubles up to; each with jitter) still ends before `deadline`.
/// With `cut`, a try still under way at the deadline is given up (it may
/// yet be stored: a retry with the same id tells), so the whole takes no
/// longer than the deadline; without, a try takes as long as the
/// transport's own time-out.
pub(crate) async fn store_first_hop<T: Transport>(
    transport: &T,
    order: OrderId,
    out: Outgoing,
    deadline: tokio::time::Instant,
    backoff: (Duration, Duration),
    cut: bool,
) -> Result<PublishAck, Unstored> {
    let began = tokio::time::Instant::now();
    let (mut pause, cap) = backoff;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let attempt = transport.publish(out.clone());
        let result = if cut {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, attempt).await {
                Ok(r) => r,
                Err(_) => Err(TransportError::TimedOut(format!(
                    "storing hop 0 gave no answer within {left:?}"
                ))),
            }
        } else {
            attempt.await
        };
        let error = match result {
            Ok(ack) => {
                if tries > 1 {
                    tracing::info!(%order, subject = %out.subject, tries, duplicate = ack.duplicate, "a start was stored after retries");
                }
                return Ok(ack);
            }
            Err(e) => e,
        };
        let now = tokio::time::Instant::now();
        // Half the pause, plus up to as much again at random: many clients
        // cut off by one outage do not all come back at once.
        let wait = pause / 2 + pause.mul_f64(fastrand::f64() / 2.0);
        if !error.is_retryable() || now + wait >= deadline {
            return Err(Unstored {
                error,
                tries,
                waited: now.duration_since(began),
            });
        }
        tracing::warn!(%order, subject = %out.subject, error = %error, tries, retry_in = ?wait, "a start was not stored; trying again with the same id");
        tokio::time::sleep(wait).await;
        pause = (pause * 2).min(cap);
    }
}

async fn follow<T: Transport>(inner: Arc<Inner<T>>, mut consumer: T::Consumer, cancel: CancellationToken) {
    loop {
        let batch = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = consumer.fetch(FOLLOW_BATCH) => r,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "following finished orders failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => continue,
                }
            }
        };
        for d in batch {
            let msg = d.message();
            match inner
                .codec
                .decode_as(&msg.payload, msg.headers.get(headers::CONTENT_TYPE))
            {
                // A branch that undid its own steps after its join went on
                // without it ends so: the order's end comes on its own.
                Ok(doc) if doc.branch.is_some() => {}
                Ok(doc) => resolve(&inner, Arc::new(doc)),
                Err(e) => tracing::warn!(subject = %msg.subject, error = %e, "ignoring an undecodable terminal hop"),
            }
            if let Err(e) = d.ack().await {
                tracing::warn!(error = %e, "ack of a terminal hop failed");
            }
        }
    }
}

fn resolve<T>(inner: &Inner<T>, doc: Arc<Document>) {
    let mut slots = slots(inner);
    match slots.remove(&doc.id) {
        Some(Slot::Waiting(waiters)) => {
            for w in waiters {
                let _ = w.send(doc.clone());
            }
        }
        Some(Slot::Started) => {
            slots.insert(doc.id, Slot::Done(doc));
        }
        // Not ours, or already delivered (a redelivered terminal hop).
        Some(done @ Slot::Done(_)) => {
            slots.insert(doc.id, done);
        }
        None => {}
    }
}
