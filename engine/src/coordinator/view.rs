//! The coordinator's view: where every tracked order stands, built only from
//! the hops in the stream, in stream order.
//!
//! The view is a pure function of the hops it was given (and of the clock
//! for dropping finished orders): a coordinator that replays the stream
//! after a restart holds the same view as one that never stopped. Nothing
//! here does I/O; reading the log and answering requests, on either
//! transport, are the sibling modules `feed`, `requests` and `stalls`.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::timing::{StepTimes, TimeSummary};
use crate::codec::Envelope;
use crate::document::{Status, Timestamp};
use crate::hash::FastState;
use crate::id::{OrderId, ServiceSubject, StepName, WorkflowName};
use crate::workflow::Route;

/// Which share of the orders one coordinator tracks: those whose id hashes
/// to `index` out of `count` (see [`Partition::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

/// A partition that cannot exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartitionError {
    #[error("partition `{0}` is not of the form `<index>/<count>` (e.g. `0/2`)")]
    Syntax(String),
    #[error(
        "partition {index}/{count} does not exist: the index counts from 0 and must be below the count (at least 1)"
    )]
    OutOfRange { index: u32, count: u32 },
}

impl Partition {
    /// The whole: one coordinator tracks every order.
    pub const ALL: Partition = Partition { index: 0, count: 1 };

    pub fn new(index: u32, count: u32) -> Result<Self, PartitionError> {
        if count == 0 || index >= count {
            return Err(PartitionError::OutOfRange { index, count });
        }
        Ok(Self { index, count })
    }

    /// The partition of `id` among `count`: the low 64 bits of the id (the
    /// random bits of a UUID v7), mixed by SplitMix64's finaliser, modulo
    /// `count`. Fixed forever: a client in another language can compute it.
    pub fn of(id: &OrderId, count: u32) -> u32 {
        let b = id.as_uuid().as_bytes();
        let mut low = [0u8; 8];
        low.copy_from_slice(&b[8..]);
        let mut z = u64::from_be_bytes(low);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // The remainder is below `count`, a u32.
        u32::try_from(z % u64::from(count.max(1))).unwrap_or(0)
    }

    pub fn owns(&self, id: &OrderId) -> bool {
        Self::of(id, self.count) == self.index
    }
}

impl Default for Partition {
    fn default() -> Self {
        Self::ALL
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Partition {
    type Err = PartitionError;
    fn from_str(s: &str) -> Result<Self, PartitionError> {
        let syntax = || PartitionError::Syntax(s.to_owned());
        let (i, n) = s.split_once('/').ok_or_else(syntax)?;
        let index = i.trim().parse().map_err(|_| syntax())?;
        let count = n.trim().parse().map_err(|_| syntax())?;
        Self::new(index, count)
    }
}

/// One hop as the stream stored it.
#[derive(Debug, Clone)]
pub struct StoredHop {
    /// The stream sequence.
    pub seq: u64,
    /// When the stream stored it (the server's clock).
    pub stored_at: Timestamp,
    pub envelope: Envelope,
}

/// What became of a hop given to [`View::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The order's state moved to this hop.
    Tracked,
    /// Another coordinator's partition.
    NotMine,
    /// Older than what the view holds (a duplicate, or a re-run of a step
    /// that was superseded): ignored.
    Stale,
    /// A terminal hop already past the retention: not kept.
    Expired,
}

/// The compact state of one order: 40 bytes, plus its 16-byte key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    seq: u64,
    at: Timestamp,
    /// When the current step should have produced its next hop: the later
    /// of the hop's time and its `not_before`, plus the step's timeout.
    due: Timestamp,
    hop: u32,
    attempt: u32,
    route: u16,
    step: u16,
    status: Status,
    /// The hop is a wait on unavailable infrastructure: the same attempt
    /// at the same step again, later (see `transition`), not a retry.
    waiting: bool,
    /// The hop is a branch's, while the order runs its fork's branches.
    branch: bool,
}

/// The `due` of a branch's hop: never. A branch that arrived at its join
/// publishes no next hop while the others run, so its last hop is no
/// stall; a branch's step that stops is delivered again by the stream.
const NEVER: Timestamp = Timestamp(u64::MAX);

