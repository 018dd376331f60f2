//! Driving the orders of a scenario, timing its faults, and checking what
//! must hold afterwards.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use waybill::coordinator::api::OrdersQuery;
use waybill::transport::nats::{Nats, ServerList, DLQ_STREAM, HOPS_STREAM};
use waybill::transport::NatsConfig;
use waybill::{AttemptResult, Client, Document, OrderId, Status, StepKind, Timestamp};
use waybill_testkit::workspace_root;
use waybill_workers::replay::{self, FileReport, PreparedOrder, ReplayOptions};
use waybill_workers::services::initial_stock;
use waybill_workflows::Order;

use crate::stack::Stack;

/// The example flows every scenario replays: the `cooling_off` orders
/// first, so that their timers (2 s) are pending while the scenario's
/// faults strike, then 2,000 orders of every kind (completed, declined, out
/// of stock, unshippable, gateway retries).
pub fn mixed() -> Vec<PreparedOrder> {
    let registry = waybill_workflows::registry().unwrap();
    let load = |file: &str| {
        replay::load(&workspace_root().join("examples/orders").join(file), &registry)
            .unwrap()
            .orders
    };
    let mut orders = load("cooling-off.jsonl");
    orders.extend(load("mixed.jsonl"));
    orders
}

/// The trip's example flows, `n` times each: signals before and after the
/// step, a duplicate, a deadline passing, sold-out holds, a declined card,
/// a cancel while waiting for the signal. Not the cancel while asleep: the
/// order sleeps only a second, and a replay that sees it asleep late sees
/// it no more (its line expects what only a cancel in time gives).
pub fn trips(n: usize) -> Vec<PreparedOrder> {
    let registry = waybill_workflows::registry().unwrap();
    let path = workspace_root().join("examples/orders/trip.jsonl");
    let lines: Vec<PreparedOrder> = replay::load(&path, &registry)
        .unwrap()
        .orders
        .into_iter()
        .filter(|o| !o.actions.iter().any(|a| a.when == replay::When::Asleep))
        .collect();
    lines.iter().cycle().take(n * lines.len()).cloned().collect()
}

/// `n` orders of the mixed flows: a prefix, or the file again and again
/// (each start is a new order; the stock is plentiful for every SKU the
/// file uses, so each line ends as its `expect` says however often it
/// runs).
pub fn mixed_n(n: usize) -> Vec<PreparedOrder> {
    let all = mixed();
    all.iter().cycle().take(n).cloned().collect()
}

/// Orders built from one JSON line template, `n` times.
pub fn orders_like(template: &str, expect: Status, n: usize) -> Vec<PreparedOrder> {
    let registry = waybill_workflows::registry().unwrap();
    let dir = std::env::temp_dir().join(format!("waybill-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}.jsonl", OrderId::new()));
    let line = template.replacen('{', &format!("{{\"expect\":\"{expect}\","), 1);
    std::fs::write(&file, vec![line; n].join("\n")).unwrap();
    let orders = replay::load(&file, &registry).unwrap().orders;
    let _ = std::fs::remove_file(&file);
    orders
}

/// A driver: starts the orders through one node and follows them to their
/// end, counting each finished order for the faults to wait on.
#[derive(Debug)]
pub struct Driver {
    pub nats: Nats,
    /// JetStream on the transport's connection, for reading the streams
    /// straight.
    pub js: async_nats::jetstream::Context,
    pub client: Client<Nats>,
    done_tx: watch::Sender<u64>,
    finished_at: Mutex<HashMap<OrderId, Timestamp>>,
}

/// What the driver saw.
#[derive(Debug)]
pub struct Driven {
    pub report: FileReport,
    pub finals: HashMap<OrderId, Document>,
    /// When the driver saw each order finish.
    pub finished_at: HashMap<OrderId, Timestamp>,
}

impl Driven {
    /// Step attempts recorded in the orders' histories.
    pub fn records(&self) -> u64 {
        self.finals.values().map(|d| d.history.len() as u64).sum()
    }

