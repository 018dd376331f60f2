//! The embedded transport: the seam's semantics inside one process, for
//! trying Waybill with no server and for users' own tests of their workflows.
//!
//! It is not a broker to grow: it serves one process. What it keeps:
//! - a message is delivered to every consumer whose filter matches it at
//!   publish time; a message no consumer matches waits for the first consumer
//!   created later that does (so a hop published before its worker started is
//!   not lost);
//! - per consumer, the JetStream rules: explicit ack, nak with or without a
//!   delay, redelivery when the ack deadline passes, `max_deliver`;
//! - a message that used up its deliveries unacknowledged is not dropped: it
//!   becomes a dead letter with that reason (NATS reports this as an advisory;
//!   here it is made explicit);
//! - deduplication by message id within a window;
//! - the stream as a log (the last [`EmbeddedConfig::log_capacity`]
//!   messages), which a coordinator reads as it reads `WAYBILL_HOPS`;
//! - requests and answers between the tasks of the process.
//!
//! Time is `tokio::time`, so tests can pause and advance it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use arc_swap::ArcSwap;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{ConsumerConfig, ConsumerKind, DeadLetter, Error, Message, Outgoing, PublishAck, Stored, Transport};
use crate::document::Timestamp;
use crate::id::MsgId;

mod consumer;
mod log;
mod rpc;

use consumer::{ConsumerState, Filter};
pub use consumer::{ConsumerStats, EmbeddedConsumer, EmbeddedDelivery};
pub use log::EmbeddedLog;

/// Settings of an embedded transport.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// How long a message id is remembered for deduplication.
    pub duplicate_window: Duration,
    /// Largest message (payload and headers) accepted.
    pub max_message_size: usize,
    /// How many of the latest messages the log keeps for reading back (a
    /// stream's message limit): what a coordinator can replay and show the
    /// history of. 0 keeps no log, and no coordinator can follow it.
    pub log_capacity: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            duplicate_window: Duration::from_secs(120),
            max_message_size: 1024 * 1024,
            log_capacity: 100_000,
        }
    }
}

/// The in-process transport. Cheap to clone; clones share everything.
#[derive(Clone, Debug)]
pub struct Embedded {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: EmbeddedConfig,
    seq: AtomicU64,
    /// Deduplication, in shards by key so publishers on different threads
    /// rarely wait for each other.
    dedup: [Mutex<Dedup>; DEDUP_SHARDS],
    /// What every publish reads: the consumers, as a snapshot swapped on
    /// change (reads take no lock).
    consumers: ArcSwap<Vec<Arc<ConsumerState>>>,
    /// Changes to the consumers, and messages no consumer took yet.
    routing: Mutex<Routing>,
    dead: Arc<DeadLetters>,
    /// Orders to cancel at their next hop.
    cancels: super::cancels::CancelSet,
    /// The signals delivered to orders, by order and name: their JSON.
    signals: Mutex<HashMap<(crate::id::OrderId, crate::id::SignalName), super::KeptSignal, crate::hash::FastState>>,
    /// The records of joins, by order and fork: their bytes and revision.
    joins: Mutex<Joins>,
    /// The latest messages, in sequence order (see
    /// [`EmbeddedConfig::log_capacity`]).
    log: Mutex<VecDeque<Arc<Stored>>>,
    /// Wakes the log's readers when a message is appended.
    appended: Notify,
    /// Who serves requests and announcements.
    rpc: rpc::Subscriptions,
}

/// The records of joins, by order and fork: their bytes and revision.
type Joins = HashMap<(crate::id::OrderId, u8), (Bytes, u64), crate::hash::FastState>;

#[derive(Debug, Default)]
struct Dedup {
    ids: HashMap<DedupKey, u64, crate::hash::FastState>,
    order: VecDeque<(Instant, DedupKey)>,
}

/// A message id, kept compact: a hop's own `<uuid>:<hop>` id as numbers (no
/// allocation, cheap to hash), anything else as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum DedupKey {
    Hop(u128, u32),
    Text(Arc<str>),
}

