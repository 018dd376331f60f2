//! Nothing lost when processes die: the mixed example flows replayed over
//! NATS with two worker processes per service, while a worker is killed
//! (SIGKILL) and started again, or while nats-server itself is killed and
//! restarted on its store. Afterwards every order has ended as its line
//! expects (the replay checks it), and the services' own state, read
//! straight from the KV buckets, shows nothing done twice: each completed
//! order charged once, each compensated one charged and refunded once, and
//! stock conserved (initial = available + reserved; reserved = what
//! completed orders took).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use waybill::transport::nats::Nats;
use waybill::transport::NatsConfig;
use waybill::Status;
use waybill_testkit::{workspace_root, NatsServer, Proc};
use waybill_workers::replay;
use waybill_workers::services::initial_stock;
use waybill_workflows::Order;

const MIXED: &str = "examples/orders/mixed.jsonl";

fn command(bin: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.args(args).current_dir(workspace_root()).env("RUST_LOG", "warn");
    c
}

fn setup(url: &str) {
    let out = command(
        env!("CARGO_BIN_EXE_waybill"),
        &["setup", "--nats", url, "--stock", "examples/stock.json"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

const BINS: [(&str, &str); 3] = [
    ("payment-worker", env!("CARGO_BIN_EXE_payment-worker")),
    ("inventory-worker", env!("CARGO_BIN_EXE_inventory-worker")),
    ("shipping-worker", env!("CARGO_BIN_EXE_shipping-worker")),
];

fn worker(i: usize, url: &str) -> Proc {
    let (name, bin) = BINS[i];
    // A short ack wait, so the steps a killed worker held come back soon.
    Proc::spawn(name, command(bin, &["--nats", url, "--ack-wait", "2"]))
}

fn replay_process(url: &str) -> Proc {
    Proc::spawn(
        "waybill replay",
        command(
            env!("CARGO_BIN_EXE_waybill"),
            &["replay", "--no-progress", "--nats", url, "--order-timeout", "60", MIXED],
        ),
    )
}

/// Watches every hop published (a plain subscription sees them) so a test
/// can wait until the replay is well under way.
async fn hop_watch(url: &str) -> async_nats::Subscriber {
    let client = async_nats::connect(url).await.unwrap();
    client.subscribe("waybill.hop.>").await.unwrap()
}

async fn wait_for_hops(watch: &mut async_nats::Subscriber, n: usize) {
    tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..n {
            watch.next().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the replay did not publish {n} hops within 60 s"));
}

async fn bucket_values<T: serde::de::DeserializeOwned>(nats: &Nats, bucket: &str) -> HashMap<String, T> {
    let store = nats.jetstream().get_key_value(bucket).await.unwrap();
    let mut keys = store.keys().await.unwrap();
    let mut out = HashMap::new();
    while let Some(k) = keys.next().await {
        let k = k.unwrap();
        if let Some(v) = store.get(&k).await.unwrap() {
            out.insert(k, serde_json::from_slice(&v).unwrap());
        }
    }
    out
}

/// The ledger and the stock, read from their buckets, agree with the orders.
async fn check_invariants(url: &str) {
    let registry = waybill_workflows::registry().unwrap();
    let file = replay::load(&workspace_root().join(MIXED), &registry).unwrap();
    let seed = replay::load_stock(&workspace_root().join("examples/stock.json")).unwrap();
    let mut want: HashMap<Status, usize> = HashMap::new();
    let mut taken: BTreeMap<String, i64> = BTreeMap::new();
    for o in &file.orders {
        *want.entry(o.expect).or_default() += 1;
        if o.expect == Status::Completed {
            for item in o.payload.decode::<Order>().unwrap().items {
                *taken.entry(item.sku).or_default() += item.qty;
            }
        }
    }
    let nats = Nats::connect(url, NatsConfig::default()).await.unwrap();

    let ledger: HashMap<String, serde_json::Value> = bucket_values(&nats, "payments").await;
    let charged_only = ledger
        .values()
        .filter(|e| e["charged"] == true && e["refunded"] == false)
        .count();
    let refunded = ledger.values().filter(|e| e["refunded"] == true).count();
    assert_eq!(
        charged_only,
        want[&Status::Completed],
        "each completed order is charged once"
    );
    assert_eq!(
        refunded,
        want[&Status::Compensated],
        "each compensated order is refunded once"
    );
    assert_eq!(
        ledger.len(),
        want[&Status::Completed] + want[&Status::Compensated],
        "no declined order is charged"
    );

    let stock: HashMap<String, serde_json::Value> = bucket_values(&nats, "inventory").await;
    for (sku, v) in &stock {
        let (available, reserved) = (v["available"].as_i64().unwrap(), v["reserved"].as_i64().unwrap());
        assert_eq!(
            available + reserved,
            initial_stock(&seed, sku),
            "{sku} is not conserved: {v}"
        );
        assert_eq!(reserved, taken.get(sku).copied().unwrap_or(0), "{sku}: {v}");
        assert!(v.get("pending").is_none(), "{sku} kept a pending change: {v}");
    }
    for sku in taken.keys() {
        assert!(stock.contains_key(sku), "{sku} was taken but has no level");
    }
}

fn finish(replay: Proc, workers: Vec<Proc>) -> Vec<(String, u64)> {
    let status = replay.wait(Duration::from_secs(180));
    assert!(status.success(), "the replay failed: {status}");
    workers
        .into_iter()
        .map(|w| {
            let name = w.name.clone();
            let (status, stderr) = w.signal_and_wait("TERM", Duration::from_secs(30));
            assert!(status.success(), "{name}: {status}: {stderr}");
            let steps = stderr
                .lines()
                .find_map(|l| l.split("drained after ").nth(1))
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            (name, steps)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_per_service_share_the_work_and_a_killed_one_loses_nothing() {
    let server = NatsServer::start();
    let url = server.url();
    setup(&url);
    let mut workers: Vec<Proc> = (0..3).flat_map(|i| [worker(i, &url), worker(i, &url)]).collect();
    let mut watch = hop_watch(&url).await;
    let replay = replay_process(&url);

    // Kill one of the two payment workers mid-replay, then start it again.
    wait_for_hops(&mut watch, 2500).await;
    drop(watch);
    workers.remove(0).kill9();
    workers.push(worker(0, &url));

    let steps = finish(replay, workers);
    // The surviving twin of each service took a share of the work.
    for name in ["inventory-worker", "shipping-worker"] {
        let shares: Vec<u64> = steps.iter().filter(|(n, _)| n == name).map(|s| s.1).collect();
        assert!(
            shares.len() == 2 && shares.iter().all(|&n| n > 0),
            "{name} shares: {shares:?}"
        );
    }
    check_invariants(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_and_restarted_mid_replay_loses_nothing() {
    let mut server = NatsServer::start();
    let url = server.url();
    setup(&url);
    let workers: Vec<Proc> = (0..3).map(|i| worker(i, &url)).collect();
    let mut watch = hop_watch(&url).await;
    let replay = replay_process(&url);

    wait_for_hops(&mut watch, 2500).await;
    drop(watch);
    server.restart(); // SIGKILL, then the same port and store

    finish(replay, workers);
    check_invariants(&url).await;
}
