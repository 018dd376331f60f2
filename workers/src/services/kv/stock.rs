//! Stock levels in the `inventory` bucket: one value per SKU, changed only
//! by compare-and-swap on its revision, each change marked with the order
//! and operation that made it until the order's record holds it.

use std::collections::{BTreeMap, HashMap};

use async_nats::jetstream::kv::{self, Store};
use serde::{Deserialize, Serialize};
use waybill::transport::fault;
use waybill::transport::nats::Nats;

use super::super::inventory::{initial_stock, Level, StockError};
use super::store::{after_conflict, decode, encode, latest_as, stock_err};
use super::{open, KvError, INVENTORY, RESERVATIONS};

/// A SKU's value in the `inventory` bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SkuValue {
    pub(super) available: i64,
    pub(super) reserved: i64,
    /// Changes made for orders whose own record does not say so yet.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) pending: BTreeMap<String, i64>,
}

/// Stock in the `inventory` and `reservations` buckets.
#[derive(Debug, Clone)]
pub struct KvStock {
    pub(super) stock: Store,
    pub(super) orders: Store,
    pub(super) seed: HashMap<String, i64>,
}

/// What one change of a SKU came to.
pub(super) enum Change {
    Made,
    Short { available: i64 },
}

impl KvStock {
    /// Opens the buckets; `seed` gives the initial units of SKUs that have no
    /// level yet (as `waybill setup --stock` would have), with the reference
    /// rules for the rest (`OOS-` none, others 1,000,000).
    pub async fn open(nats: &Nats, seed: HashMap<String, i64>) -> Result<Self, KvError> {
        Ok(Self {
            stock: open(nats, INVENTORY).await?,
            orders: open(nats, RESERVATIONS).await?,
            seed,
        })
    }

    /// A SKU's value and revision, created at its initial level if absent.
    pub(super) async fn sku(&self, sku: &str) -> Result<(SkuValue, u64), StockError> {
        loop {
            match self.stock.entry(sku).await.map_err(stock_err)? {
                Some(e) if e.operation == kv::Operation::Put => {
                    let v = decode(INVENTORY, sku, &e.value).map_err(|e| StockError::Store(e.to_string()))?;
                    return Ok((v, e.revision));
                }
                _ => {
                    let v = SkuValue {
                        available: initial_stock(&self.seed, sku),
                        reserved: 0,
                        pending: BTreeMap::new(),
                    };
                    match self.stock.create(sku, encode(&v)).await {
                        Ok(rev) => return Ok((v, rev)),
                        Err(e) if fault::is_conflict(&e) => continue,
                        Err(e) => return Err(stock_err(e)),
                    }
                }
            }
        }
    }

    /// A SKU's value and revision from the bucket's stream leader
    /// (`store::latest`); `None` if it has no level yet.
    pub(super) async fn sku_latest(&self, sku: &str) -> Result<Option<(SkuValue, u64)>, StockError> {
        latest_as(&self.stock, INVENTORY, sku, StockError::Unavailable, StockError::Store).await
    }

    /// Moves `qty` units of `sku` from available to reserved (negative: back),
    /// once per `marker`; refuses to make available negative when `check`.
    pub(super) async fn change(&self, sku: &str, marker: &str, qty: i64, check: bool) -> Result<Change, StockError> {
        let mut tries = 0;
        loop {
            let (mut v, mut rev) = self.sku(sku).await?;
            if v.pending.contains_key(marker) {
                return Ok(Change::Made);
            }
            if check && v.available < qty {
                // Short is decided on a read alone: not on a lagging
                // replica's older level.
                if let Some(fresh) = self.sku_latest(sku).await? {
                    (v, rev) = fresh;
                }
                if v.pending.contains_key(marker) {
                    return Ok(Change::Made);
                }
                if v.available < qty {
                    return Ok(Change::Short { available: v.available });
                }
            }
            v.available -= qty;
            v.reserved += qty;
            v.pending.insert(marker.to_owned(), qty);
            match self.stock.update(sku, encode(&v), rev).await {
                Ok(_) => return Ok(Change::Made),
                Err(e) if fault::is_conflict(&e) => after_conflict(&mut tries).await,
                Err(e) => return Err(stock_err(e)),
            }
        }
    }

    /// Removes `marker` from `sku` once the order's record holds the change.
    pub(super) async fn settle(&self, sku: &str, marker: &str) -> Result<(), StockError> {
        let mut tries = 0;
        loop {
            let (mut v, mut rev) = self.sku(sku).await?;
            if !v.pending.contains_key(marker) {
                // "No marker, nothing to do" is decided on the read alone:
                // not on a lagging replica's (see `store::latest`). The common
                // case, a marker to remove, needs no such read: the
                // compare-and-swap below refuses a stale revision.
                match self.sku_latest(sku).await? {
                    Some(fresh) if fresh.0.pending.contains_key(marker) => (v, rev) = fresh,
                    _ => return Ok(()),
                }
            }
            v.pending.remove(marker);
            match self.stock.update(sku, encode(&v), rev).await {
                Ok(_) => return Ok(()),
                Err(e) if fault::is_conflict(&e) => after_conflict(&mut tries).await,
                Err(e) => return Err(stock_err(e)),
            }
        }
    }

    /// The level of `sku` as it stands (markers aside).
    pub async fn level_of(&self, sku: &str) -> Result<(Level, usize), StockError> {
        let (v, _) = self.sku(sku).await?;
        Ok((
            Level {
                available: v.available,
                reserved: v.reserved,
            },
            v.pending.len(),
        ))
    }

    /// Whether `marker`'s change is on `sku`. If it is not, writes the SKU
    /// again unchanged: a change still in flight from a run that gave up
    /// (a publish that timed out may yet be stored) then fails its
    /// compare-and-swap instead of landing after this look.
    pub(super) async fn seal(&self, sku: &str, marker: &str) -> Result<bool, StockError> {
        let mut tries = 0;
        loop {
            let (v, rev) = self.sku(sku).await?;
            if v.pending.contains_key(marker) {
                return Ok(true);
            }
            match self.stock.update(sku, encode(&v), rev).await {
                Ok(_) => return Ok(false),
                Err(e) if fault::is_conflict(&e) => after_conflict(&mut tries).await,
                Err(e) => return Err(stock_err(e)),
            }
        }
    }
}