impl DedupKey {
    fn shard(&self) -> usize {
        let h = match self {
            DedupKey::Hop(order, hop) => (*order as u64) ^ u64::from(*hop).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            DedupKey::Text(t) => t.bytes().fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b)),
        };
        (h % DEDUP_SHARDS as u64) as usize
    }

    fn of(id: &MsgId) -> Self {
        // A branch's hop is rare: kept as its text.
        if let Some(hop) = id.as_hop().filter(|h| h.branch.is_none()) {
            return DedupKey::Hop(hop.order.as_uuid().as_u128(), hop.hop);
        }
        match id.as_custom() {
            // A custom id spelled as a hop's is that hop's id.
            Some(text) => Self::of_text(text),
            None => DedupKey::Text(id.to_string().into()),
        }
    }

    fn of_text(id: &str) -> Self {
        if let Some((text, hop)) = id.split_once(':') {
            // Only the canonical form (as OrderId prints it) maps to a number,
            // so two different texts never share a key.
            let canonical = text.len() == 36 && !text.bytes().any(|b| b.is_ascii_uppercase());
            let canonical_hop = !hop.starts_with(['0', '+']) || hop == "0";
            if let (true, true, Ok(order), Ok(hop)) = (
                canonical,
                canonical_hop,
                uuid::Uuid::try_parse(text),
                hop.parse::<u32>(),
            ) {
                return DedupKey::Hop(order.as_u128(), hop);
            }
        }
        DedupKey::Text(id.into())
    }
}

#[derive(Debug, Default)]
struct Routing {
    unclaimed: VecDeque<Arc<Stored>>,
}

const DEDUP_SHARDS: usize = 16;

#[derive(Debug)]
pub(super) struct DeadLetters {
    letters: Mutex<Vec<DeadLetter>>,
    count: watch::Sender<usize>,
}

impl DeadLetters {
    fn push(&self, letter: DeadLetter) {
        let n = {
            let mut l = lock(&self.letters);
            l.push(letter);
            l.len()
        };
        self.count.send_replace(n);
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind
    // (queues and maps, changed by single calls), so carrying on is sound.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
impl Embedded {
    pub fn new() -> Self {
        Self::with_config(EmbeddedConfig::default())
    }

    pub fn with_config(config: EmbeddedConfig) -> Self {
        let (count, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                config,
                seq: AtomicU64::new(0),
                dedup: std::array::from_fn(|_| Mutex::new(Dedup::default())),
                consumers: ArcSwap::from_pointee(Vec::new()),
                routing: Mutex::new(Routing::default()),
                dead: Arc::new(DeadLetters {
                    letters: Mutex::new(Vec::new()),
                    count,
                }),
                cancels: super::cancels::CancelSet::default(),
                signals: Mutex::default(),
                joins: Mutex::default(),
                log: Mutex::new(VecDeque::new()),
                appended: Notify::new(),
                rpc: rpc::Subscriptions::default(),
            }),
        }
    }

    /// Every dead letter stored so far, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.inner.dead.letters).clone()
    }

    /// Waits until at least `n` dead letters are stored.
    pub async fn wait_for_dead_letters(&self, n: usize) {
        let mut rx = self.inner.dead.count.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// The state of a durable consumer, if it exists.
    pub fn consumer_stats(&self, durable: &str) -> Option<ConsumerStats> {
        let consumers = self.inner.consumers.load();
        Some(consumers.iter().find(|c| c.config.durable == durable)?.stats())
    }

    /// How many consumers a message on `subject` would be delivered to.
    pub fn consumers_matching(&self, subject: &str) -> usize {
        self.inner
            .consumers
            .load()
            .iter()
            .filter(|c| c.filter.matches(subject))
            .count()
    }

    /// Messages stored so far (duplicates not counted).
    pub fn stored(&self) -> u64 {
        self.inner.seq.load(Ordering::Relaxed)
    }

    /// Gives `message` its sequence and appends it to the log, under the
    /// log's lock so the log stays in sequence order.
    fn store(&self, message: Message) -> Arc<Stored> {
        let stored_at = Timestamp::now();
        let capacity = self.inner.config.log_capacity;
        if capacity == 0 {
            let sequence = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
            return Arc::new(Stored {
                sequence,
                stored_at,
                message,
            });
        }
        let stored = {
            let mut log = lock(&self.inner.log);
            let sequence = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let stored = Arc::new(Stored {
                sequence,
                stored_at,
                message,
            });
            if log.len() >= capacity {
                log.pop_front();
            }
            log.push_back(stored.clone());
            stored
        };
        self.inner.appended.notify_waiters();
        stored
    }

    fn route(&self, stored: Arc<Stored>) {
        let subject = stored.message.subject.as_str();
        let mut matched = false;
        for c in self.inner.consumers.load().iter().filter(|c| c.filter.matches(subject)) {
            c.push(stored.clone());
            matched = true;
        }
        if matched {
            return;
        }
        // No consumer yet: look again under the lock that consumer creation
        // takes, so a message is never stranded between the two.
        let mut routing = lock(&self.inner.routing);
        for c in self.inner.consumers.load().iter().filter(|c| c.filter.matches(subject)) {
            c.push(stored.clone());
            matched = true;
        }
        if !matched {
            routing.unclaimed.push_back(stored);
        }
    }
}

