//! The fault suite: nothing lost, nothing done twice.
//!
//! Each scenario starts its own nats-server (or a three-node cluster), the
//! worker processes (the real binaries), a coordinator process, replays the
//! 2,000 mixed example orders through them while it injects its faults, and
//! then checks ([`run::verify`]): every order ended as its line expects;
//! the coordinator tells each order's final status and hop; the payment
//! ledger and the stock, read straight from their KV buckets, are exactly
//! what the finished orders require; the dead-letter stream holds exactly
//! what it should. Every process is started and stopped here.
//!
//! The orders are driven from a task of their own, so the faults, which
//! start and stop processes, may block this thread.
//!
//! The scenarios run one after another (each is a dozen processes; two
//! cores take one at a time) and write a table to
//! `target/reliability/report.md` (and `.json`). Run them all with
//! `cargo test -p waybill-workers --test faults`, or some with
//! `… --test faults -- cluster drain` (scenarios whose name contains a word).
//!
//! The soak (`scripts/soak`) runs the same scenarios with more orders,
//! several times: `… --test faults -- --repeat 5 --orders 3000 cluster`.
//! `--orders N` sets the orders of the cluster scenarios (default 400,
//! enough for CI) and of the worker-kill one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod bad_input;
mod report;
mod run;
mod stack;

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::LocalBoxFuture;
use futures::FutureExt;
use waybill::Status;

use report::Row;
use run::{Driven, Driver, Trigger};
use stack::{Connect, Stack};

type Scenario = fn() -> LocalBoxFuture<'static, Row>;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("no-faults", || no_faults().boxed_local()),
    ("worker-sigkill", || worker_sigkill().boxed_local()),
    ("signals-worker-sigkill", || signals_worker_sigkill().boxed_local()),
    ("signals-nats-server-sigkill", || signals_nats_server_sigkill().boxed_local()),
    ("coordinator-sigkill", || coordinator_sigkill().boxed_local()),
    ("nats-server-sigkill", || nats_server_sigkill().boxed_local()),
    ("worker-drain", || worker_drain().boxed_local()),
    ("cluster-node1-payment-coordinator-kill", || {
        cluster_outage(Victim::Node(0), Connect::Own).boxed_local()
    }),
    ("cluster-node2-inventory-kill", || {
        cluster_outage(Victim::Node(1), Connect::Own).boxed_local()
    }),
    ("cluster-node3-shipping-kill", || {
        cluster_outage(Victim::Node(2), Connect::Own).boxed_local()
    }),
    ("cluster-seeds-n1-kill", || {
        cluster_outage(Victim::Node(0), Connect::Seeds).boxed_local()
    }),
    ("cluster-seeds-n2-kill", || {
        cluster_outage(Victim::Node(1), Connect::Seeds).boxed_local()
    }),
    ("cluster-seeds-n3-kill", || {
        cluster_outage(Victim::Node(2), Connect::Seeds).boxed_local()
    }),
    ("cluster-seeds-hop-leader-kill", || {
        cluster_outage(Victim::HopLeader, Connect::Seeds).boxed_local()
    }),
    ("handler-panic-hang", || handler_panic_hang().boxed_local()),
    ("bad-input", || bad_input::scenario().boxed_local()),
];

/// Orders of the cluster and worker-kill scenarios (`--orders N`).
static ORDERS: AtomicUsize = AtomicUsize::new(0);

/// The orders of a scenario that scales with `--orders`.
fn orders_or(default: usize) -> usize {
    match ORDERS.load(Ordering::Relaxed) {
        0 => default,
        n => n,
    }
}

