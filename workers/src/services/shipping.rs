//! `shipping.dispatch`.

use std::future::Future;
use std::sync::Mutex;

use waybill::hash::FastMap;
use waybill::{OrderId, Payload, StepContext, StepError, StepOutput};

use super::order_of;

/// The tracking number of an order: derived from its id, so a redelivered
/// dispatch gives the same one.
pub fn tracking_number(order: OrderId) -> String {
    let hex = order.as_uuid().simple().to_string().to_uppercase();
    format!("WB{}", &hex[20..])
}

/// Why a shipment could not be recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShipmentError {
    /// The log's store answered, but not as it should: worth a retry,
    /// counted as an attempt.
    #[error("{0}")]
    Store(String),
}

impl From<ShipmentError> for StepError {
    fn from(e: ShipmentError) -> Self {
        match e {
            ShipmentError::Store(message) => StepError::transient(message),
        }
    }
}

/// Where shipments are recorded.
pub trait ShipmentLog: Send + Sync + 'static {
    /// Records the shipment of `order` unless it is recorded; returns its
    /// tracking number.
    fn record(&self, order: OrderId, tracking: String) -> impl Future<Output = Result<String, ShipmentError>> + Send;
}

/// Shipments in memory.
#[derive(Debug, Default)]
pub struct MemoryShipments {
    shipments: Mutex<FastMap<OrderId, String>>,
}

impl MemoryShipments {
    pub fn count(&self) -> usize {
        self.shipments.lock().map(|s| s.len()).unwrap_or(0)
    }
}

impl ShipmentLog for MemoryShipments {
    async fn record(&self, order: OrderId, tracking: String) -> Result<String, ShipmentError> {
        let mut s = self.shipments.lock().unwrap_or_else(|p| p.into_inner());
        Ok(s.entry(order).or_insert(tracking).clone())
    }
}

/// The shipping service.
#[derive(Debug)]
pub struct ShippingService<S> {
    log: S,
}

impl<S: ShipmentLog> ShippingService<S> {
    pub fn new(log: S) -> Self {
        Self { log }
    }

    pub fn log(&self) -> &S {
        &self.log
    }

    /// Dispatches the order. Country `XX` cannot be shipped to (a permanent
    /// failure); zip `99999` makes the simulated carrier client panic on
    /// every attempt (a bug), so the order is compensated once its retries
    /// are used up.
    pub async fn dispatch(&self, ctx: StepContext, payload: Payload) -> Result<StepOutput, StepError> {
        let order = order_of(&payload)?;
        if order.ship_to.country == "XX" {
            return Err(StepError::permanent("cannot ship to country XX"));
        }
        if order.ship_to.zip == "99999" {
            panic!("carrier client bug (simulated for zip 99999)");
        }
        let tracking = self.log.record(ctx.order_id, tracking_number(ctx.order_id)).await?;
        Ok(StepOutput::ok().with_detail(tracking))
    }
}