impl Default for Embedded {
    fn default() -> Self {
        Self::new()
    }
}

impl Transport for Embedded {
    type Consumer = EmbeddedConsumer;

    async fn publish(&self, msg: Outgoing) -> Result<PublishAck, Error> {
        let size = msg.payload.len() + msg.headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>();
        let max = self.inner.config.max_message_size;
        if size > max {
            return Err(Error::TooLarge { size, max });
        }
        let message = Message {
            subject: msg.subject,
            headers: msg.headers,
            payload: msg.payload,
        };
        let stored = match msg.msg_id {
            Some(id) => {
                let now = Instant::now();
                let key = DedupKey::of(&id);
                let mut d = lock(&self.inner.dedup[key.shard()]);
                let window = self.inner.config.duplicate_window;
                while d.order.front().is_some_and(|(t, _)| now.duration_since(*t) >= window) {
                    if let Some((_, old)) = d.order.pop_front() {
                        d.ids.remove(&old);
                    }
                }
                if let Some(&seq) = d.ids.get(&key) {
                    return Ok(PublishAck {
                        sequence: seq,
                        duplicate: true,
                    });
                }
                // Stored under the shard's lock, so a second publish of the
                // same id waits and finds it.
                let stored = self.store(message);
                d.ids.insert(key.clone(), stored.sequence);
                d.order.push_back((now, key));
                stored
            }
            None => self.store(message),
        };
        let sequence = stored.sequence;
        self.route(stored);
        Ok(PublishAck {
            sequence,
            duplicate: false,
        })
    }

    async fn consumer(&self, config: ConsumerConfig) -> Result<EmbeddedConsumer, Error> {
        if config.durable.is_empty() {
            return Err(Error::BadConfig("durable consumer name is empty".into()));
        }
        if config.ack_wait.is_zero() {
            return Err(Error::BadConfig(format!(
                "consumer `{}`: ack_wait is zero",
                config.durable
            )));
        }
        if config.max_deliver == 0 {
            return Err(Error::BadConfig(format!(
                "consumer `{}`: max_deliver is zero",
                config.durable
            )));
        }
        let filter = Filter::parse(&config.filter)?;
        let mut routing = lock(&self.inner.routing);
        let current = self.inner.consumers.load_full();
        if let Some(c) = current.iter().find(|c| c.config.durable == config.durable) {
            // The prefetch is each process's own, not the consumer's.
            if !c.config.same_consumer(&config) {
                return Err(Error::BadConfig(format!(
                    "consumer `{}` exists with a different configuration ({:?}, asked for {:?})",
                    config.durable, c.config, config
                )));
            }
            return Ok(EmbeddedConsumer { state: c.clone() });
        }
        let state = Arc::new(ConsumerState::new(config, filter, self.inner.dead.clone()));
        // A shared consumer takes what waited for one; a private one starts
        // with what is published from now on.
        if state.config.kind == ConsumerKind::Shared {
            let unclaimed = std::mem::take(&mut routing.unclaimed);
            for m in unclaimed {
                if state.filter.matches(&m.message.subject) {
                    state.push(m);
                } else {
                    routing.unclaimed.push_back(m);
                }
            }
        }
        let mut next = Vec::clone(&current);
        next.push(state.clone());
        self.inner.consumers.store(Arc::new(next));
        Ok(EmbeddedConsumer { state })
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), Error> {
        self.inner.dead.push(letter);
        Ok(())
    }

