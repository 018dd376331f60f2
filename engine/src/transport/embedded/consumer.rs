//! The embedded transport's durable consumers: per consumer, the JetStream
//! rules (explicit ack, nak with or without a delay, redelivery when the ack
//! deadline passes, `max_deliver`, dead letters for what used it up).

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{lock, DeadLetters};
use crate::transport::{
    Consumer, ConsumerConfig, ConsumerPosition, DeadLetter, DeadLetterKind, Delivery, Error, Message, Stored,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Filter {
    Exact(String),
    /// `a.b.>`, kept as `a.b.`; matches one or more further tokens.
    Prefix(String),
}

impl Filter {
    pub(super) fn parse(filter: &str) -> Result<Self, Error> {
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

    pub(super) fn matches(&self, subject: &str) -> bool {
        match self {
            Filter::Exact(s) => s == subject,
            Filter::Prefix(p) => subject.len() > p.len() && subject.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug)]
pub(super) struct ConsumerState {
    pub(super) config: ConsumerConfig,
    pub(super) filter: Filter,
    queue: Mutex<Queue>,
    notify: Notify,
    dead: Arc<DeadLetters>,
    /// Fetches waiting for a message now.
    waiting: AtomicU64,
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
        (other.at, other.pending.msg.sequence).cmp(&(self.at, self.pending.msg.sequence))
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
    /// The highest sequence handed to this consumer, and delivered by it.
    pushed: u64,
    delivered: u64,
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

impl ConsumerState {
    pub(super) fn new(config: ConsumerConfig, filter: Filter, dead: Arc<DeadLetters>) -> Self {
        Self {
            config,
            filter,
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            dead,
            waiting: AtomicU64::new(0),
        }
    }

    pub(super) fn push(&self, msg: Arc<Stored>) {
        {
            let mut q = lock(&self.queue);
            q.pushed = q.pushed.max(msg.sequence);
            q.ready.push_back(Pending { msg, delivered: 0 });
        }
        self.notify.notify_one();
    }

    pub(super) fn stats(&self) -> ConsumerStats {
        let q = lock(&self.queue);
        ConsumerStats {
            ready: q.ready.len(),
            delayed: q.delayed.len(),
            in_flight: q.inflight.len(),
        }
    }

    /// Where the consumer stands: its ack floor is just below the oldest
    /// message it still holds in any state (one pass over what it holds:
    /// asked rarely, by the coordinator's stall checks).
    pub(super) fn position(&self) -> ConsumerPosition {
        let q = lock(&self.queue);
        let oldest = q
            .ready
            .iter()
            .map(|p| p.msg.sequence)
            .chain(q.delayed.iter().map(|d| d.pending.msg.sequence))
            .chain(q.inflight.keys().copied())
            .min();
        ConsumerPosition {
            durable: self.config.durable.clone(),
            ack_floor: oldest.map_or(q.pushed, |s| s - 1),
            delivered: q.delivered,
            pending: (q.ready.len() + q.delayed.len()) as u64,
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    fn dead_letter(&self, pending: &Arc<Stored>, reason: String) {
        self.dead.push(DeadLetter {
            message: pending.message.clone(),
            kind: DeadLetterKind::Exhausted,
            reason,
            consumer: self.config.durable.clone(),
        });
    }

    /// Makes the delayed messages of `order` (a hop handed back until it is
    /// due) ready now: it was cancelled, and its cancel applies at its next
    /// hop; or, with `signal`, the hop waiting for that signal got it.
    /// Returns how many there were.
    pub(super) fn wake(&self, order: &crate::id::OrderId, signal: Option<&crate::id::SignalName>) -> usize {
        let woken = {
            let mut q = lock(&self.queue);
            let is_order = |d: &Due| {
                let headers = &d.pending.msg.message.headers;
                headers
                    .get(crate::headers::HOP)
                    .and_then(crate::headers::HopHeader::parse)
                    .is_some_and(|h| h.order.parse::<crate::id::OrderId>().is_ok_and(|id| &id == order))
                    && signal.is_none_or(|s| headers.get(crate::headers::AWAITS) == Some(s.as_str()))
            };
            if !q.delayed.iter().any(is_order) {
                return 0;
            }
            let (wake, keep): (Vec<Due>, Vec<Due>) = std::mem::take(&mut q.delayed).into_iter().partition(is_order);
            q.delayed = keep.into();
            let n = wake.len();
            q.ready.extend(wake.into_iter().map(|d| d.pending));
            n
        };
        self.notify.notify_one();
        woken
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

/// One handle on an embedded durable consumer.
#[derive(Debug)]
pub struct EmbeddedConsumer {
    pub(super) state: Arc<ConsumerState>,
}

/// Counts a fetch as waiting while it lives.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Consumer for EmbeddedConsumer {
    type Delivery = EmbeddedDelivery;

    async fn fetch(&mut self, max: usize) -> Result<Vec<EmbeddedDelivery>, Error> {
        let max = max.max(1);
        let state = &self.state;
        let _waiting = Waiting::new(&state.waiting);
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
                            p.msg.sequence,
                            Inflight {
                                msg: p.msg.clone(),
                                delivered,
                                token,
                                deadline,
                            },
                        );
                        q.deadlines.push_back((deadline, p.msg.sequence, token));
                        q.delivered = q.delivered.max(p.msg.sequence);
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
        if q.inflight
            .get(&self.msg.sequence)
            .is_some_and(|i| i.token == self.token)
        {
            q.inflight.remove(&self.msg.sequence)
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
        self.msg.sequence
    }

    async fn ack(self) -> Result<(), Error> {
        // Like JetStream, an ack settles the message even if its deadline
        // passed and it was handed out again.
        lock(&self.state.queue).inflight.remove(&self.msg.sequence);
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
        let Some(inf) = q.inflight.get_mut(&self.msg.sequence).filter(|i| i.token == self.token) else {
            return Ok(());
        };
        inf.deadline = deadline;
        q.deadlines.push_back((deadline, self.msg.sequence, self.token));
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
