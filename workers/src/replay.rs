//! Replaying example order flows on the embedded default: every order of a
//! JSON Lines file is started, followed to its end, and compared with the
//! `expect` field of its line.
//!
//! On the embedded default, [`EmbeddedRuntime`] also runs a coordinator
//! beside the worker and the client, as a NATS deployment runs one; at the
//! end, [`CoordinatorCheck`] compares the ends it counted from the hops
//! alone with the ends the replay saw (a disagreement fails the run).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
// Tokio's clock: the system's, unless a test pauses it; a paced run's
// timers follow it.
use tokio::time::Instant;
use waybill::coordinator::api::{OrdersQuery, StatusReply};
use waybill::coordinator::{self, CoordinatorClient, CoordinatorConfig, CoordinatorHandle};
use waybill::hash::FastMap;
use waybill::transport::{Embedded, EmbeddedConfig, HopLog, Rpc, Transport};
use waybill::{Client, Document, OrderId, Payload, Registry, Status, Worker, WorkerHandle, Workflow};

use crate::services::MemoryServices;

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}, line {line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: no order flows found (expected .jsonl files)", path.display())]
    Empty { path: PathBuf },
    #[error("stock file {}: {message}", path.display())]
    Stock { path: PathBuf, message: String },
    #[error("could not start the embedded runtime: {0}")]
    Start(String),
}

/// One order read from a file, validated and ready to start.
#[derive(Debug, Clone)]
pub struct PreparedOrder {
    pub line: usize,
    pub expect: Status,
    pub workflow: Workflow,
    pub payload: Payload,
    /// What the replay does to the order once started, in this order.
    pub actions: Vec<Action>,
}

/// Something a replay does to an order in flight, through the coordinator
/// (as `waybill signal` and `waybill cancel` do), once the order is where
/// `when` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub when: When,
    pub what: Act,
}

/// An action's moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// As soon as the order is started (before it reaches a waiting step).
    Start,
    /// Once the order waits for the signal the action sends.
    Waiting,
    /// Once the order sleeps before its step (a step's wait).
    Asleep,
}

/// What an action does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Act {
    /// Delivers a signal with its JSON; `duplicate` says whether the
    /// coordinator must answer that the order had it already.
    Signal {
        name: waybill::SignalName,
        data: String,
        duplicate: bool,
    },
    /// Cancels the order, with a reason.
    Cancel { reason: String },
}

/// A line's `signals` entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalLine {
    name: String,
    #[serde(default)]
    data: Option<serde_json::Value>,
    when: When,
    #[serde(default)]
    duplicate: bool,
}

/// A line's `cancel` field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelLine {
    when: When,
    #[serde(default)]
    reason: Option<String>,
}

/// The actions of one line: its `signals` (a list) and `cancel` fields,
/// taken out of the order's JSON.
fn actions_of(map: &mut serde_json::Map<String, serde_json::Value>) -> Result<Vec<Action>, String> {
    let mut actions = Vec::new();
    if let Some(v) = map.remove("signals") {
        let lines: Vec<SignalLine> = serde_json::from_value(v).map_err(|e| {
            format!(
                "`signals`: {e} (expected a list of {{\"name\", \"when\": \"start\"|\"waiting\", \"data\", \"duplicate\"}})"
            )
        })?;
        for l in lines {
            if l.when == When::Asleep {
                return Err(format!(
                    "`signals`: signal `{}` is sent at start or once waiting, not asleep",
                    l.name
                ));
            }
            let name = waybill::SignalName::new(&l.name).map_err(|e| format!("`signals`: {e}"))?;
            let data = l.data.unwrap_or_else(|| serde_json::json!({})).to_string();
            actions.push(Action {
                when: l.when,
                what: Act::Signal {
                    name,
                    data,
                    duplicate: l.duplicate,
                },
            });
        }
    }
    if let Some(v) = map.remove("cancel") {
        let c: CancelLine = serde_json::from_value(v).map_err(|e| {
            format!("`cancel`: {e} (expected {{\"when\": \"start\"|\"asleep\"|\"waiting\", \"reason\"}})")
        })?;
        actions.push(Action {
            when: c.when,
            what: Act::Cancel {
                reason: c
                    .reason
                    .unwrap_or_else(|| waybill::coordinator::api::DEFAULT_CANCEL_REASON.to_owned()),
            },
        });
    }
    Ok(actions)
}