    async fn delete_consumer(&self, durable: &str) -> Result<(), Error> {
        let _routing = lock(&self.inner.routing);
        let current = self.inner.consumers.load_full();
        if current.iter().any(|c| c.config.durable == durable) {
            let next: Vec<_> = current
                .iter()
                .filter(|c| c.config.durable != durable)
                .cloned()
                .collect();
            self.inner.consumers.store(Arc::new(next));
        }
        Ok(())
    }

    async fn request_cancel(&self, order: crate::id::OrderId, reason: &str) -> Result<bool, Error> {
        let fresh = self.inner.cancels.insert(order, reason.to_owned());
        // An order asleep (a step's wait, a retry's backoff) meets its
        // cancel now rather than when its wait ends.
        self.wake(order, None).await?;
        Ok(fresh)
    }

    fn cancel_requested(&self, order: &crate::id::OrderId) -> Option<String> {
        self.inner.cancels.get(order)
    }

    async fn send_signal(
        &self,
        order: crate::id::OrderId,
        name: &crate::id::SignalName,
        data: &str,
    ) -> Result<bool, Error> {
        let fresh = match lock(&self.inner.signals).entry((order, name.clone())) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(super::KeptSignal {
                    data: data.to_owned(),
                    at: Timestamp::now(),
                });
                true
            }
        };
        self.wake(order, Some(name)).await?;
        Ok(fresh)
    }

    async fn signal(
        &self,
        order: &crate::id::OrderId,
        name: &crate::id::SignalName,
    ) -> Result<Option<super::KeptSignal>, Error> {
        Ok(lock(&self.inner.signals).get(&(*order, name.clone())).cloned())
    }

    async fn join_state(&self, order: &crate::id::OrderId, fork: u8) -> Result<Option<(Bytes, u64)>, Error> {
        Ok(lock(&self.inner.joins).get(&(*order, fork)).cloned())
    }

    async fn put_join_state(&self, order: crate::id::OrderId, fork: u8, state: Bytes, expected: u64) -> Result<bool, Error> {
        let mut joins = lock(&self.inner.joins);
        let entry = joins.entry((order, fork)).or_insert((Bytes::new(), 0));
        if entry.1 != expected {
            return Ok(false);
        }
        *entry = (state, expected + 1);
        Ok(true)
    }

    async fn wake(&self, order: crate::id::OrderId, signal: Option<&crate::id::SignalName>) -> Result<(), Error> {
        for c in self.inner.consumers.load().iter() {
            c.wake(&order, signal);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::DedupKey;
    use crate::id::{DedupId, MsgId, OrderId};

    #[test]
    fn a_hops_id_is_keyed_as_numbers_whoever_spells_it() {
        let order: OrderId = "01890a5d-ac96-774b-bcce-b302099a8057".parse().unwrap();
        let hop = DedupId::main(order, 3);
        let key = DedupKey::Hop(order.as_uuid().as_u128(), 3);
        assert_eq!(DedupKey::of(&MsgId::hop(hop)), key);
        assert_eq!(DedupKey::of(&MsgId::custom(hop.to_string())), key);
        assert_eq!(
            DedupKey::of(&MsgId::redrive(hop, 9)),
            DedupKey::Text(MsgId::redrive(hop, 9).to_string().into())
        );
        assert_eq!(DedupKey::of(&MsgId::exhausted(9)), DedupKey::Text("exhausted:9".into()));
        // Only the canonical spelling is a hop's.
        let upper = hop.to_string().to_uppercase();
        assert_eq!(
            DedupKey::of(&MsgId::custom(upper.clone())),
            DedupKey::Text(upper.into())
        );
        assert_eq!(DedupKey::of(&MsgId::custom("m:0")), DedupKey::Text("m:0".into()));
    }
}
