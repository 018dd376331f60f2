//! Waybill: a workflow engine where each order is a document that carries its
//! own route and state from one stateless worker to the next.
//!
//! Read first: `examples/` at the repository root, and [`Workflow::builder`].
//!
//! Module map:
//! - [`id`]: newtypes for every identity (`OrderId`, `ServiceSubject`, …).
//! - `workflow`: definitions ([`Workflow::builder`]) and the [`Route`] copied
//!   into every document.
//! - `document`: the [`Document`] envelope, readable without the payload type.
//! - [`codec`]: the one versioned wire format (postcard, or JSON), bounded.
//! - [`transition`]: pure (document, step result) → next hop.
//! - [`transport`]: the seam, and the [`Embedded`](transport::Embedded)
//!   transport.
//! - `worker`: the runtime that runs step handlers ([`Worker::builder`]).
//! - `client`: start orders and wait for their end ([`Client`]).
//! - `registry`: the workflows a process can start, with payload validation.
//! - [`subject`] and [`headers`]: every subject name and header, in one place.
//! - [`hash`]: a fast hasher for maps keyed by Waybill's ids.

mod client;
pub mod codec;
pub mod coordinator;
mod document;
pub mod hash;
pub mod headers;
pub mod id;
mod registry;
pub mod subject;
pub mod transition;
pub mod transport;
mod worker;
mod workflow;

pub use client::{Client, ClientError, DEFAULT_START_TIMEOUT, MAX_START_TIMEOUT};
pub use codec::{Codec, DecodeError, EncodeError, Envelope, Format};
pub use document::{
    AttemptResult, Compensation, ContentType, Document, Journal, Payload, PayloadError, Status, StepKind, StepRecord,
    Target, Timestamp, UnknownStatus,
};
pub use id::{DedupId, MsgId, NameError, OrderId, Outcome, ServiceSubject, StepName, WorkerId, WorkflowName};
pub use registry::{Registry, StartError, WorkflowPayload};
pub use transition::{Attempt, Decision, StepResult};
pub use worker::{
    BoxFuture, Handler, IdempotencyKey, StepContext, StepError, StepOutput, Worker, WorkerBuilder, WorkerError,
    WorkerHandle, WorkerStats, DEFAULT_UNAVAILABLE_LIMIT,
};
pub use workflow::{
    Backoff, Branch, DefinitionError, Next, Route, RouteStep, Then, Workflow, WorkflowBuilder, DEFAULT_STEP_TIMEOUT,
    MAX_STEPS,
};
