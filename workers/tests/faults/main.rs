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
use run::{Driver, Driven, Trigger, Verdict};
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

/// Stops the workers (each must still be alive, then drain and exit 0),
/// checks everything, and makes the scenario's row.
#[allow(clippy::too_many_arguments)]
pub async fn finish(
    name: &str,
    faults: String,
    mut stack: Stack,
    driver: Arc<Driver>,
    driven: Driven,
    trigger: Trigger,
    dead_letters: u64,
    began: Instant,
) -> (Row, Stack, Verdict) {
    let seconds = began.elapsed();
    stack.assert_all_alive();
    stack.drain_workers();
    let verdict = run::verify(&stack, &driver, &driven, dead_letters).await;
    let recover = run::time_to_recover(&trigger.faults, &driven);
    let injected = trigger.faults.len();
    let row = Row::new(name, &driven, (faults, injected), &verdict, dead_letters, recover, seconds);
    driver.client.close().await;
    (row, stack, verdict)
}

/// The same stack and orders with nothing done to them: the reference
/// for the run times below, and a check of the checks.
async fn no_faults() -> Row {
    let began = Instant::now();
    let mut stack = Stack::single();
    stack.start_coordinator(0);
    stack.start_workers(1);
    let driver = Driver::connect(&stack.url(0)).await;
    let orders = run::mixed();
    let trigger = driver.trigger(orders.len());
    let driven = driver.start(orders).await.unwrap();
    finish("no faults (reference)", "none".into(), stack, driver, driven, trigger, 0, began)
        .await
        .0
}

/// SIGKILL of a random worker (two processes per service) a dozen times
/// through the run, each started again at once.
async fn worker_sigkill() -> Row {
    let began = Instant::now();
    let mut stack = Stack::single();
    stack.start_coordinator(0);
    stack.start_workers(2);
    let driver = Driver::connect(&stack.url(0)).await;
    let orders = run::mixed();
    let mut trigger = driver.trigger(orders.len());
    const KILLS: usize = 12;
    let mut rng = fastrand::Rng::with_seed(5);
    let run = driver.start(orders);
    for k in 1..=KILLS {
        trigger.at(k as f64 / (KILLS + 2) as f64).await;
        let i = rng.usize(..stack.workers.len());
        trigger.fault();
        stack.kill_and_restart_worker(i);
    }
    let driven = run.await.unwrap();
    let faults = format!("{KILLS} × SIGKILL of a random worker, restarted");
    finish("worker SIGKILL", faults, stack, driver, driven, trigger, 0, began)
        .await
        .0
}

/// SIGKILL of the coordinator a quarter through, started again halfway;
/// killed again at three quarters and started at once. Its rebuilt view
/// must agree with every order.
async fn coordinator_sigkill() -> Row {
    let began = Instant::now();
    let mut stack = Stack::single();
    stack.start_coordinator(0);
    stack.start_workers(1);
    let driver = Driver::connect(&stack.url(0)).await;
    let orders = run::mixed();
    let mut trigger = driver.trigger(orders.len());
    let run = driver.start(orders);
    trigger.at(0.25).await;
    trigger.fault();
    stack.kill_coordinator();
    trigger.at(0.5).await;
    stack.start_coordinator(0);
    trigger.at(0.75).await;
    trigger.fault();
    stack.kill_coordinator();
    stack.start_coordinator(0);
    let driven = run.await.unwrap();
    let faults = "2 × SIGKILL of the coordinator, restarted".to_owned();
    finish("coordinator SIGKILL", faults, stack, driver, driven, trigger, 0, began)
        .await
        .0
}

/// SIGKILL of nats-server, twice, each time started again on the same
/// port and store. Every client reconnects; nothing stored is lost.
async fn nats_server_sigkill() -> Row {
    let began = Instant::now();
    let mut stack = Stack::single();
    stack.start_coordinator(0);
    stack.start_workers(1);
    let driver = Driver::connect(&stack.url(0)).await;
    let orders = run::mixed();
    let mut trigger = driver.trigger(orders.len());
    let run = driver.start(orders);
    for at in [0.3, 0.7] {
        trigger.at(at).await;
        trigger.fault();
        let stack::Servers::One(server) = &mut stack.servers else {
            unreachable!("a single-server stack")
        };
        server.restart();
    }
    let driven = run.await.unwrap();
    let faults = "2 × SIGKILL of nats-server, restarted on its store".to_owned();
    finish("nats-server SIGKILL", faults, stack, driver, driven, trigger, 0, began)
        .await
        .0
}

