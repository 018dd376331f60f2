//! The page's live snapshot, taken once a second by one task however many
//! pages are open: the coordinator's dashboard, the orders that ended and
//! the hops read in each of the last five minutes' seconds, and the number
//! of dead letters (asked of NATS every few seconds).
//!
//! The throughput points are cheap (a few counters) and are taken whether
//! or not anyone looks, so the chart has its history when a page opens.
//! The dashboard is one pass over every tracked order with the view
//! locked (about 50 ms at a million orders, time in which the coordinator
//! reads no hop and answers no status), so it is read only while someone
//! looks: a page holding the event stream open, or a `GET /api/live` in
//! the last few seconds.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{watch, Notify};
use waybill::coordinator::api::Dashboard;
use waybill::coordinator::CoordinatorCounts;
use waybill::transport::nats::Nats;
use waybill::{Status, Timestamp};

/// Seconds of throughput kept.
const POINTS: usize = 300;
/// Stalled orders and failures listed.
const LISTED: usize = 20;
const DEAD_LETTERS_EVERY: Duration = Duration::from_secs(5);
/// How long a `GET /api/live` keeps the dashboard read without a page
/// holding the event stream.
const ASKED_KEEPS: Duration = Duration::from_secs(5);
/// How long a request waits for a snapshot with the dashboard in it.
const FULL_WITHIN: Duration = Duration::from_secs(5);

/// What every open page gets each second.
#[derive(Debug, Serialize)]
pub struct Live {
    /// When it was taken, in milliseconds since the epoch.
    pub at_ms: u64,
    /// Absent while nobody looks (see the module's note).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dashboard: Option<Dashboard>,
    /// How long the dashboard took to read, in milliseconds: the
    /// coordinator's view is locked that long (one pass over its orders).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dashboard_ms: Option<f64>,
    /// One point a second, oldest first.
    pub throughput: Vec<Point>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letters_error: Option<String>,
}

/// One second of traffic.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub at_ms: u64,
    /// Orders that ended in that second, by how.
    pub ended: BTreeMap<Status, u64>,
    /// Hops the coordinator read in that second.
    pub hops: u64,
}

struct Sampler {
    counts: CoordinatorCounts<Nats>,
    nats: Nats,
    points: VecDeque<Point>,
    last: Option<(BTreeMap<Status, u64>, u64)>,
    dead_letters: (Option<u64>, Option<String>),
    dead_letters_at: Option<tokio::time::Instant>,
}

impl Sampler {
    async fn sample(&mut self, with_dashboard: bool) -> Snapshot {
        let now = Timestamp::now();
        let at_ms = now.0 / 1000;
        let finished = self.counts.finished();
        let hops = self.counts.feed_stats().hops_read;
        if let Some((before, hops_before)) = &self.last {
            let ended = finished
                .iter()
                .map(|(st, n)| (*st, n - before.get(st).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .collect();
            self.points.push_back(Point {
                at_ms,
                ended,
                hops: hops.saturating_sub(*hops_before),
            });
            while self.points.len() > POINTS {
                self.points.pop_front();
            }
        }
        self.last = Some((finished, hops));
        if self.dead_letters_at.is_none_or(|t| t.elapsed() >= DEAD_LETTERS_EVERY) {
            self.dead_letters_at = Some(tokio::time::Instant::now());
            self.dead_letters = match tokio::time::timeout(Duration::from_secs(2), self.nats.dead_letter_count()).await
            {
                Ok(Ok(n)) => (Some(n), None),
                Ok(Err(e)) => (None, Some(e.to_string())),
                Err(_) => (None, Some("NATS did not answer within 2 s".to_owned())),
            };
        }
        let (dashboard, dashboard_ms) = if with_dashboard {
            let began = std::time::Instant::now();
            let dashboard = self.counts.dashboard(LISTED);
            (Some(dashboard), Some(began.elapsed().as_secs_f64() * 1000.0))
        } else {
            (None, None)
        };
        let live = Live {
            at_ms,
            dashboard,
            dashboard_ms,
            throughput: self.points.iter().cloned().collect(),
            dead_letters: self.dead_letters.0,
            dead_letters_error: self.dead_letters.1.clone(),
        };
        let json =
            serde_json::to_string(&live).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string());
        Snapshot {
            json: Arc::from(json),
            full: with_dashboard,
        }
    }
}

/// One snapshot, as JSON.
#[derive(Debug, Clone)]
pub(super) struct Snapshot {
    pub json: Arc<str>,
    /// Whether it holds the dashboard.
    pub full: bool,
}

/// The handlers' side of the sampler.
#[derive(Clone)]
pub(super) struct LiveFeed {
    rx: watch::Receiver<Snapshot>,
    asked: Arc<AskedFlag>,
}

/// Set by a request, read and cleared by the sampler; `now` wakes it.
struct AskedFlag {
    asked: AtomicBool,
    now: Notify,
}

impl LiveFeed {
    /// The latest snapshot with the dashboard in it: the current one if it
    /// has it, otherwise the one the sampler takes at once on being asked
    /// (or, if that takes past [`FULL_WITHIN`], the latest there is).
    pub async fn full(&self) -> Arc<str> {
        let mut rx = self.subscribe();
        let wait = async {
            loop {
                let s = rx.borrow_and_update().clone();
                if s.full || rx.changed().await.is_err() {
                    return s.json;
                }
            }
        };
        match tokio::time::timeout(FULL_WITHIN, wait).await {
            Ok(json) => json,
            Err(_) => self.rx.borrow().json.clone(),
        }
    }

    /// A receiver for a page that stays open (the event stream): while it
    /// lives, every snapshot holds the dashboard.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        let rx = self.rx.clone();
        self.asked.asked.store(true, Ordering::Relaxed);
        self.asked.now.notify_one();
        rx
    }
}

/// Starts sampling; the feed always holds the latest snapshot. The task
/// ends when every receiver is gone.
pub(super) fn start(counts: CoordinatorCounts<Nats>, nats: Nats) -> LiveFeed {
    let mut sampler = Sampler {
        counts,
        nats,
        points: VecDeque::with_capacity(POINTS + 1),
        last: None,
        dead_letters: (None, None),
        dead_letters_at: None,
    };
    let (tx, rx) = watch::channel(Snapshot {
        json: Arc::from("{}"),
        full: false,
    });
    let asked = Arc::new(AskedFlag {
        asked: AtomicBool::new(false),
        now: Notify::new(),
    });
    let flag = asked.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut asked_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = flag.now.notified() => {}
            }
            if flag.asked.swap(false, Ordering::Relaxed) {
                asked_at = Some(tokio::time::Instant::now());
            }
            // The feed's own receiver is always there; another is a page
            // holding the event stream open.
            let watched = tx.receiver_count() > 1 || asked_at.is_some_and(|t| t.elapsed() < ASKED_KEEPS);
            let snapshot = sampler.sample(watched).await;
            if tx.send(snapshot).is_err() {
                return;
            }
        }
    });
    LiveFeed { rx, asked }
}
