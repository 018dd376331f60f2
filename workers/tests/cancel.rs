//! `waybill cancel` over NATS: an order cancelled while its step runs stops
//! at its next hop, its completed step is undone, and it ends `cancelled`;
//! an order that ended cannot be cancelled.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use waybill::coordinator::{self, CoordinatorConfig};
use waybill::transport::nats::Nats;
use waybill::transport::NatsConfig;
use waybill::{Client, Payload, Status, StepContext, StepError, StepOutput, Worker};
use waybill_testkit::NatsServer;
use waybill_workflows::samples::{self, Kind};
use waybill_workflows::services::{
    INVENTORY_RELEASE, INVENTORY_RESERVE, PAYMENT_CHARGE, PAYMENT_REFUND, SHIPPING_DISPATCH,
};

mod common;
use common::{text, waybill};

const DEADLINE: Duration = Duration::from_secs(20);

fn counted(calls: &Arc<AtomicUsize>) -> impl waybill::Handler {
    let calls = calls.clone();
    move |_ctx: StepContext, _p: Payload| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Ok(StepOutput::ok()) }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_cancelled_while_its_step_runs_is_undone_and_ends_cancelled() {
    let server = NatsServer::start();
    let url = server.url();
    let nats = Nats::connect(&url, NatsConfig::default()).await.unwrap();
    nats.setup().await.unwrap();
    let registry = Arc::new(waybill_workflows::registry().unwrap());
    let coordinator = coordinator::start(nats.clone(), Some(registry.clone()), CoordinatorConfig::default())
        .await
        .unwrap();
    let client = Client::connect(nats.clone()).await.unwrap();

    // The charge waits at a gate the test opens.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(tokio::sync::Notify::new());
    let charge = {
        let (gate, entered) = (gate.clone(), entered.clone());
        move |_ctx: StepContext, _p: Payload| {
            let (gate, entered) = (gate.clone(), entered.clone());
            async move {
                entered.notify_one();
                let _permit = gate.acquire().await.map_err(|_| StepError::transient("closed"))?;
                Ok(StepOutput::ok())
            }
        }
    };
    let calls: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let worker = Worker::builder(nats.clone())
        .serve(PAYMENT_CHARGE, charge)
        .serve(PAYMENT_REFUND, counted(&calls[0]))
        .serve(INVENTORY_RESERVE, counted(&calls[1]))
        .serve(INVENTORY_RELEASE, counted(&calls[2]))
        .serve(SHIPPING_DISPATCH, counted(&calls[3]))
        .start()
        .await
        .unwrap();

    let order = &samples::of_kind(Kind::Happy, 1, 3)[0].order;
    let (wf, p) = registry.prepare(waybill_workflows::ORDER, order).unwrap();
    let id = client.start(&wf, p).await.unwrap();
    tokio::time::timeout(DEADLINE, entered.notified()).await.unwrap();

    let out = waybill(&url, &["cancel", &id.to_string(), "--reason", "customer asked"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stdout).contains("stops at its next hop"),
        "{}",
        text(&out.stdout)
    );
    // The worker shares this connection's set of cancels: wait until its
    // follower has seen this one, then let the charge finish.
    assert!(nats.cancel_seen(&id, DEADLINE).await, "the worker never saw the cancel");
    gate.add_permits(1);

    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Cancelled, "{:?}", doc.failure);
    let n: Vec<usize> = calls.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(
        n,
        [1, 0, 0, 0],
        "the charge refunded once; nothing reserved, released or shipped"
    );

    // The coordinator shows the cancel in the history.
    let status = waybill(&url, &["status", &id.to_string(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["status"], "cancelled", "{v}");
    let history = v["history"].as_array().unwrap();
    assert!(history.iter().any(|h| h["cancelled"] == "customer asked"), "{v}");

    // An order that ended cannot be cancelled.
    let again = waybill(&url, &["cancel", &id.to_string()]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already ended cancelled"),
        "{}",
        text(&again.stderr)
    );
    let bad = waybill(&url, &["cancel", "not-an-id"]);
    assert!(!bad.status.success());

    worker.shutdown().await;
    client.close().await;
    coordinator.shutdown().await;
}
