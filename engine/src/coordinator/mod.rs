//! The coordinator: every order tracked and queryable, beside the data
//! path, with no database of its own.
//!
//! - [`view`]: what is tracked per order, built from the hops alone (pure).
//! - [`api`]: the JSON request interface any NATS client can use.
//! - the service ([`start`]): follows `WAYBILL_HOPS` with an ordered
//!   consumer, answers requests, reports stalled orders and re-drives the
//!   hops nothing will deliver again.

pub mod api;
pub mod client;
mod service;
pub mod view;

pub use client::{CoordinatorClient, RequestError};
pub use service::{start, CoordinatorConfig, CoordinatorError, CoordinatorHandle};
pub use view::{Applied, Filter, OrderState, Partition, PartitionError, StoredHop, Summary, View};
