//! Stock in the `inventory` bucket ([`record`](super::record) says what it
//! holds). A reservation of several lines is all or nothing and made in
//! one atomic batch with the order's record, so there is never a
//! half-made reservation to find, lease or undo; a release gives back what
//! the record says was reserved, once, in one batch with the record.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use tokio::sync::{mpsc, oneshot};
use waybill::transport::fault;
use waybill::transport::nats::Nats;
use waybill::OrderId;

use super::super::inventory::{Level, Reservation, StockError, StockStore};
use super::commit::{self, Op};
use super::record::{order_key, OrderRecord, RecState};
use super::store::{check_key, encode, latest_as, stock_err};
use super::{open, stats, KvError, INVENTORY};

/// How many times a release reads the order's record again after it
/// changed under it (another run of the order's steps) before giving up.
const RELEASE_TRIES: usize = 8;

/// Stock in the `inventory` bucket, shared by every inventory worker on
/// any host. Cheap to clone; clones share one committer.
#[derive(Debug, Clone)]
pub struct KvStock {
    store: Store,
    seed: HashMap<String, i64>,
    ops: mpsc::Sender<Op>,
}

impl KvStock {
    /// Opens the bucket (which `waybill setup` created) and starts this
    /// process's committer; `seed` gives the initial units of SKUs that
    /// have no level yet (as `waybill setup --stock` would have), with the
    /// reference rules for the rest (`OOS-` none, others 1,000,000).
    pub async fn open(nats: &Nats, seed: HashMap<String, i64>) -> Result<Self, KvError> {
        let store = open(nats, INVENTORY).await?;
        if !store.stream.cached_info().config.allow_atomic_publish {
            return Err(KvError {
                bucket: INVENTORY,
                message: "does not take atomic batches: run `waybill setup` against nats-server 2.12 or later".into(),
            });
        }
        let ops = commit::start(nats.clone(), store.clone(), seed.clone());
        Ok(Self { store, seed, ops })
    }

    /// An order's record and its revision, from the stream leader: what a
    /// release decides on must not be a lagging replica's older answer.
    async fn record(&self, order: OrderId) -> Result<Option<(OrderRecord, u64)>, StockError> {
        stats::read();
        latest_as(
            &self.store,
            INVENTORY,
            &order_key(order),
            StockError::Unavailable,
            StockError::Store,
        )
        .await
    }

    /// The level of `sku` as it stands, from the stream leader.
    pub async fn level_of(&self, sku: &str) -> Result<Level, StockError> {
        Ok(commit::read_sku(&self.store, &self.seed, sku).await?.0.into())
    }

    async fn ask<T>(&self, op: impl FnOnce(oneshot::Sender<Result<T, StockError>>) -> Op) -> Result<T, StockError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StockError::Unavailable("the stock committer has stopped".into());
        self.ops.send(op(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl StockStore for KvStock {
    async fn reserve(&self, order: OrderId, lines: &BTreeMap<String, i64>) -> Result<Reservation, StockError> {
        for sku in lines.keys() {
            check_key(sku).map_err(|e| StockError::Invalid(e.to_string()))?;
        }
        let lines = lines.clone();
        self.ask(|reply| Op::Reserve { order, lines, reply }).await
    }

    async fn release(&self, order: OrderId) -> Result<bool, StockError> {
        for _ in 0..RELEASE_TRIES {
            let Some((rec, revision)) = self.record(order).await? else {
                // Nothing was reserved. Close the order all the same, so a
                // late run of its reservation (a redelivery) takes nothing.
                let closed = OrderRecord {
                    state: RecState::Closed,
                    lines: BTreeMap::new(),
                    short: None,
                };
                match self.store.create(order_key(order), encode(&closed)).await {
                    Ok(_) => {
                        stats::written(1);
                        return Ok(false);
                    }
                    // A run of the reservation got there first: look again.
                    Err(e) if fault::is_conflict(&e) => {
                        stats::conflict();
                        continue;
                    }
                    Err(e) => return Err(stock_err(e)),
                }
            };
            if rec.state != RecState::Reserved {
                return Ok(false);
            }
            let lines = rec.lines;
            if self
                .ask(|reply| Op::Release {
                    order,
                    lines,
                    revision,
                    reply,
                })
                .await?
            {
                return Ok(true);
            }
        }
        Err(StockError::Busy(Duration::from_millis(200)))
    }

    async fn level(&self, sku: &str) -> Result<Level, StockError> {
        self.level_of(sku).await
    }
}
