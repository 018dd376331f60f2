//! The wire structs: the only types the codec hands to serde.
//!
//! Each domain type that travels has its wire form here, converted with
//! `From` (or `TryFrom`, when the wire can hold what the domain refuses).
//! Decoding owns ([`read`]); encoding borrows ([`write`]: a hop is written
//! without copying its history or payload). **The field order and the
//! variant order of these types are the format**: a type's two forms list
//! the same fields in the same order, and changing either is a change of
//! [`ENVELOPE_VERSION`](super::ENVELOPE_VERSION) (`tests/wire_format.rs`
//! holds documents of versions 1 and 2 that must keep their bytes). The
//! versions differ only in the route's steps: version 2 adds each step's
//! wait (`RouteStepV2`); a route without one is still written as version 1.
//!
//! Identities ([`OrderId`](crate::id::OrderId), the names) travel as
//! themselves: each is one scalar (a UUID, a string) whose serde form is
//! validated in `id.rs` and is also their JSON interface. Times travel as
//! their microseconds.

mod read;
mod write;

use std::marker::PhantomData;

use serde::Serialize;

pub(super) use read::{BranchAt, JsonRoute, Route as WireRoute, RouteStepV2, RouteV3, WireBody, WireBodyV3, WireHead};
pub(super) use write::{JsonRouteRef, WireBodyRef, WireBodyRefV3, WireRouteRef, WireRouteRefV3, WireStepRef, WireStepRefV2};

/// A slice written as the sequence of its items' wire forms, without
/// collecting them first.
struct Seq<'a, T, W>(&'a [T], PhantomData<fn() -> W>);

impl<'a, T, W> Seq<'a, T, W> {
    fn of(items: &'a [T]) -> Self {
        Self(items, PhantomData)
    }
}

impl<T, W> Seq<'_, T, W> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a, T, W: From<&'a T> + Serialize> Serialize for Seq<'a, T, W> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(W::from))
    }
}
