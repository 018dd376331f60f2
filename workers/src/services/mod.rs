//! The reference services: payment, inventory and shipping, and the trip's
//! ([`TripService`], in memory only). Each keeps its
//! own state behind an interface of its own ([`Ledger`], [`StockStore`],
//! [`ShipmentLog`]); here that state is in memory; [`kv`] keeps the ledger
//! and the stock in NATS KV buckets shared by every process of a service
//! (shipping needs none: its tracking number derives from the order id).
//!
//! Every handler is idempotent on the order (its step's idempotency key): a
//! redelivered step changes nothing twice.

mod inventory;
pub mod kv;
mod payment;
mod shipping;
mod trip;

use std::sync::Arc;

pub use inventory::{initial_stock, InventoryService, Level, MemoryStock, Reservation, StockError, StockStore};
pub use payment::{Ledger, LedgerError, MemoryLedger, PaymentEntry, PaymentService};
pub use shipping::{tracking_number, MemoryShipments, ShipmentError, ShipmentLog, ShippingService};
pub use trip::{Hold, TripService, TripState};

use waybill::transport::Transport;
use waybill::{Payload, StepContext, StepError, WorkerBuilder};
use waybill_workflows::services::{
    INVENTORY_RELEASE, INVENTORY_RESERVE, PAYMENT_CHARGE, PAYMENT_REFUND, SHIPPING_DISPATCH, TRIP_BOOK, TRIP_CAR_HOLD,
    TRIP_CAR_RELEASE, TRIP_CHARGE, TRIP_FLIGHT_HOLD, TRIP_FLIGHT_RELEASE, TRIP_HOTEL_HOLD, TRIP_HOTEL_RELEASE,
    TRIP_REFUND, TRIP_REMIND, TRIP_QUOTE, TRIP_AIRPORT_CAR_HOLD, TRIP_AIRPORT_CAR_RELEASE,
};
use waybill_workflows::OrderView;

/// Reads the order a step works on (without copying it); a payload that is
/// not an order is a permanent error.
pub(crate) fn order_of(payload: &Payload) -> Result<OrderView<'_>, StepError> {
    Ok(payload.decode_borrowed::<OrderView>()?)
}

/// How much of a step's time a call to its store leaves unused: the call
/// gives up that long before the step would time out, so a store that does
/// not answer (a node away, a leader being elected) is an unavailable store,
/// waited out without spending an attempt, and not a step that timed out,
/// which spends one (and an outage of a few step timeouts used them all).
/// It also leaves the store time to give up an inventory lease.
pub(crate) const STORE_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a store call may take out of a step's `window`: all of it but
/// [`STORE_MARGIN`], and at least half of it.
pub(crate) fn store_budget(window: std::time::Duration) -> std::time::Duration {
    window.saturating_sub(STORE_MARGIN).max(window / 2)
}

