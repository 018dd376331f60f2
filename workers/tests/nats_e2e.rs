//! End to end over NATS, as a user deploys it: `waybill setup`, the three
//! worker binaries as separate processes, and `waybill replay --nats`, all
//! against a throwaway nats-server started by the test.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::{Command, Output};
use std::time::Duration;

use waybill_testkit::{workspace_root, NatsServer, Proc};

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
    ]
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

    let procs = workers(&url);
    let out = waybill(&["replay", "--no-progress", "--nats", &url, "examples/orders"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("examples/orders/mixed.jsonl") && stdout.contains("all orders ended as expected"));

    // SIGTERM drains every worker, which then exits 0.
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
