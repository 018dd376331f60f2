//! `payment.charge` and `payment.refund`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use waybill::hash::FastMap;
use waybill::{OrderId, Payload, StepContext, StepError, StepOutput};

use super::order_of;

/// One order's line in the ledger (its JSON form is the one the NATS ledger
/// stores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentEntry {
    pub amount_cents: i64,
    pub charged: bool,
    pub refunded: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The ledger's store cannot be reached for now (no responders, a
    /// leader election, a time-out): the step waits, spending no attempt.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    /// The store answered, but not as a ledger should (an unreadable or
    /// vanished entry): worth a retry, counted as an attempt.
    #[error("ledger error: {0}")]
    Store(String),
}

impl From<LedgerError> for StepError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Unavailable(_) => StepError::unavailable(e.to_string()),
            LedgerError::Store(_) => StepError::transient(e.to_string()),
        }
    }
}

/// The payment ledger, keyed by order id. Charging an order twice, or
/// refunding it twice, must be impossible.
pub trait Ledger: Send + Sync + 'static {
    /// Charges `amount` for `order` unless it was charged already; returns
    /// the entry as it now stands.
    fn charge(&self, order: OrderId, amount: i64) -> impl Future<Output = Result<PaymentEntry, LedgerError>> + Send;
    /// Refunds `order` if it was charged and not refunded yet; `None` when it
    /// was never charged.
    fn refund(&self, order: OrderId) -> impl Future<Output = Result<Option<PaymentEntry>, LedgerError>> + Send;
    fn entry(&self, order: OrderId) -> impl Future<Output = Result<Option<PaymentEntry>, LedgerError>> + Send;
}

/// A ledger in memory, with counters of the effects it applied.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    entries: Mutex<FastMap<OrderId, PaymentEntry>>,
    charges: AtomicU64,
    refunds: AtomicU64,
}

impl MemoryLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<OrderId, PaymentEntry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Charges applied (not counting repeats that changed nothing).
    pub fn charges_applied(&self) -> u64 {
        self.charges.load(Ordering::Relaxed)
    }

    /// Refunds applied (not counting repeats that changed nothing).
    pub fn refunds_applied(&self) -> u64 {
        self.refunds.load(Ordering::Relaxed)
    }

    /// A copy of every entry.
    pub fn snapshot(&self) -> FastMap<OrderId, PaymentEntry> {
        self.lock().clone()
    }
}

impl Ledger for MemoryLedger {
    async fn charge(&self, order: OrderId, amount: i64) -> Result<PaymentEntry, LedgerError> {
        let mut entries = self.lock();
        let e = entries.entry(order).or_insert(PaymentEntry {
            amount_cents: amount,
            charged: false,
            refunded: false,
        });
        if !e.charged {
            e.charged = true;
            e.amount_cents = amount;
            self.charges.fetch_add(1, Ordering::Relaxed);
        }
        Ok(*e)
    }

    async fn refund(&self, order: OrderId) -> Result<Option<PaymentEntry>, LedgerError> {
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(&order) else {
            return Ok(None);
        };
        if e.charged && !e.refunded {
            e.refunded = true;
            self.refunds.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(*e))
    }

    async fn entry(&self, order: OrderId) -> Result<Option<PaymentEntry>, LedgerError> {
        Ok(self.lock().get(&order).copied())
    }
}

/// The payment service over a ledger.
#[derive(Debug)]
pub struct PaymentService<L> {
    ledger: L,
}

impl<L: Ledger> PaymentService<L> {
    pub fn new(ledger: L) -> Self {
        Self { ledger }
    }

    pub fn ledger(&self) -> &L {
        &self.ledger
    }

    /// Charges Σ quantity × unit price. The simulated gateway knows test
    /// cards, by their last four digits:
    /// - `0002` is declined;
    /// - `0119` fails at the gateway on its first two attempts;
    /// - `0341` never answers on its first attempt (the step times out);
    /// - `0259` makes the gateway client panic on every attempt (a bug); once
    ///   its retries are used up the order is compensated (the refund finds
    ///   nothing charged).
    pub async fn charge(&self, ctx: StepContext, payload: Payload) -> Result<StepOutput, StepError> {
        let order = order_of(&payload)?;
        let card: &str = &order.payment.card;
        if card.ends_with("0002") {
            return Ok(StepOutput::outcome("declined").with_detail("card declined"));
        }
        if card.ends_with("0119") && ctx.attempt <= 2 {
            return Err(StepError::transient(
                "payment gateway unavailable (simulated for cards ending 0119)",
            ));
        }
        if card.ends_with("0341") && ctx.attempt == 1 {
            // The step's timeout ends this attempt.
            std::future::pending::<()>().await;
        }
        if card.ends_with("0259") {
            panic!("payment gateway client bug (simulated for cards ending 0259)");
        }
        let amount = order.total_cents().map_err(|e| StepError::permanent(e.to_string()))?;
        let entry = super::store_call(&ctx, "the ledger", self.ledger.charge(ctx.order_id, amount)).await?;
        Ok(StepOutput::ok().with_detail(format!("charged {} cents", entry.amount_cents)))
    }

    /// Refunds the order's charge, once.
    pub async fn refund(&self, ctx: StepContext, _payload: Payload) -> Result<StepOutput, StepError> {
        let entry = super::store_call(&ctx, "the ledger", self.ledger.refund(ctx.order_id)).await?;
        Ok(match entry {
            Some(e) => StepOutput::ok().with_detail(format!("refunded {} cents", e.amount_cents)),
            None => StepOutput::ok().with_detail("nothing was charged"),
        })
    }
}
