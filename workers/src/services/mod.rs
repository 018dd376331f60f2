//! The reference services: payment, inventory and shipping. Each keeps its
//! own state behind an interface of its own ([`Ledger`], [`StockStore`],
//! [`ShipmentLog`]); here that state is in memory.
//!
//! Every handler is idempotent on the order (its step's idempotency key): a
//! redelivered step changes nothing twice.

mod inventory;
mod payment;
mod shipping;

use std::sync::Arc;

pub use inventory::{InventoryService, Level, MemoryStock, Reservation, StockError, StockStore};
pub use payment::{Ledger, LedgerError, MemoryLedger, PaymentEntry, PaymentService};
pub use shipping::{tracking_number, MemoryShipments, ShipmentLog, ShippingService};

use waybill::transport::Transport;
use waybill::{Payload, StepContext, StepError, WorkerBuilder};
use waybill_workflows::OrderView;

/// Reads the order a step works on (without copying it); a payload that is
/// not an order is a permanent error.
pub(crate) fn order_of(payload: &Payload) -> Result<OrderView<'_>, StepError> {
    Ok(payload.decode_borrowed::<OrderView>()?)
}

/// The three services with in-memory state, as the embedded default runs
/// them.
#[derive(Debug, Clone)]
pub struct MemoryServices {
    pub payment: Arc<PaymentService<MemoryLedger>>,
    pub inventory: Arc<InventoryService<MemoryStock>>,
    pub shipping: Arc<ShippingService<MemoryShipments>>,
}

impl MemoryServices {
    /// Fresh state; stock seeded from `stock` (SKU → units).
    pub fn new(stock: std::collections::HashMap<String, i64>) -> Self {
        Self {
            payment: Arc::new(PaymentService::new(MemoryLedger::default())),
            inventory: Arc::new(InventoryService::new(MemoryStock::new(stock))),
            shipping: Arc::new(ShippingService::new(MemoryShipments::default())),
        }
    }

    /// Serves all five service subjects on `builder`.
    pub fn serve<T: Transport>(&self, builder: WorkerBuilder<T>) -> WorkerBuilder<T> {
        let p = self.payment.clone();
        let p2 = self.payment.clone();
        let i = self.inventory.clone();
        let i2 = self.inventory.clone();
        let s = self.shipping.clone();
        builder
            .serve("payment.charge", move |ctx: StepContext, pl: Payload| {
                let p = p.clone();
                async move { p.charge(ctx, pl).await }
            })
            .serve("payment.refund", move |ctx: StepContext, pl: Payload| {
                let p = p2.clone();
                async move { p.refund(ctx, pl).await }
            })
            .serve("inventory.reserve", move |ctx: StepContext, pl: Payload| {
                let i = i.clone();
                async move { i.reserve(ctx, pl).await }
            })
            .serve("inventory.release", move |ctx: StepContext, pl: Payload| {
                let i = i2.clone();
                async move { i.release(ctx, pl).await }
            })
            .serve("shipping.dispatch", move |ctx: StepContext, pl: Payload| {
                let s = s.clone();
                async move { s.dispatch(ctx, pl).await }
            })
    }
}
