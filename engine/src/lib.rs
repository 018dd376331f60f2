//! Waybill: a workflow engine where each order is a document that carries its
//! own route and state from one stateless worker to the next.
//!
//! Read first: `engine/examples/quickstart.rs` (`cargo run -p waybill
//! --example quickstart`: a workflow, its handlers, orders on the embedded
//! transport), then [`Workflow::builder`]. The order domain the programs run
//! is the `waybill-workflows` crate; the repository's `ARCHITECTURE.md` is
//! the map.
//!
//! Module map:
//! - [`id`]: newtypes for every identity (`OrderId`, `ServiceSubject`, …).
//! - `workflow`: definitions ([`Workflow::builder`]), their validation, and
//!   the [`Route`] copied into every document.
//! - `document`: the [`Document`] envelope, readable without the payload type.
//! - [`codec`]: the one versioned wire format (postcard, or JSON), bounded.
//! - [`transition`]: pure (document, step result) → next hop.
//! - [`transport`]: the seam ([`Transport`](transport::Transport),
//!   [`HopLog`](transport::HopLog), [`Rpc`](transport::Rpc)) and its two
//!   implementations, [`Embedded`](transport::Embedded) and
//!   [`Nats`](transport::Nats).
//! - `worker`: the runtime that runs step handlers ([`Worker::builder`]).
//! - `client`: start orders and wait for their end ([`Client`]).
//! - `registry`: the workflows a process can start, with payload validation.
//! - [`coordinator`]: every order tracked and queryable beside the data
//!   path, written once over [`HopLog`](transport::HopLog) +
//!   [`Rpc`](transport::Rpc).
//! - [`subject`] and [`headers`]: every subject name and header, in one place.
//! - [`hash`]: a fast hasher for maps keyed by Waybill's ids.
//! - [`trace`]: where a step sits in its order's distributed trace (the
//!   order id is the trace id), for a tracer to read off the step's span.

mod client;
pub mod codec;
pub mod coordinator;
mod document;
pub mod hash;
pub mod headers;
pub mod id;
pub mod join;
mod registry;
pub mod subject;
pub mod trace;
pub mod transition;
pub mod transport;
mod worker;
mod workflow;

pub use client::{Client, ClientError, DEFAULT_START_TIMEOUT, MAX_START_TIMEOUT};
pub use codec::{Codec, DecodeError, EncodeError, Envelope, Format};
pub use document::{
    AttemptResult, AwaitedSignal, BranchAt, Compensation, ContentType, Document, Journal, Payload, PayloadError, Status,
    StepKind, StepRecord, Target, Timestamp, UnknownStatus,
};
pub use id::{
    DedupId, MsgId, NameError, OrderId, Outcome, ServiceSubject, SignalName, StepName, WorkerId, WorkflowName,
};
pub use registry::{InvalidPayload, Registry, StartError, WorkflowPayload};
pub use transition::{Attempt, Decision, StepResult};
pub use worker::{
    BoxFuture, Handler, IdempotencyKey, StepContext, StepError, StepOutput, Worker, WorkerBuilder, WorkerError,
    WorkerHandle, WorkerMetrics, WorkerStats, DEFAULT_UNAVAILABLE_LIMIT, MAX_DEFAULT_PREFETCH,
};
pub use workflow::graph;
pub use workflow::{
    Backoff, Branch, DefinitionError, Fork, Join, Merge, Next, Onward, Route, RouteStep, Then, Wait, Workflow,
    WorkflowBuilder, DEFAULT_STEP_TIMEOUT, MAX_BRANCHES, MAX_DELAY, MAX_STEPS,
};
