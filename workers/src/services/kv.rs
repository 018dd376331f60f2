//! The services' state in NATS KV buckets, shared by every process of a
//! service on any host. There is no shared database: each service owns its
//! buckets.
//!
//! - `payments`: key = order id, value `{"amount_cents", "charged",
//!   "refunded"}`. A charge is a `create` (it fails if the key exists), so an
//!   order cannot be charged twice whatever the redeliveries or processes; a
//!   refund is a compare-and-swap.
//! - `inventory`: key = SKU, value `{"available", "reserved"}`, changed only by
//!   compare-and-swap on the revision. Each change also records, in the same
//!   swap, a marker `"<order>:<op>"` under `"pending"`; a redelivered step
//!   that finds its marker knows its change is already made. Markers are
//!   removed once the order's own record says the change is done, so at rest
//!   a value is exactly `{"available", "reserved"}`.
//! - `reservations`: key = order id, what the inventory did for the order:
//!   the lines, which SKUs are reserved, undone or released, and the outcome.
//!   A reservation of several lines is all or nothing: if a later line is
//!   short, the earlier ones are undone before the answer is given.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Store};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use waybill::transport::fault::{self, Fault};
use waybill::transport::nats::Nats;
use waybill::OrderId;

use super::inventory::{initial_stock, Level, Reservation, Run, StockError, StockStore};
use super::payment::{Ledger, LedgerError, PaymentEntry};

/// The payment ledger's bucket.
pub const PAYMENTS: &str = "payments";
/// Stock levels per SKU.
pub const INVENTORY: &str = "inventory";
/// What the inventory did for each order.
pub const RESERVATIONS: &str = "reservations";

/// Why a bucket could not be created, opened or used.
#[derive(Debug, thiserror::Error)]
#[error("KV bucket `{bucket}`: {message}")]
pub struct KvError {
    pub bucket: &'static str,
    pub message: String,
}

fn kv_err(bucket: &'static str, e: impl std::fmt::Display) -> KvError {
    KvError {
        bucket,
        message: e.to_string(),
    }
}