    /// Each order's history, as text to search.
    pub fn histories(&self) -> Vec<String> {
        self.finals.values().map(|d| format!("{:?}", d.history)).collect()
    }
}

impl Driver {
    pub async fn connect(url: &str) -> Arc<Self> {
        let servers: ServerList = url.parse().unwrap();
        // The clients reconnect as Waybill's own processes do.
        let raw = waybill::transport::nats::connect_options("faults-driver")
            .connect(&servers)
            .await
            .unwrap();
        let nats = Nats::with_client(raw.clone(), NatsConfig::default()).unwrap();
        nats.setup().await.unwrap();
        let client = Client::connect(nats.clone()).await.unwrap();
        let (done_tx, _) = watch::channel(0);
        Arc::new(Self {
            nats,
            js: async_nats::jetstream::new(raw),
            client,
            done_tx,
            finished_at: Mutex::new(HashMap::new()),
        })
    }

    /// A handle to wait on the run's progress, for `n` orders in all.
    pub fn trigger(&self, total: usize) -> Trigger {
        Trigger {
            done: self.done_tx.subscribe(),
            total: total as u64,
            faults: Vec::new(),
        }
    }

    /// Starts driving `orders` on a task of its own.
    pub fn start(self: &Arc<Self>, orders: Vec<PreparedOrder>) -> Running {
        let driver = self.clone();
        Running(Some(tokio::spawn(async move { driver.drive(&orders).await })))
    }

    /// Starts driving `orders` on a task of its own, at most `in_flight`
    /// at a time (fewer spread the starts over the run).
    pub fn start_paced(self: &Arc<Self>, orders: Vec<PreparedOrder>, in_flight: usize) -> Running {
        let driver = self.clone();
        Running(Some(tokio::spawn(async move {
            driver.drive_with(&orders, in_flight).await
        })))
    }

    async fn drive(&self, orders: &[PreparedOrder]) -> Driven {
        self.drive_with(orders, 512).await
    }

    async fn drive_with(&self, orders: &[PreparedOrder], in_flight: usize) -> Driven {
        let opts = ReplayOptions {
            in_flight,
            order_timeout: Duration::from_secs(90),
            ..ReplayOptions::default()
        };
        let mut finals = HashMap::with_capacity(orders.len());
        let report = replay::run_orders(&self.client, "faults", orders, &opts, |id, doc| {
            if let Some(doc) = doc {
                finals.insert(id, doc.clone());
            }
            self.finished_at.lock().unwrap().insert(id, Timestamp::now());
            self.done_tx.send_modify(|n| *n += 1);
        })
        .await;
        let finished_at = std::mem::take(&mut *self.finished_at.lock().unwrap());
        Driven {
            report,
            finals,
            finished_at,
        }
    }
}

/// A run of orders under way. Dropped unfinished (its scenario failed), it
/// stops, rather than drive on into the next scenario.
#[derive(Debug)]
pub struct Running(Option<tokio::task::JoinHandle<Driven>>);

