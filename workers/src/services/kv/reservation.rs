//! The inventory protocol: what the inventory did for each order, in the
//! `reservations` bucket. A reservation of several lines is all or
//! nothing (a short line undoes the earlier ones before the answer); a
//! release gives back what was reserved, once; a reservation that never
//! finished is abandoned by its release, so a late run changes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use waybill::transport::fault;
use waybill::OrderId;

use super::super::inventory::{Level, Reservation, Run, StockError, StockStore};
use super::lease::{lease, within_run, Lease};
use super::stock::Change;
use super::store::{check_key, decode, encode, stock_err};
use super::{KvStock, RESERVATIONS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ResState {
    Reserving,
    RollingBack,
    Reserved,
    Insufficient,
    Releasing,
    Released,
}

/// An order's record in the `reservations` bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ResRecord {
    lines: BTreeMap<String, i64>,
    state: ResState,
    /// SKUs whose reservation is made.
    #[serde(default)]
    applied: Vec<String>,
    /// SKUs whose reservation is undone (a later line was short) or released.
    #[serde(default)]
    returned: Vec<String>,
    /// The short line, once found.
    #[serde(default)]
    short: Option<(String, i64, i64)>,
    /// The run that may act for this order, and until when (ms since the
    /// epoch). Two runs of one step can overlap (a redelivery beside a slow
    /// original); only the holder acts, the other is deferred.
    #[serde(default)]
    pub(super) lease: Option<Lease>,
}