/// Creates the services' buckets if they do not exist (`waybill setup`).
pub async fn setup_buckets(nats: &Nats, replicas: usize) -> Result<(), KvError> {
    for bucket in [PAYMENTS, INVENTORY, RESERVATIONS] {
        let js = nats.jetstream();
        if js.get_key_value(bucket).await.is_ok() {
            continue;
        }
        js.create_key_value(kv::Config {
            bucket: bucket.into(),
            history: 1,
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| kv_err(bucket, e))?;
    }
    Ok(())
}

/// Opens a bucket that `waybill setup` created.
pub async fn open(nats: &Nats, bucket: &'static str) -> Result<Store, KvError> {
    nats.jetstream()
        .get_key_value(bucket)
        .await
        .map_err(|e| kv_err(bucket, format!("is not there ({e}); create it with `waybill setup`")))
}

/// Seeds stock levels; SKUs that already have a level keep it (setup is
/// idempotent and never resets live stock). Returns how many were created.
pub async fn seed_stock(nats: &Nats, stock: &BTreeMap<String, i64>) -> Result<usize, KvError> {
    let store = open(nats, INVENTORY).await?;
    let mut created = 0;
    for (sku, &available) in stock {
        check_key(sku).map_err(|e| kv_err(INVENTORY, e))?;
        let value = SkuValue {
            available,
            reserved: 0,
            pending: BTreeMap::new(),
        };
        match store.create(sku, encode(&value)).await {
            Ok(_) => created += 1,
            Err(e) if fault::is_conflict(&e) => {}
            Err(e) => return Err(kv_err(INVENTORY, e)),
        }
    }
    Ok(created)
}

fn encode<T: Serialize>(v: &T) -> Bytes {
    // Plain structs of numbers, strings and maps: encoding cannot fail.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

fn decode<T: DeserializeOwned>(bucket: &'static str, key: &str, b: &[u8]) -> Result<T, String> {
    serde_json::from_slice(b).map_err(|e| format!("bucket {bucket}, key {key}: unreadable value: {e}"))
}

/// A key's latest value and revision, read from the bucket's stream leader:
/// every write acknowledged before this read is in it. `Store::entry` reads
/// with a direct get, which any replica answers, and a replica that lags
/// (a node catching up after a restart) answers with an older value. Where
/// a write follows the read, its compare-and-swap refuses a stale revision;
/// where a decision rests on the read alone (nothing left to settle,
/// nothing charged, not enough stock), the read must be this one. The
/// cluster soak found a stock marker left behind because a settle read a
/// lagging replica that did not have it yet.
async fn latest(store: &Store, key: &str) -> Result<Option<(Bytes, u64)>, (Fault, String)> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let subject = format!("{}{key}", store.prefix);
    match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => {
            let removed = m
                .headers
                .get("KV-Operation")
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
            Ok((!removed).then_some((m.payload, m.sequence)))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err((fault::classify(&e), e.to_string())),
    }
}

/// [`latest`], decoded as `T`, with the service's own errors: `unavailable`
/// for a leader that does not answer, `broken` for anything else.
async fn latest_as<T: DeserializeOwned, E>(
    store: &Store,
    bucket: &'static str,
    key: &str,
    unavailable: fn(String) -> E,
    broken: fn(String) -> E,
) -> Result<Option<(T, u64)>, E> {
    match latest(store, key).await {
        Ok(Some((value, revision))) => Ok(Some((decode(bucket, key, &value).map_err(broken)?, revision))),
        Ok(None) => Ok(None),
        Err((Fault::Unavailable, e)) => Err(unavailable(format!("bucket {bucket}, key {key}: {e}"))),
        Err((_, e)) => Err(broken(format!("bucket {bucket}, key {key}: {e}"))),
    }
}

/// Waits a little after losing a compare-and-swap race: under many
/// concurrent reservations of one SKU, retrying at once only loses again.
async fn after_conflict(tries: &mut u32) {
    *tries += 1;
    let cap_us = 200u64 << (*tries).min(6);
    tokio::time::sleep(Duration::from_micros(fastrand::u64(0..cap_us))).await;
}

/// A SKU must be a valid KV key: letters, digits, `-`, `_`, `=`, `/`, `.`.
fn check_key(sku: &str) -> Result<(), String> {
    let ok = !sku.is_empty()
        && !sku.starts_with('.')
        && !sku.ends_with('.')
        && sku
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'/' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "SKU `{sku}` cannot be stored: use letters, digits, `-`, `_`, `=`, `/` and `.`"
        ))
    }
}

// ---------------------------------------------------------------- payments

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
        match self.store.entry(key).await.map_err(ledger_err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let v = decode(PAYMENTS, key, &e.value).map_err(LedgerError::Store)?;
                Ok(Some((v, e.revision)))
            }
            _ => Ok(None),
        }
    }
}

impl KvLedger {
    /// [`Self::read`], from the bucket's stream leader ([`latest`]).
    async fn read_latest(&self, key: &str) -> Result<Option<(PaymentEntry, u64)>, LedgerError> {
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
            Ok(_) => Ok(entry),
            // Charged before (a redelivery): read it from the leader, which
            // has it, not from a replica that may not yet.
            Err(e) if fault::is_conflict(&e) => self
                .read_latest(&key)
                .await?
                .map(|(e, _)| e)
                .ok_or_else(|| LedgerError::Store(format!("ledger entry {key} vanished"))),
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
                // charge would be kept (see [`latest`]). A refund to make
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
                Ok(_) => return Ok(Some(entry)),
                Err(e) if fault::is_conflict(&e) => continue,
                Err(e) => return Err(ledger_err(e)),
            }
        }
    }

    async fn entry(&self, order: OrderId) -> Result<Option<PaymentEntry>, LedgerError> {
        Ok(self.read(&order.to_string()).await?.map(|(e, _)| e))
    }
}

/// A store error of the ledger, told apart by its kind and code
/// ([`fault::classify`]): an unavailable store (no responders, a leader
/// election, a time-out) is waited out without spending an attempt. A lost
/// race is handled where it can happen; anywhere else it, like the rest,
/// is an error worth a retry.
fn ledger_err<E: std::error::Error + 'static>(e: E) -> LedgerError {
    match fault::classify(&e) {
        Fault::Unavailable => LedgerError::Unavailable(e.to_string()),
        Fault::Conflict | Fault::Other => LedgerError::Store(e.to_string()),
    }
}