/// Where a tracked order stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    pub id: OrderId,
    pub workflow: WorkflowName,
    pub version: u32,
    pub status: Status,
    /// The step the latest hop is for (being undone while compensating);
    /// once terminal, the step the order ended at.
    pub step: StepName,
    /// The service the latest hop is addressed to; none once terminal.
    pub service: Option<ServiceSubject>,
    pub hop: u32,
    pub attempt: u32,
    /// The stream sequence of the latest hop.
    pub sequence: u64,
    /// When the latest hop was stored, in microseconds since the epoch.
    pub last_hop_at: Timestamp,
    /// When the current step should have moved on; none once terminal.
    pub due: Option<Timestamp>,
}

/// Step times cover the last one to two of these (of the log's time).
const STEP_TIME_WINDOW: Duration = Duration::from_secs(300);

/// A step of a workflow version, as counted in summaries: `order/charge`.
pub type StepKey = String;

/// Which orders a query is about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    #[serde(default)]
    pub status: Option<Status>,
    /// A step name, or `workflow/step`.
    #[serde(default)]
    pub step: Option<String>,
    /// Only orders past their step's deadline (plus the grace).
    #[serde(default)]
    pub stalled: bool,
    #[serde(default)]
    pub workflow: Option<String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.status.is_none() && self.step.is_none() && !self.stalled && self.workflow.is_none()
    }
}

/// Counts over the tracked orders, and the ids that match a filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Orders held in memory (in flight, and finished within the retention).
    pub tracked: u64,
    pub in_flight: u64,
    /// Tracked orders by status.
    pub by_status: std::collections::BTreeMap<Status, u64>,
    /// Orders in flight by the step their latest hop is for.
    pub by_step: std::collections::BTreeMap<StepKey, u64>,
    /// Orders that reached each terminal status since this view began
    /// (including those since dropped from memory).
    pub finished: std::collections::BTreeMap<Status, u64>,
    /// In-flight orders past their step's deadline plus the grace.
    pub stalled: u64,
    /// In-flight orders whose latest hop waits on unavailable
    /// infrastructure (no attempt spent).
    #[serde(default)]
    pub waiting: u64,
    /// Tracked orders by workflow (all versions) and status.
    #[serde(default)]
    pub by_workflow: std::collections::BTreeMap<String, std::collections::BTreeMap<Status, u64>>,
    /// Orders that match the filter.
    pub matched: u64,
    /// Matching ids, oldest hop first, at most the limit asked for.
    pub ids: Vec<OrderId>,
}

/// Every tracked order, from the hops of the stream.
#[derive(Debug)]
pub struct View {
    partition: Partition,
    retention: Duration,
    routes: Vec<Arc<Route>>,
    route_ids: HashMap<(WorkflowName, u32), u16>,
    /// The route of the last hop, by identity: hops come in runs of one
    /// workflow version.
    last_route: Option<(Arc<Route>, u16)>,
    /// Keyed by ids from the stream, which only trusted publishers write:
    /// the fast hasher, not SipHash (a measurable share of the replay).
    orders: HashMap<OrderId, Entry, FastState>,
    /// Finished orders in the order they finished, for dropping them once
    /// the retention has passed.
    finished: VecDeque<(Timestamp, OrderId)>,
    by_status: [u64; 6],
    /// Tracked counts by route and status.
    by_route: Vec<[u64; 6]>,
    /// In-flight orders waiting on infrastructure.
    waiting: u64,
    /// In-flight counts by (route, step).
    by_step: HashMap<(u16, u16), u64>,
    /// How long orders stayed at each (route, step) lately.
    step_times: HashMap<(u16, u16), StepTimes>,
    finished_total: [u64; 6],
    applied: u64,
    stale: u64,
    last_seq: u64,
}

fn status_index(s: Status) -> usize {
    match s {
        Status::Running => 0,
        Status::Compensating => 1,
        Status::Completed => 2,
        Status::Failed => 3,
        Status::Compensated => 4,
        Status::Cancelled => 5,
    }
}

impl View {
    pub fn new(partition: Partition, retention: Duration) -> Self {
        Self {
            partition,
            retention,
            routes: Vec::new(),
            route_ids: HashMap::new(),
            last_route: None,
            orders: HashMap::default(),
            finished: VecDeque::new(),
            by_status: [0; 6],
            by_route: Vec::new(),
            waiting: 0,
            by_step: HashMap::new(),
            step_times: HashMap::new(),
            finished_total: [0; 6],
            applied: 0,
            stale: 0,
            last_seq: 0,
        }
    }

    pub fn partition(&self) -> Partition {
        self.partition
    }