/// Runs a call to the step's store within [`store_budget`] of the step's
/// time; one that does not answer by then is an unavailable store.
pub(crate) async fn store_call<T, E>(
    ctx: &StepContext,
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, StepError>
where
    StepError: From<E>,
{
    let window = ctx.deadline.saturating_duration_since(tokio::time::Instant::now());
    let budget = store_budget(window);
    match tokio::time::timeout(budget, call).await {
        Ok(r) => r.map_err(StepError::from),
        Err(_) => Err(StepError::unavailable(format!(
            "{what} did not answer within {} ms",
            budget.as_millis()
        ))),
    }
}

/// A step handler calling `method` of the shared service `svc`.
macro_rules! handler {
    ($svc:expr, $method:ident) => {{
        let svc = $svc.clone();
        move |ctx: StepContext, payload: Payload| {
            let svc = svc.clone();
            async move { svc.$method(ctx, payload).await }
        }
    }};
}

/// The reference services with in-memory state, as the embedded default
/// runs them: the order's three and the trip's.
#[derive(Debug, Clone)]
pub struct MemoryServices {
    pub payment: Arc<PaymentService<MemoryLedger>>,
    pub inventory: Arc<InventoryService<MemoryStock>>,
    pub shipping: Arc<ShippingService<MemoryShipments>>,
    pub trip: Arc<TripService>,
}

impl MemoryServices {
    /// Fresh state; stock seeded from `stock` (SKU → units).
    pub fn new(stock: std::collections::HashMap<String, i64>) -> Self {
        Self {
            payment: Arc::new(PaymentService::new(MemoryLedger::default())),
            inventory: Arc::new(InventoryService::new(MemoryStock::new(stock))),
            shipping: Arc::new(ShippingService::new(MemoryShipments::default())),
            trip: Arc::default(),
        }
    }

    /// Serves every service subject on `builder`.
    pub fn serve<T: Transport>(&self, builder: WorkerBuilder<T>) -> WorkerBuilder<T> {
        let builder = serve_payment(&self.payment, builder);
        let builder = serve_inventory(&self.inventory, builder);
        let builder = serve_shipping(&self.shipping, builder);
        serve_trip(&self.trip, builder)
    }
}

/// A step handler calling `method` of the trip service for one hold.
macro_rules! hold_handler {
    ($svc:expr, $method:ident, $kind:expr) => {{
        let svc = $svc.clone();
        move |ctx: StepContext, payload: Payload| {
            let svc = svc.clone();
            async move { svc.$method($kind, ctx, payload).await }
        }
    }};
}

/// Serves the ten `trip.…` subjects.
pub fn serve_trip<T: Transport>(svc: &Arc<TripService>, builder: WorkerBuilder<T>) -> WorkerBuilder<T> {
    builder
        .serve(TRIP_FLIGHT_HOLD, hold_handler!(svc, hold, Hold::Flight))
        .serve(TRIP_FLIGHT_RELEASE, hold_handler!(svc, release, Hold::Flight))
        .serve(TRIP_HOTEL_HOLD, hold_handler!(svc, hold, Hold::Hotel))
        .serve(TRIP_HOTEL_RELEASE, hold_handler!(svc, release, Hold::Hotel))
        .serve(TRIP_CAR_HOLD, hold_handler!(svc, hold, Hold::Car))
        .serve(TRIP_CAR_RELEASE, hold_handler!(svc, release, Hold::Car))
        .serve(TRIP_AIRPORT_CAR_HOLD, hold_handler!(svc, hold, Hold::AirportCar))
        .serve(TRIP_AIRPORT_CAR_RELEASE, hold_handler!(svc, release, Hold::AirportCar))
        .serve(TRIP_QUOTE, handler!(svc, quote))
        .serve(TRIP_CHARGE, handler!(svc, charge))
        .serve(TRIP_REFUND, handler!(svc, refund))
        .serve(TRIP_REMIND, handler!(svc, remind))
        .serve(TRIP_BOOK, handler!(svc, book))
}

/// Serves `payment.charge` and `payment.refund`.
pub fn serve_payment<T: Transport, L: Ledger>(
    svc: &Arc<PaymentService<L>>,
    builder: WorkerBuilder<T>,
) -> WorkerBuilder<T> {
    builder
        .serve(PAYMENT_CHARGE, handler!(svc, charge))
        .serve(PAYMENT_REFUND, handler!(svc, refund))
}

/// Serves `inventory.reserve` and `inventory.release`.
pub fn serve_inventory<T: Transport, S: StockStore>(
    svc: &Arc<InventoryService<S>>,
    builder: WorkerBuilder<T>,
) -> WorkerBuilder<T> {
    builder
        .serve(INVENTORY_RESERVE, handler!(svc, reserve))
        .serve(INVENTORY_RELEASE, handler!(svc, release))
}

/// Serves `shipping.dispatch`.
pub fn serve_shipping<T: Transport, S: ShipmentLog>(
    svc: &Arc<ShippingService<S>>,
    builder: WorkerBuilder<T>,
) -> WorkerBuilder<T> {
    builder.serve(SHIPPING_DISPATCH, handler!(svc, dispatch))
}
