//! Group commit of the inventory: one task per process owns the stock
//! levels it has seen and turns every reservation and release waiting for
//! it into one atomic batch (`Nats::publish_atomic`): each order's record,
//! and each SKU the batch touches once, at its new level. Every message
//! expects its key's last revision (an order's record: none yet), so the
//! batch is stored whole only if nobody else wrote those keys since; then a
//! reservation has cost one stored message plus its share of the SKUs',
//! and no read.
//!
//! A refused batch is planned again. Either another process changed a
//! SKU (its levels are read again from the stream leader) or an order's
//! record exists already (a redelivery, or two runs of one step): that
//! order is answered from its record and left out. A batch that was not
//! confirmed (a time-out, a failover) may or may not have been stored: its
//! orders get an unavailable store, and their next run finds out from
//! their record.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_nats::jetstream::kv::Store;
use tokio::sync::{mpsc, oneshot};
use waybill::transport::nats::{AtomicError, AtomicWrite, Nats, MAX_BATCH};
use waybill::OrderId;

use super::super::inventory::{initial_stock, Reservation, StockError};
use super::record::{order_key, sku_key, OrderRecord, RecState, Short, SkuValue};
use super::store::{after_conflict, encode, latest_as};
use super::{stats, INVENTORY};

/// The most orders in one batch.
const MAX_OPS: usize = 256;

/// How many times a batch is planned again after being refused before its
/// orders are told the store is busy (they try again later).
const MAX_REPLANS: u32 = 16;

/// A change of the stock, waiting for the committer.
pub(super) enum Op {
    /// Reserve every line, or none if one is short.
    Reserve {
        order: OrderId,
        lines: BTreeMap<String, i64>,
        reply: oneshot::Sender<Result<Reservation, StockError>>,
    },
    /// Give back what the order's record (read at `revision`) reserved.
    /// Answers `false` when the record has changed since: read it again.
    Release {
        order: OrderId,
        lines: BTreeMap<String, i64>,
        revision: u64,
        reply: oneshot::Sender<Result<bool, StockError>>,
    },
}

impl Op {
    fn order(&self) -> OrderId {
        match self {
            Op::Reserve { order, .. } | Op::Release { order, .. } => *order,
        }
    }

    fn lines(&self) -> &BTreeMap<String, i64> {
        match self {
            Op::Reserve { lines, .. } | Op::Release { lines, .. } => lines,
        }
    }

    /// The messages the op may add to a batch: its record and its SKUs.
    fn size(&self) -> usize {
        1 + self.lines().len()
    }

    fn fail(self, e: StockError) {
        match self {
            Op::Reserve { reply, .. } => drop(reply.send(Err(e))),
            Op::Release { reply, .. } => drop(reply.send(Err(e))),
        }
    }

    fn abandoned(&self) -> bool {
        match self {
            Op::Reserve { reply, .. } => reply.is_closed(),
            Op::Release { reply, .. } => reply.is_closed(),
        }
    }
}

/// Starts the committer of `store`; it runs until every sender is gone.
pub(super) fn start(nats: Nats, store: Store, seed: HashMap<String, i64>) -> mpsc::Sender<Op> {
    let (tx, rx) = mpsc::channel(4 * MAX_OPS);
    let committer = Committer {
        nats,
        store,
        seed,
        levels: HashMap::new(),
    };
    tokio::spawn(committer.run(rx));
    tx
}

struct Committer {
    nats: Nats,
    store: Store,
    seed: HashMap<String, i64>,
    /// The last level and revision seen of each SKU (a revision of 0: the
    /// SKU has no level stored yet). Other processes may have written since:
    /// a batch built on an old revision is refused, never stored.
    levels: HashMap<String, (SkuValue, u64)>,
}

/// A SKU as one plan sees it.
struct Working {
    base: SkuValue,
    revision: u64,
    /// Read from the stream leader for this plan (not from the cache).
    fresh: bool,
    /// Units this plan moves from available to reserved (negative: back).
    moved: i64,
}