fn main() -> ExitCode {
    let mut words: Vec<String> = Vec::new();
    let mut repeat = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = |what: &str| -> usize {
            args.next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{what} takes a number"))
        };
        match a.as_str() {
            "--repeat" => repeat = number("--repeat").max(1),
            "--orders" => ORDERS.store(number("--orders"), Ordering::Relaxed),
            _ if a.starts_with('-') => {}
            _ => words.push(a),
        }
    }
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in SCENARIOS {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    // The driver runs in this process: its client's complaints (a consumer
    // it cannot follow) are what a stall would show. Other logs stay quiet.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("waybill::client=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    let chosen = SCENARIOS
        .iter()
        .filter(|(name, _)| words.is_empty() || words.iter().any(|w| name.contains(w.as_str())));
    let runs: Vec<_> = (1..=repeat)
        .flat_map(|run| chosen.clone().map(move |s| (run, s)))
        .collect();
    for (run, (name, scenario)) in runs {
        if repeat > 1 {
            eprintln!("fault scenario {name} (run {run} of {repeat}) ...");
        } else {
            eprintln!("fault scenario {name} ...");
        }
        let began = Instant::now();
        let row = runtime.block_on(std::panic::AssertUnwindSafe(scenario()).catch_unwind());
        let row = row.unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".into());
            Row::crashed(name, why, began.elapsed())
        });
        eprintln!(
            "fault scenario {name}: {} in {:.1} s",
            if row.passed() { "ok" } else { "FAILED" },
            row.seconds
        );
        for p in &row.problems {
            eprintln!("  {p}");
        }
        rows.push(row);
    }
    let table = report::write(&rows, repeat);
    println!("{table}");
    if rows.iter().all(Row::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One scenario's stack, driver and clock (from when its servers are up).
struct Scene {
    began: Instant,
    stack: Stack,
    driver: Arc<Driver>,
    trigger: Trigger,
}

impl Scene {
    /// Starts the coordinator on `coordinator_node` and `per_service`
    /// workers of each service, and connects a driver to node 0 for `orders`
    /// orders.
    async fn new(mut stack: Stack, coordinator_node: usize, per_service: usize, orders: usize) -> Self {
        let began = Instant::now();
        stack.start_coordinator(coordinator_node);
        stack.start_workers(per_service);
        // The driver is the clients: given every node, as clients are.
        let driver = Driver::connect(&stack.seeds()).await;
        let trigger = driver.trigger(orders);
        Self {
            began,
            stack,
            driver,
            trigger,
        }
    }

    /// Stops the workers (each must still be alive, then drain and exit 0),
    /// checks everything, and makes the scenario's row.
    async fn end(mut self, name: &str, faults: String, driven: Driven, dead_letters: u64) -> (Row, Stack) {
        let seconds = self.began.elapsed();
        self.stack.assert_all_alive();
        self.stack.drain_workers();
        let mut verdict = run::verify(&self.stack, &self.driver, &driven, dead_letters).await;
        // What the workers say they dead-lettered (those killed say nothing).
        let said: u64 = self.stack.drained.iter().map(|d| d.dead_lettered).sum();
        if said > dead_letters {
            verdict
                .problems
                .push(format!("the workers dead-lettered {said}, expected {dead_letters}"));
        }
        let recover = run::time_to_recover(&self.trigger.faults, &driven);
        if std::env::var_os("WAYBILL_FAULTS_SLOWEST").is_some() {
            eprintln!("{}", run::slowest(&driven));
        }
        if run::waited(&driven) > 0 {
            eprintln!(
                "  {} orders waited on unavailable infrastructure, then went on",
                run::waited(&driven)
            );
        }
        if !verdict.problems.is_empty() || verdict.lost > 0 {
            // What the processes said, to tell a stall's cause in CI.
            let coordinator = self.stack.stop_coordinator();
            let tails = self.stack.drained.iter().map(|d| d.tail.clone());
            verdict.problems.extend(tails.chain([coordinator]));
        }
        let injected = self.trigger.faults.len();
        let row = Row::new(
            name,
            &driven,
            (faults, injected),
            &verdict,
            dead_letters,
            &recover,
            seconds,
        );
        self.driver.client.close().await;
        (row, self.stack)
    }
}

/// The trip's flows (orders asleep on a reminder's timer, waiting for
/// their approval signal, a deadline passing, cancels) while the trip's
/// workers are SIGKILLed and started again: a kill delays a trip, and
/// never changes how it ends; no trip is booked, reminded or undone twice.
async fn signals_worker_sigkill() -> Row {
    const KILLS: usize = 4;
    let orders = run::trips(orders_or(2000).div_ceil(400));
    let mut sc = Scene::new(Stack::single(), 0, 1, orders.len()).await;
    sc.stack.start_trip_workers(2);
    let mut rng = fastrand::Rng::with_seed(9);
    let run = sc.driver.start(orders);
    for k in 1..=KILLS {
        sc.trigger.at(k as f64 / (KILLS + 2) as f64).await;
        let trip_workers: Vec<usize> = (0..sc.stack.workers.len())
            .filter(|&i| sc.stack.workers[i].service == stack::TRIP)
            .collect();
        let i = trip_workers[rng.usize(..trip_workers.len())];
        sc.trigger.fault();
        sc.stack.kill_and_restart_worker(i);
    }
    let driven = run.done().await;
    let faults = format!("{KILLS} × SIGKILL of a trip worker while trips run branches, sleep and await signals, restarted");
    sc.end("signals: worker SIGKILL", faults, driven, 0).await.0
}

/// The trip's flows while nats-server is SIGKILLed twice and started again
/// on its store: trips asleep on a reminder's timer (a message the server
/// holds to publish later) and waiting for a signal or its deadline (the
/// same) must wake once each, every timer firing once, when the server is
/// back; their branches run on.
async fn signals_nats_server_sigkill() -> Row {
    let orders = run::trips(orders_or(2000).div_ceil(400));
    let mut sc = Scene::new(Stack::single(), 0, 1, orders.len()).await;
    sc.stack.start_trip_workers(2);
    let run = sc.driver.start(orders);
    for at in [0.3, 0.6] {
        sc.trigger.at(at).await;
        sc.trigger.fault();
        let stack::Servers::One(server) = &mut sc.stack.servers else {
            unreachable!("a single-server stack")
        };
        server.restart();
    }
    let driven = run.done().await;
    let faults = "2 × SIGKILL of nats-server while trips sleep, await signals and run branches, restarted".to_owned();
    sc.end("signals: nats-server SIGKILL", faults, driven, 0).await.0
}

/// The same stack and orders with nothing done to them: the reference
/// for the run times below, and a check of the checks.
async fn no_faults() -> Row {
    let orders = run::mixed();
    let scene = Scene::new(Stack::single(), 0, 1, orders.len()).await;
    let driven = scene.driver.start(orders).done().await;
    scene.end("no faults (reference)", "none".into(), driven, 0).await.0
}

/// SIGKILL of a random worker (two processes per service) a dozen times
/// through the run, each started again at once.
async fn worker_sigkill() -> Row {
    const KILLS: usize = 12;
    let orders = run::mixed_n(orders_or(2000));
    let mut sc = Scene::new(Stack::single(), 0, 2, orders.len()).await;
    let mut rng = fastrand::Rng::with_seed(5);
    let run = sc.driver.start(orders);
    for k in 1..=KILLS {
        sc.trigger.at(k as f64 / (KILLS + 2) as f64).await;
        let i = rng.usize(..sc.stack.workers.len());
        sc.trigger.fault();
        sc.stack.kill_and_restart_worker(i);
    }
    let driven = run.done().await;
    let faults = format!("{KILLS} × SIGKILL of a random worker, restarted");
    sc.end("worker SIGKILL", faults, driven, 0).await.0
}

/// SIGKILL of the coordinator a quarter through, started again halfway;
/// killed again at three quarters and started at once. Its rebuilt view
/// must agree with every order.
async fn coordinator_sigkill() -> Row {
    let orders = run::mixed();
    let mut sc = Scene::new(Stack::single(), 0, 1, orders.len()).await;
    let run = sc.driver.start(orders);
    sc.trigger.at(0.25).await;
    sc.trigger.fault();
    sc.stack.kill_coordinator();
    sc.trigger.at(0.5).await;
    sc.stack.start_coordinator(0);
    sc.trigger.at(0.75).await;
    sc.trigger.fault();
    sc.stack.kill_coordinator();
    sc.stack.start_coordinator(0);
    let driven = run.done().await;
    let faults = "2 × SIGKILL of the coordinator, restarted".to_owned();
    sc.end("coordinator SIGKILL", faults, driven, 0).await.0
}

/// SIGKILL of nats-server, twice, each time started again on the same
/// port and store. Every client reconnects; nothing stored is lost.
async fn nats_server_sigkill() -> Row {
    let orders = run::mixed();
    let mut sc = Scene::new(Stack::single(), 0, 1, orders.len()).await;
    let run = sc.driver.start(orders);
    for at in [0.3, 0.7] {
        sc.trigger.at(at).await;
        sc.trigger.fault();
        let stack::Servers::One(server) = &mut sc.stack.servers else {
            unreachable!("a single-server stack")
        };
        server.restart();
    }
    let driven = run.done().await;
    let faults = "2 × SIGKILL of nats-server, restarted on its store".to_owned();
    sc.end("nats-server SIGKILL", faults, driven, 0).await.0
}

/// SIGTERM of every worker at once (a rolling deploy done badly: all at
/// the same time), then all started again. A drained worker finishes and
/// acknowledges what it holds, so nothing is run again: every step attempt
/// the workers made is in exactly one order's history, and no worker
/// published a hop the stream already had.
async fn worker_drain() -> Row {
    let orders = run::mixed();
    let mut sc = Scene::new(Stack::single(), 0, 1, orders.len()).await;
    let run = sc.driver.start(orders);
    sc.trigger.at(0.4).await;
    sc.trigger.fault();
    sc.stack.drain_workers();
    sc.stack.start_workers(1);
    let driven = run.done().await;
    let faults = "SIGTERM of all 3 workers (drain), restarted".to_owned();
    let recorded = driven.records();
    let (mut row, stack) = sc.end("worker SIGTERM drain", faults, driven, 0).await;
    // Every drained worker reported; none was killed. A step run again
    // after its next hop was stored is `redone`; a handler call that left
    // no record (a run deferred behind another's lease) is not work done.
    let steps: u64 = stack.drained.iter().map(|d| d.steps).sum();
    let redone: u64 = stack.drained.iter().map(|d| d.redone).sum();
    if redone != 0 || steps < recorded {
        row.duplicate_effects += redone;
        row.problems.push(format!(
            "the workers ran {steps} step attempts ({redone} redone); the orders' histories record {recorded}"
        ));
    }
    row
}

/// How long a killed node stays away in the cluster scenarios: longer than
/// a step's whole retry budget (8 attempts from 50 ms, about 6 s), which
/// is what an outage used to spend, turning healthy orders into refunds.
const OUTAGE: Duration = Duration::from_secs(20);

/// Which node a cluster scenario kills.
#[derive(Debug, Clone, Copy)]
enum Victim {
    /// Node `i` (0: the payment worker's and the coordinator's, 1: the
    /// inventory worker's, 2: the shipping worker's).
    Node(usize),
    /// Whichever node leads the hop stream when the fault strikes.
    HopLeader,
}

/// A three-node cluster, streams and buckets with three replicas; one
/// worker per service, each on its own node (payment and the coordinator
/// on the first, inventory on the second, shipping on the third; with
/// `Victim::HopLeader`, two per service, spread); each process given only
/// its node's URL or the seed list. While orders are still being started,
/// a third of the way through, the victim is SIGKILLed, stays away for
/// [`OUTAGE`], and is started again on its store. Every order must end
/// exactly as the same order ends without faults (its line's `expect`),
/// none lost, no effect twice: a restart delays orders, it never changes
/// how they end.
async fn cluster_outage(victim: Victim, connect: Connect) -> Row {
    let orders = run::mixed_n(orders_or(400));
    let mut stack = Stack::cluster();
    stack.connect = connect;
    let per_service = if matches!(victim, Victim::HopLeader) { 2 } else { 1 };
    let mut sc = Scene::new(stack, 0, per_service, orders.len()).await;
    let began = sc.began;
    // 64 at a time: the starts go on through the outage.
    let run = sc.driver.start_paced(orders, 64);
    sc.trigger.at(1.0 / 3.0).await;
    let node = match victim {
        Victim::Node(i) => i,
        Victim::HopLeader => {
            let mut hops = sc
                .driver
                .js
                .get_stream(waybill::transport::nats::HOPS_STREAM)
                .await
                .unwrap();
            let info = hops.info().await.unwrap();
            let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).unwrap_or_default();
            let stack::Servers::Cluster(cluster) = &sc.stack.servers else {
                unreachable!("a cluster stack")
            };
            cluster
                .index_of(&leader)
                .unwrap_or_else(|| panic!("the hop stream has no known leader: {:?}", info.cluster))
        }
    };
    let stack::Servers::Cluster(cluster) = &mut sc.stack.servers else {
        unreachable!("a cluster stack")
    };
    let at = || began.elapsed().as_secs_f64();
    eprintln!(
        "  {:.1} s: killing {} for {} s",
        at(),
        cluster.name(node),
        OUTAGE.as_secs()
    );
    sc.trigger.fault();
    cluster.kill(node);
    // The fault under test is an outage of this length, not a wait for an
    // event: the node stays away while the orders go on without it.
    tokio::time::sleep(OUTAGE).await;
    eprintln!("  {:.1} s: restarting {}", at(), cluster.name(node));
    cluster.restart(node);
    eprintln!("  {:.1} s: the cluster has formed again", at());
    let driven = run.done().await;
    let who = match victim {
        Victim::Node(0) => "the payment worker's and coordinator's node".to_owned(),
        Victim::Node(1) => "the inventory worker's node".to_owned(),
        Victim::Node(_) => "the shipping worker's node".to_owned(),
        Victim::HopLeader => "the node leading the hop stream".to_owned(),
    };
    let given = match connect {
        Connect::Own => "each process given its node's URL",
        Connect::Seeds => "every process given the seed list",
    };
    let faults = format!("SIGKILL of {who}, away {} s; {given}", OUTAGE.as_secs());
    let name = match (victim, connect) {
        (Victim::HopLeader, _) => "3-node cluster, seed lists, hop-stream leader away 20 s".to_owned(),
        (Victim::Node(i), Connect::Own) => format!("3-node cluster, node n{} away 20 s", i + 1),
        (Victim::Node(i), Connect::Seeds) => format!("3-node cluster, seed lists, node n{} away 20 s", i + 1),
    };
    sc.end(&name, faults, driven, 0).await.0
}

