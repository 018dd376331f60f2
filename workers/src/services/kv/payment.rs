//! The payment ledger in the `payments` bucket: a charge is a `create`, so
//! an order cannot be charged twice; a refund is a compare-and-swap.

use async_nats::jetstream::kv::{self, Store};
use waybill::transport::fault;
use waybill::transport::nats::Nats;
use waybill::OrderId;

use super::super::payment::{Ledger, LedgerError, PaymentEntry};
use super::store::{decode, encode, latest_as, ledger_err};
use super::{open, stats, KvError, PAYMENTS};

/// The payment ledger in the `payments` bucket.
#[derive(Debug, Clone)]
pub struct KvLedger {
    store: Store,
}

impl KvLedger {
    pub async fn open(nats: &Nats) -> Result<Self, KvError> {
        Ok(Self {
            store: open(nats, PAYMENTS).await?,
        })
    }

    async fn read(&self, key: &str) -> Result<Option<(PaymentEntry, u64)>, LedgerError> {
        stats::read();
        match self.store.entry(key).await.map_err(ledger_err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let v = decode(PAYMENTS, key, &e.value).map_err(|e| LedgerError::Store(e.to_string()))?;
                Ok(Some((v, e.revision)))
            }
            _ => Ok(None),
        }
    }
}

impl KvLedger {
    /// [`Self::read`], from the bucket's stream leader ([`latest`](super::store::latest)).
    async fn read_latest(&self, key: &str) -> Result<Option<(PaymentEntry, u64)>, LedgerError> {
        stats::read();
        latest_as(&self.store, PAYMENTS, key, LedgerError::Unavailable, LedgerError::Store).await
    }
}

impl Ledger for KvLedger {
    async fn charge(&self, order: OrderId, amount: i64) -> Result<PaymentEntry, LedgerError> {
        let key = order.to_string();
        let entry = PaymentEntry {
            amount_cents: amount,
            charged: true,
            refunded: false,
        };
        match self.store.create(&key, encode(&entry)).await {
            Ok(_) => {
                stats::written(1);
                Ok(entry)
            }
            // Charged before (a redelivery): read it from the leader, which
            // has it, not from a replica that may not yet.
            Err(e) if fault::is_conflict(&e) => {
                stats::conflict();
                self.read_latest(&key)
                    .await?
                    .map(|(e, _)| e)
                    .ok_or_else(|| LedgerError::Store(format!("ledger entry {key} vanished")))
            }
            Err(e) => Err(ledger_err(e)),
        }
    }

    async fn refund(&self, order: OrderId) -> Result<Option<PaymentEntry>, LedgerError> {
        let key = order.to_string();
        loop {
            let owed = |e: &PaymentEntry| e.charged && !e.refunded;
            let read = match self.read(&key).await? {
                Some(r) if owed(&r.0) => Some(r),
                // "Never charged" or "refunded already" is decided on the
                // read alone: not on a lagging replica's answer, or a
                // charge would be kept (see `store::latest`). A refund to make
                // needs no such read: its compare-and-swap refuses a stale
                // revision.
                _ => self.read_latest(&key).await?,
            };
            let Some((mut entry, revision)) = read else {
                return Ok(None);
            };
            if !owed(&entry) {
                return Ok(Some(entry));
            }
            entry.refunded = true;
            match self.store.update(&key, encode(&entry), revision).await {
                Ok(_) => {
                    stats::written(1);
                    return Ok(Some(entry));
                }
                Err(e) if fault::is_conflict(&e) => {
                    stats::conflict();
                    continue;
                }
                Err(e) => return Err(ledger_err(e)),
            }
        }
    }

    async fn entry(&self, order: OrderId) -> Result<Option<PaymentEntry>, LedgerError> {
        Ok(self.read(&order.to_string()).await?.map(|(e, _)| e))
    }
}
