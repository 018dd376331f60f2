//! What the coordinator's tasks share: the view, how far the replay is, and
//! the counters. Every task goes through these methods; none holds the lock
//! across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::api::{Dashboard, FeedStats, OrdersQuery, OrdersReply};
use super::view::{Filter, OrderState, Partition, StoredHop, View};
use crate::document::Timestamp;
use crate::id::OrderId;
use crate::transport::LogInfo;

#[derive(Debug, Default)]
struct Replay {
    /// The log's last sequence when the coordinator started.
    target: u64,
    started: Option<Instant>,
    took: Option<Duration>,
    replayed: u64,
}

#[derive(Debug)]
struct State {
    view: View,
    replay: Replay,
    /// Stalled orders already reported, at the sequence they stalled on.
    reported: HashMap<OrderId, u64>,
}

/// A message of the log as the view takes it: a hop, or the sequence of a
/// message that is not a document (it moves no order, but has been read).
pub(super) type Read = Result<StoredHop, u64>;

/// The view and its bookkeeping.
#[derive(Debug)]
pub(super) struct Tracker {
    partition: Partition,
    state: Mutex<State>,
    /// `true` once the replay caught up; every applied batch also wakes
    /// whoever waits for a sequence.
    caught_up: tokio::sync::watch::Sender<bool>,
    pub(super) hops_read: AtomicU64,
    pub(super) undecodable: AtomicU64,
    pub(super) redriven: AtomicU64,
    pub(super) redrive_refused: AtomicU64,
}

