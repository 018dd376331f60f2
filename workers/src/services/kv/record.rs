//! What the `inventory` bucket holds: a level per SKU and a record per
//! order, under one stream so that one atomic batch changes both.
//!
//! - `sku.<SKU>`: `{"available", "reserved"}`; `available + reserved` is the
//!   SKU's initial stock, always.
//! - `order.<id>`: what the inventory did for the order: its lines and
//!   whether they are reserved, were short, were released, or the order was
//!   closed before anything was reserved.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use waybill::OrderId;

use super::super::inventory::{Level, Reservation};

/// The key of a SKU's level.
pub(super) fn sku_key(sku: &str) -> String {
    format!("sku.{sku}")
}

/// The key of an order's record.
pub(super) fn order_key(order: OrderId) -> String {
    format!("order.{order}")
}

/// A SKU's value in the `inventory` bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SkuValue {
    pub(super) available: i64,
    pub(super) reserved: i64,
}

impl From<SkuValue> for Level {
    fn from(v: SkuValue) -> Self {
        Level {
            available: v.available,
            reserved: v.reserved,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RecState {
    /// Every line is reserved.
    Reserved,
    /// A line was short; nothing was reserved.
    Insufficient,
    /// Reserved, then given back.
    Released,
    /// Released before anything was reserved (a compensation of a
    /// reservation that never got through): a late run of the reservation
    /// finds the order closed and takes nothing.
    Closed,
}

/// The line that was short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Short {
    pub(super) sku: String,
    pub(super) wanted: i64,
    pub(super) available: i64,
}

/// An order's record in the `inventory` bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct OrderRecord {
    pub(super) state: RecState,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) lines: BTreeMap<String, i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) short: Option<Short>,
}

impl OrderRecord {
    /// What a reservation of this order answers (the same on every run).
    pub(super) fn answer(&self) -> Reservation {
        match &self.short {
            Some(s) if self.state == RecState::Insufficient => Reservation::Insufficient {
                sku: s.sku.clone(),
                wanted: s.wanted,
                available: s.available,
            },
            // Reserved once; a later release does not change that answer.
            // A closed order's late run takes nothing; its answer goes to a
            // step the order has long left behind.
            _ => Reservation::Reserved,
        }
    }
}
