//! What a worker counts for Prometheus ([`WorkerMetrics`]), when asked to
//! ([`super::WorkerBuilder::metrics`]): off, a step pays nothing for it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::id::ServiceSubject;
use crate::transition::StepResult;
use crate::transport::DeadLetterKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HopLabels {
    service: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// Upper bounds of the step-duration buckets, in seconds: 1 ms to 60 s.
const STEP_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

fn step_histogram() -> Histogram {
    Histogram::new(STEP_BUCKETS)
}

/// A worker's series: steps by service and outcome, their durations, dead
/// letters by reason, and tries to store a next hop again while the stream
/// was unavailable. Cheap to clone; clones count together.
#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    hops: Family<HopLabels, Counter>,
    step_seconds: Family<ServiceLabel, Histogram, fn() -> Histogram>,
    dead_letters: Family<ReasonLabel, Counter>,
    unavailable: Family<ServiceLabel, Counter>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self {
            hops: Family::default(),
            step_seconds: Family::new_with_constructor(step_histogram as fn() -> Histogram),
            dead_letters: Family::default(),
            unavailable: Family::default(),
        }
    }
}

impl WorkerMetrics {
    /// Adds the series to `registry` (whose prefix, if any, comes first):
    /// `waybill_hops_total{service,outcome}`,
    /// `waybill_step_duration_seconds{service}` (a histogram),
    /// `waybill_dead_letters_total{reason}` and
    /// `waybill_unavailable_retries_total{service}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "waybill_hops",
            "Steps run, by service and by outcome: a business outcome (ok, declined, ...) or transient, \
             permanent, unavailable, deferred",
            self.hops.clone(),
        );
        registry.register_with_unit(
            "waybill_step_duration",
            "How long a step's handler took, by service",
            Unit::Seconds,
            self.step_seconds.clone(),
        );
        registry.register(
            "waybill_dead_letters",
            "Messages this worker made dead letters, by reason (invalid, exhausted, unavailable)",
            self.dead_letters.clone(),
        );
        registry.register(
            "waybill_unavailable_retries",
            "Steps and next hops that met unavailable infrastructure and wait to be tried again, by service",
            self.unavailable.clone(),
        );
    }

    pub(super) fn step(&self, service: &ServiceSubject, result: &StepResult, seconds: f64) {
        let outcome = match result {
            StepResult::Outcome { outcome, .. } => outcome.as_str(),
            StepResult::Transient(_) => "transient",
            StepResult::Permanent(_) => "permanent",
            StepResult::Unavailable(_) => {
                self.unavailable_retry(service);
                "unavailable"
            }
        };
        self.hop(service, outcome);
        self.step_seconds
            .get_or_create(&ServiceLabel {
                service: service.to_string(),
            })
            .observe(seconds);
    }

    pub(super) fn hop(&self, service: &ServiceSubject, outcome: &str) {
        self.hops
            .get_or_create(&HopLabels {
                service: service.to_string(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub(super) fn dead_letter(&self, kind: DeadLetterKind) {
        self.dead_letters
            .get_or_create(&ReasonLabel {
                reason: kind.as_str().to_owned(),
            })
            .inc();
    }

    pub(super) fn unavailable_retry(&self, service: &ServiceSubject) {
        self.unavailable
            .get_or_create(&ServiceLabel {
                service: service.to_string(),
            })
            .inc();
    }
}