/// SIGTERM of every worker at once (a rolling deploy done badly: all at
/// the same time), then all started again. A drained worker finishes and
/// acknowledges what it holds, so nothing is run again: every step attempt
/// the workers made is in exactly one order's history, and no worker
/// published a hop the stream already had.
async fn worker_drain() -> Row {
    let began = Instant::now();
    let mut stack = Stack::single();
    stack.start_coordinator(0);
    stack.start_workers(1);
    let driver = Driver::connect(&stack.url(0)).await;
    let orders = run::mixed();
    let mut trigger = driver.trigger(orders.len());
    let run = driver.start(orders);
    trigger.at(0.4).await;
    trigger.fault();
    stack.drain_workers();
    stack.start_workers(1);
    let driven = run.await.unwrap();
    let faults = "SIGTERM of all 3 workers (drain), restarted".to_owned();
    let recorded = driven.records();
    let (mut row, stack, _) = finish("worker SIGTERM drain", faults, stack, driver, driven, trigger, 0, began).await;
    let steps: u64 = stack.drained.iter().map(|d| d.steps).sum();
    let redone: u64 = stack.drained.iter().map(|d| d.redone).sum();
    if redone != 0 || steps != recorded {
        row.duplicate_effects += redone + steps.saturating_sub(recorded);
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
    let began = Instant::now();
    let mut stack = Stack::cluster();
    stack.start_coordinator(1);
    stack.start_workers(2);
    let driver = Driver::connect(&stack.url(0)).await;
    let orders = run::mixed();
    let mut trigger = driver.trigger(orders.len());
    let run = driver.start(orders);
    trigger.at(0.33).await;
    let mut hops = driver
        .nats
        .jetstream()
        .get_stream(waybill::transport::nats::HOPS_STREAM)
        .await
        .unwrap();
    let info = hops.info().await.unwrap();
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).unwrap_or_default();
    let stack::Servers::Cluster(cluster) = &mut stack.servers else {
        unreachable!("a cluster stack")
    };
    let node = cluster.index_of(&leader).unwrap_or(2);
    eprintln!("  killing {} (it leads {})", cluster.name(node), waybill::transport::nats::HOPS_STREAM);
    trigger.fault();
    cluster.kill(node);
    trigger.at(0.66).await;
    cluster.restart(node);
    let driven = run.await.unwrap();
    let faults = "SIGKILL of the node leading the hop stream, restarted".to_owned();
    finish("3-node cluster, node killed", faults, stack, driver, driven, trigger, 0, began)
        .await
        .0
}

/// Handlers that panic or hang, mixed into the flows: a card whose
/// gateway client panics on every attempt (once the retries are used up
/// the order is compensated: the refund finds nothing charged), a zip whose carrier client panics (the order is
/// compensated: stock released, card refunded), a card whose gateway never
/// answers its first attempt (the step times out, is retried, completes).
/// The workers survive all of it.
async fn handler_panic_hang() -> Row {
    const EACH: usize = 20;
    let began = Instant::now();
    let mut stack = Stack::single();
    stack.start_coordinator(0);
    stack.start_workers(1);
    let driver = Driver::connect(&stack.url(0)).await;
    let base = r#"{"customer":"c-f","items":[{"qty":1,"sku":"SKU-3","unit_price_cents":500}],"payment":{"card":"4242424242424242"},"ship_to":{"country":"NL","zip":"1011"}}"#;
    let mut orders = run::mixed();
    let odd = [
        (base.replace("4242424242424242", "4000000000000259"), Status::Compensated),
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
    let trigger = driver.trigger(orders.len());
    let driven = driver.start(orders).await.unwrap();
    let faults = format!("{} orders whose handler panics, {EACH} whose handler hangs", 2 * EACH);
    let histories = driven.histories();
    let (mut row, _, _) = finish("handler panics and hangs", faults, stack, driver, driven, trigger, 0, began).await;
    row.faults_injected = 3 * EACH;
    for (needle, want) in [("handler panicked", 2 * EACH), ("timed out", EACH)] {
        let seen = histories.iter().filter(|h| h.contains(needle)).count();
        if seen < want {
            row.problems.push(format!("{seen} orders record `{needle}`, expected {want}"));
        }
    }
    row
}