/// Handlers that panic or hang, mixed into the flows: a card whose gateway
/// client panics on every attempt and a zip whose carrier client panics
/// (once the retries are used up, each order is compensated: what was done
/// is undone, and a refund finds nothing charged if the charge never went
/// through), and a card whose gateway never answers its first attempt (the
/// step times out, is retried, completes). The workers survive all of it.
async fn handler_panic_hang() -> Row {
    const EACH: usize = 20;
    let base = r#"{"customer":"c-f","items":[{"qty":1,"sku":"SKU-3","unit_price_cents":500}],"payment":{"card":"4242424242424242"},"ship_to":{"country":"NL","zip":"1011"}}"#;
    let mut orders = run::mixed();
    let odd = [
        (
            base.replace("4242424242424242", "4000000000000259"),
            Status::Compensated,
        ),
        (base.replace(r#""zip":"1011""#, r#""zip":"99999""#), Status::Compensated),
        (base.replace("4242424242424242", "4000000000000341"), Status::Completed),
    ];
    for (k, (line, expect)) in odd.iter().enumerate() {
        for (j, o) in run::orders_like(line, *expect, EACH).into_iter().enumerate() {
            // Spread through the run.
            let at = (j * orders.len() / EACH + k * 7).min(orders.len());
            orders.insert(at, o);
        }
    }
    let sc = Scene::new(Stack::single(), 0, 1, orders.len()).await;
    let driven = sc.driver.start(orders).done().await;
    let faults = format!("{} orders whose handler panics, {EACH} whose handler hangs", 2 * EACH);
    let histories = driven.histories();
    let (mut row, _) = sc.end("handler panics and hangs", faults, driven, 0).await;
    row.faults_injected = 3 * EACH;
    for (needle, want) in [("handler panicked", 2 * EACH), ("timed out", EACH)] {
        let seen = histories.iter().filter(|h| h.contains(needle)).count();
        if seen < want {
            row.problems
                .push(format!("{seen} orders record `{needle}`, expected {want}"));
        }
    }
    row
}
