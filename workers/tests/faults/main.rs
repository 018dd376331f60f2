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

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod bad_input;
mod report;
mod run;
mod stack;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use futures::future::LocalBoxFuture;
use futures::FutureExt;
use waybill::Status;

use report::Row;
use run::{Driven, Driver, Trigger};
use stack::Stack;

type Scenario = fn() -> LocalBoxFuture<'static, Row>;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("no-faults", || no_faults().boxed_local()),
    ("worker-sigkill", || worker_sigkill().boxed_local()),
    ("coordinator-sigkill", || coordinator_sigkill().boxed_local()),
    ("nats-server-sigkill", || nats_server_sigkill().boxed_local()),
    ("worker-drain", || worker_drain().boxed_local()),
    ("cluster-node-kill", || cluster_node_kill().boxed_local()),
    ("handler-panic-hang", || handler_panic_hang().boxed_local()),
    ("bad-input", || bad_input::scenario().boxed_local()),
];

fn main() -> ExitCode {
    let words: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
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
    for (name, scenario) in SCENARIOS {
        if !words.is_empty() && !words.iter().any(|w| name.contains(w.as_str())) {
            continue;
        }
        eprintln!("fault scenario {name} ...");
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
    let table = report::write(&rows);
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
        let driver = Driver::connect(&stack.url(0)).await;
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
            recover,
            seconds,
        );
        self.driver.client.close().await;
        (row, self.stack)
    }
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
    let orders = run::mixed();
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

/// A three-node cluster, streams and buckets with three replicas, each
/// service's two workers and the coordinator on different nodes. The node
/// that leads the hop stream is killed a third through and started again
/// two thirds through.
async fn cluster_node_kill() -> Row {
    let orders = run::mixed();
    let mut sc = Scene::new(Stack::cluster(), 1, 2, orders.len()).await;
    let began = sc.began;
    let run = sc.driver.start(orders);
    sc.trigger.at(0.33).await;
    let mut hops = sc
        .driver
        .nats
        .jetstream()
        .get_stream(waybill::transport::nats::HOPS_STREAM)
        .await
        .unwrap();
    let info = hops.info().await.unwrap();
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).unwrap_or_default();
    let stack::Servers::Cluster(cluster) = &mut sc.stack.servers else {
        unreachable!("a cluster stack")
    };
    let node = cluster
        .index_of(&leader)
        .unwrap_or_else(|| panic!("the hop stream has no known leader: {:?}", info.cluster));
    let at = || began.elapsed().as_secs_f64();
    eprintln!(
        "  {:.1} s: killing {} (it leads {})",
        at(),
        cluster.name(node),
        waybill::transport::nats::HOPS_STREAM
    );
    sc.trigger.fault();
    cluster.kill(node);
    sc.trigger.at(0.66).await;
    eprintln!("  {:.1} s: restarting {}", at(), cluster.name(node));
    cluster.restart(node);
    eprintln!("  {:.1} s: the cluster has formed again", at());
    let driven = run.done().await;
    let faults = "SIGKILL of the node leading the hop stream, restarted".to_owned();
    sc.end("3-node cluster, node killed", faults, driven, 0).await.0
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