/// A store error of the stock, as [`ledger_err`] tells them apart.
fn stock_err<E: std::error::Error + 'static>(e: E) -> StockError {
    match fault::classify(&e) {
        Fault::Unavailable => StockError::Unavailable(e.to_string()),
        Fault::Conflict | Fault::Other => StockError::Store(e.to_string()),
    }
}

// --------------------------------------------------------------- inventory

/// A SKU's value in the `inventory` bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SkuValue {
    available: i64,
    reserved: i64,
    /// Changes made for orders whose own record does not say so yet.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pending: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ResState {
    Reserving,
    RollingBack,
    Reserved,
    Insufficient,
    Releasing,
    Released,
}

/// An order's record in the `reservations` bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ResRecord {
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
    lease: Option<Lease>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    run: String,
    until_ms: u64,
}

/// The longest one run of a reservation or a release acts. A run takes
/// milliseconds; one that cannot finish in this time faces a store that is
/// away or overloaded: it gives up as an unavailable store (the step waits
/// and tries again, spending no attempt) and lets its lease go. The lease
/// is this long plus [`LEASE_MARGIN`], so a run whose worker died holds the
/// order back 6.5 s, not the step's whole timeout (10 s) plus 5 s: the
/// fault suite measured 15-20 s of recovery after a worker's SIGKILL, set
/// by that lease. 2.5 s was tried: under the fault suite's load (2,000
/// orders, 512 in flight, debug build on 2 cores) 84 reservations of the
/// run without faults took longer and waited, and its order p99 rose from
/// 2.9 s to 5.3 s, for no gain in recovery (p99 11.5 s against 11.1 s).
const RUN_BUDGET: Duration = Duration::from_millis(5000);

/// Added to a run's budget in its lease: covers a write still in flight
/// when the run gives up, and clock differences between hosts (the lease
/// is wall-clock time; hosts must agree within this margin).
const LEASE_MARGIN: Duration = Duration::from_millis(1500);

/// How long one run may act: [`RUN_BUDGET`], within its step's time.
fn run_budget(run: Run) -> Duration {
    super::store_budget(run.window).min(RUN_BUDGET)
}

/// How long giving up a lease may take, each of its two calls: the run
/// keeps [`super::STORE_MARGIN`] of its step's time for it.
const LET_GO_WITHIN: Duration = Duration::from_millis(900);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A fresh lease for a run.
fn lease(id: &str, run: Run) -> Lease {
    let ms = u64::try_from((run_budget(run) + LEASE_MARGIN).as_millis()).unwrap_or(u64::MAX);
    Lease {
        run: id.to_owned(),
        until_ms: now_ms().saturating_add(ms),
    }
}

/// Stock in the `inventory` and `reservations` buckets.
#[derive(Debug, Clone)]
pub struct KvStock {
    stock: Store,
    orders: Store,
    seed: std::collections::HashMap<String, i64>,
}


/// What one change of a SKU came to.
enum Change {
    Made,
    Short { available: i64 },
}

impl KvStock {
    /// Opens the buckets; `seed` gives the initial units of SKUs that have no
    /// level yet (as `waybill setup --stock` would have), with the reference
    /// rules for the rest (`OOS-` none, others 1,000,000).
    pub async fn open(nats: &Nats, seed: std::collections::HashMap<String, i64>) -> Result<Self, KvError> {
        Ok(Self {
            stock: open(nats, INVENTORY).await?,
            orders: open(nats, RESERVATIONS).await?,
            seed,
        })
    }

