//! How long orders stay at each step, as the hop log tells it: from the
//! hop that sent an order to a step to the hop that step produced. Kept in
//! log-spaced buckets (a fixed 1 KiB per step, quantiles within 10 %) over
//! a sliding window of the log's own time, so a replayed log and a live one
//! agree, and old traffic leaves the figures.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::document::Timestamp;

/// Four buckets per doubling from 100 µs: bucket `i` holds times below
/// `100 µs · 2^((i+1)/4)`; the last holds everything longer (~2.4 days).
const BUCKETS: usize = 128;
const FIRST_US: f64 = 100.0;
const PER_DOUBLING: f64 = 4.0;

fn bucket_of(micros: u64) -> usize {
    if micros as f64 <= FIRST_US {
        return 0;
    }
    let i = ((micros as f64 / FIRST_US).log2() * PER_DOUBLING).floor() as usize;
    i.min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in microseconds.
fn upper_of(i: usize) -> f64 {
    FIRST_US * 2f64.powf((i + 1) as f64 / PER_DOUBLING)
}

#[derive(Debug, Clone)]
struct Histogram {
    counts: Box<[u32; BUCKETS]>,
    total: u64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }

    fn clear(&mut self) {
        self.counts.fill(0);
        self.total = 0;
    }
}

/// One step's times over the current and the previous window.
#[derive(Debug, Clone)]
pub(crate) struct StepTimes {
    window: Duration,
    /// Where the current window began (log time).
    start: Timestamp,
    current: Histogram,
    previous: Histogram,
}

impl StepTimes {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            start: Timestamp(0),
            current: Histogram::new(),
            previous: Histogram::new(),
        }
    }

    /// Notes one stay of `took`, ended at `at` (the log's time).
    pub(crate) fn record(&mut self, at: Timestamp, took: Duration) {
        self.roll(at);
        let i = bucket_of(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        self.current.counts[i] = self.current.counts[i].saturating_add(1);
        self.current.total += 1;
    }

    /// Moves the window on to hold `at`: the current window becomes the
    /// previous one, or both are dropped when more than a window passed.
    fn roll(&mut self, at: Timestamp) {
        if at < self.start.plus(self.window) {
            return;
        }
        if at < self.start.plus(self.window * 2) {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
            self.start = self.start.plus(self.window);
        } else {
            self.current.clear();
            self.previous.clear();
            self.start = at;
        }
    }

    /// The stays in the last one to two windows before `now`: how many,
    /// and their median and 99th percentile.
    pub(crate) fn summary(&self, now: Timestamp) -> Option<TimeSummary> {
        let mut counts = [0u64; BUCKETS];
        let mut total = 0;
        // A window that ended more than a window ago is old traffic.
        let fresh = |end: Timestamp| end.plus(self.window) > now;
        if fresh(self.start.plus(self.window)) {
            for (c, n) in counts.iter_mut().zip(self.current.counts.iter()) {
                *c += u64::from(*n);
            }
            total += self.current.total;
        }
        if fresh(self.start) {
            for (c, n) in counts.iter_mut().zip(self.previous.counts.iter()) {
                *c += u64::from(*n);
            }
            total += self.previous.total;
        }
        if total == 0 {
            return None;
        }
        let quantile = |q: f64| {
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return upper_of(i) / 1000.0;
                }
            }
            upper_of(BUCKETS - 1) / 1000.0
        };
        Some(TimeSummary {
            count: total,
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
        })
    }
}

/// How long orders stayed at a step lately: an upper bound of each
/// quantile, within 19 % (the bucket's width).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeSummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn at(s: u64) -> Timestamp {
        Timestamp(s * 1_000_000)
    }

    #[test]
    fn quantiles_bound_the_times_closely() {
        let mut t = StepTimes::new(MIN);
        for ms in 1..=100u64 {
            t.record(at(1), Duration::from_millis(ms));
        }
        let s = t.summary(at(2)).unwrap();
        assert_eq!(s.count, 100);
        assert!((50.0..=50.0 * 1.19).contains(&s.p50_ms), "{s:?}");
        assert!((99.0..=99.0 * 1.19).contains(&s.p99_ms), "{s:?}");
        // The extremes land in the first and the last bucket.
        t.record(at(1), Duration::ZERO);
        t.record(at(1), Duration::from_secs(10 * 86_400));
        assert_eq!(t.summary(at(2)).unwrap().count, 102);
    }

    #[test]
    fn old_traffic_leaves_the_window() {
        let mut t = StepTimes::new(MIN);
        t.record(at(1000), Duration::from_secs(5));
        // A window later the stay still counts (the previous window) …
        t.record(at(1061), Duration::from_millis(1));
        assert_eq!(t.summary(at(1062)).unwrap().count, 2);
        // … two windows later only the new one does …
        t.record(at(1125), Duration::from_millis(1));
        let s = t.summary(at(1125)).unwrap();
        assert_eq!(s.count, 2);
        assert!(s.p99_ms < 2.0);
        // … and with nothing recorded for long, nothing is left.
        assert_eq!(t.summary(at(2000)), None);
    }
}
