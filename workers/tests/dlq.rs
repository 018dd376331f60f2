//! `waybill dlq` over NATS: dead letters listed, shown, sent back to their
//! step, refused when their order moved on, and purged.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use waybill::coordinator::{self, CoordinatorConfig};
use waybill::transport::nats::Nats;
use waybill::transport::NatsConfig;
use waybill::{Client, OrderId, Payload, Status, StepContext, StepError, Worker};
use waybill_testkit::{workspace_root, NatsServer};
use waybill_workers::replay;
use waybill_workers::services::MemoryServices;
use waybill_workflows::samples::{self, Kind};

mod common;
use common::{text, waybill};

const DEADLINE: Duration = Duration::from_secs(20);

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until `n` dead letters are stored: an ordered consumer of the
/// dead-letter stream is given each as it is stored.
async fn until_dead_letters(url: &str, n: usize) {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    use futures::StreamExt;
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let stream = js.get_stream(waybill::transport::nats::DLQ_STREAM).await.unwrap();
    let consumer = stream.create_consumer(OrderedConfig::default()).await.unwrap();
    let mut stored = consumer.messages().await.unwrap();
    for i in 0..n {
        let next = tokio::time::timeout(DEADLINE, stored.next()).await;
        assert!(
            matches!(next, Ok(Some(Ok(_)))),
            "{i} of {n} dead letters stored within {DEADLINE:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_sent_back_to_their_step_and_purged() {
    let server = NatsServer::start();
    let url = server.url();
    let nats = Nats::connect(&url, NatsConfig::default()).await.unwrap();
    nats.setup().await.unwrap();
    let registry = Arc::new(waybill_workflows::registry().unwrap());
    let coordinator = coordinator::start(nats.clone(), Some(registry.clone()), CoordinatorConfig::default())
        .await
        .unwrap();
    let client = Client::connect(nats.clone()).await.unwrap();

    // A payment service that cannot charge (its gateway is away): every
    // delivery is handed back until the deliveries run out, and each of the
    // three orders becomes a dead letter of kind `exhausted`.
    let broken = Worker::builder(nats.clone())
        .serve(
            waybill_workflows::services::PAYMENT_CHARGE,
            |_ctx: StepContext, _p: Payload| async { Err(StepError::defer("gateway away", Duration::from_millis(20))) },
        )
        .max_deliver(2)
        .start()
        .await
        .unwrap();
    let mut ids: Vec<OrderId> = Vec::new();
    for s in samples::of_kind(Kind::Happy, 3, 1) {
        let (wf, p) = registry.prepare(waybill_workflows::ORDER, &s.order).unwrap();
        ids.push(client.start(&wf, p).await.unwrap());
    }
    until_dead_letters(&url, 3).await;
    broken.shutdown().await;

    // Listed, with the order and hop each one holds.
    let list = json(&waybill(&url, &["dlq", "list", "--json"]));
    let letters = list.as_array().unwrap();
    assert_eq!(letters.len(), 3, "{list}");
    for l in letters {
        assert_eq!(l["kind"], "exhausted", "{l}");
        assert_eq!(l["service"], "payment.charge", "{l}");
        assert_eq!(l["hop"], 0, "{l}");
        assert!(ids.iter().any(|id| l["order"] == id.to_string()), "{l}");
    }
    let seqs: Vec<u64> = letters.iter().map(|l| l["sequence"].as_u64().unwrap()).collect();
    let table = waybill(&url, &["dlq", "list", "--kind", "exhausted", "--since", "1h"]);
    assert!(table.status.success());
    assert!(
        text(&table.stdout).contains("3 dead letter(s)"),
        "{}",
        text(&table.stdout)
    );
    let none = json(&waybill(&url, &["dlq", "list", "--kind", "invalid", "--json"]));
    assert_eq!(none, serde_json::json!([]));
    let shown = waybill(&url, &["dlq", "show", &seqs[0].to_string()]);
    assert!(
        text(&shown.stdout).contains("gateway away, on delivery 2 of at most 2"),
        "{}",
        text(&shown.stdout)
    );

    // A healthy payment service is back: the first letter goes back to its
    // step and its order completes, charged once.
    let stock = replay::load_stock(&workspace_root().join("examples/stock.json")).unwrap();
    let services = MemoryServices::new(stock);
    let healthy = services
        .serve(Worker::builder(nats.clone()).max_deliver(2))
        .start()
        .await
        .unwrap();
    let sent = json(&waybill(&url, &["dlq", "redrive", &seqs[0].to_string(), "--json"]));
    assert_eq!(sent[0]["result"], "sent", "{sent}");
    let first: OrderId = letters[0]["order"].as_str().unwrap().parse().unwrap();
    let doc = tokio::time::timeout(DEADLINE, client.wait(first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.status, Status::Completed);
    assert_eq!(
        nats.dead_letter_count().await.unwrap(),
        2,
        "the redriven letter is gone"
    );

    // Sent and deleted: naming it again is an error.
    let again = waybill(&url, &["dlq", "redrive", &seqs[0].to_string()]);
    assert!(!again.status.success(), "a letter already gone is an error");
    assert!(
        text(&again.stderr).contains("no dead letter"),
        "{}",
        text(&again.stderr)
    );

    // Purge: a dry run first, then for real.
    let dry = waybill(&url, &["dlq", "purge", "--all"]);
    assert!(dry.status.success());
    assert!(text(&dry.stdout).contains("would delete 2"), "{}", text(&dry.stdout));
    assert_eq!(nats.dead_letter_count().await.unwrap(), 2);
    let purged = json(&waybill(
        &url,
        &["dlq", "purge", &seqs[1].to_string(), "--yes", "--json"],
    ));
    assert_eq!(purged, serde_json::json!([seqs[1]]));
    assert_eq!(nats.dead_letter_count().await.unwrap(), 1);

    // Redrive --all sends the last one; its order completes.
    let sent = json(&waybill(&url, &["dlq", "redrive", "--all", "--json"]));
    assert_eq!(sent.as_array().unwrap().len(), 1, "{sent}");
    let last: OrderId = letters[2]["order"].as_str().unwrap().parse().unwrap();
    let doc = tokio::time::timeout(DEADLINE, client.wait(last))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.status, Status::Completed);
    assert_eq!(nats.dead_letter_count().await.unwrap(), 0);

    healthy.shutdown().await;
    client.close().await;
    coordinator.shutdown().await;
}

#[test]
fn a_redrive_is_refused_once_the_order_moved_on_or_ended() {
    use waybill_workers::dlq::may_redrive;
    let status = |hop: u32, status: Status| -> waybill::coordinator::api::StatusReply {
        serde_json::from_value(serde_json::json!({
            "id": OrderId::new(), "workflow": "order", "version": 1, "status": status, "step": "charge",
            "hop": hop, "attempt": 1, "sequence": 9, "last_hop_at": "x", "stalled": false, "history": [],
            "partition": "0/1"
        }))
        .unwrap()
    };
    assert!(may_redrive(2, &status(2, Status::Running)).is_ok());
    let moved = may_redrive(2, &status(3, Status::Running)).unwrap_err();
    assert!(moved.contains("moved on to hop 3"), "{moved}");
    let ended = may_redrive(2, &status(2, Status::Completed)).unwrap_err();
    assert!(ended.contains("already ended completed"), "{ended}");
}
