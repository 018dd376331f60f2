//! `inventory.reserve` and `inventory.release`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use waybill::hash::FastMap;
use waybill::{OrderId, Payload, StepContext, StepError, StepOutput};

use super::order_of;

/// Units of a SKU not listed in the seed.
pub const UNLISTED_STOCK: i64 = 1_000_000;

/// Stock of one SKU (its JSON form is the one the NATS store keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Level {
    pub available: i64,
    pub reserved: i64,
}

/// What a reservation came to. Recorded per order, so a redelivered
/// reservation answers the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    Reserved,
    Insufficient { sku: String, wanted: i64, available: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StockError {
    /// The store cannot be reached for now (no responders, a leader
    /// election, a time-out): the step waits, spending no attempt.
    #[error("stock store unavailable: {0}")]
    Unavailable(String),
    /// The store answered, but not as it should (an unreadable value):
    /// worth a retry, counted as an attempt.
    #[error("stock store error: {0}")]
    Store(String),
    /// The order asks for what cannot be stored (a SKU that is no valid
    /// key): retrying will not help.
    #[error("{0}")]
    Invalid(String),
    /// Another run of a step of this order holds it (a redelivery
    /// overlapping a slow original): try again after the delay.
    #[error("another run holds this order's stock for {0:?} more")]
    Busy(std::time::Duration),
}

impl From<StockError> for StepError {
    fn from(e: StockError) -> Self {
        match e {
            StockError::Busy(d) => StepError::defer(e.to_string(), d),
            StockError::Unavailable(_) => StepError::unavailable(e.to_string()),
            StockError::Store(_) => StepError::transient(e.to_string()),
            StockError::Invalid(_) => StepError::permanent(e.to_string()),
        }
    }
}

/// Stock levels. A reservation takes all lines or none; release undoes a
/// reservation once, or what a reservation that never finished did.
pub trait StockStore: Send + Sync + 'static {
    fn reserve(
        &self,
        order: OrderId,
        lines: &BTreeMap<String, i64>,
    ) -> impl Future<Output = Result<Reservation, StockError>> + Send;
    /// Returns whether anything was released.
    fn release(&self, order: OrderId) -> impl Future<Output = Result<bool, StockError>> + Send;
    fn level(&self, sku: &str) -> impl Future<Output = Result<Level, StockError>> + Send;
}

/// The initial units of `sku`: listed in the seed, none for `OOS-` SKUs,
/// otherwise `UNLISTED_STOCK` (1,000,000).
pub fn initial_stock(seed: &HashMap<String, i64>, sku: &str) -> i64 {
    match seed.get(sku) {
        Some(&n) => n,
        None if sku.starts_with("OOS-") => 0,
        None => UNLISTED_STOCK,
    }
}

#[derive(Debug)]
struct Held {
    lines: BTreeMap<String, i64>,
    result: Reservation,
    released: bool,
}

#[derive(Debug, Default)]
struct StockState {
    levels: HashMap<String, Level>,
    orders: FastMap<OrderId, Held>,
}

/// Stock in memory.
#[derive(Debug)]
pub struct MemoryStock {
    seed: HashMap<String, i64>,
    state: Mutex<StockState>,
}

impl MemoryStock {
    pub fn new(seed: HashMap<String, i64>) -> Self {
        Self {
            seed,
            state: Mutex::new(StockState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The initial units of a SKU.
    pub fn initial(&self, sku: &str) -> i64 {
        initial_stock(&self.seed, sku)
    }

    /// Every SKU touched so far with its level.
    pub fn levels(&self) -> HashMap<String, Level> {
        self.lock().levels.clone()
    }
}

impl StockStore for MemoryStock {
    async fn reserve(&self, order: OrderId, lines: &BTreeMap<String, i64>) -> Result<Reservation, StockError> {
        let mut st = self.lock();
        if let Some(held) = st.orders.get(&order) {
            return Ok(held.result.clone());
        }
        let seed = &self.seed;
        let mut short = None;
        for (sku, &wanted) in lines {
            let level = *st.levels.entry(sku.clone()).or_insert_with(|| Level {
                available: initial_stock(seed, sku),
                reserved: 0,
            });
            if level.available < wanted {
                short = Some(Reservation::Insufficient {
                    sku: sku.clone(),
                    wanted,
                    available: level.available,
                });
                break;
            }
        }
        let result = match short {
            Some(s) => s,
            None => {
                for (sku, &qty) in lines {
                    if let Some(level) = st.levels.get_mut(sku) {
                        level.available -= qty;
                        level.reserved += qty;
                    }
                }
                Reservation::Reserved
            }
        };
        st.orders.insert(
            order,
            Held {
                lines: lines.clone(),
                result: result.clone(),
                released: false,
            },
        );
        Ok(result)
    }

    async fn release(&self, order: OrderId) -> Result<bool, StockError> {
        let mut st = self.lock();
        let StockState { levels, orders } = &mut *st;
        let Some(held) = orders.get_mut(&order) else {
            return Ok(false);
        };
        if held.released || held.result != Reservation::Reserved {
            return Ok(false);
        }
        for (sku, &qty) in &held.lines {
            if let Some(level) = levels.get_mut(sku) {
                level.available += qty;
                level.reserved -= qty;
            }
        }
        held.released = true;
        Ok(true)
    }

    async fn level(&self, sku: &str) -> Result<Level, StockError> {
        let st = self.lock();
        Ok(st.levels.get(sku).copied().unwrap_or(Level {
            available: self.initial(sku),
            reserved: 0,
        }))
    }
}

/// The quantities an order asks for, per SKU (lines of one SKU added up).
pub fn lines_of(order: &waybill_workflows::OrderView<'_>) -> Result<BTreeMap<String, i64>, StepError> {
    let mut lines = BTreeMap::new();
    for item in &order.items {
        let q = lines.entry(item.sku.to_string()).or_insert(0i64);
        *q = q
            .checked_add(item.qty)
            .ok_or_else(|| StepError::permanent(format!("quantity of {} overflows", item.sku)))?;
    }
    Ok(lines)
}

/// The inventory service over a stock store.
#[derive(Debug)]
pub struct InventoryService<S> {
    stock: S,
}

impl<S: StockStore> InventoryService<S> {
    pub fn new(stock: S) -> Self {
        Self { stock }
    }

    pub fn stock(&self) -> &S {
        &self.stock
    }

    /// Reserves every line or none; not enough stock is the outcome
    /// `out_of_stock`.
    pub async fn reserve(&self, ctx: StepContext, payload: Payload) -> Result<StepOutput, StepError> {
        let order = order_of(&payload)?;
        let lines = lines_of(&order)?;
        let reserve = self.stock.reserve(ctx.order_id, &lines);
        match super::store_call(&ctx, "the stock", reserve).await? {
            Reservation::Reserved => Ok(StepOutput::ok()),
            Reservation::Insufficient { sku, wanted, available } => Ok(StepOutput::outcome("out_of_stock")
                .with_detail(format!("{sku}: wanted {wanted}, available {available}"))),
        }
    }

    /// Releases the order's reservation, once.
    pub async fn release(&self, ctx: StepContext, _payload: Payload) -> Result<StepOutput, StepError> {
        let release = self.stock.release(ctx.order_id);
        let released = super::store_call(&ctx, "the stock", release).await?;
        Ok(StepOutput::ok().with_detail(if released { "released" } else { "nothing to release" }))
    }
}