impl Working {
    fn available(&self) -> i64 {
        self.base.available - self.moved
    }
}

/// One batch: the writes, and what each op answers if it is stored.
struct Plan {
    writes: Vec<AtomicWrite>,
    /// The SKUs written, in `writes` order after the records.
    skus: Vec<(String, SkuValue)>,
    /// What each op answers once stored (a release: that it released).
    answers: Vec<Reservation>,
}

impl Committer {
    /// Where the bucket's keys are written (a bucket of another domain
    /// takes writes under its own prefix).
    fn write_prefix(&self) -> &str {
        self.store.put_prefix.as_deref().unwrap_or(&self.store.prefix)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut held: Vec<Op> = Vec::new();
        loop {
            if held.is_empty() {
                match rx.recv().await {
                    Some(op) => held.push(op),
                    None => return,
                }
            }
            let mut ops = std::mem::take(&mut held);
            let mut size: usize = ops.iter().map(Op::size).sum();
            while ops.len() < MAX_OPS && size < MAX_BATCH / 2 {
                match rx.try_recv() {
                    Ok(op) => {
                        size += op.size();
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            // One op per order in a batch: two messages for one record
            // would both be checked against the record before the batch,
            // and both stored. A second op of an order waits for the next.
            let mut orders = HashSet::new();
            let (now, later): (Vec<Op>, Vec<Op>) = ops.into_iter().partition(|op| orders.insert(op.order()));
            held = later;
            self.commit(now).await;
        }
    }

    /// Stores `ops` in one batch, planning again while it is refused.
    async fn commit(&mut self, mut ops: Vec<Op>) {
        let (mut replans, mut backoff) = (0, 0);
        loop {
            ops.retain(|op| !op.abandoned());
            if ops.is_empty() {
                return;
            }
            if ops.iter().any(|op| op.size() >= MAX_BATCH) {
                let (big, rest): (Vec<Op>, Vec<Op>) = ops.into_iter().partition(|op| op.size() >= MAX_BATCH);
                for op in big {
                    let n = op.lines().len();
                    op.fail(StockError::Invalid(format!(
                        "an order of {n} SKUs cannot be reserved at once (at most {})",
                        MAX_BATCH - 1
                    )));
                }
                ops = rest;
                continue;
            }
            let plan = match self.plan(&ops).await {
                Ok(plan) => plan,
                Err(e) => return fail_all(ops, &e),
            };
            stats::batch();
            match self.nats.publish_atomic(&plan.writes).await {
                Ok(ack) => {
                    stats::written(plan.writes.len());
                    let records = ops.len() as u64;
                    for (i, (sku, value)) in plan.skus.into_iter().enumerate() {
                        self.levels.insert(sku, (value, ack.first + records + i as u64));
                    }
                    for (op, answer) in ops.into_iter().zip(plan.answers) {
                        match op {
                            Op::Reserve { reply, .. } => drop(reply.send(Ok(answer))),
                            Op::Release { reply, .. } => drop(reply.send(Ok(true))),
                        }
                    }
                    return;
                }
                Err(AtomicError::Conflict(_)) => {
                    stats::conflict();
                    replans += 1;
                    if replans > MAX_REPLANS {
                        return fail_all(
                            ops,
                            &StockError::Store(format!("the stock changed under {MAX_REPLANS} batches in a row")),
                        );
                    }
                    match self.after_conflict(ops, &plan.skus).await {
                        Ok(rest) => ops = rest,
                        Err((rest, e)) => return fail_all(rest, &e),
                    }
                    if replans > 2 {
                        // Several processes after the same SKUs: spread out.
                        after_conflict(&mut backoff).await;
                    }
                }
                Err(e) => {
                    // Not confirmed: the batch may be stored. Its SKUs are
                    // read again next time; its orders try again and learn
                    // from their records what happened.
                    for (sku, _) in &plan.skus {
                        self.levels.remove(sku);
                    }
                    let e = match e {
                        AtomicError::Unavailable(m) => StockError::Unavailable(m),
                        other => StockError::Store(other.to_string()),
                    };
                    return fail_all(ops, &e);
                }
            }
        }
    }

    /// After a refused batch: reads its SKUs again from the stream leader.
    /// If none had changed, an order's record was what refused it: each
    /// order whose record is no longer as its op expects is answered (a
    /// reservation from its record; a release is told to read again) and
    /// left out of the next plan.
    async fn after_conflict(
        &mut self,
        ops: Vec<Op>,
        skus: &[(String, SkuValue)],
    ) -> Result<Vec<Op>, (Vec<Op>, StockError)> {
        let mut changed = false;
        for (sku, _) in skus {
            let before = self.levels.get(sku).map(|(_, rev)| *rev);
            match self.load(sku).await {
                Ok((_, rev)) => changed |= before != Some(rev),
                Err(e) => return Err((ops, e)),
            }
        }
        if changed {
            return Ok(ops);
        }
        let mut rest = Vec::with_capacity(ops.len());
        for op in ops {
            let key = order_key(op.order());
            let record = match latest_as::<OrderRecord, _>(
                &self.store,
                INVENTORY,
                &key,
                StockError::Unavailable,
                StockError::Store,
            )
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    rest.push(op);
                    return Err((rest, e));
                }
            };
            stats::read();
            match (op, record) {
                (Op::Reserve { reply, .. }, Some((rec, _))) => drop(reply.send(Ok(rec.answer()))),
                (Op::Release { reply, revision, .. }, Some((_, rev))) if rev != revision => {
                    drop(reply.send(Ok(false)));
                }
                (Op::Release { reply, .. }, None) => drop(reply.send(Ok(false))),
                (op, _) => rest.push(op),
            }
        }
        Ok(rest)
    }

    /// A SKU's level and revision, read from the stream leader into the
    /// cache.
    async fn load(&mut self, sku: &str) -> Result<(SkuValue, u64), StockError> {
        let (value, rev) = read_sku(&self.store, &self.seed, sku).await?;
        self.levels.insert(sku.to_owned(), (value, rev));
        Ok((value, rev))
    }

    /// Plans one batch for `ops`, in their order, on the levels known.
    ///
    /// Every decision of a plan rests on one level per SKU. When a SKU
    /// read again mid-plan turns out to have changed, the units the plan's
    /// earlier orders took were counted on a level that is gone (another
    /// process may have taken them): the plan starts over on the new level.
    /// A SKU is read at most once per call, so it starts over at most once
    /// per SKU.
    async fn plan(&mut self, ops: &[Op]) -> Result<Plan, StockError> {
        let mut fresh = HashSet::new();
        loop {
            if let Some(plan) = self.plan_once(ops, &mut fresh).await? {
                return Ok(plan);
            }
        }
    }

    /// One try of [`plan`](Self::plan): `None` when a SKU's level changed
    /// under it. `fresh` holds the SKUs read from the stream leader during
    /// this plan (their cached level is that read).
    async fn plan_once(&mut self, ops: &[Op], fresh: &mut HashSet<String>) -> Result<Option<Plan>, StockError> {
        let mut working: BTreeMap<String, Working> = BTreeMap::new();
        for sku in ops.iter().flat_map(|op| op.lines().keys()) {
            if working.contains_key(sku) {
                continue;
            }
            let cached = match self.levels.get(sku) {
                Some(&known) => known,
                None => {
                    fresh.insert(sku.clone());
                    self.load(sku).await?
                }
            };
            working.insert(
                sku.clone(),
                Working {
                    base: cached.0,
                    revision: cached.1,
                    fresh: fresh.contains(sku),
                    moved: 0,
                },
            );
        }
        let mut writes = Vec::with_capacity(ops.len() + working.len());
        let mut answers = Vec::with_capacity(ops.len());
        for op in ops {
            let (record, expect, answer) = match op {
                Op::Reserve { lines, .. } => {
                    let short = match self.short_line(lines, &mut working, fresh).await? {
                        Check::Fits => None,
                        Check::Short(s) => Some(s),
                        Check::Changed => return Ok(None),
                    };
                    let answer = match &short {
                        None => {
                            for (sku, qty) in lines {
                                if let Some(w) = working.get_mut(sku) {
                                    w.moved += qty;
                                }
                            }
                            Reservation::Reserved
                        }
                        Some(s) => Reservation::Insufficient {
                            sku: s.sku.clone(),
                            wanted: s.wanted,
                            available: s.available,
                        },
                    };
                    let record = match short {
                        None => OrderRecord {
                            state: RecState::Reserved,
                            lines: lines.clone(),
                            short: None,
                        },
                        Some(s) => OrderRecord {
                            state: RecState::Insufficient,
                            lines: lines.clone(),
                            short: Some(s),
                        },
                    };
                    (record, 0, answer)
                }
                Op::Release { lines, revision, .. } => {
                    for (sku, qty) in lines {
                        if let Some(w) = working.get_mut(sku) {
                            w.moved -= qty;
                        }
                    }
                    let record = OrderRecord {
                        state: RecState::Released,
                        lines: lines.clone(),
                        short: None,
                    };
                    (record, *revision, Reservation::Reserved)
                }
            };
            writes.push(AtomicWrite {
                subject: waybill::subject::kv_key(self.write_prefix(), &order_key(op.order())),
                payload: encode(&record),
                expect_last: Some(expect),
            });
            answers.push(answer);
        }
        let mut skus = Vec::new();
        for (sku, w) in working {
            if w.moved == 0 {
                continue;
            }
            let value = SkuValue {
                available: w.base.available - w.moved,
                reserved: w.base.reserved + w.moved,
            };
            writes.push(AtomicWrite {
                subject: waybill::subject::kv_key(self.write_prefix(), &sku_key(&sku)),
                payload: encode(&value),
                expect_last: Some(w.revision),
            });
            skus.push((sku, value));
        }
        Ok(Some(Plan { writes, skus, answers }))
    }

    /// Whether the stock covers `lines` after what this plan has taken
    /// already, or the first line it cannot. "Short" is decided on a level
    /// read from the stream leader for this plan, never on the cache alone:
    /// a release by another process may have given units back since.
    async fn short_line(
        &mut self,
        lines: &BTreeMap<String, i64>,
        working: &mut BTreeMap<String, Working>,
        fresh: &mut HashSet<String>,
    ) -> Result<Check, StockError> {
        for (sku, &wanted) in lines {
            let Some(w) = working.get_mut(sku) else { continue };
            if w.available() >= wanted {
                continue;
            }
            if !w.fresh {
                fresh.insert(sku.clone());
                let (base, revision) = self.load(sku).await?;
                if revision != w.revision && w.moved != 0 {
                    return Ok(Check::Changed);
                }
                w.base = base;
                w.revision = revision;
                w.fresh = true;
            }
            let available = w.available();
            if available < wanted {
                return Ok(Check::Short(Short {
                    sku: sku.clone(),
                    wanted,
                    available,
                }));
            }
        }
        Ok(Check::Fits)
    }
}

/// Whether a reservation fits in a plan.
enum Check {
    Fits,
    Short(Short),
    /// A SKU this plan has already moved units of has a new level: plan
    /// again on it.
    Changed,
}

/// A SKU's level and revision, read from the stream leader (revision 0 and
/// the initial level if it has none yet).
pub(super) async fn read_sku(
    store: &Store,
    seed: &HashMap<String, i64>,
    sku: &str,
) -> Result<(SkuValue, u64), StockError> {
    stats::read();
    let found = latest_as::<SkuValue, _>(
        store,
        INVENTORY,
        &sku_key(sku),
        StockError::Unavailable,
        StockError::Store,
    )
    .await?;
    Ok(found.unwrap_or_else(|| {
        let available = initial_stock(seed, sku);
        (SkuValue { available, reserved: 0 }, 0)
    }))
}

fn fail_all(ops: Vec<Op>, e: &StockError) {
    for op in ops {
        op.fail(e.clone());
    }
}