    /// The stream sequence of the last hop applied (whatever became of it).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Hops that moved an order.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Hops ignored as older than what the view held.
    pub fn stale(&self) -> u64 {
        self.stale
    }

    pub fn len(&self) -> usize {
        self.orders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.orders.is_empty()
    }

    /// Orders not yet finished.
    pub fn summary_in_flight(&self) -> u64 {
        self.by_status[0] + self.by_status[1]
    }

    /// Bytes the view's tables hold (their capacity, not only what is used).
    pub fn memory_bytes(&self) -> usize {
        // One control byte per bucket besides the entry itself.
        let order = std::mem::size_of::<(OrderId, Entry)>() + 1;
        self.orders.capacity() * order
            + self.finished.capacity() * std::mem::size_of::<(Timestamp, OrderId)>()
            + self.by_step.capacity() * (std::mem::size_of::<((u16, u16), u64)>() + 1)
    }

    fn route_id(&mut self, route: &Arc<Route>) -> u16 {
        if let Some((r, id)) = &self.last_route {
            if Arc::ptr_eq(r, route) {
                return *id;
            }
        }
        let id = self.route_id_slow(route);
        self.last_route = Some((route.clone(), id));
        id
    }

    fn route_id_slow(&mut self, route: &Arc<Route>) -> u16 {
        let key = (route.workflow.clone(), route.version);
        if let Some(&id) = self.route_ids.get(&key) {
            return id;
        }
        // More than 65,535 workflow versions in one stream is not a real
        // case; should it happen, the newest share the last slot's names.
        let id = u16::try_from(self.routes.len()).unwrap_or(u16::MAX);
        if usize::from(id) == self.routes.len() {
            self.routes.push(route.clone());
        }
        self.route_ids.insert(key, id);
        id
    }

    fn step_key(&self, route: u16, step: u16) -> StepKey {
        match self.routes.get(usize::from(route)) {
            Some(r) => match r.step(step) {
                Some(s) => format!("{}/{}", r.workflow, s.name),
                None => format!("{}/#{step}", r.workflow),
            },
            None => format!("#{route}/#{step}"),
        }
    }

    fn count(&mut self, e: &Entry, delta: i64) {
        let slot = &mut self.by_status[status_index(e.status)];
        *slot = slot.saturating_add_signed(delta);
        let route = usize::from(e.route);
        if self.by_route.len() <= route {
            self.by_route.resize(route + 1, [0; 6]);
        }
        let slot = &mut self.by_route[route][status_index(e.status)];
        *slot = slot.saturating_add_signed(delta);
        if e.waiting {
            self.waiting = self.waiting.saturating_add_signed(delta);
        }
        if !e.status.is_terminal() {
            let n = self.by_step.entry((e.route, e.step)).or_insert(0);
            *n = n.saturating_add_signed(delta);
            if *n == 0 {
                self.by_step.remove(&(e.route, e.step));
            }
        }
    }

