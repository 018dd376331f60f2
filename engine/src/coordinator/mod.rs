//! The coordinator: every order tracked and queryable, beside the data
//! path, with no database of its own.
//!
//! See [`view`] for what is tracked.

pub mod view;

pub use view::{Applied, Filter, OrderState, Partition, PartitionError, StoredHop, Summary, View};
