//! Retry policies.

use std::time::Duration;

use super::duration_ms;

/// When and how often a failed step is tried again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Attempts in all, the first one included. `1` means no retry.
    pub max_attempts: u32,
    /// Delay before the second attempt, in milliseconds.
    pub initial_ms: u32,
    /// Upper bound of any delay, in milliseconds.
    pub max_ms: u32,
    /// Each delay is the previous one times this.
    pub multiplier: f32,
    /// Fraction of the delay that is randomised, 0 to 1 (0.2 = ±20 %).
    pub jitter: f32,
}

impl Backoff {
    /// No retry: the first failure is final.
    pub const fn none() -> Self {
        Self {
            max_attempts: 1,
            initial_ms: 0,
            max_ms: 0,
            multiplier: 1.0,
            jitter: 0.0,
        }
    }

    /// Up to `max_attempts` attempts, the delay doubling from `initial`, capped
    /// at 30 s, with ±20 % jitter.
    pub fn exponential(max_attempts: u32, initial: Duration) -> Self {
        Self {
            max_attempts,
            initial_ms: duration_ms(initial),
            max_ms: 30_000,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }

    /// Up to `max_attempts` attempts, `delay` apart, without jitter.
    pub fn fixed(max_attempts: u32, delay: Duration) -> Self {
        let ms = duration_ms(delay);
        Self {
            max_attempts,
            initial_ms: ms,
            max_ms: ms,
            multiplier: 1.0,
            jitter: 0.0,
        }
    }

    pub fn with_max_delay(mut self, max: Duration) -> Self {
        self.max_ms = duration_ms(max);
        self
    }

    pub fn with_jitter(mut self, jitter: f32) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay after failed attempt number `attempt` (1-based). `unit` is a
    /// random number in `[0, 1)` that places the jitter: passing it in keeps
    /// this function pure.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let base = f64::from(self.initial_ms) * f64::from(self.multiplier).powi(exp);
        let base = base.min(f64::from(self.max_ms));
        let jitter = f64::from(self.jitter.clamp(0.0, 1.0));
        let factor = 1.0 + jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        let ms = (base * factor).clamp(0.0, f64::from(self.max_ms.max(1)) * 2.0);
        Duration::from_micros((ms * 1000.0).round() as u64)
    }

    /// What is wrong with this policy, if anything.
    pub(super) fn problem(&self) -> Option<String> {
        if self.max_attempts == 0 {
            return Some("retry policy allows 0 attempts; at least 1 is needed".into());
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Some(format!(
                "retry multiplier {} must be a finite number ≥ 1",
                self.multiplier
            ));
        }
        if !(self.jitter.is_finite() && (0.0..=1.0).contains(&self.jitter)) {
            return Some(format!("retry jitter {} must be within 0..=1", self.jitter));
        }
        if self.initial_ms > self.max_ms {
            return Some(format!(
                "initial retry delay {} ms exceeds the maximum delay {} ms",
                self.initial_ms, self.max_ms
            ));
        }
        None
    }
}

impl Default for Backoff {
    /// Three attempts, 100 ms then 200 ms apart (with jitter).
    fn default() -> Self {
        Self::exponential(3, Duration::from_millis(100))
    }
}