impl Running {
    /// Waits until every order has finished (or was given up on).
    pub async fn done(mut self) -> Driven {
        let task = self.0.take().unwrap();
        task.await.unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Waits for the run to reach a point, and notes when faults happen.
#[derive(Debug)]
pub struct Trigger {
    done: watch::Receiver<u64>,
    total: u64,
    pub faults: Vec<Timestamp>,
}

impl Trigger {
    /// Waits until `fraction` of the orders have finished.
    pub async fn at(&mut self, fraction: f64) {
        let target = (self.total as f64 * fraction).ceil() as u64;
        let reached = tokio::time::timeout(Duration::from_secs(180), self.done.wait_for(|n| *n >= target))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(
            reached,
            "the run did not reach {target} finished orders within 180 s (at {})",
            *self.done.borrow()
        );
    }

    /// Notes that a fault happens now.
    pub fn fault(&mut self) {
        self.faults.push(Timestamp::now());
    }
}

/// How long the stack took to get over each fault: the time until the last
/// order that was in flight when it struck had finished (zero when none
/// was). One figure per fault, in the order of the faults.
pub fn time_to_recover(faults: &[Timestamp], driven: &Driven) -> Vec<Duration> {
    faults
        .iter()
        .map(|&fault| {
            driven
                .finals
                .values()
                .filter(|doc| doc.created_at < fault)
                .filter_map(|doc| driven.finished_at.get(&doc.id))
                .filter(|&&end| end > fault)
                .map(|end| end.since(fault))
                .max()
                .unwrap_or_default()
        })
        .collect()
}

/// Orders whose history shows a wait on unavailable infrastructure.
pub fn waited(driven: &Driven) -> usize {
    driven
        .finals
        .values()
        .filter(|d| d.history.iter().any(|r| r.result.is_unavailable()))
        .count()
}

/// What the checks found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Orders that did not reach the status their line expects, or that
    /// the coordinator sees otherwise.
    pub lost: usize,
    /// Effects done twice, or done where none was due: a refund of a
    /// completed order, a charge of a failed one, stock reserved beyond what
    /// completed orders took.
    pub duplicate_effects: u64,
    /// Effects missing: a completed order not charged, stock not reserved.
    pub missing_effects: u64,
    /// Every other problem, described.
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn problem(&mut self, p: String) {
        if self.problems.len() < 20 {
            self.problems.push(p);
        }
    }
}

/// Everything a scenario must show afterwards: each order at its expected
/// end; the coordinator's view agreeing order by order; the ledger and the
/// stock exactly as the finished orders require; exactly `dead_letters`
/// dead letters.
pub async fn verify(stack: &Stack, driver: &Driver, driven: &Driven, dead_letters: u64) -> Verdict {
    let mut v = Verdict::default();
    for (i, m) in driven.report.mismatches.iter().enumerate() {
        v.lost += 1;
        // The first few journals, to tell in CI why they ended otherwise.
        let mut journal = String::new();
        if let Some(id) = m.order_id.as_ref().and_then(|id| id.parse::<OrderId>().ok()).filter(|_| i < 3) {
            let doc = match driven.finals.get(&id) {
                Some(d) => Some(Arc::new(d.clone())),
                None => tokio::time::timeout(Duration::from_secs(2), driver.client.wait(id))
                    .await
                    .ok()
                    .and_then(Result::ok),
            };
            if let Some(d) = doc {
                journal = format!("\n{}", d.journal());
            }
        }
        v.problem(format!(
            "line {}: expected {}, got {:?}: {}{journal}",
            m.line, m.expected, m.actual, m.detail
        ));
    }
    coordinator_agrees(stack, driver, driven, &mut v).await;
    effects_match(driver, driven, &mut v).await;
    trips_match(driven, &mut v);
    let dlq = driver.nats.dead_letter_count().await.unwrap();
    if dlq != dead_letters {
        let reasons = dead_letter_reasons(&driver.js).await;
        v.problem(format!("{dlq} dead letters, expected {dead_letters}: {reasons:?}"));
    }
    v
}

fn is_trip(doc: &Document) -> bool {
    doc.route.workflow.as_str() == waybill_workflows::trip::TRIP
}

/// What the trips' histories must show, whatever was killed meanwhile
/// (their services keep their state in their workers' memory, which a
/// SIGKILL takes with it, so the histories are what is checked): a booked
/// trip received its approval once and was booked once, on it, and undid
/// nothing; every other trip undid each step it did, once; no step that
/// waits ran before its wait (the reminder a second after the charge), nor
/// more than once, and a booked trip's reminder ran (its timer fired).
fn trips_match(driven: &Driven, v: &mut Verdict) {
    fn ran<'d>(doc: &'d Document, step: &str, kind: StepKind) -> Vec<&'d waybill::StepRecord> {
        doc.history
            .iter()
            .filter(|r| r.step.as_str() == step && r.kind == kind && matches!(r.result, AttemptResult::Outcome(_)))
            .collect()
    }
    for doc in driven.finals.values().filter(|d| is_trip(d)) {
        let signals = doc
            .history
            .iter()
            .filter(|r| matches!(r.result, AttemptResult::Signal { .. }))
            .count();
        let booked = ran(doc, "book", StepKind::Forward).len();
        let completed = doc.status == Status::Completed;
        if completed && (signals != 1 || booked != 1 || doc.signal("approved").is_none()) {
            v.duplicate_effects += u64::from(booked > 1);
            v.problem(format!(
                "trip {} completed with {signals} signal records and {booked} bookings:\n{}",
                doc.id,
                doc.journal()
            ));
        }
        for step in [
            "hold_flight",
            "hold_hotel",
            "hold_car",
            "hold_airport_car",
            "charge",
        ] {
            // Done: an outcome that moved the trip on (not `sold_out` or
            // `declined`, which did nothing).
            let did = ran(doc, step, StepKind::Forward)
                .iter()
                .any(|r| matches!(&r.result, AttemptResult::Outcome(o) if o == "ok"));
            let undone = ran(doc, step, StepKind::Compensation).len();
            let want = usize::from(did && !completed);
            if undone != want {
                v.duplicate_effects += u64::from(undone > want);
                v.missing_effects += u64::from(undone < want);
                v.problem(format!(
                    "trip {} ended {}: {step} undone {undone} times, expected {want}",
                    doc.id, doc.status
                ));
            }
        }
        let reminded = ran(doc, "remind", StepKind::Forward);
        let charged = ran(doc, "charge", StepKind::Forward);
        // The reminder's timer fires once: a booked trip was reminded once.
        if reminded.len() > 1 || (completed && reminded.is_empty()) {
            v.duplicate_effects += u64::from(reminded.len() > 1);
            v.missing_effects += u64::from(reminded.is_empty());
            v.problem(format!("trip {} ended {} and was reminded {} times", doc.id, doc.status, reminded.len()));
        }
        if let (Some(r), Some(c)) = (reminded.first(), charged.first()) {
            if r.started_at < c.ended_at.plus(waybill_workflows::trip::REMINDER_AFTER) {
                v.problem(format!("trip {} was reminded before its wait ended", doc.id));
            }
        }
    }
}