    /// Moves the hop's order to where the hop says, unless the view already
    /// holds a later hop of it. `now` decides whether a terminal hop is
    /// already past the retention.
    pub fn apply(&mut self, hop: &StoredHop, now: Timestamp) -> Applied {
        self.last_seq = self.last_seq.max(hop.seq);
        let env = &hop.envelope;
        if !self.partition.owns(&env.id) {
            return Applied::NotMine;
        }
        let route = self.route_id(&env.route);
        let due = {
            let start = env.not_before.map_or(hop.stored_at, |nb| nb.max(hop.stored_at));
            let timeout = env.route.step(env.step).map(|s| s.timeout()).unwrap_or_default();
            start.plus(timeout)
        };
        let mut new = Entry {
            seq: hop.seq,
            at: hop.stored_at,
            due: if env.branch.is_some() { NEVER } else { due },
            hop: env.hop,
            attempt: env.attempt,
            route,
            step: env.step,
            status: env.status,
            waiting: false,
            branch: env.branch.is_some(),
        };
        if let Some(b) = env.branch {
            // A branch's hops show where the order is while its branches
            // run: from the fork to the join. Its arrival, the undoing of
            // a branch its join went on without, and its end are the
            // join's business, not the order's.
            let current = self.orders.get(&env.id).copied();
            let before_join = match current {
                None => true,
                Some(old) if old.branch => old.seq < new.seq,
                Some(old) => !old.status.is_terminal() && old.hop < b.hop_at,
            };
            if env.status != Status::Running || !before_join {
                self.stale += 1;
                return Applied::Stale;
            }
        }
        let expired = env.status.is_terminal() && hop.stored_at.plus(self.retention) <= now;
        let was_terminal = match self.orders.entry(env.id) {
            MapEntry::Occupied(o) => {
                let old = *o.get();
                // Branches count their hops apart; the order's own hop past
                // the join comes after every branch's it joined.
                let later = if old.branch || new.branch {
                    old.seq < new.seq
                } else {
                    (old.hop, old.seq) < (new.hop, new.seq)
                };
                if !later {
                    self.stale += 1;
                    return Applied::Stale;
                }
                new.waiting = env.not_before.is_some()
                    && old.status == new.status
                    && !new.status.is_terminal()
                    && (old.route, old.step, old.attempt) == (new.route, new.step, new.attempt)
                    && new.hop > old.hop;
                // The next hop of a step run forward: the order's stay there.
                if old.status == Status::Running && new.hop == old.hop + 1 && new.at >= old.at {
                    self.step_times
                        .entry((old.route, old.step))
                        .or_insert_with(|| StepTimes::new(STEP_TIME_WINDOW))
                        .record(new.at, Duration::from_micros(new.at.0 - old.at.0));
                }
                if expired {
                    o.remove();
                } else {
                    *o.into_mut() = new;
                }
                self.count(&old, -1);
                old.status.is_terminal()
            }
            MapEntry::Vacant(v) => {
                if !expired {
                    v.insert(new);
                }
                false
            }
        };
        self.applied += 1;
        if env.status.is_terminal() && !was_terminal {
            self.finished_total[status_index(env.status)] += 1;
        }
        if expired {
            return Applied::Expired;
        }
        self.count(&new, 1);
        if env.status.is_terminal() {
            self.finished.push_back((hop.stored_at, env.id));
        }
        Applied::Tracked
    }

    /// Makes room for `orders` more orders at once (before a replay: the
    /// table then never rehashes while it is read).
    pub fn reserve(&mut self, orders: usize) {
        self.orders.reserve(orders);
    }

    /// Gives back the room the orders do not use (after a replay).
    pub fn shrink(&mut self) {
        self.orders.shrink_to_fit();
    }

    /// Notes that the stream message `seq` was read but is not a hop.
    pub fn skip(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// Drops finished orders whose retention has passed; returns how many.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        let mut dropped = 0;
        while let Some(&(at, id)) = self.finished.front() {
            if at.plus(self.retention) > now {
                break;
            }
            self.finished.pop_front();
            // Only if it is still that finished hop (not moved on since).
            if let Some(e) = self.orders.get(&id).copied() {
                if e.status.is_terminal() && e.at == at {
                    self.orders.remove(&id);
                    self.count(&e, -1);
                    dropped += 1;
                }
            }
        }
        if self.finished.capacity() > 1024 && self.finished.len() < self.finished.capacity() / 4 {
            self.finished.shrink_to_fit();
        }
        dropped
    }

    /// The readable state of an entry. Every entry's route and step exist
    /// (the route is recorded before the entry, and the codec checks the
    /// step), so `None` is only a defence.
    fn state(&self, id: OrderId, e: &Entry) -> Option<OrderState> {
        let route = self.routes.get(usize::from(e.route))?;
        let step = route.step(e.step)?;
        let service = match e.status {
            Status::Running => Some(step.service.clone()),
            Status::Compensating => step.compensate.clone(),
            _ => None,
        };
        Some(OrderState {
            id,
            workflow: route.workflow.clone(),
            version: route.version,
            status: e.status,
            step: step.name.clone(),
            service,
            hop: e.hop,
            attempt: e.attempt,
            sequence: e.seq,
            last_hop_at: e.at,
            due: (!e.status.is_terminal() && e.due != NEVER).then_some(e.due),
        })
    }

    /// Where the order stands, if this view tracks it.
    pub fn get(&self, id: &OrderId) -> Option<OrderState> {
        self.orders.get(id).and_then(|e| self.state(*id, e))
    }

    /// Every tracked order, sorted by id: for comparing two views.
    pub fn snapshot(&self) -> Vec<OrderState> {
        let mut all: Vec<OrderState> = self.orders.iter().filter_map(|(id, e)| self.state(*id, e)).collect();
        all.sort_by_key(|s| s.id);
        all
    }

    fn is_stalled(e: &Entry, now: Timestamp, grace: Duration) -> bool {
        !e.status.is_terminal() && e.due.plus(grace) < now
    }

