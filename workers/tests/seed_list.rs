//! Every program takes a seed list: `--nats` or `NATS_URL` as a
//! comma-separated list of servers whose first is dead (a port nothing
//! listens on). `waybill setup`, the three workers, `waybill coordinator`,
//! `waybill start` and `waybill status` all connect to the live one, and the
//! orders complete. Once with `--nats`, once with `NATS_URL`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::process::{Command, Output};
use std::time::Duration;

use futures::StreamExt;
use waybill_testkit::{workspace_root, NatsServer, Proc};

const WAYBILL: &str = env!("CARGO_BIN_EXE_waybill");
const WORKERS: [(&str, &str); 3] = [
    ("payment-worker", env!("CARGO_BIN_EXE_payment-worker")),
    ("inventory-worker", env!("CARGO_BIN_EXE_inventory-worker")),
    ("shipping-worker", env!("CARGO_BIN_EXE_shipping-worker")),
];
const HAPPY: &str = "examples/orders/happy.jsonl";

/// How the list reaches the programs.
#[derive(Debug, Clone, Copy)]
enum Given {
    Flag,
    Env,
}

/// A loopback port nothing listens on: bound, then let go.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `bin args…`, given `list` as `--nats` or as `NATS_URL`; bounded
/// connection attempts, so no program waits long on its own.
fn command(bin: &str, args: &[&str], list: &str, given: Given) -> Command {
    let mut c = Command::new(bin);
    c.args(args)
        .current_dir(workspace_root())
        .env_remove("NATS_URL")
        .env("RUST_LOG", "warn,waybill_workers::cli=info");
    match given {
        Given::Flag => {
            c.args(["--nats", list]);
        }
        Given::Env => {
            c.env("NATS_URL", list);
        }
    }
    c.args(["--connect-timeout", "10"]);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(bin: &str, args: &[&str], list: &str, given: Given) -> Output {
    let out = command(bin, args, list, given).output().unwrap();
    assert!(
        out.status.success(),
        "{bin} {args:?} with {list} ({given:?}) failed: {}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    out
}

async fn every_program_connects_through_a_list_whose_first_server_is_dead(given: Given) {
    let server = NatsServer::start();
    // The dead node first; the live one without its scheme, after a space.
    let list = format!("nats://127.0.0.1:{}, 127.0.0.1:{}", dead_port(), server.port());

    let setup = run(WAYBILL, &["setup", "--stock", "examples/stock.json"], &list, given);
    assert!(text(&setup.stdout).contains("are ready on"), "{}", text(&setup.stdout));

    let mut procs: Vec<Proc> = WORKERS
        .iter()
        .map(|(name, bin)| Proc::spawn(*name, command(bin, &[], &list, given)))
        .collect();
    procs.push(Proc::spawn(
        "waybill coordinator",
        command(WAYBILL, &["coordinator"], &list, given),
    ));
    for p in &mut procs[..3] {
        p.expect_stderr(" serving", Duration::from_secs(30));
    }
    procs[3].expect_stderr("replayed", Duration::from_secs(30));

    // Every finished order's terminal hop, seen as it is stored.
    let watcher = async_nats::connect(server.url()).await.unwrap();
    let mut done = watcher.subscribe("waybill.done.>").await.unwrap();
    watcher.flush().await.unwrap();

    let start = run(
        WAYBILL,
        &["start", "order", HAPPY, "--timeout", "5", "--retry-for", "20"],
        &list,
        given,
    );
    let ids: Vec<String> = text(&start.stdout).lines().map(str::to_owned).collect();
    let want = std::fs::read_to_string(workspace_root().join(HAPPY))
        .unwrap()
        .lines()
        .count();
    assert_eq!(ids.len(), want, "one id per order: {}", text(&start.stdout));
    for id in &ids {
        id.parse::<waybill::OrderId>()
            .unwrap_or_else(|e| panic!("`{id}` is not an order id: {e}"));
    }

    for _ in 0..ids.len() {
        tokio::time::timeout(Duration::from_secs(30), done.next())
            .await
            .expect("an order did not finish within 30 s")
            .unwrap();
    }
    // The coordinator reads the stream beside the workers and may be a
    // moment behind the last terminal hop: an orders request with `after`
    // is answered once its view has read that hop (it waits for it).
    let js = async_nats::jetstream::new(watcher.clone());
    let last = js
        .get_stream(waybill::transport::nats::HOPS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    let query = waybill::coordinator::api::OrdersQuery {
        after: Some(last),
        ..Default::default()
    };
    // Each answer waits up to 5 s for the view; past that it says to ask
    // again.
    let transport =
        waybill::transport::Nats::with_client(watcher.clone(), waybill::transport::NatsConfig::default()).unwrap();
    let mut answer = Err(String::new());
    for _ in 0..4 {
        answer = waybill_workers::ops::orders(&transport, &query, Duration::from_secs(10))
            .await
            .map_err(|e| format!("{e:#}"));
        if answer.is_ok() {
            break;
        }
    }
    if let Err(e) = answer {
        panic!("the coordinator did not read up to hop {last} within 20 s: {e}");
    }
    for id in &ids {
        let out = run(WAYBILL, &["status", id, "--json"], &list, given);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["status"], "completed", "order {id}: {v}");
    }
    for mut p in procs {
        assert!(p.alive(), "{} exited", p.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_list_given_with_nats() {
    every_program_connects_through_a_list_whose_first_server_is_dead(Given::Flag).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_list_given_in_nats_url() {
    every_program_connects_through_a_list_whose_first_server_is_dead(Given::Env).await;
}

#[test]
fn a_wrong_entry_is_named() {
    for (list, want) in [
        (
            "nats://127.0.0.1:4222,nats://127.0.0.1:42x3",
            "NATS server `nats://127.0.0.1:42x3` (entry 2 of the list) is invalid: port `42x3`",
        ),
        (
            "nats://127.0.0.1:4222,,127.0.0.1:4223",
            "entry 2 of the NATS server list",
        ),
        ("http://127.0.0.1:4222", "unknown scheme `http`"),
    ] {
        for given in [Given::Flag, Given::Env] {
            let out = command(WAYBILL, &["setup"], list, given).output().unwrap();
            assert!(!out.status.success(), "{list} was accepted");
            let err = text(&out.stderr);
            assert!(err.contains(want), "{list} ({given:?}): expected `{want}` in {err}");
        }
    }
}
