//! The `waybill` command as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::process::{Command, Output};
use waybill_testkit::workspace_root;

fn waybill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("the waybill binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn replay_of_the_examples_succeeds_and_prints_a_table() {
    let out = waybill(&["replay", "--no-progress", "examples/orders"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("orders/s") && stdout.contains("p99 ms"), "{stdout}");
    assert!(stdout.contains("examples/orders/mixed.jsonl"), "{stdout}");
    assert!(stdout.contains("all orders ended as expected"), "{stdout}");
}

#[test]
fn replay_reports_json() {
    let out = waybill(&["replay", "--json", "examples/orders/declined.jsonl"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["files"][0]["failed"], v["files"][0]["orders"]);
    assert!(v["files"][0]["p99_ms"].is_number());
    // The replay's own coordinator tracked the same ends from the hops.
    assert_eq!(v["coordinator"]["disagreements"], serde_json::json!([]), "{v}");
}

#[test]
fn replay_can_show_the_coordinators_live_view() {
    let out = waybill(&["replay", "--watch", "examples/orders/declined.jsonl"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // Not a terminal: the view prints its lines.
    assert!(
        stdout.contains("in flight,") && stdout.contains("partitions 1/1"),
        "{stdout}"
    );
    assert!(stdout.contains("all orders ended as expected"), "{stdout}");
}

#[test]
fn a_mismatch_is_named_and_fails_the_run() {
    let dir = std::env::temp_dir().join(format!("waybill-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wrong.jsonl");
    let line = r#"{"expect":"completed","customer":"c","items":[{"sku":"A","qty":1,"unit_price_cents":1}],"payment":{"card":"4000000000000002"},"ship_to":{"country":"DE","zip":"1"}}"#;
    std::fs::write(&file, format!("{line}\n")).unwrap();
    let out = waybill(&["replay", "--no-progress", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("line 1") && stdout.contains("expected completed, got failed"),
        "{stdout}"
    );
    // The replay's coordinator shows the order's status and history.
    assert!(
        stdout.contains("status    failed") && stdout.contains("payment.charge"),
        "{stdout}"
    );

    std::fs::write(&file, "{oops\n").unwrap();
    let out = waybill(&["replay", "--no-progress", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("wrong.jsonl, line 1: not JSON"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();

    let out = waybill(&["replay", "no/such/file.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no/such/file.jsonl"));
}

#[test]
fn example_orders_are_generated_on_demand() {
    let out = waybill(&["example-orders", "--count", "5", "--kind", "unshippable"]);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    assert!(lines
        .iter()
        .all(|l| l["expect"] == "compensated" && l["ship_to"]["country"] == "XX"));
}

#[test]
fn graph_draws_the_order_route_and_names_what_is_unknown() {
    let out = waybill(&["graph", "order"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mermaid = text(&out.stdout);
    for line in [
        "flowchart TD",
        "s0[\"<b>charge</b><br/>payment.charge<br/>8 tries, 10 s\"]",
        "s1 -- \"out_of_stock\" --> failed",
        "s2 -- \"ok\" --> completed",
    ] {
        assert!(mermaid.contains(line), "missing {line:?}:\n{mermaid}");
    }
    let cooling = text(&waybill(&["graph", "cooling_off"]).stdout);
    assert!(
        cooling.contains("s1[\"<b>charge</b><br/>payment.charge<br/>waits 2 s, 8 tries, 10 s\"]"),
        "the wait is drawn:\n{cooling}"
    );
    let trip = text(&waybill(&["graph", "trip"]).stdout);
    assert!(
        trip.contains("waits for approved (at most 3 s)") && trip.contains("s7 -. \"no approved in time\" .-> failed"),
        "the signal and its timeout are drawn:\n{trip}"
    );
    assert!(
        trip.contains("s0 -- \"ok, fork holds\" --> s2") && trip.contains("s4 -- \"ok, join car: first 1\" --> s5"),
        "the forks and joins are drawn:\n{trip}"
    );
    let dot = text(&waybill(&["graph", "order", "--version", "1", "--format", "dot"]).stdout);
    assert!(dot.starts_with("digraph \"order v1\" {"), "{dot}");

    let out = waybill(&["graph", "order", "--version", "7"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no workflow `order` version 7 (known: cooling_off v1, order v1, trip v1, trip v2)"),
        "{}",
        text(&out.stderr)
    );
    let out = waybill(&["graph", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("nope"), "{}", text(&out.stderr));
}