impl KvStock {
    pub(super) async fn record(&self, order: &str) -> Result<Option<(ResRecord, u64)>, StockError> {
        match self.orders.entry(order).await.map_err(stock_err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let r = decode(RESERVATIONS, order, &e.value).map_err(|e| StockError::Store(e.to_string()))?;
                Ok(Some((r, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Saves the order's record. Only the lease holder writes it, so a lost
    /// race here means another run took over: this one stops.
    pub(super) async fn save(&self, order: &str, r: &ResRecord, rev: u64) -> Result<u64, StockError> {
        match self.orders.update(order, encode(r), rev).await {
            Ok(rev) => Ok(rev),
            Err(e) if fault::is_conflict(&e) => Err(StockError::Busy(Duration::from_millis(500))),
            Err(e) => Err(stock_err(e)),
        }
    }

    /// Runs `op` over the record's SKUs not yet `done`, saving each;
    /// returns the SKUs it settled.
    async fn apply_all(
        &self,
        order: &str,
        rec: &mut ResRecord,
        rev: &mut u64,
        op: &str,
        sign: i64,
    ) -> Result<Vec<String>, StockError> {
        let marker = format!("{order}:{op}");
        let mut settled = Vec::new();
        let todo: Vec<String> = rec
            .applied
            .iter()
            .filter(|s| !rec.returned.contains(s))
            .cloned()
            .collect();
        for sku in todo {
            let qty = rec.lines.get(&sku).copied().unwrap_or(0);
            self.change(&sku, &marker, sign * qty, false).await?;
            rec.returned.push(sku.clone());
            *rev = self.save(order, rec, *rev).await?;
            self.settle(&sku, &marker).await?;
            settled.push(sku);
        }
        Ok(settled)
    }

    /// Settles `op`'s markers on `skus`, but for those this run settled
    /// already (`done`): a run interrupted between saving and settling
    /// leaves markers for the next to settle. Skipping what this run did
    /// itself spares a read of the stream leader per SKU (a settle that
    /// finds no marker confirms it there).
    async fn settle_all(&self, order: &str, skus: &[String], op: &str, done: &[String]) -> Result<(), StockError> {
        let marker = format!("{order}:{op}");
        for sku in skus.iter().filter(|s| !done.contains(s)) {
            self.settle(sku, &marker).await?;
        }
        Ok(())
    }
}

impl StockStore for KvStock {
    async fn reserve(
        &self,
        order: OrderId,
        lines: &BTreeMap<String, i64>,
        run: Run,
    ) -> Result<Reservation, StockError> {
        for sku in lines.keys() {
            check_key(sku).map_err(|e| StockError::Invalid(e.to_string()))?;
        }
        let key = order.to_string();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let result = within_run(run, self.reserve_as(&key, &id, lines, run)).await;
        if matches!(result, Err(StockError::Unavailable(_) | StockError::Store(_))) {
            self.let_go(&key, &id).await;
        }
        result
    }

    async fn release(&self, order: OrderId, run: Run) -> Result<bool, StockError> {
        let key = order.to_string();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let result = within_run(run, self.release_as(&key, &id, run)).await;
        if matches!(result, Err(StockError::Unavailable(_) | StockError::Store(_))) {
            self.let_go(&key, &id).await;
        }
        result
    }

    async fn level(&self, sku: &str) -> Result<Level, StockError> {
        Ok(self.level_of(sku).await?.0)
    }
}

impl KvStock {
    /// One run (`id`) of a reservation.
    async fn reserve_as(
        &self,
        key: &str,
        id: &str,
        lines: &BTreeMap<String, i64>,
        run: Run,
    ) -> Result<Reservation, StockError> {
        let (mut rec, mut rev) = match self.record(key).await? {
            Some((rec, rev)) if matches!(rec.state, ResState::Reserving | ResState::RollingBack) => {
                self.take_lease(key, rec, rev, id, run).await?
            }
            Some(r) => r,
            None => {
                let rec = ResRecord {
                    lines: lines.clone(),
                    state: ResState::Reserving,
                    applied: Vec::new(),
                    returned: Vec::new(),
                    short: None,
                    lease: Some(lease(id, run)),
                };
                match self.orders.create(key, encode(&rec)).await {
                    Ok(rev) => (rec, rev),
                    Err(e) if fault::is_conflict(&e) => {
                        return Err(StockError::Busy(Duration::from_millis(200)));
                    }
                    Err(e) => return Err(stock_err(e)),
                }
            }
        };
        let insufficient = |r: &ResRecord| match &r.short {
            Some((sku, wanted, available)) => Reservation::Insufficient {
                sku: sku.clone(),
                wanted: *wanted,
                available: *available,
            },
            None => Reservation::Reserved,
        };
        let marker = format!("{key}:reserve");
        // The SKUs whose markers this run settled itself.
        let mut settled: Vec<String> = Vec::new();
        if rec.state == ResState::Reserving {
            let todo: Vec<(String, i64)> = rec
                .lines
                .iter()
                .filter(|(s, _)| !rec.applied.contains(s))
                .map(|(s, q)| (s.clone(), *q))
                .collect();
            for (sku, qty) in todo {
                match self.change(&sku, &marker, qty, true).await? {
                    Change::Made => {
                        rec.applied.push(sku.clone());
                        rev = self.save(key, &rec, rev).await?;
                        self.settle(&sku, &marker).await?;
                        settled.push(sku);
                    }
                    Change::Short { available } => {
                        rec.short = Some((sku, qty, available));
                        rec.state = ResState::RollingBack;
                        rev = self.save(key, &rec, rev).await?;
                        break;
                    }
                }
            }
            if rec.state == ResState::Reserving {
                self.settle_all(key, &rec.applied, "reserve", &settled).await?;
                rec.state = ResState::Reserved;
                rec.lease = None;
                self.save(key, &rec, rev).await?;
                return Ok(Reservation::Reserved);
            }
        }
        match rec.state {
            ResState::RollingBack => {
                self.settle_all(key, &rec.applied, "reserve", &settled).await?;
                let undone = self.apply_all(key, &mut rec, &mut rev, "undo", -1).await?;
                self.settle_all(key, &rec.returned, "undo", &undone).await?;
                rec.state = ResState::Insufficient;
                rec.lease = None;
                self.save(key, &rec, rev).await?;
                Ok(insufficient(&rec))
            }
            ResState::Insufficient => Ok(insufficient(&rec)),
            // Reserved once; a later release does not change that answer.
            _ => Ok(Reservation::Reserved),
        }
    }

    /// One run (`id`) of a release.
    async fn release_as(&self, key: &str, id: &str, run: Run) -> Result<bool, StockError> {
        let Some((rec, rev)) = self.record(key).await? else {
            // Nothing was reserved. Close the order's record all the same,
            // so a late run of its reservation (a redelivery) takes nothing.
            let closed = ResRecord {
                lines: BTreeMap::new(),
                state: ResState::Released,
                applied: Vec::new(),
                returned: Vec::new(),
                short: None,
                lease: None,
            };
            return match self.orders.create(key, encode(&closed)).await {
                Ok(_) => Ok(false),
                // A run of the reservation created it meanwhile: look again.
                Err(e) if fault::is_conflict(&e) => Err(StockError::Busy(Duration::from_millis(200))),
                Err(e) => Err(stock_err(e)),
            };
        };
        if matches!(rec.state, ResState::Reserving | ResState::RollingBack) {
            return self.abandon(key, id, rec, rev, run).await;
        }
        if !matches!(rec.state, ResState::Reserved | ResState::Releasing) {
            return Ok(false);
        }
        let (mut rec, mut rev) = self.take_lease(key, rec, rev, id, run).await?;
        if rec.state == ResState::Reserved {
            rec.state = ResState::Releasing;
            rev = self.save(key, &rec, rev).await?;
        }
        let released = self.apply_all(key, &mut rec, &mut rev, "release", -1).await?;
        self.settle_all(key, &rec.returned, "release", &released).await?;
        rec.state = ResState::Released;
        rec.lease = None;
        self.save(key, &rec, rev).await?;
        Ok(true)
    }

    /// Releases a reservation that never finished: its step ran out of
    /// attempts part-way (a store that kept failing, a run that died), and
    /// the order is being compensated. Whatever it changed is given back,
    /// and the record is closed, so a late run of the step changes nothing.
    async fn abandon(&self, key: &str, id: &str, rec: ResRecord, rev: u64, run: Run) -> Result<bool, StockError> {
        let (mut rec, mut rev) = self.take_lease(key, rec, rev, id, run).await?;
        // A change made whose record was not saved is known by its marker.
        let reserve = format!("{key}:reserve");
        let unrecorded: Vec<String> = rec
            .lines
            .keys()
            .filter(|sku| !rec.applied.contains(sku))
            .cloned()
            .collect();
        for sku in unrecorded {
            if self.seal(&sku, &reserve).await? {
                rec.applied.push(sku);
                rev = self.save(key, &rec, rev).await?;
            }
        }
        self.settle_all(key, &rec.applied, "reserve", &[]).await?;
        // A rollback under way keeps its marker, so a change it made
        // before is not made twice.
        let op = if rec.state == ResState::RollingBack {
            "undo"
        } else {
            "release"
        };
        let given_back = self.apply_all(key, &mut rec, &mut rev, op, -1).await?;
        self.settle_all(key, &rec.returned, op, &given_back).await?;
        let gave_back = !rec.returned.is_empty();
        rec.state = ResState::Released;
        rec.lease = None;
        self.save(key, &rec, rev).await?;
        Ok(gave_back)
    }
}