    /// A SKU's value and revision, created at its initial level if absent.
    async fn sku(&self, sku: &str) -> Result<(SkuValue, u64), StockError> {
        loop {
            match self.stock.entry(sku).await.map_err(stock_err)? {
                Some(e) if e.operation == kv::Operation::Put => {
                    let v = decode(INVENTORY, sku, &e.value).map_err(StockError::Store)?;
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
    /// ([`latest`]); `None` if it has no level yet.
    async fn sku_latest(&self, sku: &str) -> Result<Option<(SkuValue, u64)>, StockError> {
        latest_as(&self.stock, INVENTORY, sku, StockError::Unavailable, StockError::Store).await
    }

    /// Moves `qty` units of `sku` from available to reserved (negative: back),
    /// once per `marker`; refuses to make available negative when `check`.
    async fn change(&self, sku: &str, marker: &str, qty: i64, check: bool) -> Result<Change, StockError> {
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
    async fn settle(&self, sku: &str, marker: &str) -> Result<(), StockError> {
        let mut tries = 0;
        loop {
            let (mut v, mut rev) = self.sku(sku).await?;
            if !v.pending.contains_key(marker) {
                // "No marker, nothing to do" is decided on the read alone:
                // not on a lagging replica's (see [`latest`]). The common
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

    async fn record(&self, order: &str) -> Result<Option<(ResRecord, u64)>, StockError> {
        match self.orders.entry(order).await.map_err(stock_err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let r = decode(RESERVATIONS, order, &e.value).map_err(StockError::Store)?;
                Ok(Some((r, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Saves the order's record. Only the lease holder writes it, so a lost
    /// race here means another run took over: this one stops.
    async fn save(&self, order: &str, r: &ResRecord, rev: u64) -> Result<u64, StockError> {
        match self.orders.update(order, encode(r), rev).await {
            Ok(rev) => Ok(rev),
            Err(e) if fault::is_conflict(&e) => {
                Err(StockError::Busy(Duration::from_millis(500)))
            }
            Err(e) => Err(stock_err(e)),
        }
    }

    /// Takes the order's lease for this run, or defers while another run
    /// holds it.
    async fn take_lease(
        &self,
        order: &str,
        mut rec: ResRecord,
        rev: u64,
        id: &str,
        run: Run,
    ) -> Result<(ResRecord, u64), StockError> {
        if let Some(l) = &rec.lease {
            let now = now_ms();
            if l.run != id && l.until_ms > now {
                return Err(StockError::Busy(Duration::from_millis(l.until_ms - now)));
            }
        }
        rec.lease = Some(lease(id, run));
        let rev = self.save(order, &rec, rev).await?;
        Ok((rec, rev))
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
}

/// Runs one run of a step within its budget ([`run_budget`]): a store that
/// does not answer by then is unavailable, and the run still has time to
/// give up its lease.
async fn within_run<T>(run: Run, op: impl std::future::Future<Output = Result<T, StockError>>) -> Result<T, StockError> {
    let budget = run_budget(run);
    match tokio::time::timeout(budget, op).await {
        Ok(r) => r,
        Err(_) => Err(StockError::Unavailable(format!(
            "the stock store did not answer within {} ms",
            budget.as_millis()
        ))),
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
            check_key(sku).map_err(StockError::Invalid)?;
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
                Err(e) if fault::is_conflict(&e) => {
                    Err(StockError::Busy(Duration::from_millis(200)))
                }
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

    /// Whether `marker`'s change is on `sku`. If it is not, writes the SKU
    /// again unchanged: a change still in flight from a run that gave up
    /// (a publish that timed out may yet be stored) then fails its
    /// compare-and-swap instead of landing after this look.
    async fn seal(&self, sku: &str, marker: &str) -> Result<bool, StockError> {
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

    /// Gives up the order's lease after a run failed with an error (best
    /// effort): the step's next attempt then goes ahead at once instead of
    /// waiting for the lease to lapse. A run that dies or hangs cannot, and
    /// its lease lapses after the step's timeout plus the margin.
    async fn let_go(&self, key: &str, id: &str) {
        // Bounded: with the store away, the lease lapses by itself.
        let Ok(Ok(Some((mut rec, rev)))) = tokio::time::timeout(LET_GO_WITHIN, self.record(key)).await else {
            return;
        };
        if rec.lease.as_ref().is_some_and(|l| l.run == id) {
            rec.lease = None;
            match tokio::time::timeout(LET_GO_WITHIN, self.save(key, &rec, rev)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(order = key, error = %e, "could not give up the lease"),
                Err(_) => tracing::debug!(order = key, "could not give up the lease in time"),
            }
        }
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
