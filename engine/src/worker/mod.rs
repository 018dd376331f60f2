//! The worker runtime: one process serving one or more service subjects.
//!
//! ```text
//!  consumer (per service) ──fetch──▶ pump ──spawn, one permit each──▶ step task
//!                                                                      │
//!   decode + verify ── bad? ──▶ dead letter (reason) + term            │
//!   not due yet?    ──────────▶ nak(remaining delay)                   │
//!   handler (timeout, panics caught, progress kept alive)              │
//!   transition::apply ─▶ encode ─▶ publish `<order>:<hop>` ─▶ stored? ─▶ ack input
//!                                                  └─ failed ─▶ nak, redelivered later
//! ```
//!
//! Three kinds of failure: a transient error spends one of the step's
//! attempts (retried with the route's backoff), a permanent one fails the
//! order (compensating), and an *unavailable* infrastructure (a store or
//! NATS with no responders, a leader election, a time-out, a lost
//! connection) spends nothing: the step is tried again after a capped
//! backoff while the order stays running, its history saying since when it
//! waits and why; so are the runtime's own publishes. Only the operator's
//! limit ([`WorkerBuilder::unavailable_limit`]) ends such a wait, as a dead
//! letter of kind `unavailable` to redrive, never as a failed order.
//!
//! The output hop is stored before the input is acknowledged, so a crash at
//! any point leads to a redelivery, and the redelivery to the same result:
//! handlers are idempotent on [`StepContext::idempotency_key`], and the
//! republished hop carries the same deduplication id.
//!
//! The files: `handler` is the API a service author reads;
//! the rest is the runtime: `builder` (configure and start), `handle` (the
//! running worker, its counters and shared state), `pump` (the fetch loop),
//! `process` (one delivery: admit, run, hand off), `run` (the handler under
//! its deadline), `handoff` (store the next hop, then acknowledge) and
//! `metrics` (the Prometheus series, when asked for).

mod branching;
mod builder;
mod handle;
mod handler;
mod handoff;
mod metrics;
mod process;
mod pump;
mod run;

pub use builder::{Worker, WorkerBuilder, WorkerError, DEFAULT_UNAVAILABLE_LIMIT, MAX_DEFAULT_PREFETCH};
pub use handle::{WorkerHandle, WorkerStats};
pub use handler::{BoxFuture, Handler, IdempotencyKey, StepContext, StepError, StepOutput};
pub use metrics::WorkerMetrics;