/// The reason of every dead letter, in order.
pub async fn dead_letter_reasons(js: &async_nats::jetstream::Context) -> Vec<String> {
    let stream = js.get_stream(DLQ_STREAM).await.unwrap();
    let state = stream.get_info().await.unwrap().state;
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let reason = m
                .headers
                .get(waybill::headers::DLQ_REASON)
                .map(|r| r.as_str().to_owned())
                .unwrap_or_else(|| "(no reason header)".into());
            out.push(reason);
        }
    }
    out
}

/// Waits until the coordinator has read every hop stored, then asks it for
/// each order: it must tell the status and hop of the final document.
async fn coordinator_agrees(stack: &Stack, driver: &Driver, driven: &Driven, v: &mut Verdict) {
    let client = async_nats::connect(stack.url(stack.coordinator_node)).await.unwrap();
    let client = waybill::transport::Nats::with_client(client, waybill::transport::NatsConfig::default()).unwrap();
    let mut hops = driver.js.get_stream(HOPS_STREAM).await.unwrap();
    let last = hops.info().await.unwrap().state.last_sequence;
    // `after`: the coordinator answers once its view has read that hop,
    // waiting up to 5 s for it, or says to ask again.
    let query = OrdersQuery {
        after: Some(last),
        ..OrdersQuery::default()
    };
    let mut answer = Err(String::new());
    for _ in 0..12 {
        answer = waybill_workers::ops::orders(&client, &query, Duration::from_secs(10))
            .await
            .map_err(|e| format!("{e:#}"));
        if answer.is_ok() {
            break;
        }
    }
    if let Err(e) = answer {
        v.problem(format!(
            "the coordinator did not read up to hop {last} within a minute: {e}"
        ));
        return;
    }
    let answers: Vec<_> = futures::stream::iter(driven.finals.values())
        .map(|doc| {
            let client = client.clone();
            async move {
                let r = waybill_workers::ops::status(&client, &doc.id.to_string(), Duration::from_secs(5)).await;
                (doc, r)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for (doc, answer) in answers {
        match answer {
            Ok(s) if s.status == doc.status && s.hop == doc.hop => {}
            Ok(s) => {
                v.lost += 1;
                v.problem(format!(
                    "order {}: the coordinator says {} at hop {}, the order ended {} at hop {}",
                    doc.id, s.status, s.hop, doc.status, doc.hop
                ));
            }
            Err(e) => {
                v.lost += 1;
                v.problem(format!("order {}: the coordinator cannot tell: {e:#}", doc.id));
            }
        }
    }
}

/// Every live key of a bucket and its value, read from the leader of the
/// bucket's stream: the keys from the stream's info, each one's last value
/// by a message get (`$JS.API.STREAM.MSG.GET`), both of which the leader
/// answers. Not the bucket's own reads, which are direct gets that any
/// replica answers: a node just restarted answers them with what it has so
/// far, and showed orders uncharged and markers unsettled that were not (a
/// false failure of the checks; the services decide on what the leader
/// says). The leader holds every write a service was told was stored.
async fn bucket_values(js: &async_nats::jetstream::Context, bucket: &str) -> HashMap<String, serde_json::Value> {
    let stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
    let prefix = format!("$KV.{bucket}.");
    let mut subjects = stream.info_with_subjects(format!("{prefix}>")).await.unwrap();
    let mut out = HashMap::new();
    while let Some(subject) = subjects.next().await {
        let (subject, _) = subject.unwrap();
        let m = stream.get_last_raw_message_by_subject(&subject).await.unwrap();
        // A deleted or purged key is a marker, not a value.
        let op = m.headers.get("KV-Operation").map(|v| v.as_str().to_owned());
        if matches!(op.as_deref(), Some("DEL" | "PURGE")) {
            continue;
        }
        let key = subject.strip_prefix(&prefix).unwrap_or(&subject).to_owned();
        out.insert(key, serde_json::from_slice(&m.payload).unwrap());
    }
    out
}

/// The services' state, read straight from their buckets, against what the
/// finished orders require: a completed order charged once and not
/// refunded; a compensated one charged and refunded if its charge went
/// through, else charged and refunded or neither; a failed one never
/// charged; for every SKU, initial = available + reserved, and reserved =
/// what completed orders took.
async fn effects_match(driver: &Driver, driven: &Driven, v: &mut Verdict) {
    let ledger = bucket_values(&driver.js, "payments").await;
    let mut taken: BTreeMap<String, i64> = BTreeMap::new();
    // The trips keep their state in their workers' memory: see
    // `trips_match`.
    for doc in driven.finals.values().filter(|d| !is_trip(d)) {
        let entry = ledger.get(&doc.id.to_string());
        let charged = entry.is_some_and(|e| e["charged"] == true);
        let refunded = entry.is_some_and(|e| e["refunded"] == true);
        // Whether the charge step went through, by the order's history.
        let paid = doc.history.iter().any(|r| {
            r.step.as_str() == "charge"
                && r.kind == StepKind::Forward
                && matches!(&r.result, AttemptResult::Outcome(o) if o == "ok")
        });
        let (want_charged, want_refunded) = match doc.status {
            Status::Completed => (true, false),
            Status::Compensated if paid => (true, true),
            // A charge that ran out of attempts may have gone through all
            // the same; then its refund gave it back. Either way, even.
            Status::Compensated => (charged, charged),
            _ => (false, false),
        };
        v.missing_effects += u64::from(want_charged && !charged) + u64::from(want_refunded && !refunded);
        v.duplicate_effects += u64::from(!want_charged && charged) + u64::from(!want_refunded && refunded);
        if (charged, refunded) != (want_charged, want_refunded) {
            v.problem(format!(
                "order {} ended {} but its ledger entry is {entry:?}",
                doc.id, doc.status
            ));
        }
        if doc.status == Status::Completed {
            for item in doc.payload.decode::<Order>().unwrap().items {
                *taken.entry(item.sku).or_default() += item.qty;
            }
        }
    }
    let known: std::collections::HashSet<String> = driven.finals.keys().map(ToString::to_string).collect();
    for k in ledger.keys().filter(|k| !known.contains(*k)) {
        v.duplicate_effects += 1;
        v.problem(format!("the ledger has an entry for {k}, an order never started here"));
    }

    let seed = replay::load_stock(&workspace_root().join("examples/stock.json")).unwrap();
    let inventory = bucket_values(&driver.js, "inventory").await;
    // Each order's record: held (`reserved`) exactly while its order
    // completed; no record of an order never started here.
    for (key, record) in inventory
        .iter()
        .filter_map(|(k, r)| Some((k.strip_prefix("order.")?, r)))
    {
        let held = record["state"] == "reserved";
        match key.parse::<OrderId>().ok().and_then(|id| driven.finals.get(&id)) {
            None => v.problem(format!(
                "the inventory has a record for {key}, an order never started here"
            )),
            Some(doc) if held != (doc.status == Status::Completed) => {
                v.problem(format!(
                    "order {key} ended {} but its inventory record is {record}",
                    doc.status
                ));
            }
            Some(_) => {}
        }
    }
    let stock: HashMap<String, serde_json::Value> = inventory
        .into_iter()
        .filter_map(|(k, level)| Some((k.strip_prefix("sku.")?.to_owned(), level)))
        .collect();
    for (sku, level) in &stock {
        let (Some(available), Some(reserved)) = (level["available"].as_i64(), level["reserved"].as_i64()) else {
            v.problem(format!("{sku} has no level: {level}"));
            continue;
        };
        let want = taken.get(sku).copied().unwrap_or(0);
        if available.checked_add(reserved) != Some(initial_stock(&seed, sku)) {
            v.problem(format!("{sku} is not conserved: {level}"));
        }
        if reserved > want {
            v.duplicate_effects += u64::try_from(reserved - want).unwrap_or(0);
        } else {
            v.missing_effects += u64::try_from(want - reserved).unwrap_or(0);
        }
        if reserved != want {
            v.problem(format!("{sku}: {reserved} reserved, completed orders took {want}"));
        }
    }
    for (sku, want) in &taken {
        if !stock.contains_key(sku) {
            v.missing_effects += u64::try_from(*want).unwrap_or(0);
            v.problem(format!("{sku} was taken by completed orders but has no level"));
        }
    }
}

/// The slowest order's history, each record with its start and end in
/// seconds since the order was created, and its worker: what held it up
/// (`WAYBILL_FAULTS_SLOWEST=1` prints it for each scenario).
pub fn slowest(driven: &Driven) -> String {
    let Some((doc, end)) = driven
        .finals
        .values()
        .filter_map(|d| driven.finished_at.get(&d.id).map(|end| (d, *end)))
        .max_by_key(|(d, end)| end.since(d.created_at))
    else {
        return "no order finished".into();
    };
    let t = |ts: Timestamp| ts.since(doc.created_at).as_secs_f64();
    let mut out = format!("  slowest order {} took {:.1} s:\n", doc.id, t(end));
    for r in &doc.history {
        out.push_str(&format!(
            "    {:>6.2}-{:>6.2} s {} {:?} attempt {} {:?} on {}\n",
            t(r.started_at),
            t(r.ended_at),
            r.step,
            r.kind,
            r.attempt,
            r.result,
            r.worker
        ));
    }
    out
}
