//! The page's live snapshot, taken once a second by one task however many
//! pages are open: the coordinator's dashboard, the orders that ended and
//! the hops read in each of the last five minutes' seconds, and the number
//! of dead letters (asked of NATS every few seconds).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use waybill::coordinator::api::Dashboard;
use waybill::coordinator::CoordinatorCounts;
use waybill::transport::nats::Nats;
use waybill::{Status, Timestamp};

/// Seconds of throughput kept.
const POINTS: usize = 300;
/// Stalled orders and failures listed.
const LISTED: usize = 20;
const DEAD_LETTERS_EVERY: Duration = Duration::from_secs(5);

/// What every open page gets each second.
#[derive(Debug, Serialize)]
pub struct Live {
    /// When it was taken, in milliseconds since the epoch.
    pub at_ms: u64,
    pub dashboard: Dashboard,
    /// How long the dashboard took to read, in milliseconds: the
    /// coordinator's view is locked that long (one pass over its orders).
    pub dashboard_ms: f64,
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
    async fn sample(&mut self) -> String {
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
        let began = std::time::Instant::now();
        let dashboard = self.counts.dashboard(LISTED);
        let dashboard_ms = began.elapsed().as_secs_f64() * 1000.0;
        let live = Live {
            at_ms,
            dashboard,
            dashboard_ms,
            throughput: self.points.iter().cloned().collect(),
            dead_letters: self.dead_letters.0,
            dead_letters_error: self.dead_letters.1.clone(),
        };
        serde_json::to_string(&live).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string())
    }
}

/// Starts sampling; the receiver always holds the latest snapshot (JSON).
/// The task ends when every receiver is gone.
pub(super) fn start(counts: CoordinatorCounts<Nats>, nats: Nats) -> watch::Receiver<Arc<str>> {
    let mut sampler = Sampler {
        counts,
        nats,
        points: VecDeque::with_capacity(POINTS + 1),
        last: None,
        dead_letters: (None, None),
        dead_letters_at: None,
    };
    let (tx, rx) = watch::channel(Arc::<str>::from("{}"));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let snapshot = sampler.sample().await;
            if tx.send(Arc::from(snapshot)).is_err() {
                return;
            }
        }
    });
    rx
}