/// The orders of one file.
#[derive(Debug, Clone)]
pub struct FlowFile {
    pub path: PathBuf,
    pub orders: Vec<PreparedOrder>,
}

/// The `.jsonl` files named, folders expanded (sorted by name).
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ReplayError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|source| ReplayError::Io {
            path: p.clone(),
            source,
        })?;
        if meta.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|source| ReplayError::Io {
                    path: p.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "jsonl"))
                .collect();
            if files.is_empty() {
                return Err(ReplayError::Empty { path: p.clone() });
            }
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Reads and validates one file of order flows. Each non-blank line is a JSON
/// object: the order, plus `expect` (the terminal status it must reach),
/// optionally `workflow` (default `order`), and what to do to the order in
/// flight: `signals` (a list of `{"name", "data", "when": "start" |
/// "waiting", "duplicate": bool}`) and `cancel` (`{"when": "start" |
/// "asleep" | "waiting", "reason"}`), done through the coordinator.
pub fn load(path: &Path, registry: &Registry) -> Result<FlowFile, ReplayError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut orders = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let err = |message: String| ReplayError::Line {
            path: path.to_owned(),
            line,
            message,
        };
        let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| err(format!("not JSON: {e}")))?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(err("expected a JSON object (an order with an `expect` field)".into()));
        };
        let expect = match map.remove("expect") {
            Some(serde_json::Value::String(s)) => s.parse::<Status>().map_err(|e| err(e.to_string()))?,
            Some(other) => return Err(err(format!("`expect` must be a string, got {other}"))),
            None => return Err(err("missing field `expect`".into())),
        };
        if !expect.is_terminal() {
            return Err(err(format!("`expect` must be a terminal status, got `{expect}`")));
        }
        let workflow = match map.remove("workflow") {
            Some(serde_json::Value::String(s)) => s,
            Some(other) => return Err(err(format!("`workflow` must be a string, got {other}"))),
            None => waybill_workflows::ORDER.to_owned(),
        };
        let actions = actions_of(&mut map).map_err(err)?;
        let json = serde_json::to_vec(&map).map_err(|e| err(e.to_string()))?;
        let (workflow, payload) = registry
            .prepare_json(&workflow, &json)
            .map_err(|e| err(e.to_string()))?;
        orders.push(PreparedOrder {
            line,
            expect,
            workflow,
            payload,
            actions,
        });
    }
    if orders.is_empty() {
        return Err(ReplayError::Empty { path: path.to_owned() });
    }
    Ok(FlowFile {
        path: path.to_owned(),
        orders,
    })
}

/// Reads a stock file: a JSON object of SKU → units.
pub fn load_stock(path: &Path) -> Result<HashMap<String, i64>, ReplayError> {
    let err = |message: String| ReplayError::Stock {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let stock: HashMap<String, i64> =
        serde_json::from_str(&text).map_err(|e| err(format!("expected {{\"SKU\": units, …}}: {e}")))?;
    if let Some((sku, n)) = stock.iter().find(|(_, &n)| n < 0) {
        return Err(err(format!("{sku} has negative stock {n}")));
    }
    Ok(stock)
}

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Orders started and not yet finished, at most.
    pub in_flight: usize,
    /// Steps the worker runs at once.
    pub concurrency: usize,
    /// How long the run may go without any order finishing before the
    /// orders still in flight are reported as not finished.
    pub order_timeout: Duration,
    /// Run a coordinator beside the embedded default (on by default; off
    /// measures the engine alone).
    pub coordinator: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            in_flight: 2048,
            concurrency: 512,
            order_timeout: Duration::from_secs(60),
            coordinator: true,
        }
    }
}

/// An order that did not end as its line expected.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub line: usize,
    pub order_id: Option<String>,
    pub expected: Status,
    /// The status reached, or `None` if the order did not finish.
    pub actual: Option<Status>,
    pub detail: String,
}