    /// In-flight orders past their step's deadline plus `grace`, longest
    /// overdue first, at most `limit`.
    pub fn stalled(&self, now: Timestamp, grace: Duration, limit: usize) -> Vec<OrderState> {
        let mut late: Vec<(Timestamp, OrderId)> = self
            .orders
            .iter()
            .filter(|(_, e)| Self::is_stalled(e, now, grace))
            .map(|(id, e)| (e.due, *id))
            .collect();
        late.sort_unstable();
        late.truncate(limit);
        late.into_iter()
            .filter_map(|(_, id)| self.orders.get(&id).and_then(|e| self.state(id, e)))
            .collect()
    }

    /// Orders that reached each terminal status since this view began
    /// (what a summary's `finished` says, without a pass over the orders).
    pub fn finished(&self) -> std::collections::BTreeMap<Status, u64> {
        Status::ALL
            .into_iter()
            .map(|st| (st, self.finished_total[status_index(st)]))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// How long orders stayed at each step lately (see [`super::timing`]),
    /// by `workflow/step`.
    pub fn step_times(&self, now: Timestamp) -> std::collections::BTreeMap<StepKey, TimeSummary> {
        let mut out = std::collections::BTreeMap::new();
        for (&(route, step), times) in &self.step_times {
            if let Some(t) = times.summary(now) {
                // Versions of one workflow share a step's name: the
                // busiest version's figures stand for it.
                let key = self.step_key(route, step);
                if out.get(&key).is_none_or(|o: &TimeSummary| o.count < t.count) {
                    out.insert(key, t);
                }
            }
        }
        out
    }

    /// The orders that finished last, newest first, at most `limit`; with
    /// `failed_only`, those that did not complete.
    pub fn recently_finished(&self, limit: usize, failed_only: bool) -> Vec<OrderState> {
        self.finished
            .iter()
            .rev()
            .filter_map(|&(at, id)| {
                let e = self.orders.get(&id)?;
                // Only if it is still that finished hop.
                (e.at == at && e.status.is_terminal()).then_some((id, e))
            })
            .filter(|(_, e)| !failed_only || e.status != Status::Completed)
            .take(limit)
            .filter_map(|(id, e)| self.state(id, e))
            .collect()
    }

    fn matches(&self, filter: &Filter, step_filter: Option<&str>, e: &Entry, stalled: bool) -> bool {
        if filter.stalled && !stalled {
            return false;
        }
        if filter.status.is_some_and(|st| st != e.status) {
            return false;
        }
        let route = self.routes.get(usize::from(e.route));
        if let Some(w) = filter.workflow.as_deref() {
            if route.is_none_or(|r| r.workflow.as_str() != w) {
                return false;
            }
        }
        if let Some(want) = step_filter {
            let Some(r) = route else { return false };
            let Some(step) = r.step(e.step) else { return false };
            let hit = match want.split_once('/') {
                Some((wf, name)) => r.workflow.as_str() == wf && step.name.as_str() == name,
                None => step.name.as_str() == want,
            };
            if !hit || e.status.is_terminal() {
                return false;
            }
        }
        true
    }

    /// Counts, and the ids matching `filter` (at most `limit`, oldest
    /// latest-hop first).
    pub fn summary(&self, filter: &Filter, now: Timestamp, grace: Duration, limit: usize) -> Summary {
        let mut s = Summary {
            tracked: self.orders.len() as u64,
            in_flight: (self.by_status[0] + self.by_status[1]),
            ..Summary::default()
        };
        for st in Status::ALL {
            let n = self.by_status[status_index(st)];
            if n > 0 {
                s.by_status.insert(st, n);
            }
            let f = self.finished_total[status_index(st)];
            if f > 0 {
                s.finished.insert(st, f);
            }
        }
        for (&(route, step), &n) in &self.by_step {
            *s.by_step.entry(self.step_key(route, step)).or_insert(0) += n;
        }
        s.waiting = self.waiting;
        for (route, counts) in self.by_route.iter().enumerate() {
            let Some(r) = self.routes.get(route) else { continue };
            for st in Status::ALL {
                let n = counts[status_index(st)];
                if n > 0 {
                    *s.by_workflow
                        .entry(r.workflow.to_string())
                        .or_default()
                        .entry(st)
                        .or_insert(0) += n;
                }
            }
        }
        // One pass over the orders: the stalled count, and the matches.
        // One pass: the stalled count, the match count, and the `limit`
        // matches with the oldest latest hop (a bounded max-heap, so an
        // unfiltered summary of a million orders allocates nothing large).
        let step_filter = filter.step.as_deref();
        let mut oldest: std::collections::BinaryHeap<(u64, OrderId)> =
            std::collections::BinaryHeap::with_capacity(limit.min(self.orders.len()) + 1);
        for (id, e) in &self.orders {
            let stalled = Self::is_stalled(e, now, grace);
            s.stalled += u64::from(stalled);
            if !self.matches(filter, step_filter, e, stalled) {
                continue;
            }
            s.matched += 1;
            if oldest.len() < limit {
                oldest.push((e.seq, *id));
            } else if oldest.peek().is_some_and(|top| (e.seq, *id) < *top) {
                oldest.pop();
                oldest.push((e.seq, *id));
            }
        }
        s.ids = oldest.into_sorted_vec().into_iter().map(|(_, id)| id).collect();
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::codec::{Codec, Format};
    use crate::document::{Document, Payload};
    use crate::workflow::Workflow;

    fn route() -> Arc<Route> {
        Workflow::builder("order", 1)
            .step("charge", "payment.charge")
            .compensate("payment.refund")
            .timeout(Duration::from_secs(2))
            .step("ship", "shipping.dispatch")
            .build()
            .unwrap()
            .shared_route()
    }

    fn hop(id: OrderId, hop: u32, step: u16, status: Status, seq: u64, at_s: u64) -> StoredHop {
        let mut d = Document::new(id, route(), Payload::postcard(&1u8).unwrap());
        d.hop = hop;
        d.step = step;
        d.status = status;
        let c = Codec::default();
        StoredHop {
            seq,
            stored_at: Timestamp(at_s * 1_000_000),
            envelope: c
                .peek(&c.encode(&d, Format::Postcard).unwrap(), Format::Postcard)
                .unwrap(),
        }
    }

    const T0: Timestamp = Timestamp(0);

    /// A hop of the forked route `prepare`, fork (`l` | `r`), `finish`:
    /// the order's own (`branch` none) or a branch's.
    fn forked_hop(id: OrderId, hop: u32, step: u16, status: Status, seq: u64, branch: Option<u8>) -> StoredHop {
        use crate::workflow::Join;
        let route = Workflow::builder("pair", 1)
            .step("prepare", "t.prepare")
            .fork("pair")
            .branch()
            .step("l", "t.l")
            .branch()
            .step("r", "t.r")
            .join(Join::all())
            .step("finish", "t.finish")
            .build()
            .unwrap()
            .shared_route();
        let mut d = Document::new(id, route, Payload::postcard(&1u8).unwrap());
        d.hop = hop;
        d.step = step;
        d.status = status;
        d.branch = branch.map(|b| crate::document::BranchAt {
            fork: 0,
            branch: b,
            hop_at: 2,
            history_at: 1,
            owed_at: 0,
        });
        let c = Codec::default();
        StoredHop {
            seq,
            stored_at: Timestamp(seq * 1_000_000),
            envelope: c
                .peek(&c.encode(&d, Format::Postcard).unwrap(), Format::Postcard)
                .unwrap(),
        }
    }

    #[test]
    fn an_order_in_its_branches_shows_at_a_branch_step_until_its_join_goes_on() {
        let mut v = View::new(Partition::ALL, Duration::from_secs(60));
        let id = OrderId::new();
        let at = |v: &View| {
            let s = v.get(&id).unwrap();
            (s.step.to_string(), s.status, s.due.is_some())
        };
        assert_eq!(v.apply(&forked_hop(id, 0, 0, Status::Running, 1, None), T0), Applied::Tracked);
        // The fork's entry, then the branches' hops (counted apart).
        assert_eq!(v.apply(&forked_hop(id, 1, 1, Status::Running, 2, None), T0), Applied::Tracked);
        assert_eq!(v.apply(&forked_hop(id, 2, 1, Status::Running, 3, Some(0)), T0), Applied::Tracked);
        assert_eq!(v.apply(&forked_hop(id, 2, 2, Status::Running, 4, Some(1)), T0), Applied::Tracked);
        // No deadline inside a branch: one that arrived waits for the others.
        assert_eq!(at(&v), ("r".to_owned(), Status::Running, false));
        // An arrival is the join's business, not the order's.
        assert_eq!(v.apply(&forked_hop(id, 3, 1, Status::Completed, 5, Some(0)), T0), Applied::Stale);
        assert_eq!(at(&v).1, Status::Running);
        // The order past the join, then a branch's late hop: left out.
        assert_eq!(v.apply(&forked_hop(id, 3, 3, Status::Running, 6, None), T0), Applied::Tracked);
        assert_eq!(v.apply(&forked_hop(id, 5, 2, Status::Running, 7, Some(1)), T0), Applied::Stale);
        assert_eq!(at(&v), ("finish".to_owned(), Status::Running, true));
        assert_eq!(v.apply(&forked_hop(id, 4, 3, Status::Completed, 8, None), T0), Applied::Tracked);
        assert_eq!(v.apply(&forked_hop(id, 6, 2, Status::Running, 9, Some(1)), T0), Applied::Stale);
        assert_eq!(at(&v).1, Status::Completed);
    }

    #[test]
    fn follows_an_order_and_ignores_older_hops() {
        let mut v = View::new(Partition::ALL, Duration::from_secs(60));
        let id = OrderId::new();
        assert_eq!(v.apply(&hop(id, 0, 0, Status::Running, 1, 1), T0), Applied::Tracked);
        assert_eq!(v.apply(&hop(id, 1, 1, Status::Running, 5, 2), T0), Applied::Tracked);
        // A re-run of hop 0 stored later, and a duplicate of hop 1 stored earlier.
        assert_eq!(v.apply(&hop(id, 0, 0, Status::Running, 6, 3), T0), Applied::Stale);
        assert_eq!(v.apply(&hop(id, 1, 1, Status::Running, 4, 3), T0), Applied::Stale);
        let s = v.get(&id).unwrap();
        assert_eq!((s.hop, s.step.as_str(), s.sequence), (1, "ship", 5));
        assert_eq!(s.service.unwrap().as_str(), "shipping.dispatch");
        // The same hop stored again later (a re-drive) moves the sequence on.
        assert_eq!(v.apply(&hop(id, 1, 1, Status::Running, 9, 4), T0), Applied::Tracked);
        assert_eq!(v.get(&id).unwrap().sequence, 9);
        let sum = v.summary(&Filter::default(), T0, Duration::ZERO, 10);
        assert_eq!(sum.by_step.get("order/ship"), Some(&1));
        assert_eq!((sum.tracked, sum.in_flight), (1, 1));
    }

    #[test]
    fn finished_orders_leave_after_the_retention_and_replay_agrees() {
        let retention = Duration::from_secs(10);
        let (a, b) = (OrderId::new(), OrderId::new());
        let hops = [
            hop(a, 0, 0, Status::Running, 1, 100),
            hop(b, 0, 0, Status::Running, 2, 101),
            hop(a, 1, 1, Status::Completed, 3, 102),
            hop(b, 1, 1, Status::Running, 4, 120),
        ];
        // Live: hops applied as they come, expiry run as time passes.
        let mut live = View::new(Partition::ALL, retention);
        for h in &hops {
            live.apply(h, h.stored_at);
            live.expire(h.stored_at);
        }
        assert!(live.get(&a).is_none(), "finished at 102, dropped by 120");
        // Replayed later, all at once.
        let now = Timestamp(121 * 1_000_000);
        let mut replayed = View::new(Partition::ALL, retention);
        for h in &hops {
            replayed.apply(h, now);
        }
        assert_eq!(replayed.snapshot(), live.snapshot());
        let sum = replayed.summary(&Filter::default(), now, Duration::ZERO, 10);
        assert_eq!(sum.finished.get(&Status::Completed), Some(&1));
        assert_eq!(sum.by_status.get(&Status::Completed), None);
    }

    #[test]
    fn stalled_orders_are_those_past_their_step_timeout_plus_grace() {
        let mut v = View::new(Partition::ALL, Duration::from_secs(60));
        let (a, b) = (OrderId::new(), OrderId::new());
        v.apply(&hop(a, 0, 0, Status::Running, 1, 10), T0);
        v.apply(&hop(b, 0, 0, Status::Running, 2, 11), T0);
        // charge times out after 2 s: a is due at 12, b at 13.
        let at = |s: u64| Timestamp(s * 1_000_000);
        assert!(v.stalled(at(12), Duration::ZERO, 10).is_empty());
        let late = v.stalled(at(14), Duration::ZERO, 10);
        assert_eq!(late.iter().map(|s| s.id).collect::<Vec<_>>(), vec![a, b]);
        assert_eq!(v.stalled(at(14), Duration::from_secs(5), 10), vec![]);
        let filter = Filter {
            stalled: true,
            ..Filter::default()
        };
        let sum = v.summary(&filter, at(12).plus(Duration::from_millis(500)), Duration::ZERO, 10);
        assert_eq!((sum.stalled, sum.matched, sum.ids.clone()), (1, 1, vec![a]));
        // The list keeps the oldest latest hops, in order, up to the limit.
        let all = v.summary(&Filter::default(), at(12), Duration::ZERO, 1);
        assert_eq!((all.matched, all.ids), (2, vec![a]));
        let all = v.summary(&Filter::default(), at(12), Duration::ZERO, 0);
        assert_eq!((all.matched, all.ids), (2, vec![]));
        assert_eq!(v.summary(&Filter::default(), at(12), Duration::ZERO, 5).ids, vec![a, b]);
    }

    #[test]
    fn waits_step_times_workflows_and_failures_are_counted() {
        let mut v = View::new(Partition::ALL, Duration::from_secs(600));
        let (a, b) = (OrderId::new(), OrderId::new());
        let at = |s: u64| Timestamp(s * 1_000_000);
        v.apply(&hop(a, 0, 0, Status::Running, 1, 10), T0);
        // a's charge waits on infrastructure: the same attempt, later.
        let mut wait = hop(a, 1, 0, Status::Running, 2, 11);
        wait.envelope.not_before = Some(at(12));
        v.apply(&wait, T0);
        v.apply(&hop(b, 0, 0, Status::Running, 3, 10), T0);
        v.apply(&hop(b, 1, 1, Status::Running, 4, 12), T0);
        let sum = v.summary(&Filter::default(), at(13), Duration::ZERO, 0);
        assert_eq!(sum.waiting, 1);
        assert_eq!(sum.by_workflow["order"][&Status::Running], 2);
        v.apply(&hop(a, 2, 1, Status::Running, 5, 14), T0);
        assert_eq!(v.summary(&Filter::default(), at(14), Duration::ZERO, 0).waiting, 0);
        // At charge: a for 1 s and 3 s (its wait, then the try), b for 2 s.
        let times = v.step_times(at(15));
        let charge = &times["order/charge"];
        assert_eq!(charge.count, 3);
        assert!((2000.0..=2000.0 * 1.19).contains(&charge.p50_ms), "{charge:?}");
        assert!((3000.0..=3000.0 * 1.19).contains(&charge.p99_ms), "{charge:?}");
        assert!(!times.contains_key("order/ship"));
        v.apply(&hop(b, 2, 1, Status::Compensated, 6, 15), T0);
        v.apply(&hop(a, 3, 1, Status::Completed, 7, 16), T0);
        assert_eq!(ids(&v.recently_finished(10, true)), vec![b]);
        assert_eq!(ids(&v.recently_finished(10, false)), vec![a, b]);
        assert_eq!(ids(&v.recently_finished(1, false)), vec![a]);
        let sum = v.summary(&Filter::default(), at(16), Duration::ZERO, 0);
        assert_eq!(sum.by_workflow["order"].get(&Status::Running), None);
        assert_eq!(sum.by_workflow["order"][&Status::Completed], 1);
        assert_eq!(std::mem::size_of::<Entry>(), 40, "the compact entry grew");
    }

    fn ids(states: &[OrderState]) -> Vec<OrderId> {
        states.iter().map(|s| s.id).collect()
    }

    #[test]
    fn partitions_split_orders_without_overlap() {
        let ids: Vec<OrderId> = (0..3000).map(|_| OrderId::new()).collect();
        let mut views: Vec<View> = (0..3)
            .map(|i| View::new(Partition::new(i, 3).unwrap(), Duration::from_secs(60)))
            .collect();
        for (n, id) in ids.iter().enumerate() {
            let h = hop(*id, 0, 0, Status::Running, n as u64 + 1, 1);
            let owners = views
                .iter_mut()
                .map(|v| v.apply(&h, T0))
                .filter(|a| *a == Applied::Tracked)
                .count();
            assert_eq!(owners, 1);
        }
        for v in &views {
            assert!((800..1200).contains(&v.len()), "uneven split: {}", v.len());
        }
        assert_eq!("1/3".parse::<Partition>().unwrap(), Partition::new(1, 3).unwrap());
        assert!("3/3".parse::<Partition>().is_err());
        assert!("x".parse::<Partition>().is_err());
        assert!("0/0".parse::<Partition>().is_err());
    }
}