impl Tracker {
    pub(super) fn new(partition: Partition, retention: Duration) -> Self {
        Self {
            partition,
            state: Mutex::new(State {
                view: View::new(partition, retention),
                replay: Replay::default(),
                reported: HashMap::new(),
            }),
            caught_up: tokio::sync::watch::channel(false).0,
            hops_read: AtomicU64::new(0),
            undecodable: AtomicU64::new(0),
            redriven: AtomicU64::new(0),
            redrive_refused: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn last_seq(&self) -> u64 {
        self.state().view.last_seq()
    }

    pub(super) fn get(&self, id: &OrderId) -> Option<OrderState> {
        self.state().view.get(id)
    }

    pub(super) fn snapshot(&self) -> Vec<OrderState> {
        self.state().view.snapshot()
    }

    pub(super) fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    pub(super) async fn wait_caught_up(&self) {
        let mut rx = self.caught_up.subscribe();
        // The sender lives as long as `self`.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Records the replay's target, once: by the first read of the log that
    /// gets this far (an earlier one may have failed before).
    pub(super) fn begin_replay(&self, info: &LogInfo) {
        let mut st = self.state();
        if st.replay.started.is_some() {
            return;
        }
        st.replay.target = info.last_sequence;
        st.replay.started = Some(Instant::now());
        // Room for as many orders as this partition's share of the log
        // could hold (each order is at least one hop), up to two million:
        // the table does not rehash while the replay fills it, and gives
        // back what it did not need once caught up.
        let share = info.messages / u64::from(self.partition.count.max(1));
        st.view.reserve(usize::try_from(share.min(2_000_000)).unwrap_or(0));
        tracing::info!(
            hops = info.messages,
            last_sequence = info.last_sequence,
            "replaying the hop log"
        );
        // Nothing to read (an empty log, or one whose hops were all purged
        // or aged out): caught up at once.
        if info.messages == 0 || info.last_sequence < info.first_sequence {
            st.replay.took = Some(Duration::ZERO);
            drop(st);
            self.caught_up.send_replace(true);
        }
    }

    pub(super) fn apply(&self, hops: &[Read]) {
        if hops.is_empty() {
            return;
        }
        let t = Timestamp::now();
        let mut st = self.state();
        for h in hops {
            match h {
                Ok(h) => {
                    st.view.apply(h, t);
                }
                Err(seq) => st.view.skip(*seq),
            }
        }
        let last = st.view.last_seq();
        let mut newly_caught_up = false;
        if st.replay.took.is_none() {
            st.replay.replayed += hops.len() as u64;
            if last >= st.replay.target {
                let took = st.replay.started.map_or(Duration::ZERO, |s| s.elapsed());
                st.replay.took = Some(took);
                st.view.shrink();
                newly_caught_up = true;
                let rate = st.replay.replayed as f64 / took.as_secs_f64().max(1e-9);
                tracing::info!(
                    hops = st.replay.replayed,
                    seconds = took.as_secs_f64(),
                    hops_per_sec = rate as u64,
                    tracked = st.view.len(),
                    "caught up with the hop log"
                );
            }
        }
        drop(st);
        if newly_caught_up {
            self.caught_up.send_replace(true);
        } else {
            // Wakes whoever waits for a sequence.
            self.caught_up.send_modify(|_| {});
        }
    }

    /// Waits, at most `within`, until the view has read `sequence`.
    pub(super) async fn reached(&self, sequence: u64, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                // Subscribed before looking, so no batch is missed in between.
                let mut rx = self.caught_up.subscribe();
                if self.last_seq() >= sequence {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }

    pub(super) fn feed_stats(&self) -> FeedStats {
        let st = self.state();
        let secs = st.replay.took.map_or_else(
            || st.replay.started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
            |d| d.as_secs_f64(),
        );
        FeedStats {
            caught_up: st.replay.took.is_some(),
            replayed_hops: st.replay.replayed,
            replay_seconds: secs,
            replay_hops_per_sec: if secs > 0.0 {
                st.replay.replayed as f64 / secs
            } else {
                0.0
            },
            last_sequence: st.view.last_seq(),
            hops_read: self.hops_read.load(Ordering::Relaxed),
            undecodable: self.undecodable.load(Ordering::Relaxed),
            redriven: self.redriven.load(Ordering::Relaxed),
            redrive_refused: self.redrive_refused.load(Ordering::Relaxed),
            view_bytes: st.view.memory_bytes() as u64,
        }
    }

    /// This partition's answer to an orders request.
    pub(super) fn orders(&self, query: &OrdersQuery, stall_grace: Duration) -> OrdersReply {
        let p = self.partition;
        let summary = self
            .state()
            .view
            .summary(&query.filter(), Timestamp::now(), stall_grace, query.limit());
        OrdersReply {
            summary,
            partitions: p.count,
            answered: vec![p.index],
            missing: Vec::new(),
            feeds: vec![self.feed_stats()],
        }
    }

    pub(super) fn finished(&self) -> std::collections::BTreeMap<crate::document::Status, u64> {
        self.state().view.finished()
    }

    /// See [`super::CoordinatorCounts::dashboard`]: read under one lock.
    pub(super) fn dashboard(&self, stall_grace: Duration, limit: usize) -> Dashboard {
        let now = Timestamp::now();
        let feed = self.feed_stats();
        let st = self.state();
        Dashboard {
            summary: st.view.summary(&Filter::default(), now, stall_grace, 0),
            step_times: st.view.step_times(now),
            stalled: st.view.stalled(now, stall_grace, limit),
            recent_failures: st.view.recently_finished(limit, true),
            partition: self.partition.to_string(),
            feed,
        }
    }

    /// Drops finished orders past the retention; returns the orders newly
    /// stalled (not reported at their current sequence yet), how many are
    /// stalled, tracked and in flight.
    pub(super) fn check(&self, now: Timestamp, grace: Duration) -> Checked {
        let mut st = self.state();
        st.view.expire(now);
        let stalled = st.view.stalled(now, grace, 1000);
        let ids: std::collections::HashSet<OrderId> = stalled.iter().map(|s| s.id).collect();
        st.reported.retain(|id, _| ids.contains(id));
        let fresh: Vec<OrderState> = stalled
            .into_iter()
            .filter(|s| st.reported.get(&s.id) != Some(&s.sequence))
            .collect();
        for s in &fresh {
            st.reported.insert(s.id, s.sequence);
        }
        Checked {
            stalled: st.reported.len(),
            tracked: st.view.len(),
            in_flight: st.view.summary_in_flight(),
            fresh,
        }
    }

    /// Looks at an order again in the next check.
    pub(super) fn forget_reported(&self, id: &OrderId) {
        self.state().reported.remove(id);
    }
}

/// What one stall check found.
#[derive(Debug)]
pub(super) struct Checked {
    pub fresh: Vec<OrderState>,
    pub stalled: usize,
    pub tracked: usize,
    pub in_flight: u64,
}
