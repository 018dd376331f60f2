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
//! - deduplication by message id within a window.
//!
//! Time is `tokio::time`, so tests can pause and advance it.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{
    Consumer, ConsumerConfig, ConsumerKind, DeadLetter, Delivery, Error, Message, Outgoing, PublishAck, Transport,
};

/// Settings of an embedded transport.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// How long a message id is remembered for deduplication.
    pub duplicate_window: Duration,
    /// Largest message (payload and headers) accepted.
    pub max_message_size: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            duplicate_window: Duration::from_secs(120),
            max_message_size: 1024 * 1024,
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
}

#[derive(Debug, Default)]
struct Dedup {
    ids: HashMap<DedupKey, u64, crate::hash::FastState>,
    order: VecDeque<(Instant, DedupKey)>,
}

/// A message id, kept compact: Waybill's own `<uuid>:<hop>` ids as numbers
/// (no allocation, cheap to hash), anything else as text.
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

    fn of(id: &str) -> Self {
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
struct DeadLetters {
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

#[derive(Debug)]
struct Stored {
    seq: u64,
    message: Message,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Filter {
    Exact(String),
    /// `a.b.>`, kept as `a.b.`; matches one or more further tokens.
    Prefix(String),
}

impl Filter {
    fn parse(filter: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::BadConfig(format!("filter subject `{filter}`: {why}"));
        if filter.is_empty() {
            return Err(bad("empty"));
        }
        if filter.contains('*') || filter.contains(char::is_whitespace) {
            return Err(bad(
                "the embedded transport supports one subject or a prefix ending in `.>`",
            ));
        }
        if filter == ">" {
            return Ok(Filter::Prefix(String::new()));
        }
        match filter.strip_suffix('>') {
            Some(prefix) if prefix.ends_with('.') => Ok(Filter::Prefix(prefix.to_owned())),
            Some(_) => Err(bad("`>` must be a whole last token")),
            None => Ok(Filter::Exact(filter.to_owned())),
        }
    }

    fn matches(&self, subject: &str) -> bool {
        match self {
            Filter::Exact(s) => s == subject,
            Filter::Prefix(p) => subject.len() > p.len() && subject.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug)]
struct ConsumerState {
    config: ConsumerConfig,
    filter: Filter,
    queue: Mutex<Queue>,
    notify: Notify,
    dead: Arc<DeadLetters>,
}

#[derive(Debug, Clone)]
struct Pending {
    msg: Arc<Stored>,
    delivered: u32,
}

#[derive(Debug)]
struct Due {
    at: Instant,
    pending: Pending,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    // Reversed: BinaryHeap is a max-heap and the earliest must come first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.pending.msg.seq).cmp(&(self.at, self.pending.msg.seq))
    }
}

#[derive(Debug)]
struct Inflight {
    msg: Arc<Stored>,
    delivered: u32,
    token: u64,
    /// Current ack deadline; `in_progress` moves it later.
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Queue {
    ready: VecDeque<Pending>,
    delayed: BinaryHeap<Due>,
    inflight: HashMap<u64, Inflight, crate::hash::FastState>,
    /// (deadline, sequence, token), in deadline order: the ack wait is the
    /// same for every delivery of a consumer, so appending keeps it sorted.
    deadlines: VecDeque<(Instant, u64, u64)>,
    next_token: u64,
}

/// How many messages a consumer holds, by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumerStats {
    pub ready: usize,
    pub delayed: usize,
    pub in_flight: usize,
}

impl ConsumerStats {
    /// Messages not yet acknowledged, in any state.
    pub fn unacked(&self) -> usize {
        self.ready + self.delayed + self.in_flight
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind
    // (queues and maps, changed by single calls), so carrying on is sound.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ConsumerState {
    fn push(&self, msg: Arc<Stored>) {
        lock(&self.queue).ready.push_back(Pending { msg, delivered: 0 });
        self.notify.notify_one();
    }

    fn dead_letter(&self, pending: &Arc<Stored>, reason: String) {
        self.dead.push(DeadLetter {
            message: pending.message.clone(),
            kind: super::DeadLetterKind::Exhausted,
            reason,
            consumer: self.config.durable.clone(),
        });
    }

    /// Moves due delayed messages and expired deliveries back to `ready`.
    fn promote(&self, q: &mut Queue, now: Instant) {
        while q.delayed.peek().is_some_and(|d| d.at <= now) {
            if let Some(d) = q.delayed.pop() {
                q.ready.push_back(d.pending);
            }
        }
        while let Some(&(at, seq, token)) = q.deadlines.front() {
            // An entry is stale when its delivery was settled or its deadline
            // extended; stale entries are dropped early so the list stays
            // as short as the deliveries in flight.
            match q.inflight.get(&seq).filter(|i| i.token == token) {
                Some(i) if i.deadline == at && at > now => break,
                Some(i) if i.deadline == at => {
                    q.deadlines.pop_front();
                    if let Some(inf) = q.inflight.remove(&seq) {
                        self.requeue(q, inf, None, "its ack deadline passed");
                    }
                }
                _ => {
                    q.deadlines.pop_front();
                }
            }
        }
    }

    /// Puts a delivery back for another try, or dead-letters it when its
    /// deliveries are used up.
    fn requeue(&self, q: &mut Queue, inf: Inflight, delay: Option<Duration>, why: &str) {
        if inf.delivered >= self.config.max_deliver {
            self.dead_letter(
                &inf.msg,
                format!(
                    "delivered {} times (max_deliver) without being acknowledged; last time {why}",
                    inf.delivered
                ),
            );
            return;
        }
        let pending = Pending {
            msg: inf.msg,
            delivered: inf.delivered,
        };
        match delay {
            Some(d) if !d.is_zero() => q.delayed.push(Due {
                at: Instant::now() + d,
                pending,
            }),
            _ => q.ready.push_back(pending),
        }
    }

    fn next_wake(q: &Queue) -> Option<Instant> {
        let a = q.delayed.peek().map(|d| d.at);
        let b = q.deadlines.front().map(|d| d.0);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
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
        let c = consumers.iter().find(|c| c.config.durable == durable)?;
        let q = lock(&c.queue);
        Some(ConsumerStats {
            ready: q.ready.len(),
            delayed: q.delayed.len(),
            in_flight: q.inflight.len(),
        })
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
        let seq = match msg.msg_id {
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
                let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
                d.ids.insert(key.clone(), seq);
                d.order.push_back((now, key));
                seq
            }
            None => self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1,
        };
        self.route(Arc::new(Stored {
            seq,
            message: Message {
                subject: msg.subject,
                headers: msg.headers,
                payload: msg.payload,
            },
        }));
        Ok(PublishAck {
            sequence: seq,
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
            if c.config != config {
                return Err(Error::BadConfig(format!(
                    "consumer `{}` exists with a different configuration ({:?}, asked for {:?})",
                    config.durable, c.config, config
                )));
            }
            return Ok(EmbeddedConsumer { state: c.clone() });
        }
        let state = Arc::new(ConsumerState {
            config,
            filter,
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            dead: self.inner.dead.clone(),
        });
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
}

/// One handle on an embedded durable consumer.
#[derive(Debug)]
pub struct EmbeddedConsumer {
    state: Arc<ConsumerState>,
}

impl Consumer for EmbeddedConsumer {
    type Delivery = EmbeddedDelivery;

    async fn fetch(&mut self, max: usize) -> Result<Vec<EmbeddedDelivery>, Error> {
        let max = max.max(1);
        let state = &self.state;
        loop {
            let notified = state.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut q = lock(&state.queue);
                let now = Instant::now();
                state.promote(&mut q, now);
                if !q.ready.is_empty() {
                    let n = max.min(q.ready.len());
                    let deadline = now + state.config.ack_wait;
                    let mut out = Vec::with_capacity(n);
                    for p in q.ready.drain(..n).collect::<Vec<_>>() {
                        let token = q.next_token;
                        q.next_token += 1;
                        let delivered = p.delivered + 1;
                        q.inflight.insert(
                            p.msg.seq,
                            Inflight {
                                msg: p.msg.clone(),
                                delivered,
                                token,
                                deadline,
                            },
                        );
                        q.deadlines.push_back((deadline, p.msg.seq, token));
                        out.push(EmbeddedDelivery {
                            state: state.clone(),
                            msg: p.msg,
                            delivered,
                            token,
                        });
                    }
                    if !q.ready.is_empty() {
                        // Others may be waiting: pass the wake-up on.
                        state.notify.notify_one();
                    }
                    return Ok(out);
                }
                ConsumerState::next_wake(&q)
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// One delivery from an embedded consumer.
#[derive(Debug)]
pub struct EmbeddedDelivery {
    state: Arc<ConsumerState>,
    msg: Arc<Stored>,
    delivered: u32,
    token: u64,
}

impl EmbeddedDelivery {
    /// Takes this delivery out of the in-flight set, if it is still the
    /// current delivery of its message.
    fn settle(&self, q: &mut Queue) -> Option<Inflight> {
        if q.inflight.get(&self.msg.seq).is_some_and(|i| i.token == self.token) {
            q.inflight.remove(&self.msg.seq)
        } else {
            None
        }
    }
}

impl Delivery for EmbeddedDelivery {
    fn message(&self) -> &Message {
        &self.msg.message
    }

    fn delivered(&self) -> u32 {
        self.delivered
    }

    fn sequence(&self) -> u64 {
        self.msg.seq
    }

    async fn ack(self) -> Result<(), Error> {
        // Like JetStream, an ack settles the message even if its deadline
        // passed and it was handed out again.
        lock(&self.state.queue).inflight.remove(&self.msg.seq);
        Ok(())
    }

    async fn nak(self, delay: Option<Duration>) -> Result<(), Error> {
        {
            let mut q = lock(&self.state.queue);
            if let Some(inf) = self.settle(&mut q) {
                self.state.requeue(&mut q, inf, delay, "it was negatively acknowledged");
            }
        }
        self.state.notify.notify_one();
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), Error> {
        let mut q = lock(&self.state.queue);
        let deadline = Instant::now() + self.state.config.ack_wait;
        let Some(inf) = q.inflight.get_mut(&self.msg.seq).filter(|i| i.token == self.token) else {
            return Ok(());
        };
        inf.deadline = deadline;
        q.deadlines.push_back((deadline, self.msg.seq, self.token));
        Ok(())
    }

    async fn term(self) -> Result<(), Error> {
        let mut q = lock(&self.state.queue);
        self.settle(&mut q);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert!(Filter::parse("a.b").unwrap().matches("a.b"));
        assert!(!Filter::parse("a.b").unwrap().matches("a.b.c"));
        let p = Filter::parse("a.>").unwrap();
        assert!(p.matches("a.b") && p.matches("a.b.c") && !p.matches("a.") && !p.matches("b.a"));
        assert!(Filter::parse("a.*").is_err());
        assert!(Filter::parse("a>").is_err());
        assert!(Filter::parse("").is_err());
    }
}
