//! End to end over NATS, as a user deploys it: `waybill setup`, the three
//! worker binaries as separate processes, and `waybill replay --nats`, all
//! against a throwaway nats-server started by the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::process::{Command, Output};
use std::time::Duration;

use waybill_testkit::{http_get, workspace_root, NatsServer, Proc};

fn waybill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap()
}

fn worker(name: &'static str, bin: &str, url: &str) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.args(["--nats", url])
        .current_dir(workspace_root())
        .env("RUST_LOG", "warn");
    Proc::spawn(name, cmd)
}

fn workers(url: &str) -> Vec<Proc> {
    vec![
        worker("payment-worker", env!("CARGO_BIN_EXE_payment-worker"), url),
        worker("inventory-worker", env!("CARGO_BIN_EXE_inventory-worker"), url),
        worker("shipping-worker", env!("CARGO_BIN_EXE_shipping-worker"), url),
        worker("trip-worker", env!("CARGO_BIN_EXE_trip-worker"), url),
    ]
}

/// A coordinator: the trip flows' signals and cancels go through it.
fn coordinator(url: &str) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_waybill"));
    cmd.args(["coordinator", "--nats", url])
        .current_dir(workspace_root())
        .env("RUST_LOG", "warn");
    Proc::spawn("coordinator", cmd)
}

