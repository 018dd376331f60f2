//! A golden, readable record of the order workflow on the reference
//! services: one order of every kind, with its injected failures, retries
//! and compensations. A change of behaviour shows up as a diff of
//! `tests/golden/order_flows.txt` in review.
//!
//! To accept a deliberate change: `WAYBILL_BLESS=1 cargo test -p waybill-workers --test golden`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;
use std::time::Duration;

use waybill_workers::replay::{self, EmbeddedRuntime, ReplayOptions};
use waybill_workers::services::tracking_number;
use waybill_workflows::samples::{self, Kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_flows_read_as_recorded() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let stock = replay::load_stock(&root.join("../examples/stock.json")).unwrap();
    let engine = EmbeddedRuntime::start(stock, &ReplayOptions::default()).await.unwrap();
    let registry = waybill_workflows::registry().unwrap();

    let mut record = String::new();
    for (title, kind) in [
        ("a happy order", Kind::Happy),
        ("a declined card", Kind::Declined),
        ("a flaky payment gateway", Kind::Transient),
        ("not enough stock", Kind::OutOfStock),
        ("an address that cannot be shipped to", Kind::Unshippable),
    ] {
        let sample = samples::of_kind(kind, 1, 2026).remove(0);
        let (workflow, payload) = registry.prepare("order", &sample.order).unwrap();
        let id = engine.client.start(&workflow, payload).await.unwrap();
        let doc = tokio::time::timeout(Duration::from_secs(10), engine.client.wait(id))
            .await
            .unwrap()
            .unwrap();
        // Ids and the tracking number derived from them change every run.
        let text = doc
            .journal()
            .to_string()
            .replace(&tracking_number(id), "<tracking number>")
            .replace(&id.to_string(), "<order id>");
        record.push_str(&format!("# {title}\n{text}\n"));
    }
    engine.shutdown().await;

    let golden = root.join("tests/golden/order_flows.txt");
    if std::env::var_os("WAYBILL_BLESS").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &record).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_default();
    assert!(
        want == record,
        "the order flows changed; if that is intended, run with WAYBILL_BLESS=1.\n--- recorded\n{want}\n--- now\n{record}"
    );
}