/// The result of replaying one file.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub file: String,
    pub orders: usize,
    pub completed: usize,
    pub failed: usize,
    pub compensated: usize,
    pub cancelled: usize,
    pub mismatches: Vec<Mismatch>,
    pub seconds: f64,
    /// All orders over the whole run, ramp-up and drain included.
    pub orders_per_sec: f64,
    /// Orders finished between the 10th and the 90th percentile of
    /// completions, over that time: the rate the engine sustains once
    /// started, without the ramp-up and the drain of the last orders.
    pub steady_orders_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl FileReport {
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Completions between the 10th and 90th percentile, per second of the time
/// between them (the whole-run rate when there are too few orders).
fn steady_rate(finished_at: &[Duration]) -> f64 {
    let n = finished_at.len();
    if n < 20 {
        let total = finished_at.last().map_or(0.0, Duration::as_secs_f64);
        return if total > 0.0 { n as f64 / total } else { 0.0 };
    }
    let (a, b) = (n / 10, n * 9 / 10);
    let span = finished_at[b].saturating_sub(finished_at[a]).as_secs_f64();
    if span > 0.0 {
        (b - a) as f64 / span
    } else {
        0.0
    }
}

/// Percentile `p` (0–100) of sorted microsecond samples, in milliseconds.
pub fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let idx = ((sorted_us.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[idx] as f64 / 1000.0
}

/// The embedded default: one transport, one worker serving the five
/// reference services, one client, and a coordinator that tracks every
/// order and answers status, orders and start requests on the embedded
/// transport as the coordinators of a NATS deployment do ([`Self::asks`]).
#[derive(Debug)]
pub struct EmbeddedRuntime {
    pub transport: Embedded,
    pub client: Client<Embedded>,
    pub services: MemoryServices,
    worker: WorkerHandle,
    coordinator: Option<CoordinatorHandle<Embedded>>,
}

/// How long a request to the replay's own coordinator may take: it runs in
/// this process, so only a stuck one takes long.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the replay's coordinator says of a run.
#[derive(Debug, Clone, Serialize)]
pub struct CoordinatorCheck {
    /// Where it disagrees with the orders' own ends (empty: it agrees).
    pub disagreements: Vec<String>,
    /// Its status of each order that ended other than expected (at most
    /// [`MAX_STATUSES`]), with the order's history.
    pub statuses: Vec<StatusReply>,
}

/// Statuses of mismatched orders reported, at most.
pub const MAX_STATUSES: usize = 5;

impl EmbeddedRuntime {
    pub async fn start(stock: HashMap<String, i64>, opts: &ReplayOptions) -> Result<Self, ReplayError> {
        // Without a coordinator nobody reads the log back: keep none.
        let transport = if opts.coordinator {
            Embedded::new()
        } else {
            Embedded::with_config(EmbeddedConfig {
                log_capacity: 0,
                ..EmbeddedConfig::default()
            })
        };
        let services = MemoryServices::new(stock);
        let registry = Arc::new(waybill_workflows::registry().map_err(|e| ReplayError::Start(e.to_string()))?);
        let worker = services
            .serve(
                Worker::builder(transport.clone())
                    .concurrency(opts.concurrency)
                    .registry(registry.clone()),
            )
            .start()
            .await
            .map_err(|e| ReplayError::Start(e.to_string()))?;
        let client = Client::connect(transport.clone())
            .await
            .map_err(|e| ReplayError::Start(e.to_string()))?;
        let coordinator = if opts.coordinator {
            let config = CoordinatorConfig::default();
            let handle = coordinator::start(transport.clone(), Some(registry), config)
                .await
                .map_err(|e| ReplayError::Start(e.to_string()))?;
            Some(handle)
        } else {
            None
        };
        Ok(Self {
            transport,
            client,
            services,
            worker,
            coordinator,
        })
    }

    /// A client of the replay's coordinator: the same requests (and the
    /// same answers) as `waybill status`, `orders` and `watch` over NATS.
    pub fn asks(&self) -> CoordinatorClient<Embedded> {
        CoordinatorClient::new(self.transport.clone(), ASK_TIMEOUT)
    }

    /// Compares what the coordinator tracked, from the hops alone, with
    /// how the orders of `reports` ended, and fetches its status of the
    /// orders that ended other than expected.
    pub async fn check(&self, reports: &[FileReport]) -> CoordinatorCheck {
        let asks = self.asks();
        let mut disagreements = Vec::new();
        if self.coordinator.is_none() {
            return CoordinatorCheck {
                disagreements,
                statuses: Vec::new(),
            };
        }
        let after = match self.transport.log_info().await {
            Ok(info) => Some(info.last_sequence),
            Err(e) => {
                disagreements.push(format!("the log could not be read: {e}"));
                None
            }
        };
        let query = OrdersQuery {
            after,
            limit: Some(0),
            ..OrdersQuery::default()
        };
        match asks.orders(&query).await {
            Ok(reply) => {
                let tracked = |s: Status| reply.summary.finished.get(&s).copied().unwrap_or(0);
                let ended = |f: fn(&FileReport) -> usize| reports.iter().map(f).sum::<usize>() as u64;
                for (status, ended) in [
                    (Status::Completed, ended(|r| r.completed)),
                    (Status::Failed, ended(|r| r.failed)),
                    (Status::Compensated, ended(|r| r.compensated)),
                    (Status::Cancelled, ended(|r| r.cancelled)),
                ] {
                    if tracked(status) != ended {
                        disagreements.push(format!(
                            "the coordinator counted {} orders {status}; the replay saw {ended}",
                            tracked(status)
                        ));
                    }
                }
            }
            Err(e) => disagreements.push(format!("the coordinator did not answer: {e}")),
        }
        let mut statuses = Vec::new();
        let mismatched = reports
            .iter()
            .flat_map(|r| &r.mismatches)
            .filter_map(|m| m.order_id.as_deref()?.parse::<OrderId>().ok());
        for id in mismatched.take(MAX_STATUSES) {
            match asks.status(&id).await {
                Ok(s) => statuses.push(s),
                Err(e) => disagreements.push(format!("no status of order {id}: {e}")),
            }
        }
        CoordinatorCheck {
            disagreements,
            statuses,
        }
    }

    /// Runs `orders` on the embedded default (see [`run_orders`]).
    pub async fn run(
        &self,
        label: &str,
        orders: &[PreparedOrder],
        opts: &ReplayOptions,
        on_done: impl FnMut(OrderId, Option<&Document>),
    ) -> FileReport {
        run_orders(&self.client, label, orders, opts, on_done).await
    }

    /// Stops the worker (letting steps in flight finish), the client and
    /// the coordinator.
    pub async fn shutdown(self) {
        self.worker.shutdown().await;
        self.client.close().await;
        if let Some(c) = self.coordinator {
            c.shutdown().await;
        }
    }
}

/// Starts `orders` through `client`, at most `opts.in_flight` at once, waits
/// for each to end and compares its status with what its line expects;
/// `on_done` is called as each one finishes, with its final document (`None`
/// if it could not be started or followed). Works over any transport: on
/// the embedded default the workers run in this process, on NATS wherever
/// they run.
pub async fn run_orders<T: Transport + Rpc>(
    client: &Client<T>,
    label: &str,
    orders: &[PreparedOrder],
    opts: &ReplayOptions,
    on_done: impl FnMut(OrderId, Option<&Document>),
) -> FileReport {
    run(client, label, orders, opts, None, on_done).await
}

/// [`run_orders`] at a fixed pace: order `i` is due `i / per_second`
/// seconds after the run began (deadlines from the start, so a late start
/// does not push the later ones back: the ones overdue start at once), still
/// at most `opts.in_flight` at once. An order's latency counts from when it
/// was due, so time spent waiting for a place in the window is in it. A
/// `per_second` that is not a positive number runs unpaced.
pub async fn run_orders_paced<T: Transport + Rpc>(
    client: &Client<T>,
    label: &str,
    orders: &[PreparedOrder],
    opts: &ReplayOptions,
    per_second: f64,
    on_done: impl FnMut(OrderId, Option<&Document>),
) -> FileReport {
    let rate = (per_second.is_finite() && per_second > 0.0).then_some(per_second);
    run(client, label, orders, opts, rate, on_done).await
}

async fn run<T: Transport + Rpc>(
    client: &Client<T>,
    label: &str,
    orders: &[PreparedOrder],
    opts: &ReplayOptions,
    rate: Option<f64>,
    mut on_done: impl FnMut(OrderId, Option<&Document>),
) -> FileReport {
    let began = Instant::now();
    // When order `i` is due: now, unpaced.
    let due = |i: usize| rate.map(|r| began + Duration::from_secs_f64(i as f64 / r));
    let mut latencies = Vec::with_capacity(orders.len());
    let mut by_status: BTreeMap<Status, usize> = BTreeMap::new();
    let mut mismatches = Vec::new();
    let mut finished_at = Vec::with_capacity(orders.len());
    let mut pending = FuturesUnordered::new();
    // Orders in flight, to name the ones that never finish. One stall
    // timer for the whole run, not one per order: the run ends with the
    // rest reported unfinished when no order finished for `order_timeout`.
    let mut in_flight: FastMap<OrderId, (&PreparedOrder, Instant)> = FastMap::default();
    let stall = tokio::time::sleep(opts.order_timeout);
    tokio::pin!(stall);
    let mut progressed = false;
    let mut next = 0;
    let window = opts.in_flight.max(1);
    loop {
        while next < orders.len() && pending.len() < window {
            let now = Instant::now();
            let started = match due(next) {
                Some(at) if at > now => break,
                Some(at) => at,
                None => now,
            };
            let o = &orders[next];
            next += 1;
            if in_flight.is_empty() {
                // Paced, the first order after a pause: the wait for an
                // order to finish starts now, not when the last one did.
                stall.as_mut().reset(now + opts.order_timeout);
                progressed = false;
            }
            // Starts are not awaited one by one: over NATS each is a round
            // trip to the stream, and they overlap like the orders do.
            let id = OrderId::new();
            in_flight.insert(id, (o, started));
            let client = client.clone();
            let give_up = opts.order_timeout;
            pending.push(async move {
                let result = match start_retrying(&client, id, o, give_up).await {
                    Ok(()) => match act(&client, id, &o.actions, give_up).await {
                        Ok(()) => client.wait(id).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(format!("could not start: {e}")),
                };
                (id, result)
            });
        }
        // Paced, the next order waiting for its time (not for a place in
        // the window).
        let waiting = due(next).filter(|_| next < orders.len() && pending.len() < window);
        if pending.is_empty() && waiting.is_none() {
            break;
        }
        let (id, result) = tokio::select! {
            biased;
            Some(done) = pending.next() => done,
            () = tokio::time::sleep_until(waiting.unwrap_or(began)), if waiting.is_some() => continue,
            _ = &mut stall => {
                // Nothing in flight (a paced run between two orders) is
                // not a stall.
                if progressed || in_flight.is_empty() {
                    progressed = false;
                    stall.as_mut().reset(Instant::now() + opts.order_timeout);
                    continue;
                }
                for (id, (o, _)) in in_flight.drain() {
                    mismatches.push(Mismatch {
                        line: o.line,
                        order_id: Some(id.to_string()),
                        expected: o.expect,
                        actual: None,
                        detail: format!("did not finish: no order finished for {} s", opts.order_timeout.as_secs()),
                    });
                }
                break;
            }
        };
        progressed = true;
        let Some((o, started)) = in_flight.remove(&id) else {
            continue;
        };
        finished_at.push(began.elapsed());
        on_done(id, result.as_ref().ok().map(|d| &**d));
        match result {
            Ok(doc) => {
                latencies.push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
                *by_status.entry(doc.status).or_default() += 1;
                if doc.status != o.expect {
                    mismatches.push(mismatch(o, id, &doc));
                }
            }
            Err(detail) => mismatches.push(Mismatch {
                line: o.line,
                order_id: Some(id.to_string()),
                expected: o.expect,
                actual: None,
                detail,
            }),
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    latencies.sort_unstable();
    mismatches.sort_by_key(|m| m.line);
    let count = |s| by_status.get(&s).copied().unwrap_or(0);
    FileReport {
        file: label.to_owned(),
        orders: orders.len(),
        completed: count(Status::Completed),
        failed: count(Status::Failed),
        compensated: count(Status::Compensated),
        cancelled: count(Status::Cancelled),
        mismatches,
        seconds,
        orders_per_sec: if seconds > 0.0 {
            orders.len() as f64 / seconds
        } else {
            0.0
        },
        steady_orders_per_sec: steady_rate(&finished_at),
        p50_ms: percentile_ms(&latencies, 50.0),
        p99_ms: percentile_ms(&latencies, 99.0),
    }
}

/// How often an action asks the coordinator where its order is.
const ACTION_POLL: Duration = Duration::from_millis(20);

/// Does `actions` to order `id`, each once the order is where its `when`
/// says (asked of the coordinator), within `give_up` for each.
async fn act<T: Transport + Rpc>(
    client: &Client<T>,
    id: OrderId,
    actions: &[Action],
    give_up: Duration,
) -> Result<(), String> {
    if actions.is_empty() {
        return Ok(());
    }
    let asks = CoordinatorClient::new(client.transport().clone(), ASK_TIMEOUT);
    let mut nobody = Unanswered::default();
    for a in actions {
        let deadline = Instant::now() + give_up;
        let wanted = match (&a.when, &a.what) {
            (When::Start, _) => None,
            (When::Waiting, Act::Signal { name, .. }) => Some(format!("waiting for signal {name}")),
            (When::Waiting, Act::Cancel { .. }) => Some("waiting for a signal".to_owned()),
            (When::Asleep, _) => Some("asleep".to_owned()),
        };
        if let Some(wanted) = wanted {
            loop {
                // Unknown at first: the coordinator has not read its first
                // hop yet.
                let answer = asks.status(&id).await;
                if let Err(e) = &answer {
                    nobody.check(e)?;
                }
                if let Ok(s) = answer {
                    let there = match (&a.when, &a.what) {
                        (When::Waiting, Act::Signal { name, .. }) => {
                            s.awaiting.as_ref().is_some_and(|w| w.signal == name.as_str())
                        }
                        (When::Waiting, _) => s.awaiting.is_some(),
                        _ => s.asleep_until.is_some(),
                    };
                    if there {
                        break;
                    }
                    if s.status.is_terminal() {
                        return Err(format!("the order ended {} before it was {wanted}", s.status));
                    }
                }
                if Instant::now() >= deadline {
                    return Err(format!("the order was not {wanted} within {} s", give_up.as_secs()));
                }
                tokio::time::sleep(ACTION_POLL).await;
            }
        }
        match &a.what {
            Act::Signal { name, data, duplicate } => {
                // A try that failed may have kept the signal all the same:
                // then the next one is answered `duplicate`.
                let failed_once = std::sync::atomic::AtomicBool::new(false);
                let reply = retry_asking(deadline, &mut nobody, || {
                    let ask = asks.signal(&id, name, data);
                    let failed_once = &failed_once;
                    async move {
                        let r = ask.await;
                        if r.as_ref().is_err_and(|e| e.is_retryable()) {
                            failed_once.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        r
                    }
                })
                .await
                .map_err(|e| format!("signal {name} was not delivered: {e}"))?;
                let kept_by_a_failed_try =
                    reply.duplicate && !*duplicate && failed_once.load(std::sync::atomic::Ordering::Relaxed);
                if reply.duplicate != *duplicate && !kept_by_a_failed_try {
                    return Err(format!(
                        "signal {name} was answered {} where the line expects {}",
                        if reply.duplicate { "duplicate" } else { "new" },
                        if *duplicate { "duplicate" } else { "new" },
                    ));
                }
            }
            Act::Cancel { reason } => {
                retry_asking(deadline, &mut nobody, || asks.cancel(&id, Some(reason)))
                    .await
                    .map_err(|e| format!("the cancel was not recorded: {e}"))?;
            }
        }
    }
    Ok(())
}

/// Whether the coordinator answered that it does not know the order.
fn unknown(e: &waybill::coordinator::RequestError) -> bool {
    matches!(
        e,
        waybill::coordinator::RequestError::Refused {
            code: Some(waybill::coordinator::api::ErrorCode::UnknownOrder),
            ..
        }
    )
}

/// Asks until answered, or until `deadline` while the coordinator does not
/// know the order yet (it reads the stream a moment behind the start) or
/// cannot be reached (starting, say).
async fn retry_asking<R, F: std::future::Future<Output = Result<R, waybill::coordinator::RequestError>>>(
    deadline: Instant,
    nobody: &mut Unanswered,
    ask: impl Fn() -> F,
) -> Result<R, String> {
    loop {
        match ask().await {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() < deadline && (e.is_retryable() || unknown(&e)) => {
                nobody.check(&e)?;
                tokio::time::sleep(ACTION_POLL).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// How long a replay waits for a coordinator that nobody runs: one may be
/// starting, but a flow's actions need one.
const NO_COORDINATOR: Duration = Duration::from_secs(5);

/// Since when the coordinator's requests have had no responders.
#[derive(Default)]
struct Unanswered(Option<Instant>);

impl Unanswered {
    /// An error once nobody has answered for [`NO_COORDINATOR`].
    fn check(&mut self, e: &waybill::coordinator::RequestError) -> Result<(), String> {
        use waybill::coordinator::RequestError;
        if !matches!(e, RequestError::Transport(waybill::transport::Error::NoResponders(_))) {
            self.0 = None;
            return Ok(());
        }
        let since = *self.0.get_or_insert_with(Instant::now);
        if since.elapsed() >= NO_COORDINATOR {
            return Err(format!(
                "no coordinator answered for {} s: a line's signals and cancels go through one \
                 (start `waybill coordinator`)",
                NO_COORDINATOR.as_secs()
            ));
        }
        Ok(())
    }
}

/// Starts an order; the client retries what may pass (a server
/// restarting, a leader moving) under the same id for up to `give_up` (at
/// most [`waybill::MAX_START_TIMEOUT`], inside the stream's duplicate
/// window), so a retry that was in fact stored is a duplicate, dropped by
/// the stream.
async fn start_retrying<T: Transport>(
    client: &Client<T>,
    id: OrderId,
    o: &PreparedOrder,
    give_up: Duration,
) -> Result<(), waybill::StartError> {
    client
        .clone()
        .start_timeout(give_up)
        .start_with_id(id, &o.workflow, o.payload.clone())
        .await
        .map(|_| ())
}

fn mismatch(o: &PreparedOrder, id: OrderId, doc: &Arc<Document>) -> Mismatch {
    Mismatch {
        line: o.line,
        order_id: Some(id.to_string()),
        expected: o.expect,
        actual: Some(doc.status),
        detail: doc.failure.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

    use super::*;

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
    }

    async fn engine() -> (EmbeddedRuntime, FlowFile) {
        let registry = waybill_workflows::registry().unwrap();
        let happy = load(&examples().join("orders/happy.jsonl"), &registry).unwrap();
        let stock = load_stock(&examples().join("stock.json")).unwrap();
        let opts = ReplayOptions {
            coordinator: false,
            ..ReplayOptions::default()
        };
        (EmbeddedRuntime::start(stock, &opts).await.unwrap(), happy)
    }

    // Paused time: the pace's timers and the stall timer advance only when
    // every task waits, so what follows does not depend on the machine's
    // load.
    #[tokio::test(start_paused = true)]
    async fn a_paced_run_starts_and_ends_every_order_within_its_window() {
        let (engine, happy) = engine().await;
        let opts = ReplayOptions {
            in_flight: 4,
            ..ReplayOptions::default()
        };
        let mut ended = 0;
        let report = run_orders_paced(&engine.client, "paced", &happy.orders, &opts, 500.0, |_, d| {
            ended += usize::from(d.is_some());
        })
        .await;
        assert!(report.ok(), "{:#?}", report.mismatches);
        assert_eq!((report.completed, ended), (happy.orders.len(), happy.orders.len()));
        // Not a positive rate: unpaced.
        let report = run_orders_paced(&engine.client, "unpaced", &happy.orders, &opts, 0.0, |_, _| {}).await;
        assert_eq!(report.completed, happy.orders.len());
        engine.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_between_paced_orders_is_not_a_stall() {
        // Orders due further apart than the stall timeout: with nothing in
        // flight, the run waits for the next one rather than ending.
        let (engine, happy) = engine().await;
        let opts = ReplayOptions {
            order_timeout: Duration::from_millis(100),
            ..ReplayOptions::default()
        };
        let report = run_orders_paced(&engine.client, "slow", &happy.orders[..3], &opts, 4.0, |_, _| {}).await;
        assert!(report.ok(), "{report:#?}");
        assert_eq!(report.completed, 3);
        engine.shutdown().await;
    }
}