#[test]
fn the_mixed_flows_replay_across_worker_processes() {
    let server = NatsServer::start();
    let url = server.url();
    let setup = waybill(&["setup", "--nats", &url, "--stock", "examples/stock.json"]);
    assert!(setup.status.success(), "{}", String::from_utf8_lossy(&setup.stderr));
    // Idempotent: a second setup finds the streams as they should be.
    let again = waybill(&["setup", "--nats", &url, "--stock", "examples/stock.json"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 SKUs seeded, 5 kept their level"));

    let mut procs = workers(&url);
    procs.push(coordinator(&url));
    let out = waybill(&["replay", "--no-progress", "--nats", &url, "examples/orders"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("examples/orders/mixed.jsonl") && stdout.contains("all orders ended as expected"));
    // The trip's flows (parallel holds, a branch failing and every hold
    // undone, a join of the first car desk, signals before and after the
    // step, a duplicate, a deadline passing, cancels while branches run,
    // asleep and waiting) ran too.
    let trip = stdout
        .lines()
        .find(|l| l.starts_with("examples/orders/trip.jsonl"))
        .unwrap();
    let counts: Vec<&str> = trip.split_whitespace().skip(1).take(6).collect();
    assert_eq!(counts, ["12", "4", "0", "5", "3", "0"], "{trip}");

    // SIGTERM drains every worker (and the coordinator), which then exits 0.
    for p in procs {
        let name = p.name.clone();
        let (status, stderr) = p.signal_and_wait("TERM", Duration::from_secs(20));
        assert!(status.success(), "{name} exited with {status}: {stderr}");
    }
}

#[test]
fn a_worker_refuses_to_start_without_the_streams() {
    let server = NatsServer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_shipping-worker"))
        .args(["--nats", &server.url()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WAYBILL_HOPS") && stderr.contains("waybill setup"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_server_is_reported_after_the_connect_timeout() {
    let url = {
        let server = NatsServer::start();
        server.url()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_payment-worker"))
        .args(["--nats", &url, "--connect-timeout", "1"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("could not reach NATS") && stderr.contains("within 1 s"),
        "{stderr}"
    );
}

/// The port of the `metrics on http://127.0.0.1:<port>/metrics` line.
fn port_in(line: &str) -> u16 {
    line.rsplit("127.0.0.1:")
        .next()
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// The sum of a series' samples whose labels contain `labels` (all of
/// them for `""`), from the OpenMetrics text.
fn sum_of(text: &str, series: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{series}{{")) || l.starts_with(&format!("{series} ")))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_worker_and_the_coordinator_serve_metrics_that_agree_with_their_counts() {
    let server = NatsServer::start();
    let url = server.url();
    let setup = waybill(&["setup", "--nats", &url, "--stock", "examples/stock.json"]);
    assert!(setup.status.success(), "{}", String::from_utf8_lossy(&setup.stderr));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_payment-worker"));
    cmd.args(["--nats", &url, "--metrics", "127.0.0.1:0"])
        .current_dir(workspace_root())
        .env("RUST_LOG", "warn,waybill_workers::cli=info");
    let mut payment = Proc::spawn("payment-worker", cmd);
    let port = port_in(&payment.expect_stderr("metrics on http://", Duration::from_secs(30)));
    let others = vec![
        worker("inventory-worker", env!("CARGO_BIN_EXE_inventory-worker"), &url),
        worker("shipping-worker", env!("CARGO_BIN_EXE_shipping-worker"), &url),
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_waybill"));
    cmd.args(["coordinator", "--nats", &url, "--http", "127.0.0.1:0"])
        .current_dir(workspace_root());
    let mut coordinator = Proc::spawn("coordinator", cmd);
    let coordinator_port = port_in(&coordinator.expect_stderr("metrics on http://", Duration::from_secs(30)));
    let out = waybill(&["replay", "--json", "--nats", &url, "examples/orders/mixed.jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = &report["files"][0];

    // Every order has ended: no step runs any more.
    let text = http_get(port, "/metrics").unwrap();
    let hops = sum_of(&text, "waybill_hops_total", "");
    let timed = sum_of(&text, "waybill_step_duration_seconds_count", "");
    assert!(hops > 0.0 && hops == timed, "{text}");
    assert!(
        sum_of(&text, "waybill_hops_total", r#"outcome="declined""#) > 0.0,
        "{text}"
    );
    assert!(
        sum_of(&text, "waybill_hops_total", r#"outcome="transient""#) > 0.0,
        "{text}"
    );
    assert!(
        sum_of(&text, "waybill_hops_total", r#"service="payment.refund""#) > 0.0,
        "{text}"
    );
    assert!(
        text.contains(r#"waybill_build_info{program="payment-worker""#),
        "{text}"
    );
    assert!(sum_of(&text, "process_cpu_seconds_total", "") > 0.0, "{text}");
    assert!(sum_of(&text, "process_resident_memory_bytes", "") > 0.0, "{text}");

    // The coordinator's counts of the ends agree with the replay's, once it
    // has read every hop: asked with `after` the stream's last sequence, it
    // answers only when its view has read that far (each ask waits up to
    // 5 s there; asked again while it catches up, 20 s in all).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            use waybill::coordinator::api::OrdersQuery;
            use waybill::coordinator::CoordinatorClient;
            use waybill::transport::nats::{Nats, NatsConfig};
            use waybill::transport::HopLog;
            let nats = Nats::connect(&url, NatsConfig::default()).await.unwrap();
            let last = nats.log_info().await.unwrap().last_sequence;
            let coordinators = CoordinatorClient::new(nats, Duration::from_secs(10));
            let read_all = OrdersQuery {
                after: Some(last),
                limit: Some(0),
                ..OrdersQuery::default()
            };
            let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                match coordinators.orders(&read_all).await {
                    Ok(_) => break,
                    Err(e) if tokio::time::Instant::now() < give_up => {
                        eprintln!("the coordinator has not read to {last} yet: {e}");
                    }
                    Err(e) => panic!("the coordinator never read to sequence {last}: {e}"),
                }
            }
        });
    let seen = http_get(coordinator_port, "/metrics").unwrap();
    for status in ["completed", "failed", "compensated"] {
        let counted = sum_of(&seen, "waybill_orders_finished_total", &format!(r#"status="{status}""#));
        assert_eq!(counted, file[status].as_f64().unwrap(), "{status}: {seen}");
        // All still tracked (well within the retention), by workflow.
        let tracked = sum_of(
            &seen,
            "waybill_orders",
            &format!(r#"workflow="order",status="{status}""#),
        );
        assert_eq!(tracked, file[status].as_f64().unwrap(), "{status}: {seen}");
    }
    assert_eq!(sum_of(&seen, "waybill_orders_in_flight", ""), 0.0, "{seen}");
    assert!(sum_of(&seen, "waybill_coordinator_hops_read_total", "") > 0.0, "{seen}");
    let (status, stderr) = coordinator.signal_and_wait("TERM", Duration::from_secs(20));
    assert!(status.success(), "{stderr}");

    // The worker's own count of its steps, as it drains, is the same.
    let (status, stderr) = payment.signal_and_wait("TERM", Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    let steps: f64 = stderr
        .split("drained after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line in {stderr}"));
    assert_eq!(hops, steps, "{text}");
    for p in others {
        let (status, stderr) = p.signal_and_wait("TERM", Duration::from_secs(20));
        assert!(status.success(), "{stderr}");
    }
}
